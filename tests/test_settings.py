"""engine.settings: every environment variable the engine reads, typed, documented, read afresh."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.settings import EngineSettings, settings

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
README = ROOT / "README.md"

# Variables the README's table documents that the engine writes for other libraries,
# not settings it reads (see engine/cli.py and engine.hardware's ensure_pci_bus_order).
WRITTEN_FOR_OTHERS = {"TOKENIZERS_PARALLELISM"}

VARIABLES = {name: str(field.validation_alias)
             for name, field in EngineSettings.model_fields.items()}
ALL_NAMES = set(VARIABLES.values())


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ALL_NAMES:
        monkeypatch.delenv(variable, raising=False)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    s = settings()
    assert s.registry is None and s.api_key is None and s.cc is None
    assert s.linear == "" and s.hf_hub_offline is False
    assert s.cuda_visible_devices is None and s.cuda_device_order is None
    assert s.cache_dir.name == "aitbc-engine" and s.state_dir.name == "aitbc-engine"


def test_each_call_reads_the_environment_now(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "a"))
    assert settings().cache_dir == tmp_path / "a"
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "b"))
    assert settings().cache_dir == tmp_path / "b"


def test_paths_expand_the_home_and_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("AITBC_ENGINE_REGISTRY", "~/models.yaml")
    monkeypatch.setenv("AITBC_ENGINE_STATE", "~/state")
    s = settings()
    assert s.registry == Path("/home/someone/models.yaml")
    assert s.state_dir == Path("/home/someone/state")
    for variable in ("AITBC_ENGINE_REGISTRY", "AITBC_API_KEY", "CC"):
        monkeypatch.setenv(variable, "")
    s = settings()
    assert s.registry is None and s.api_key is None and s.cc is None


def test_api_key_is_a_secret_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITBC_API_KEY", "sk-live-0123456789")
    s = settings()
    assert s.api_key is not None and s.api_key.get_secret_value() == "sk-live-0123456789"
    assert "0123456789" not in repr(s) and "0123456789" not in str(s)
    assert "0123456789" not in s.model_dump_json()


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("TRUE", True), ("yes", True),
                                                ("on", True), ("0", False), ("", False),
                                                ("maybe", False)])
def test_hf_hub_offline_reads_like_huggingface_hub(value: str, offline: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert settings().hf_hub_offline is offline


def test_linear_is_normalised_and_unknown_values_keep_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.kernels.rowgemm import blas_requested

    monkeypatch.setenv("AITBC_ENGINE_LINEAR", " BLAS ")
    assert settings().linear == "blas" and blas_requested()
    monkeypatch.setenv("AITBC_ENGINE_LINEAR", "something-else")
    assert not blas_requested()


def test_an_empty_cuda_mask_stays_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert settings().cuda_visible_devices == ""  # CUDA: no GPU, not "unset"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert settings().cuda_device_order == "FASTEST_FIRST"


def test_settings_are_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings().cc = "gcc"  # type: ignore[misc]


def _readme_table() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([A-Z_]+)` \|.*$", section,
                                                        flags=re.M)}


def test_the_readme_table_documents_every_variable_and_no_other() -> None:
    rows = _readme_table()
    assert set(rows) == ALL_NAMES | WRITTEN_FOR_OTHERS
    for name, field in EngineSettings.model_fields.items():
        assert field.description, f"settings field {name} has no description"


def _reads_of_the_environment(text: str) -> list[str]:
    """Lines that read the environment (writes such as ``os.environ.setdefault`` excluded)."""
    reads = []
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        indexed_or_got = r"getenv\(|os\.environ\.get\(|os\.environ\[[^\]]*\](?!\s*=[^=])"
        whole = r"os\.environ\b(?!\.setdefault|\.pop|\.update|\[)"
        if re.search(indexed_or_got, code) or re.search(whole, code):
            reads.append(line.strip())
    return reads


def test_only_the_settings_module_reads_the_environment() -> None:
    found = {}
    for path in sorted(ENGINE.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where == "engine/settings.py":
            continue
        reads = _reads_of_the_environment(path.read_text())
        if reads:
            found[where] = reads
    assert found == {}, "read the environment through engine.settings.settings()"


def test_the_environment_scan_sees_reads_and_lets_writes_pass() -> None:
    assert _reads_of_the_environment('x = os.environ.get("A")\ny = os.getenv("B")\n') != []
    assert _reads_of_the_environment('env = {**os.environ, "A": "1"}') != []
    assert _reads_of_the_environment('os.environ.setdefault("A", "1")  # for torch') == []
    assert _reads_of_the_environment('os.environ["A"] = "1"') == []
