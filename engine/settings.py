"""Every environment variable the engine reads, in one typed object.

``settings()`` reads the environment each time it is called (no cache: a test
or a caller that changes a variable sees the new value at the next call). The
README's "Environment variables" table documents each field; keep the two in
step. Nothing here writes to the environment: the two writes the engine makes
are for other libraries (``TOKENIZERS_PARALLELISM`` in :func:`engine.cli.main`
for tokenizers, ``CUDA_DEVICE_ORDER`` in
:func:`engine.hardware.ensure_pci_bus_order` for the CUDA runtime) and stay
``os.environ`` writes where they are.

``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` belong to CUDA, which reads
them itself when it starts; they are here as a read-only view because the
engine must mirror what CUDA sees (to join NVML's GPUs to torch's, and to
explain a GPU torch cannot see), and so that the README's table lists every
variable that changes what the engine does. An empty ``CUDA_VISIBLE_DEVICES``
means "no GPU" to CUDA, so it is kept as ``""``, not treated as unset.

Lenient where the code before it was lenient: a value the engine does not
recognise falls back to the default instead of failing every command (an
unknown ``AITBC_ENGINE_LINEAR`` keeps the kernel, an unknown ``HF_HUB_OFFLINE``
means online), and an empty value counts as unset except for the CUDA pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HF_TRUE_VALUES", "EngineSettings", "settings"]

# The values huggingface_hub itself reads as true for HF_HUB_OFFLINE (case-insensitive).
HF_TRUE_VALUES = frozenset({"1", "on", "yes", "true"})


def _unset_if_empty(value: Any) -> Any:
    """``""`` (or blanks) as None: ``VAR=`` means the default, as ``if env:`` did before."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _user_dir(value: Any) -> Any:
    """A path as given, with ``~`` expanded (None stays None)."""
    value = _unset_if_empty(value)
    return Path(value).expanduser() if isinstance(value, (str, Path)) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _flag(value: Any) -> Any:
    return _lower(value) in HF_TRUE_VALUES if isinstance(value, str) else value


_OptionalPath = Annotated[Path | None, BeforeValidator(_user_dir)]


def _default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("aitbc-engine"))


def _default_state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("aitbc-engine"))


def _from_env(name: str, default: Any = None, **kw: Any) -> Any:
    return Field(default, validation_alias=name, **kw)


class EngineSettings(BaseSettings):
    """The engine's environment, typed. Field docs name the variable and its default."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True,
                                      populate_by_name=True, use_attribute_docstrings=True)

    cache_dir: Annotated[Path, BeforeValidator(_user_dir)] = Field(
        default_factory=_default_cache_dir, validation_alias="AITBC_ENGINE_CACHE")
    """``AITBC_ENGINE_CACHE``: converted weights, digests, CPU bandwidth, the built kernel.
    Default: the user cache directory (``~/.cache/aitbc-engine`` on Linux)."""

    registry: _OptionalPath = _from_env("AITBC_ENGINE_REGISTRY")
    """``AITBC_ENGINE_REGISTRY``: the model registry file; None: the packaged ``models.yaml``."""

    state_dir: Annotated[Path, BeforeValidator(_user_dir)] = Field(
        default_factory=_default_state_dir, validation_alias="AITBC_ENGINE_STATE")
    """``AITBC_ENGINE_STATE``: where ``serve`` keeps its token. Default: the user state
    directory (``~/.local/state/aitbc-engine`` on Linux)."""

    linear: Annotated[str, BeforeValidator(_lower)] = _from_env("AITBC_ENGINE_LINEAR", "")
    """``AITBC_ENGINE_LINEAR``: ``blas`` keeps torch's BLAS on the CPU (the kernel off);
    anything else (default: unset) uses the engine's CPU linear kernel where it builds."""

    api_key: Annotated[SecretStr | None, BeforeValidator(_unset_if_empty)] = _from_env(
        "AITBC_API_KEY")
    """``AITBC_API_KEY``: the coordinator API key for ``mine`` when ``--api-key`` is not
    given. A ``SecretStr``: its repr and str are masked; ``.get_secret_value()`` reads it."""

    api_key_file: _OptionalPath = _from_env("AITBC_API_KEY_FILE")
    """``AITBC_API_KEY_FILE``: a file holding the coordinator API key (mode 600), read when
    neither ``--api-key``, ``--api-key-file`` nor ``AITBC_API_KEY`` is given."""

    token: Annotated[SecretStr | None, BeforeValidator(_unset_if_empty)] = _from_env(
        "AITBC_ENGINE_TOKEN")
    """``AITBC_ENGINE_TOKEN``: the bearer token ``serve`` requires, when neither ``--token``
    nor ``--token-file`` is given; None: ``AITBC_ENGINE_TOKEN_FILE``, else the state
    directory's token file."""

    token_file: _OptionalPath = _from_env("AITBC_ENGINE_TOKEN_FILE")
    """``AITBC_ENGINE_TOKEN_FILE``: a file holding the token ``serve`` requires (mode 600);
    None: the state directory's token file (made on first start)."""

    coordinator_key: Annotated[str | None, BeforeValidator(_unset_if_empty)] = _from_env(
        "AITBC_COORDINATOR_KEY")
    """``AITBC_COORDINATOR_KEY``: the coordinator's Ed25519 public key that receipts are
    checked against (64 hex digits, base64, or a PEM file path); None: receipts are kept
    unchecked (``no_key``). A public key, so not a secret."""

    cc: Annotated[str | None, BeforeValidator(_unset_if_empty)] = _from_env("CC")
    """``CC``: the C compiler that builds the CPU kernel (a name on PATH or a path);
    default: ``cc``, else ``gcc``, else ``clang``."""

    hf_hub_offline: Annotated[bool, BeforeValidator(_flag)] = _from_env("HF_HUB_OFFLINE", False)
    """``HF_HUB_OFFLINE``: huggingface_hub's own switch (``1``/``on``/``yes``/``true``);
    the engine reads it to say the hub is out of reach without trying it."""

    cuda_visible_devices: str | None = _from_env("CUDA_VISIBLE_DEVICES")
    """``CUDA_VISIBLE_DEVICES`` (CUDA's, read-only): the GPUs CUDA may use; None: unset
    (every GPU); ``""``: none."""

    cuda_device_order: str | None = _from_env("CUDA_DEVICE_ORDER")
    """``CUDA_DEVICE_ORDER`` (CUDA's, read-only here): the engine sets it to
    ``PCI_BUS_ID`` at start-up unless it is set, so CUDA and NVML number GPUs alike."""


def settings() -> EngineSettings:
    """The engine's settings, read from the environment now (each call reads it afresh)."""
    return EngineSettings()
