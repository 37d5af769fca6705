"""Registry: the packaged file, validation messages, user registries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.errors import RegistryError, UnknownModelError
from engine.registry import REGISTRY_ENV, Registry, default_registry_path, packaged_registry_path

HEADLINE = ["gpt2", "distilgpt2", "gpt2-medium", "smollm2-135m", "all-minilm-l6-v2"]


def _write(tmp_path: Path, models: dict) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": models}))
    return path


def _entry(**overrides: object) -> dict:
    base = yaml.safe_load(packaged_registry_path().read_text())["models"]["gpt2"]
    base.update(overrides)
    return base


def test_packaged_registry_has_every_headline_entry() -> None:
    reg = Registry.load(packaged_registry_path())
    assert reg.names()[:5] == HEADLINE
    gpt2 = reg.get("gpt2")
    assert gpt2.source.kind == "hub" and gpt2.source.hub is not None
    assert len(gpt2.source.hub.revision) == 40
    assert gpt2.parameters == 124_439_808 and gpt2.context_length == 1024
    smol = reg.get("smollm2-135m")
    assert smol.source.package is not None and smol.source.package.format == "gguf"
    assert smol.architecture == "llama"
    mini = reg.get("all-minilm-l6-v2")
    assert mini.task == "embedding" and mini.pooling == "mean" and mini.normalize


def test_unknown_key_names_file_entry_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, {"mine": _entry(colour="blue")})
    with pytest.raises(RegistryError) as err:
        Registry.load(path)
    msg = str(err.value)
    assert str(path) in msg and "entry 'mine'" in msg and "field 'colour'" in msg
    assert "unknown key" in msg


def test_missing_field_is_named(tmp_path: Path) -> None:
    entry = _entry()
    del entry["context_length"]
    with pytest.raises(RegistryError, match=r"entry 'm'.*field 'context_length': Field required"):
        Registry.load(_write(tmp_path, {"m": entry}))


def test_bad_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"field 'parameters'"):
        Registry.load(_write(tmp_path, {"m": _entry(parameters="many")}))


def test_nested_source_field_is_named(tmp_path: Path) -> None:
    entry = _entry(source={"hub": {"repo": "x/y"}})
    with pytest.raises(RegistryError, match=r"field 'source.hub.revision'"):
        Registry.load(_write(tmp_path, {"m": entry}))


def test_source_must_name_exactly_one_kind(tmp_path: Path) -> None:
    entry = _entry(source={"hub": {"repo": "x/y", "revision": "abc"},
                           "local": {"path": "/tmp"}})
    with pytest.raises(RegistryError, match="exactly one of hub, package or local"):
        Registry.load(_write(tmp_path, {"m": entry}))


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        Registry.load(bad)
    with pytest.raises(RegistryError, match="cannot read model registry"):
        Registry.load(tmp_path / "absent.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("version: 2\nmodels: {}\n")
    with pytest.raises(RegistryError, match="field 'version'"):
        Registry.load(wrong)


def test_unknown_model_lists_known_names() -> None:
    reg = Registry.load(packaged_registry_path())
    with pytest.raises(UnknownModelError) as err:
        reg.get("gpt5")
    assert "gpt5" in err.value.message and "smollm2-135m" in err.value.message
    assert err.value.field == "model"


def test_local_relative_path_resolves_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    entry = _entry(source={"local": {"path": "weights"}})
    reg = Registry.load(_write(tmp_path, {"m": entry}))
    local = reg.get("m").source.local
    assert local is not None and Path(local.path) == (tmp_path / "weights").resolve()


def test_environment_variable_selects_the_registry(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"only-one": _entry()})
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    assert default_registry_path() == path
    assert Registry.load().names() == ["only-one"]


def test_cli_models_json_with_user_registry(registry_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "engine", "models", "--json", "--registry",
                          str(registry_path)], capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)["models"]}
    assert set(HEADLINE) <= set(rows) and "tiny-gpt2" in rows
    assert rows["tiny-gpt2"]["available"] is True


def test_cli_models_json_reports_availability_here() -> None:
    """After the README install the shipped models are here and the hub models are not."""
    out = subprocess.run([sys.executable, "-m", "engine", "models", "--json"],
                         capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)["models"]}
    assert list(rows) == HEADLINE
    assert rows["smollm2-135m"]["available"] and rows["smollm2-135m"]["size_bytes"] > 90e6
    assert rows["all-minilm-l6-v2"]["available"]
    assert rows["gpt2"]["available"] is False
    assert "Hugging Face cache" in rows["gpt2"]["reason"]
    assert "--weights random" in rows["gpt2"]["reason"]


def test_trained_dtype_is_read_and_checked(tmp_path: Path) -> None:
    reg = Registry.load(packaged_registry_path())
    assert reg.get("smollm2-135m").trained_dtype == "bfloat16"
    assert {reg.get(n).trained_dtype for n in ("gpt2", "distilgpt2", "gpt2-medium")} == {
        "float32"}
    unmarked = {k: v for k, v in _entry().items() if k != "trained_dtype"}
    assert Registry.load(_write(tmp_path, {"m": unmarked})).get("m").trained_dtype is None
    with pytest.raises(RegistryError, match=r"entry 'm'.*field 'trained_dtype'"):
        Registry.load(_write(tmp_path, {"m": _entry(trained_dtype="fp8")}))
