"""The README's library example runs as written, and its quick start names real files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    block = next(b for b in _python_blocks() if "from engine import Engine" in b)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Paris" in out and re.search(r"sha256:[0-9a-f]{64}", out)


def test_hash_test_vector_block_runs() -> None:
    block = next(b for b in _python_blocks() if "aitbc-result/2" in b)
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c and "venv" in c)
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command.strip() in ci
