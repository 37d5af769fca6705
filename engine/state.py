"""Where the engine keeps its state, and the local API's token file in it.

The state directory is ``$AITBC_ENGINE_STATE`` or else platformdirs'
``user_state_dir("aitbc-engine")`` (``~/.local/state/aitbc-engine`` on Linux),
made with mode 0700. The API token lives in ``<state_dir>/token`` with mode
0600; it is made on first use. Secrets are shown only masked
(:func:`mask_secret`).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from engine.errors import EngineError
from engine.settings import settings

log = logging.getLogger(__name__)

STATE_ENV = "AITBC_ENGINE_STATE"  # read through engine.settings (field `state_dir`)
TOKEN_FILE = "token"


class TokenFileError(EngineError):
    """The API token file exists but cannot be used."""

    code = "invalid_token_file"


def default_state_dir() -> Path:
    """Where the server keeps its token: ``$AITBC_ENGINE_STATE`` or the user state dir."""
    return settings().state_dir


def mask_secret(secret: str) -> str:
    """A secret shown safely: its first 4 characters and its length."""
    return f"{secret[:4]}… ({len(secret)} chars)" if len(secret) > 8 else "****"


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


def load_or_create_token(state_dir: Path) -> tuple[str, Path, bool]:
    """The API token in ``state_dir/token``, made (mode 0600) on first use.

    Returns ``(token, path, created)``. A token file readable by others is
    tightened to 0600 with a warning.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(token + "\n")
        return token, path, True
    try:
        tighten_private(path)
        existing = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the API token file {path}: {exc}; fix its "
                             "permissions or delete it to have a new token made") from exc
    if not valid_token(existing):
        raise TokenFileError(f"the API token file {path} is empty or holds whitespace; delete "
                             "it to have a new token made, or pass --token")
    return existing, path, False


__all__ = [
    "STATE_ENV",
    "TOKEN_FILE",
    "TokenFileError",
    "default_state_dir",
    "load_or_create_token",
    "mask_secret",
    "tighten_private",
    "valid_token",
]
