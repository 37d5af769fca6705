"""Private folders and files, and the local API's token file.

The state directory is ``$AITBC_ENGINE_STATE`` or else platformdirs'
``user_state_dir("aitbc-engine")`` (``~/.local/state/aitbc-engine`` on Linux).
Every folder the engine keeps state or caches in is made with mode 0700
(:func:`private_dir`); a looser one it finds is tightened with a warning. The
API token lives in ``<state_dir>/token`` with mode 0600; it is made on first
use, written whole into a temporary file and then linked into place, so a full
disk leaves no half-written token behind. An empty token file (left by an older
engine on a full disk) is repaired; an unreadable or malformed one is refused
with a message that says what to do. Secrets are shown only masked
(:func:`mask_secret`), never in part.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from engine.errors import EngineError
from engine.settings import settings

log = logging.getLogger(__name__)

STATE_ENV = "AITBC_ENGINE_STATE"  # read through engine.settings (field `state_dir`)
TOKEN_FILE = "token"


class TokenFileError(EngineError):
    """The API token file exists but cannot be used."""

    code = "invalid_token_file"


class StateDirError(EngineError):
    """A folder the engine must write to (state, cache, journal) cannot be made or written."""

    code = "state_dir_unusable"


def default_state_dir() -> Path:
    """Where the server keeps its token: ``$AITBC_ENGINE_STATE`` or the user state dir."""
    return settings().state_dir


def mask_secret(secret: str | None) -> str:
    """A secret as it may be shown or logged: whether it is set and its length, no character."""
    return "<none>" if not secret else f"<secret, {len(secret)} chars>"


def valid_token(token: str) -> bool:
    """True for a usable bearer token: not empty, no whitespace."""
    return bool(token) and not any(c.isspace() for c in token)


def tighten_private(path: Path, mode: int = 0o600) -> None:
    """Drop group and other permissions from ``path`` if it has any, with a warning.

    A missing path is left alone; one this user cannot change raises ``OSError``.
    """
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        log.warning("%s was readable by other users (mode %o); tightened to %o", path,
                    current, mode)
        path.chmod(mode)


def problem_text(exc: OSError) -> str:
    """What an ``OSError`` means for a folder, in words a person can act on."""
    if exc.errno == errno.ENOSPC:
        return "the disk is full (free some space)"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (check the folder's owner and mode)"
    return exc.strerror or str(exc)


def private_dir(path: Path, what: str = "state") -> Path:
    """Make ``path`` (and its parents) with mode 0700, or tighten an existing one to 0700.

    Raises :class:`StateDirError` naming the folder and the problem when it
    cannot be made, is not a folder, or belongs to another user.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateDirError(f"the {what} folder {path} is not a folder")
        if info.st_uid != os.geteuid():
            raise StateDirError(f"the {what} folder {path} belongs to another user (uid "
                                f"{info.st_uid}); use a folder of your own")
        tighten_private(path, 0o700)
    except OSError as exc:
        raise StateDirError(f"the {what} folder {path} is unusable: {problem_text(exc)}") \
            from exc
    return path


def private_temp_file(folder: Path, data: bytes, *, prefix: str, sync: bool = True) -> Path:
    """``data`` in a new file of a unique name in ``folder``, mode 0600, flushed (and
    fsynced when ``sync``); the caller moves it into place or removes it."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def write_private(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: a 0600 temporary file beside it, then
    ``os.replace``, so a reader sees the old file or the new one, never a part."""
    temporary = private_temp_file(path.parent, data, prefix=f".{path.name}.", sync=sync)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _install_token(path: Path, *, replace: bool) -> str:
    """Write a new token into ``path`` atomically; returns the token now in the file."""
    token = secrets.token_urlsafe(32)
    try:
        temporary = private_temp_file(path.parent, (token + "\n").encode(), prefix=".token.")
        try:
            if replace:
                os.replace(temporary, path)
            else:
                os.link(temporary, path)  # fails if another process made the file first
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise StateDirError(f"cannot write the API token file {path}: {problem_text(exc)}; "
                            "or pass --token-file") from exc
    return token


def _read_token(path: Path) -> str:
    try:
        tighten_private(path)
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the API token file {path}: {exc}; fix its "
                             "permissions or delete it to have a new token made") from exc


def load_or_create_token(state_dir: Path) -> tuple[str, Path, bool]:
    """The API token in ``state_dir/token``, made (mode 0600) on first use.

    Returns ``(token, path, created)``. A token file readable by others is
    tightened to 0600 with a warning; an empty one is replaced by a new token
    with a warning; one that holds whitespace inside is refused.
    """
    private_dir(state_dir)
    path = state_dir / TOKEN_FILE
    if not path.exists():
        token = _install_token(path, replace=False)
        return token, path, True
    existing = _read_token(path)
    if not existing:
        log.warning("the API token file %s was empty (a write cut short, for example by a "
                    "full disk); a new token was made", path)
        return _install_token(path, replace=True), path, True
    if not valid_token(existing):
        raise TokenFileError(f"the API token file {path} holds whitespace inside the token; "
                             "delete it to have a new token made, or pass --token-file")
    return existing, path, False


__all__ = [
    "STATE_ENV",
    "TOKEN_FILE",
    "StateDirError",
    "TokenFileError",
    "default_state_dir",
    "load_or_create_token",
    "mask_secret",
    "private_dir",
    "private_temp_file",
    "problem_text",
    "tighten_private",
    "valid_token",
    "write_private",
]
