"""``aitbc-engine verify``: exit status 0 accepted, 1 rejected, 2 unusable input; JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.executor import Engine
from engine.jobs import Job


@pytest.fixture(scope="module")
def files(registry_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("verify-cli")
    job = Job(model="tiny-gpt2", prompt="Hello GPU", params={"max_tokens": 6})  # type: ignore
    with Engine(registry_path, devices=["cpu"]) as eng:
        result = eng.run(job)
    assert result.ok
    (base / "job.json").write_text(job.to_json())
    (base / "result.json").write_text(result.to_json())
    forged = result.to_dict()
    forged["result_hash"] = "sha256:" + "1" * 64
    (base / "forged.json").write_text(json.dumps(forged))
    (base / "garbage.json").write_text("not json at all")
    return {p.stem: p for p in base.iterdir()}


def verify_args(registry_path: Path, job: Path, result: Path, *extra: str) -> list[str]:
    return ["verify", "--registry", str(registry_path), "--job", str(job), "--result",
            str(result), *extra]


def test_accepted_result_exits_0_with_json(registry_path: Path, files: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for mode in ("integrity", "tolerant"):
        code = main(verify_args(registry_path, files["job"], files["result"], "--mode", mode,
                                "--json"))
        verdict = json.loads(capsys.readouterr().out)
        assert code == 0 and verdict["accepted"] is True and verdict["mode"] == mode
        assert verdict["reasons"] == [] and verdict["cost_seconds"] > 0


def test_rejected_result_exits_1(registry_path: Path, files: dict[str, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(verify_args(registry_path, files["job"], files["forged"], "--mode", "integrity"))
    out = capsys.readouterr().out
    assert code == 1 and "REJECTED" in out and "does not recompute" in out
    code = main(verify_args(registry_path, files["job"], files["forged"], "--weights", "random",
                            "--json"))
    verdict = json.loads(capsys.readouterr().out)
    assert code == 1 and verdict["accepted"] is False


def test_unusable_input_exits_2(registry_path: Path, files: dict[str, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(verify_args(registry_path, files["job"], files["garbage"])) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(verify_args(registry_path, files["garbage"], files["result"])) == 2
    missing = files["job"].parent / "missing.json"
    assert main(verify_args(registry_path, missing, files["result"])) == 2
    assert "cannot read the job file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(verify_args(registry_path, files["job"], files["result"], "--mode", "bitwise"))
