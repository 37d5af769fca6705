"""The engine's cache directory: converted weights, weight digests, built kernels, probes."""

from __future__ import annotations

from pathlib import Path

from engine.settings import settings

__all__ = ["engine_cache_dir"]


def engine_cache_dir() -> Path:
    """The engine's cache directory (created): ``$AITBC_ENGINE_CACHE`` or the user cache dir."""
    path = settings().cache_dir
    path.mkdir(parents=True, exist_ok=True)
    return path
