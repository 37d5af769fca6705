"""engine.options: one place for the ranges of the run and serve options (CLI, server, Engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.errors import EngineError
from engine.executor import Engine
from engine.options import FLAGS, OptionError, RunOptions, ServeLimits

SERVE = {"port": 8765, "max_queue": 64, "max_body_bytes": 1024, "history": 10}


@pytest.mark.parametrize(("values", "message"), [
    ({"max_concurrent": 0}, "max_concurrent must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"batch_window_seconds": -0.5}, "batch_window_seconds must be at least 0, got -0.5"),
    ({"job_timeout": 0}, "job_timeout must be more than 0, got 0"),
    ({"decode": "fast"}, "decode must be one of 'auto', 'dynamic' or 'static', got 'fast'"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"weights": "zeros"}, "weights must be one of 'pretrained' or 'random', got 'zeros'"),
    ({"bogus": 1}, "bogus is not an option here"),
])
def test_run_options_name_the_keyword(values: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError) as err:
        RunOptions.check(**values)
    assert err.value.message.startswith(message)
    assert err.value.code == "usage" and err.value.field == next(iter(values))
    assert isinstance(err.value, ValueError) and isinstance(err.value, EngineError)


def test_defaults_and_good_values_pass() -> None:
    assert RunOptions.check().engine_kwargs() == {
        "max_concurrent": 1, "batch_size": None, "batch_window_seconds": 0.0,
        "job_timeout": None, "decode": "auto", "dtype": None, "weights": "pretrained"}
    run = RunOptions.check(max_concurrent=4, batch_size=1, batch_window_seconds=0,
                           job_timeout=0.05, decode="static", dtype="bfloat16")
    assert (run.max_concurrent, run.batch_size, run.job_timeout) == (4, 1, 0.05)
    assert ServeLimits.check(**{**SERVE, "port": 0, "max_queue": 0, "history": 0}).port == 0


@pytest.mark.parametrize(("values", "message"), [
    ({"port": -1}, "--port must be at least 0, got -1"),
    ({"port": 65536}, "--port must be at most 65535, got 65536"),
    ({"max_queue": -1}, "--max-queue must be at least 0, got -1"),
    ({"max_body_bytes": 0}, "--max-body-bytes must be at least 1, got 0"),
    ({"history": -1}, "--history must be at least 0, got -1"),
    ({"shutdown_timeout": -1.0}, "--shutdown-timeout must be at least 0, got -1.0"),
])
def test_serve_limits_name_the_flag(values: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=f"^{message}$") as err:
        ServeLimits.check(FLAGS, **{**SERVE, **values})
    assert err.value.option == message.split()[0]


def test_engine_checks_its_options_before_touching_hardware() -> None:
    with pytest.raises(ValueError, match=r"^batch_size must be at least 1, got 0$"):
        Engine(batch_size=0, hardware=object())  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="max_concurrent must be at least 1"):
        Engine(max_concurrent=0, hardware=object())  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"^dtype must be one of"):
        Engine(dtype="fp16", hardware=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["serve", "--port", "70000"], "--port must be at most 65535, got 70000"),
    (["serve", "--max-queue", "-1"], "--max-queue must be at least 0, got -1"),
    (["serve", "--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0"),
    (["serve", "--batch-window", "-1"], "--batch-window must be at least 0, got -1.0"),
    (["serve", "--job-timeout", "0"], "--job-timeout must be more than 0, got 0.0"),
    (["mine", "--coordinator", "http://127.0.0.1:9", "--dialect", "doc", "--max-concurrent",
      "0"], "--max-concurrent must be at least 1, got 0"),
    (["mine", "--coordinator", "http://127.0.0.1:9", "--dialect", "doc", "--batch-size", "-2"],
     "--batch-size must be at least 1, got -2"),
    (["mine", "--coordinator", "http://127.0.0.1:9", "--dialect", "doc", "--timeout", "-1"],
     "--timeout must be more than 0, got -1.0"),
    (["run", "tiny", "--prompt", "x", "--timeout", "0"], "--timeout must be more than 0, got 0.0"),
])
def test_the_cli_names_the_flag_and_exits_2(argv: list[str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--state-dir", str(tmp_path)] if argv[0] != "run" else argv) == 2
    assert capsys.readouterr().err.strip() == f"aitbc-engine: error: usage: {message}"
