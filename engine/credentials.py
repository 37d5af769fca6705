"""Secrets the operator hands the engine: the API key of ``mine``, the token of ``serve``.

The documented ways are a file (``--api-key-file``/``--token-file``, or the
``*_FILE`` variables) or the environment (``AITBC_API_KEY``,
``AITBC_ENGINE_TOKEN``). A secret given as a command-line argument still works
but is warned about: every local user can read a process's arguments (``ps``,
``/proc/PID/cmdline``). A secret file must be a regular file no other user can
write (else another user chose the secret); one others can read is used with a
warning to ``chmod 600`` it. Secrets are never logged, not even in part
(:func:`engine.state.mask_secret`).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from engine.errors import EngineError
from engine.state import valid_token

log = logging.getLogger(__name__)

MAX_SECRET_BYTES = 4096

__all__ = ["MAX_SECRET_BYTES", "Secret", "SecretFileError", "SecretSources", "choose_secret",
           "read_secret_file"]


class SecretFileError(EngineError):
    """A secret file (API key, token) cannot be used; the message says why and what to do."""

    code = "invalid_secret_file"


@dataclass(frozen=True)
class Secret:
    """A secret and where it came from (``source`` is safe to print: it names, never shows)."""

    value: str
    source: str


def read_secret_file(path: Path, what: str) -> str:
    """The secret in ``path`` (surrounding blanks stripped), checked before it is trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise SecretFileError(f"cannot open the {what} file {path}: {exc.strerror}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SecretFileError(f"the {what} file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            raise SecretFileError(f"the {what} file {path} can be written by other users (mode "
                                  f"{mode:o}), so they could choose it; run chmod 600 {path}")
        if info.st_uid not in (os.geteuid(), 0):
            raise SecretFileError(f"the {what} file {path} belongs to another user (uid "
                                  f"{info.st_uid}); use a file of your own, mode 600")
        if mode & 0o044:
            log.warning("the %s file %s can be read by other users (mode %o); run chmod 600 %s",
                        what, path, mode, path)
        data = handle.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(f"the {what} file {path} is larger than {MAX_SECRET_BYTES} bytes; "
                              "it should hold the secret alone")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SecretFileError(f"the {what} file {path} is not UTF-8 text") from exc
    if not valid_token(secret):
        raise SecretFileError(f"the {what} file {path} is empty or has whitespace inside the "
                              "secret; it should hold the secret alone, on one line")
    return secret


@dataclass(frozen=True)
class SecretSources:
    """Where one secret may come from, in the order they are tried."""

    what: str  # "API key", "API token"
    argument: str | None  # the value of the flag that takes the secret itself
    argument_flag: str  # "--api-key"
    file: Path | None  # the value of the file flag
    file_flag: str  # "--api-key-file"
    env_value: SecretStr | None  # the secret's own variable
    env_name: str  # "AITBC_API_KEY"
    env_file: Path | None  # the variable naming a file
    env_file_name: str  # "AITBC_API_KEY_FILE"


def choose_secret(sources: SecretSources) -> Secret | None:
    """The secret from the first source given: argument (warned), file, variable, file variable.

    Both the argument and the file flag given at once is refused as ambiguous.
    """
    if sources.argument is not None and sources.file is not None:
        raise SecretFileError(f"give the {sources.what} once: {sources.argument_flag} or "
                              f"{sources.file_flag}, not both")
    if sources.argument is not None:
        log.warning("%s puts the %s on the command line, where every local user can read it "
                    "(ps, /proc/PID/cmdline); use %s FILE or %s instead",
                    sources.argument_flag, sources.what, sources.file_flag, sources.env_name)
        if not valid_token(sources.argument):
            raise SecretFileError(f"the {sources.what} given by {sources.argument_flag} is "
                                  "empty or has whitespace inside")
        return Secret(sources.argument, sources.argument_flag)
    if sources.file is not None:
        return Secret(read_secret_file(sources.file, sources.what),
                      f"{sources.file_flag} {sources.file}")
    if sources.env_value is not None:
        value = sources.env_value.get_secret_value().strip()
        if not valid_token(value):
            raise SecretFileError(f"{sources.env_name} is set but has whitespace inside the "
                                  f"{sources.what}")
        return Secret(value, sources.env_name)
    if sources.env_file is not None:
        return Secret(read_secret_file(sources.env_file, sources.what),
                      f"{sources.env_file_name}={sources.env_file}")
    return None
