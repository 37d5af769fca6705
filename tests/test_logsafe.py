"""Log records cannot be split or forged by input, and never hold a credential.

The CLI's logging (``_configure_logging``, as ``-v`` sets it up) and uvicorn's
access log under ``serve -v`` (a real server on loopback) are checked as
installed, on real log records from the engine and uvicorn.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from engine import Engine
from engine.cli import _configure_logging
from engine.jobs import GenerationParams, Job
from engine.server import ServeOptions, build_server, create_app

TOKEN = "logsafe-token-0123456789abcdef"
SECRET = "s3cr3t-query-value-42"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


@pytest.fixture()
def cli_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What the CLI's ``-v`` logging writes (its own handler, on a fresh root logger)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    _configure_logging(1)
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buf = io.StringIO()
    handler.setStream(buf)
    yield buf
    handler.close()


@pytest.fixture(scope="module")
def engine(registry_path: Path) -> Iterator[Engine]:
    with Engine(registry_path, devices=["cpu"], job_timeout=60) as eng:
        yield eng


FORGED = "2025-01-01 00:00:00,000 ERROR engine: FORGED"


def _one_line_per_record(text: str, records: int) -> None:
    lines = text.split("\n")[:-1]
    assert len(lines) == records, text
    for line in lines:
        assert LINE_START.match(line), line
        assert "\r" not in line and "\u2028" not in line


def test_a_job_id_cannot_add_a_log_line_over_the_api(cli_log: io.StringIO,
                                                      engine: Engine) -> None:
    """The issue's case: a job id holding a newline, posted to the API, once made the
    finished job's log line two lines."""
    with TestClient(create_app(engine, token=TOKEN),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        r = client.post("/v1/jobs", json={"type": "inference", "model": "tiny-gpt2",
                                          "prompt": "x", "max_tokens": 1,
                                          "job_id": f"job-1\n{FORGED}"})
        assert r.status_code == 422  # refused now; before, it ran and was logged
        good = client.post("/v1/jobs", json={"type": "inference", "model": "tiny-gpt2",
                                             "prompt": "x", "max_tokens": 1})
        assert good.status_code == 200
    text = cli_log.getvalue()
    assert not any(line.startswith(FORGED[:10]) for line in text.split("\n")), text
    assert all(LINE_START.match(line) for line in text.split("\n")[:-1]), text


def test_input_in_a_log_record_stays_on_its_line(cli_log: io.StringIO,
                                                 engine: Engine) -> None:
    # A library caller may build a job without validation: its finished job's line (the
    # engine's own log call) still cannot be split.
    job = Job.model_construct(job_id=f"job-2\r\n{FORGED}", model="tiny-gpt2",
                              task="text-generation", prompt="hi",
                              params=GenerationParams(max_tokens=1))
    assert engine.run(job).ok
    logging.getLogger("engine.test").warning("prompt %r and %s", "a\r\nFAKE",
                                             "hi\r\nFAKE \u2028FAKE")
    text = cli_log.getvalue()
    _one_line_per_record(text, 2)
    assert "job-2\\r\\n2025-01-01" in text
    assert "hi\\r\\nFAKE \\u2028FAKE" in text


def test_tracebacks_keep_their_lines_but_not_the_message_s(cli_log: io.StringIO) -> None:
    log = logging.getLogger("engine.test")
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("bad id 'a\nFORGED line' token=abc123") from exc
    except ValueError:
        log.exception("job %s failed", "x\ny")
    lines = cli_log.getvalue().rstrip("\n").split("\n")
    assert LINE_START.match(lines[0]) and lines[0].endswith("job x\\ny failed")
    assert "Traceback (most recent call last):" in lines
    assert any(line.startswith("  File ") for line in lines)  # the frames stay readable
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == "ValueError: bad id 'a\\nFORGED line' token=***"
    assert not any(line.startswith("FORGED") for line in lines)


def test_the_formatter_escapes_and_redacts() -> None:
    from engine.logsafe import REDACTED, escape_controls, redact

    assert escape_controls("a\r\nb\tc\x00d\x1b[31me\x85f\u2028g") == \
        "a\\r\\nb\\tc\\x00d\\x1b[31me\\x85f\\u2028g"
    for text, secret in [
        ("GET /v1/models?token=abc123&x=1", "abc123"),
        ("/x?api_key=v1&apikey=v2&key=v3&access_token=v4&password=v5", "v"),
        ("Authorization: Bearer abc.def", "abc.def"),
        ('{"Authorization": "Basic dXNlcjpwdw=="}', "dXNlcjpwdw"),
        ("sent Bearer zzz== upstream", "zzz"),
        ('{"api_key": "q\\"w", "n": 1}', 'q\\"w'),
        ("--api-key=zz9 --token=zz8", "zz"),
    ]:
        out = redact(text)
        assert secret not in out and REDACTED in out, (text, out)
    kept = "max_tokens=5 prompt_tokens=3 result_hash=sha256:ab weights_digest=sha256:cd"
    assert redact(kept) == kept


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_serve_v_access_log_redacts_a_query_token(registry_path: Path) -> None:
    """``serve -v`` (log level debug): a real uvicorn access log on loopback."""
    with Engine(registry_path, devices=["cpu"]) as engine:  # the server closes it
        sock = _free_socket()
        server = build_server(engine, ServeOptions(port=sock.getsockname()[1], token=TOKEN,
                                                   log_level="debug"))
        assert server.config.access_log
        buf = io.StringIO()
        for name in ("uvicorn.access", "uvicorn", "uvicorn.error"):
            for handler in logging.getLogger(name).handlers:
                assert isinstance(handler, logging.StreamHandler)
                handler.setStream(buf)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline
                time.sleep(0.02)
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            with httpx.Client(base_url=url, timeout=30) as c:
                ok = c.get(f"/v1/models?token={SECRET}&access_token={SECRET}",
                           headers={"Authorization": f"Bearer {TOKEN}"})
                assert ok.status_code == 200
                c.get(f"/health?api_key={SECRET}")
                c.get("/v1/jobs/a%0D%0AFORGED", headers={"Authorization": f"Bearer {TOKEN}"})
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()
    text = buf.getvalue()
    access = [line for line in text.splitlines() if "/v1/models" in line or "/health" in line]
    assert len(access) == 2, text
    assert SECRET not in text and TOKEN not in text
    assert "token=***" in text and "api_key=***" in text
    assert not any(line.startswith("FORGED") for line in text.split("\n"))
