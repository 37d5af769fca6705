"""Secrets from files and the environment, a warning for secrets on argv (issue 15, item 7)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.cli import build_parser, main
from engine.cli_serve import _token
from engine.credentials import SecretFileError, SecretSources, choose_secret, read_secret_file

SECRET = "sk-0123456789abcdefghij"


def _file(folder: Path, text: str = SECRET + "\n", mode: int = 0o600) -> Path:
    path = folder / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def _sources(**given: object) -> SecretSources:
    base: dict[str, object] = {
        "what": "API key", "argument": None, "argument_flag": "--api-key", "file": None,
        "file_flag": "--api-key-file", "env_value": None, "env_name": "AITBC_API_KEY",
        "env_file": None, "env_file_name": "AITBC_API_KEY_FILE"}
    return SecretSources(**{**base, **given})  # type: ignore[arg-type]


def test_a_private_secret_file_is_read_stripped(tmp_path: Path) -> None:
    assert read_secret_file(_file(tmp_path), "API key") == SECRET


def test_a_secret_file_others_can_read_is_used_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _file(tmp_path, mode=0o644)
    with caplog.at_level(logging.WARNING, logger="engine.credentials"):
        assert read_secret_file(path, "API key") == SECRET
    assert "chmod 600" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize(("text", "mode", "why"), [
    (SECRET, 0o666, "written by other users"),
    (SECRET, 0o620, "written by other users"),
    ("", 0o600, "empty"),
    ("two words", 0o600, "whitespace"),
    ("x" * 5000, 0o600, "larger than"),
])
def test_unusable_secret_files_are_refused_with_the_reason(tmp_path: Path, text: str, mode: int,
                                                           why: str) -> None:
    with pytest.raises(SecretFileError, match=why):
        read_secret_file(_file(tmp_path, text, mode), "API key")


def test_binary_folder_and_missing_secret_files_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00key")
    binary.chmod(0o600)
    with pytest.raises(SecretFileError, match="UTF-8"):
        read_secret_file(binary, "API key")
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(tmp_path, "API key")
    with pytest.raises(SecretFileError, match="cannot open"):
        read_secret_file(tmp_path / "absent", "API key")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_secret_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path)
    os.chown(path, 65534, 65534)
    with pytest.raises(SecretFileError, match="another user"):
        read_secret_file(path, "API key")


def test_the_sources_are_tried_in_order_and_argv_is_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _file(tmp_path)
    env_file = tmp_path / "env-secret"
    env_file.write_text("from-env-file\n")
    env_file.chmod(0o600)
    assert choose_secret(_sources()) is None
    chosen = choose_secret(_sources(env_file=env_file))
    assert chosen is not None and (chosen.value, chosen.source) == (
        "from-env-file", f"AITBC_API_KEY_FILE={env_file}")
    chosen = choose_secret(_sources(env_file=env_file, env_value=SecretStr("from-env")))
    assert chosen is not None and chosen.value == "from-env"
    chosen = choose_secret(_sources(file=path, env_value=SecretStr("from-env")))
    assert chosen is not None and chosen.value == SECRET
    assert "command line" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="engine.credentials"):
        chosen = choose_secret(_sources(argument="from-argv", env_value=SecretStr("x")))
    assert chosen is not None and chosen.value == "from-argv"
    assert "--api-key puts the API key on the command line" in caplog.text
    assert "--api-key-file" in caplog.text and "from-argv" not in caplog.text
    with pytest.raises(SecretFileError, match="not both"):
        choose_secret(_sources(argument="a", file=path))


def test_serve_takes_its_token_from_a_file_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    path = _file(tmp_path)
    args = build_parser().parse_args(["serve", "--token-file", str(path)])
    assert _token(args, state) == (SECRET, f"from --token-file {path}")
    monkeypatch.setenv("AITBC_ENGINE_TOKEN", "env-token-value")
    args = build_parser().parse_args(["serve"])
    assert _token(args, state) == ("env-token-value", "from AITBC_ENGINE_TOKEN")
    assert not state.exists()  # no token file made when one is given
    monkeypatch.delenv("AITBC_ENGINE_TOKEN")
    token, where = _token(args, state)
    assert where == f"written to {state / 'token'}" and (state / "token").read_text().strip() \
        == token


def test_mine_refuses_a_key_given_twice_before_doing_anything(
        tmp_path: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["mine", "--coordinator", "http://127.0.0.1:9", "--dialect", "aitbc",
                 "--api-key", SECRET, "--api-key-file", str(_file(tmp_path)),
                 "--registry", str(registry_path), "--device", "cpu",
                 "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and "not both" in err and SECRET not in err
