"""Shared foundations with no engine knowledge: the strict model base and the version helper."""

from __future__ import annotations

import importlib.metadata

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys (every engine data shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
