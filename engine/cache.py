"""The engine's cache directory: converted weights, weight digests, built kernels, probes."""

from __future__ import annotations

from pathlib import Path

from engine.settings import settings
from engine.state import private_dir

__all__ = ["engine_cache_dir"]


def engine_cache_dir() -> Path:
    """The engine's cache directory: ``$AITBC_ENGINE_CACHE`` or the user cache dir.

    Made with mode 0700 (a looser one is tightened with a warning); one that
    belongs to another user is refused with :class:`~engine.state.StateDirError`,
    since what the engine loads from it (converted weights, the built kernel)
    must not be writable by anyone else.
    """
    return private_dir(settings().cache_dir, "cache")
