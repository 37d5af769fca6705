"""Tests of engine.hardware: GPU names, spec sheet, discovery over a fake NVML and a fake
torch (matched by UUID, unusable GPUs, MIG), typed NVML errors. (The CPU bandwidth probe
moved to engine.bench.bandwidth: tests/test_bench_roofline.py.)"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import (
    CU126_ARCHS,
    CU128_ARCHS,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNINITIALIZED,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeNvml,
    FakeTorchCuda,
    NVMLError,
    a100,
    fake_machine,
    v100,
)
from hypothesis import given
from hypothesis import strategies as st

from engine import hardware
from engine.errors import DeviceError
from engine.hardware import (
    GPU_SPECS,
    HardwareInfo,
    Nvml,
    NvmlDriverNotLoaded,
    NvmlError,
    NvmlGpuLost,
    NvmlInvalidArgument,
    NvmlLibraryNotFound,
    NvmlNoPermission,
    NvmlNotFound,
    NvmlNotInitialized,
    NvmlNotSupported,
    NvmlUnavailable,
    TorchCudaView,
    arch_supported,
    cuda_visible_nvml_indices,
    discover,
    gpu_spec_for,
    gpu_type_from_name,
    supports_bf16,
    uuid_key,
)
from engine.hardware.errors import nvml_error_from

GiB = 2**30
TYPE_RE = re.compile(r"^[a-z0-9]+$")


@pytest.fixture(autouse=True)
def _clean_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with the real pynvml and torch and sees every GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hardware.set_nvml_module(None)
    hardware.set_torch_cuda_probe(None)
    yield
    hardware.set_nvml_module(None)
    hardware.set_torch_cuda_probe(None)


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(gpus=[v100(), a100()], driver="550.54.15", cuda=12040)


@pytest.fixture
def torch_cuda(fake: FakeNvml) -> FakeTorchCuda:
    """A CUDA torch (12.6 wheels: V100 included) that sees the fake's GPUs in NVML order,
    injected for every discovery of the test."""
    probe = FakeTorchCuda.seeing(fake.gpus)
    hardware.set_torch_cuda_probe(probe)
    return probe


@pytest.fixture
def info(fake: FakeNvml, torch_cuda: FakeTorchCuda) -> HardwareInfo:
    return discover(Nvml(fake))


# --------------------------------------------------------------------------- names

REAL_NAMES = [
    ("Tesla V100-SXM2-16GB", "v100"),
    ("Tesla V100-PCIE-32GB", "v100"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H100 NVL", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA B200", "b200"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA GeForce RTX 3090", "rtx3090"),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx3090ti"),
    ("NVIDIA GeForce RTX 4070 SUPER", "rtx4070super"),
    ("Tesla T4", "t4"),
    ("NVIDIA A10", "a10"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA A40", "a40"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA RTX A6000", "rtxa6000"),
    ("NVIDIA GeForce GTX 1080 Ti", "gtx1080ti"),
    ("Quadro RTX 8000", "rtx8000"),
    ("Tesla P100-PCIE-16GB", "p100"),
    ("NVIDIA GH200 480GB", "gh200"),
]


@pytest.mark.parametrize(("name", "expected"), REAL_NAMES)
def test_gpu_type_from_real_names(name: str, expected: str) -> None:
    assert gpu_type_from_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"), [("", "unknown"), ("!!! ---", "unknown"), ("NVIDIA", "nvidia")]
)
def test_gpu_type_fallback_is_never_empty(name: str, expected: str) -> None:
    assert gpu_type_from_name(name) == expected


def test_every_spec_family_is_its_own_gpu_type() -> None:
    for key, spec in GPU_SPECS.items():
        assert TYPE_RE.match(spec.gpu_type), key
        assert key == spec.gpu_type or key.startswith(spec.gpu_type + "-"), key
        assert gpu_type_from_name(spec.gpu_type) == spec.gpu_type


@given(st.text())
def test_gpu_type_is_always_a_clean_token(name: str) -> None:
    result = gpu_type_from_name(name)
    assert TYPE_RE.match(result)
    assert gpu_type_from_name(result) == result  # stable when fed back


_FAMILY = st.builds(
    lambda prefix, number, letter: f"{prefix}{number}{letter}",
    st.sampled_from(["A", "B", "H", "L", "T", "V", "P", "K", "GH", "RTX ", "GTX ", "RTX A"]),
    st.integers(min_value=1, max_value=9999),
    st.sampled_from(["", "S", "G"]),
)


@given(
    vendor=st.sampled_from(["NVIDIA", "Tesla", "NVIDIA GeForce", "Quadro", "NVIDIA Tesla"]),
    family=_FAMILY,
    suffix=st.sampled_from(["", " Ti", " SUPER", " Super"]),
    form_factor=st.sampled_from(["SXM2", "SXM4", "SXM5", "PCIE", "PCIe", "HBM3", "NVL", "FHHL"]),
    memory=st.integers(min_value=1, max_value=512),
)
def test_gpu_type_of_generated_names_is_the_family(
    vendor: str, family: str, suffix: str, form_factor: str, memory: int
) -> None:
    name = f"{vendor} {family}{suffix}-{form_factor}-{memory}GB"
    expected = (family + suffix).lower().replace(" ", "")
    assert gpu_type_from_name(name) == expected


# --------------------------------------------------------------------------- spec sheet


def test_spec_sheet_covers_the_families_the_engine_prices() -> None:
    for key in [
        "v100", "t4", "a10", "a10g", "a40", "a100", "l4", "l40s",
        "h100", "h200", "rtx3090", "rtx4090", "rtxa6000", "b200",
    ]:  # fmt: skip
        assert key in GPU_SPECS
    assert GPU_SPECS["a100"].memory_bandwidth_gbps == 2039.0
    assert GPU_SPECS["a100-40gb"].memory_bandwidth_gbps == 1555.0
    assert GPU_SPECS["v100"].memory_bandwidth_gbps == 900.0
    assert GPU_SPECS["h100"].fp16_tflops == pytest.approx(989.4)


def test_spec_sheet_is_consistent() -> None:
    for key, spec in GPU_SPECS.items():
        assert (spec.bf16_tflops is None) == (not supports_bf16(spec.compute_capability)), key
        assert spec.fp16_tflops > spec.fp32_tflops > 0, key
        assert spec.memory_bandwidth_gbps > 0, key


def test_peak_tflops_by_dtype() -> None:
    spec = GPU_SPECS["v100"]
    assert spec.peak_tflops("fp16") == spec.peak_tflops("torch.float16") == 125.0
    assert spec.peak_tflops("float32") == 15.7
    assert spec.peak_tflops("bfloat16") is None
    assert spec.peak_tflops("int8") is None
    assert GPU_SPECS["a100"].peak_tflops("bf16") == 312.0


def test_supports_bf16() -> None:
    assert not supports_bf16((7, 0))
    assert not supports_bf16((7, 5))
    assert supports_bf16((8, 0))
    assert supports_bf16((9, 0))
    assert supports_bf16((10, 0))


def test_gpu_spec_picks_variants() -> None:
    assert gpu_spec_for("a100", "NVIDIA A100-SXM4-40GB", 40 * GiB) is GPU_SPECS["a100-40gb"]
    assert gpu_spec_for("a100", "NVIDIA A100-SXM4-80GB", 80 * GiB) is GPU_SPECS["a100"]
    assert gpu_spec_for("h100", "NVIDIA H100 PCIe") is GPU_SPECS["h100-pcie"]
    assert gpu_spec_for("h100", "NVIDIA H100 NVL") is GPU_SPECS["h100-nvl"]
    assert gpu_spec_for("t4", "Tesla T4") is GPU_SPECS["t4"]  # no t4-pcie: the base entry
    assert gpu_spec_for("gtx1080ti", "NVIDIA GeForce GTX 1080 Ti") is None
    assert gpu_spec_for(None) is None


# --------------------------------------------------------------------------- discovery


def test_discover_two_fake_gpus(info: HardwareInfo) -> None:
    assert [d.id for d in info.devices] == ["cuda:0", "cuda:1", "cpu"]
    v, a = info.gpus
    assert (v.name, v.gpu_type, v.index, v.nvml_index) == ("Tesla V100-SXM2-16GB", "v100", 0, 0)
    assert (a.name, a.gpu_type, a.index, a.nvml_index) == ("NVIDIA A100-SXM4-80GB", "a100", 1, 1)
    assert (v.memory_total_bytes, v.memory_free_bytes) == (16 * GiB, 15 * GiB)
    assert (a.memory_total_bytes, a.memory_free_bytes) == (80 * GiB, 79 * GiB)
    assert v.compute_capability == (7, 0) and a.compute_capability == (8, 0)
    assert v.kind == a.kind == "cuda"
    assert v.energy_supported and a.energy_supported
    assert v.uuid and a.uuid and v.uuid != a.uuid and v.uuid.startswith("GPU-")
    assert not v.supports_bf16 and a.supports_bf16
    assert not supports_bf16(v.compute_capability) and supports_bf16(a.compute_capability)
    assert info.driver_version == "550.54.15"
    assert info.cuda_version == "12.4"
    assert info.nvml_available and info.nvml_error is None


def test_cpu_device_is_last(info: HardwareInfo) -> None:
    cpu = info.devices[-1]
    assert cpu is info.cpu
    assert (cpu.id, cpu.kind, cpu.index, cpu.gpu_type) == ("cpu", "cpu", None, None)
    assert cpu.cores == info.cpu_cores >= 1
    assert cpu.name == info.cpu_name != ""
    assert cpu.memory_total_bytes == info.cpu_memory_total_bytes > 0
    assert 0 < cpu.memory_free_bytes <= cpu.memory_total_bytes
    assert not cpu.energy_supported and cpu.compute_capability is None


def test_discover_with_unsupported_energy() -> None:
    k80 = FakeGpu("Tesla K80", 12 * GiB, compute_capability=(3, 7), energy_supported=False)
    fake = FakeNvml(gpus=[k80])
    nvml = Nvml(fake)
    assert nvml.energy_millijoules(0) is None
    (gpu,) = discover(nvml, torch_cuda=FakeTorchCuda.seeing([k80], arch_list=["sm_37"])).gpus
    assert gpu.gpu_type == "k80" and not gpu.energy_supported


def test_nvml_init_failure_gives_cpu_only() -> None:
    fake = FakeNvml(gpus=[v100()], fail_init=True, init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    nvml = Nvml(fake)
    assert not nvml.available()
    assert nvml.error() == "Driver Not Loaded"
    assert nvml.device_count() == 0
    torch_cuda = FakeTorchCuda.seeing(fake.gpus)
    info = discover(nvml, torch_cuda=torch_cuda)
    assert torch_cuda.calls == 0  # no GPU listed: torch is not asked
    assert info.cpu_fallback_reason is None  # nvml_error says why
    assert [d.id for d in info.devices] == ["cpu"]
    assert info.gpus == ()
    assert not info.nvml_available
    assert info.nvml_error == "Driver Not Loaded"
    assert info.driver_version is None and info.cuda_version is None


def test_injected_module_is_used_by_default(fake: FakeNvml, torch_cuda: FakeTorchCuda) -> None:
    hardware.set_nvml_module(fake)
    assert hardware.nvml_module() is fake
    info = discover()
    assert [d.gpu_type for d in info.gpus] == ["v100", "a100"]
    assert fake.init_calls == fake.shutdown_calls == 1  # discover closes its own session
    assert not fake.initialized


def test_real_pynvml_on_this_machine() -> None:
    import pynvml

    assert hardware.nvml_module() is pynvml
    info = discover()  # must not raise whether or not this machine has NVML
    assert info.devices[-1].kind == "cpu"
    if info.nvml_available:  # a GPU machine: every GPU described
        assert all(TYPE_RE.match(d.gpu_type or "") for d in info.gpus)
    else:  # no driver here: the CPU alone, and why
        assert info.gpus == ()
        assert info.nvml_error
        assert info.driver_version is None


def test_set_nvml_module_none_restores_pynvml(fake: FakeNvml) -> None:
    import pynvml

    hardware.set_nvml_module(fake)
    assert hardware.nvml_module() is fake
    hardware.set_nvml_module(None)
    assert hardware.nvml_module() is pynvml


def test_discover_snapshot_without_refresh(fake: FakeNvml) -> None:
    other = a100()
    hardware.set_torch_cuda_probe(FakeTorchCuda.seeing([*fake.gpus, other]))
    hardware.set_nvml_module(fake)
    first = discover()
    fake.gpus[0].memory_free = 1 * GiB
    assert discover(refresh_free_memory=False) is first
    fresh = discover()
    assert fresh.gpus[0].memory_free_bytes == 1 * GiB
    assert discover(refresh_free_memory=False) is fresh
    hardware.set_nvml_module(FakeNvml(gpus=[other]))  # a new module drops the snapshot
    assert [d.gpu_type for d in discover(refresh_free_memory=False).gpus] == ["a100"]
    hardware.set_torch_cuda_probe(FakeTorchCuda.cpu_build())  # so does a new torch probe
    assert discover(refresh_free_memory=False).gpus == ()


def test_info_to_dict_is_json(info: HardwareInfo) -> None:
    data = json.loads(json.dumps(info.to_dict()))
    assert [d["id"] for d in data["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    assert data["devices"][1]["compute_capability"] == [8, 0]
    assert all(d["usable"] and d["unusable_reason"] is None for d in data["devices"])
    assert data["unusable_gpus"] == [] and data["cpu_fallback_reason"] is None
    assert data["cuda_version"] == "12.4"
    assert data["nvml_available"] is True
    assert data["python_version"].count(".") == 2


# --------------------------------------------------------------------------- device lookup


def test_device_lookup(info: HardwareInfo) -> None:
    assert info.device("cuda:1").gpu_type == "a100"
    assert info.device("gpu:1").gpu_type == "a100"
    assert info.device(" CUDA:0 ").gpu_type == "v100"
    assert info.device("cuda").id == "cuda:0"
    assert info.device("gpu").id == "cuda:0"
    assert info.device("cpu") is info.cpu


def test_unknown_device_names_existing_ids(info: HardwareInfo) -> None:
    with pytest.raises(DeviceError) as excinfo:
        info.device("cuda:5")
    message = str(excinfo.value)
    assert "cuda:5" in message
    for existing in ("cuda:0", "cuda:1", "cpu"):
        assert existing in message
    assert excinfo.value.code == "invalid_device"


@pytest.mark.parametrize("name", ["cuda", "gpu:0", "tpu", "cuda:-1", ""])
def test_cpu_only_machine_rejects_gpu_names(name: str) -> None:
    info = discover(Nvml(FakeNvml(fail_init=True)))
    with pytest.raises(DeviceError, match="cpu"):
        info.device(name)


# --------------------------------------------------------------------------- NVML × torch


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "engine.hardware" and r.levelno == logging.WARNING
    ]


def test_devices_are_matched_to_torch_by_uuid_not_by_index() -> None:
    """NVML lists V100, A100, H100; torch numbers them H100, V100, A100 ("fastest first")."""
    h100 = FakeGpu("NVIDIA H100 80GB HBM3", 80 * GiB, 70 * GiB, compute_capability=(9, 0))
    nvml, torch_cuda = fake_machine([v100(), a100(), h100], order=[2, 0, 1])
    info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    assert [d.id for d in info.devices] == ["cuda:0", "cuda:1", "cuda:2", "cpu"]
    described = [
        (d.index, d.nvml_index, d.name, d.memory_total_bytes, d.compute_capability)
        for d in info.gpus
    ]
    assert described == [
        (0, 2, "NVIDIA H100 80GB HBM3", 80 * GiB, (9, 0)),
        (1, 0, "Tesla V100-SXM2-16GB", 16 * GiB, (7, 0)),
        (2, 1, "NVIDIA A100-SXM4-80GB", 80 * GiB, (8, 0)),
    ]
    assert [d.uuid for d in info.gpus] == [nvml.gpus[i].uuid for i in (2, 0, 1)]
    assert info.gpus[0].memory_free_bytes == 70 * GiB  # free memory from NVML
    assert info.device("cuda:0").gpu_type == "h100"
    assert info.device("nvml:0").id == "cuda:1"  # the NVML index names a GPU too
    assert info.unusable_gpus == () and info.cpu_fallback_reason is None
    assert torch_cuda.calls == 1


def test_uuid_key_compares_nvml_and_torch_spellings() -> None:
    assert uuid_key("GPU-8F3C0A1B-1234-5678-9ABC-DEF012345678") == uuid_key(
        "8f3c0a1b-1234-5678-9abc-def012345678"
    )
    assert uuid_key("MIG-0a1b2c3d-0000-1111-2222-333344445555") == (
        "0a1b2c3d000011112222333344445555"
    )
    assert uuid_key("GPU-aaaa") != uuid_key("MIG-bbbb")


def test_cpu_torch_build_leaves_every_gpu_unusable(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(gpus=[v100()])
    hardware.set_torch_cuda_probe(FakeTorchCuda.cpu_build("2.13.0+cpu"))
    with caplog.at_level(logging.WARNING, logger="engine.hardware"):
        info = discover(Nvml(nvml))
    assert info.gpus == ()
    assert [d.id for d in info.devices] == ["nvml:0", "cpu"]
    (gpu,) = info.unusable_gpus
    assert (gpu.kind, gpu.index, gpu.nvml_index, gpu.usable) == ("cuda", None, 0, False)
    assert gpu.name == "Tesla V100-SXM2-16GB" and gpu.memory_total_bytes == 16 * GiB
    assert gpu.unusable_reason == "torch 2.13.0+cpu is a CPU build (torch.version.cuda is None)"
    assert info.cpu_fallback_reason == (
        "NVML sees 1 GPU (Tesla V100-SXM2-16GB) but torch 2.13.0+cpu is a CPU build "
        "(torch.version.cuda is None): install a CUDA build of torch (for V100: the CUDA "
        "12.6 wheels, pip install torch --index-url https://download.pytorch.org/whl/cu126)"
    )
    assert _warnings(caplog) == [f"no usable GPU, running on the CPU: {info.cpu_fallback_reason}"]
    data = json.loads(json.dumps(info.to_dict()))
    assert data["cpu_fallback_reason"] == info.cpu_fallback_reason
    assert data["unusable_gpus"] == [
        {"id": "nvml:0", "name": gpu.name, "uuid": gpu.uuid, "reason": gpu.unusable_reason}
    ]
    assert data["devices"][0]["usable"] is False


def test_cpu_torch_build_with_a100_points_at_the_install_page() -> None:
    info = discover(Nvml(FakeNvml(gpus=[a100(), a100()])), torch_cuda=FakeTorchCuda.cpu_build())
    assert info.cpu_fallback_reason is not None
    assert info.cpu_fallback_reason.startswith("NVML sees 2 GPUs (2× NVIDIA A100-SXM4-80GB) but ")
    assert "https://pytorch.org/get-started/locally/" in info.cpu_fallback_reason
    assert "cu126" not in info.cpu_fallback_reason


def test_torch_cuda_unavailable_says_so_without_an_install_hint() -> None:
    torch_cuda = FakeTorchCuda.unavailable("The NVIDIA driver on your system is too old")
    info = discover(Nvml(FakeNvml(gpus=[a100()])), torch_cuda=torch_cuda)
    assert info.gpus == ()
    assert info.cpu_fallback_reason == (
        "NVML sees 1 GPU (NVIDIA A100-SXM4-80GB) but torch.cuda.is_available() is False: "
        "The NVIDIA driver on your system is too old"
    )


def test_v100_without_sm70_kernels_is_skipped_beside_a_usable_a100(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml, _ = fake_machine([v100(), a100()])
    torch_cuda = FakeTorchCuda.seeing(
        nvml.gpus, arch_list=CU128_ARCHS, torch_version="2.13.0+cu128", cuda_version="12.8"
    )
    with caplog.at_level(logging.WARNING, logger="engine.hardware"):
        info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    (usable,) = info.gpus
    assert (usable.id, usable.index, usable.nvml_index, usable.gpu_type) == ("cuda:1", 1, 1, "a100")
    (old,) = info.unusable_gpus
    assert (old.id, old.index, old.gpu_type) == ("nvml:0", None, "v100")
    reason = old.unusable_reason or ""
    assert "no kernels for sm_70" in reason
    assert "sm_75, sm_80, sm_86, sm_90, sm_100, sm_120, compute_120" in reason
    assert "CUDA 12.6 wheels carry it" in reason and "whl/cu126" in reason
    assert info.cpu_fallback_reason is None  # the A100 is used
    assert [d.id for d in info.devices] == ["cuda:1", "nvml:0", "cpu"]
    assert info.device("cuda").id == "cuda:1"  # the first usable GPU
    with pytest.raises(DeviceError, match="sm_70"):
        info.device("cuda:0")
    with pytest.raises(DeviceError, match=r"Tesla V100-SXM2-16GB \(nvml:0\) cannot be used"):
        info.device("nvml:0")
    (warning,) = _warnings(caplog)
    assert warning.startswith("skipping 1 GPU torch cannot drive: nvml:0 (Tesla V100-SXM2-16GB)")


def test_v100_with_the_cu126_arch_list_is_usable() -> None:
    nvml, torch_cuda = fake_machine([v100()], arch_list=CU126_ARCHS)
    (gpu,) = discover(Nvml(nvml), torch_cuda=torch_cuda).gpus
    assert (gpu.id, gpu.gpu_type, gpu.usable) == ("cuda:0", "v100", True)


def test_unusable_only_machine_refuses_cuda_with_the_reason() -> None:
    info = discover(Nvml(FakeNvml(gpus=[v100()])), torch_cuda=FakeTorchCuda.cpu_build())
    for name in ("cuda:0", "cuda", "gpu:0"):
        with pytest.raises(DeviceError) as excinfo:
            info.device(name)
        assert "CPU build" in str(excinfo.value) and "cu126" in str(excinfo.value)
        assert excinfo.value.code == "invalid_device"
    with pytest.raises(DeviceError, match="CPU build"):
        info.device("nvml:0")
    assert info.device("cpu") is info.cpu


def test_gpu_torch_does_not_see_is_unusable() -> None:
    nvml, _ = fake_machine([v100(), a100()])
    info = discover(Nvml(nvml), torch_cuda=FakeTorchCuda.seeing(nvml.gpus, order=[1]))
    assert [d.id for d in info.gpus] == ["cuda:0"]
    (missing,) = info.unusable_gpus
    assert missing.id == "nvml:0"
    assert (missing.unusable_reason or "").startswith("torch does not see it")
    assert str(missing.uuid) in (missing.unusable_reason or "")


def test_device_torch_sees_but_nvml_does_not_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    stranger = a100(name="NVIDIA A100-PCIE-40GB")
    nvml = FakeNvml(gpus=[v100()])
    torch_cuda = FakeTorchCuda.seeing([stranger, nvml.gpus[0]])
    with caplog.at_level(logging.DEBUG, logger="engine.hardware"):
        info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    assert [(d.id, d.gpu_type) for d in info.gpus] == [("cuda:1", "v100")]
    assert any("NVML does not list it" in r.getMessage() for r in caplog.records)
    assert not _warnings(caplog)


def test_torch_uuids_may_come_without_prefix_and_in_any_case() -> None:
    gpu = v100(uuid="GPU-ABCDEF01-2345-6789-ABCD-EF0123456789")
    view = TorchCudaView(
        True,
        None,
        "2.13.0+cu126",
        "12.6",
        CU126_ARCHS,
        (hardware.TorchCudaDevice(0, "abcdef01-2345-6789-abcd-ef0123456789", "V100", (7, 0), 1),),
    )
    (found,) = discover(Nvml(FakeNvml(gpus=[gpu])), torch_cuda=view).gpus
    assert (found.id, found.uuid) == ("cuda:0", "GPU-ABCDEF01-2345-6789-ABCD-EF0123456789")


@pytest.mark.parametrize(
    ("capability", "arch_list", "expected"),
    [
        ((7, 0), CU128_ARCHS, False),
        ((7, 0), CU126_ARCHS, True),
        ((7, 5), CU128_ARCHS, True),
        ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # sm_86 code runs on 8.9
        ((8, 0), ["sm_86", "sm_90"], False),  # but not on 8.0
        ((10, 0), ["sm_80", "sm_90", "compute_90"], True),  # PTX is JIT-compiled upwards
        ((9, 0), ["sm_100", "compute_120"], False),  # and never downwards
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a"], False),  # arch-specific code runs on its own capability only
        ((12, 0), CU128_ARCHS, True),
        ((3, 7), [], True),  # torch does not say: assume it can
    ],
)
def test_arch_supported(capability: tuple[int, int], arch_list: list[str], expected: bool) -> None:
    assert arch_supported(capability, arch_list) is expected


def test_real_torch_probe_on_this_machine() -> None:
    import torch

    view = hardware.probe_torch_cuda()
    assert view.torch_version == torch.__version__
    assert view.cuda_version == torch.version.cuda
    if torch.version.cuda is None:  # a CPU wheel, as in this repository's venv
        assert not view.available and view.devices == ()
        assert (
            view.reason == f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
        )
        assert view.cpu_build
    elif view.available:  # a GPU machine: every device with a UUID torch can print
        assert len(view.devices) == torch.cuda.device_count()
        assert all(len(uuid_key(d.uuid or "")) == 32 for d in view.devices)
    assert hardware.torch_cuda_view() is hardware.torch_cuda_view()  # probed once


def test_real_torch_probe_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torch(name: str, *args: object, **kwargs: object) -> object:
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_torch)
    view = hardware.probe_torch_cuda()
    assert not view.available and view.torch_version is None
    assert "torch cannot be imported" in (view.reason or "")


def test_injected_probe_is_used_by_default(fake: FakeNvml) -> None:
    probe = FakeTorchCuda.seeing(fake.gpus, order=[1, 0])
    hardware.set_torch_cuda_probe(probe)
    assert uuid_key(hardware.torch_cuda_view().devices[0].uuid) == uuid_key(fake.gpus[1].uuid)
    assert [d.gpu_type for d in discover(Nvml(fake)).gpus] == ["a100", "v100"]
    assert probe.calls == 2


# --------------------------------------------------------------------------- MIG


def _mig_a100() -> FakeGpu:
    gpu = a100()
    gpu.add_mig("3g.40gb", 40 * GiB, memory_free=39 * GiB)
    gpu.add_mig("3g.40gb", 40 * GiB, memory_free=38 * GiB)
    return gpu


def test_mig_instances_are_devices_of_their_own() -> None:
    parent = _mig_a100()
    first, second = parent.mig_instances
    assert first is not None and second is not None
    nvml, torch_cuda = fake_machine([v100(), parent], order=[2, 0, 1])  # torch: 2nd, V100, 1st
    info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    assert [d.id for d in info.devices] == ["cuda:0", "cuda:1", "cuda:2", "cpu"]
    by_uuid = {d.uuid: d for d in info.gpus}
    assert parent.uuid not in by_uuid  # the GPU itself is not a device to run on
    one, two = by_uuid[first.uuid], by_uuid[second.uuid]
    assert (one.id, one.index, one.nvml_index, one.mig_index) == ("cuda:2", 2, 1, 0)
    assert (two.id, two.index, two.nvml_index, two.mig_index) == ("cuda:0", 0, 1, 1)
    for instance, free in ((one, 39 * GiB), (two, 38 * GiB)):
        assert instance.mig and instance.parent_uuid == parent.uuid
        assert instance.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
        assert instance.gpu_type == "a100"
        assert (instance.memory_total_bytes, instance.memory_free_bytes) == (40 * GiB, free)
        assert instance.compute_capability == (8, 0) and instance.supports_bf16
        assert not instance.energy_supported  # NVML's counter is board-wide
        assert (instance.uuid or "").startswith("MIG-")
    whole = by_uuid[nvml.gpus[0].uuid]
    assert (whole.id, whole.mig, whole.energy_supported) == ("cuda:1", False, True)
    data = json.loads(json.dumps(info.to_dict()))
    assert [d["mig"] for d in data["devices"]] == [True, False, True, False]


def test_mig_instance_torch_does_not_enumerate_is_unusable() -> None:
    parent = _mig_a100()
    first, second = parent.mig_instances
    assert first is not None and second is not None
    nvml = FakeNvml(gpus=[parent])
    info = discover(Nvml(nvml), torch_cuda=FakeTorchCuda.seeing([second]))
    (used,) = info.gpus
    assert (used.id, used.uuid, used.mig_index) == ("cuda:0", second.uuid, 1)
    (skipped,) = info.unusable_gpus
    assert (skipped.id, skipped.mig, skipped.uuid) == ("nvml:0:mig:0", True, first.uuid)
    assert f"CUDA_VISIBLE_DEVICES={first.uuid}" in (skipped.unusable_reason or "")
    with pytest.raises(DeviceError, match="MIG instance"):
        info.device("nvml:0:mig:0")


def test_mig_name_fallback_and_empty_slots() -> None:
    parent = a100()
    instance = parent.add_mig("1g.10gb", 10 * GiB, name="NVIDIA A100-SXM4-80GB")
    parent.mig_instances.insert(0, None)  # slot 0 empty: NVML says NOT_FOUND
    info = discover(Nvml(FakeNvml(gpus=[parent])), torch_cuda=FakeTorchCuda.seeing([instance]))
    (gpu,) = info.gpus
    assert (gpu.name, gpu.mig_index, gpu.memory_total_bytes) == (
        "NVIDIA A100-SXM4-80GB MIG",
        1,
        10 * GiB,
    )


def test_mig_mode_without_instances_lists_the_gpu_with_the_reason() -> None:
    parent = a100(mig_mode=(1, 1))
    info = discover(Nvml(FakeNvml(gpus=[parent])), torch_cuda=FakeTorchCuda())
    (gpu,) = info.unusable_gpus
    assert (gpu.id, gpu.mig, gpu.uuid, gpu.energy_supported) == (
        "nvml:0",
        False,
        parent.uuid,
        False,
    )
    assert "MIG mode is enabled but no MIG instance is configured" in (gpu.unusable_reason or "")
    assert "MIG mode is enabled" in (info.cpu_fallback_reason or "")


def test_mig_pending_is_not_enabled() -> None:
    gpu = a100(mig_mode=(0, 1))  # enabled after the next reset: still a whole GPU now
    nvml, torch_cuda = fake_machine([gpu])
    (found,) = discover(Nvml(nvml), torch_cuda=torch_cuda).gpus
    assert (found.id, found.mig, found.uuid) == ("cuda:0", False, gpu.uuid)


def test_cuda_visible_devices_names_a_mig_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = _mig_a100()
    _, second = parent.mig_instances
    assert second is not None and second.uuid is not None
    other = v100()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", second.uuid)
    info = discover(Nvml(FakeNvml(gpus=[other, parent])), torch_cuda=FakeTorchCuda.seeing([second]))
    assert [(d.id, d.uuid) for d in info.devices[:-1]] == [("cuda:0", second.uuid)]


def test_nvml_mig_helpers() -> None:
    parent = _mig_a100()
    nvml = Nvml(FakeNvml(gpus=[v100(), parent]))
    assert not nvml.mig_enabled(0) and nvml.mig_handles(0) == []  # no MIG on a V100
    assert nvml.mig_enabled(1)
    handles = nvml.mig_handles(1)
    assert [k for k, _ in handles] == [0, 1]
    handle = handles[0][1]
    assert nvml.uuid_of(handle) == parent.mig_instances[0].uuid  # type: ignore[union-attr]
    assert nvml.memory_info_of(handle) == (40 * GiB, 39 * GiB)
    assert nvml.name_of(handle) == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert nvml.compute_capability_of(handle) == (8, 0)
    assert nvml.mig_handle(1, 5) is None  # empty slot: None, not an exception
    assert nvml.mig_handle(7, 0) is None
    assert nvml.name_of(None) is None and nvml.memory_info_of(None) is None
    assert nvml.memory_info(1) == (80 * GiB, 79 * GiB)  # the whole GPU by its index


def test_nvml_without_mig_functions_sees_no_mig() -> None:
    class OldNvml(FakeNvml):
        def __getattribute__(self, name: str) -> object:
            if "Mig" in name:
                raise AttributeError(name)
            return super().__getattribute__(name)

    gpu = a100(mig_mode=(1, 1))
    nvml = Nvml(OldNvml(gpus=[gpu]))
    assert not nvml.mig_enabled(0)
    (found,) = discover(nvml, torch_cuda=FakeTorchCuda.seeing([gpu])).gpus
    assert found.uuid == gpu.uuid


# --------------------------------------------------------------------------- CUDA order


def test_cuda_visible_devices_indices(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    torch_cuda = FakeTorchCuda.seeing(fake.gpus, order=[1])  # CUDA honours the mask too
    (only,) = discover(Nvml(fake), torch_cuda=torch_cuda).devices[:-1]
    assert (only.id, only.index, only.nvml_index, only.gpu_type) == ("cuda:0", 0, 1, "a100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    info = discover(Nvml(fake), torch_cuda=FakeTorchCuda())
    assert info.gpus == () and info.unusable_gpus == ()
    assert info.cpu_fallback_reason == "CUDA_VISIBLE_DEVICES='' hides the 2 GPUs NVML sees"


def test_cuda_visible_devices_override_and_uuid(fake: FakeNvml) -> None:
    a_uuid = fake.gpus[1].uuid
    assert a_uuid is not None
    torch_cuda = FakeTorchCuda.seeing(fake.gpus, order=[1, 0])
    gpus = discover(Nvml(fake), cuda_visible_devices=f"{a_uuid[:12]},0", torch_cuda=torch_cuda).gpus
    assert [(d.id, d.nvml_index, d.gpu_type) for d in gpus] == [
        ("cuda:0", 1, "a100"),
        ("cuda:1", 0, "v100"),
    ]


def test_cuda_visible_nvml_indices_rules() -> None:
    uuids = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-aaaa-3"]
    assert cuda_visible_nvml_indices(uuids, None) == [0, 1, 2]
    assert cuda_visible_nvml_indices(uuids, "2,0") == [2, 0]
    assert cuda_visible_nvml_indices(uuids, "0,7,1") == [0]  # stops at the first bad entry
    assert cuda_visible_nvml_indices(uuids, "1,1") == [1]
    assert cuda_visible_nvml_indices(uuids, "GPU-bbbb") == [1]
    assert cuda_visible_nvml_indices(uuids, "GPU-aaaa") == []  # ambiguous prefix
    assert cuda_visible_nvml_indices(uuids, "") == []
    assert cuda_visible_nvml_indices(uuids, "-1") == []


def test_discover_sets_pci_bus_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    discover(Nvml(FakeNvml(fail_init=True)))
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# --------------------------------------------------------------------------- Nvml session


def test_nvml_readings(fake: FakeNvml) -> None:
    nvml = Nvml(fake)
    assert nvml.available() and nvml.error() is None
    assert nvml.device_count() == 2
    assert nvml.memory_info(1) == (80 * GiB, 79 * GiB)
    assert nvml.power_watts(0) == pytest.approx(250.0)
    start = nvml.energy_millijoules(0)
    assert start is not None
    fake.gpus[0].advance_energy(1500)
    assert nvml.energy_millijoules(0) == start + 1500
    fake.advance_time(2.0)  # 250 W for 2 s
    assert nvml.energy_millijoules(0) == start + 1500 + 500_000
    assert nvml.energy_millijoules(7) is None  # no such GPU: None, not an exception
    assert nvml.memory_info(7) is None


def test_nvml_energy_step_and_lost_gpu(fake: FakeNvml) -> None:
    nvml = Nvml(fake)
    fake.gpus[1].energy_step_mj = 40
    first = nvml.energy_millijoules(1)
    second = nvml.energy_millijoules(1)
    assert first is not None and second == first + 40
    fake.gpus[1].lost = True
    assert nvml.energy_millijoules(1) is None
    assert nvml.name(1) is None


def test_nvml_close_is_idempotent(fake: FakeNvml) -> None:
    with Nvml(fake) as nvml:
        assert fake.initialized
    assert not fake.initialized and not nvml.available()
    nvml.close()
    assert fake.shutdown_calls == 1
    assert nvml.energy_millijoules(0) is None  # closed: readings stop, nothing raises


def test_nvml_module_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> object:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr("engine.hardware.nvml.nvml_module", missing)  # where Nvml looks it up
    nvml = Nvml()
    assert not nvml.available()
    assert "pynvml" in (nvml.error() or "")
    assert isinstance(nvml.init_error(), NvmlLibraryNotFound)
    assert discover(nvml).gpus == ()


# --------------------------------------------------------------------------- typed NVML errors


@pytest.mark.parametrize(
    ("code", "cls", "message"),
    [
        (NVML_ERROR_UNINITIALIZED, NvmlNotInitialized, "Uninitialized"),
        (NVML_ERROR_INVALID_ARGUMENT, NvmlInvalidArgument, "Invalid Argument"),
        (NVML_ERROR_NOT_SUPPORTED, NvmlNotSupported, "Not Supported"),
        (NVML_ERROR_NO_PERMISSION, NvmlNoPermission, "Insufficient Permissions"),
        (NVML_ERROR_NOT_FOUND, NvmlNotFound, "Not Found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, NvmlDriverNotLoaded, "Driver Not Loaded"),
        (NVML_ERROR_LIBRARY_NOT_FOUND, NvmlLibraryNotFound, "NVML Shared Library Not Found"),
        (NVML_ERROR_GPU_IS_LOST, NvmlGpuLost, "GPU is lost"),
        (NVML_ERROR_UNKNOWN, NvmlError, "Unknown Error"),
    ],
)
def test_nvml_error_codes_map_to_typed_errors(
    code: int, cls: type[NvmlError], message: str
) -> None:
    error = nvml_error_from(NVMLError(code), "nvmlDeviceGetName")
    assert type(error) is cls
    assert isinstance(error, NvmlError) and isinstance(error, DeviceError)
    assert (str(error), error.nvml_code, error.function) == (message, code, "nvmlDeviceGetName")
    assert error.code.startswith("nvml_")


def test_nvml_error_tree_and_the_real_pynvml_codes() -> None:
    import pynvml

    assert issubclass(NvmlLibraryNotFound, NvmlUnavailable)
    assert issubclass(NvmlDriverNotLoaded, NvmlUnavailable)
    assert not issubclass(NvmlNotSupported, NvmlUnavailable)
    real = {
        pynvml.NVML_ERROR_NOT_SUPPORTED: NvmlNotSupported,
        pynvml.NVML_ERROR_GPU_IS_LOST: NvmlGpuLost,
        pynvml.NVML_ERROR_RESET_REQUIRED: NvmlGpuLost,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: NvmlNotSupported,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: NvmlLibraryNotFound,
        pynvml.NVML_ERROR_IN_USE: NvmlError,
    }
    for code, cls in real.items():  # pynvml's own exception classes, by their codes
        error = nvml_error_from(pynvml.NVMLError(code))
        assert type(error) is cls and error.nvml_code == code
    assert type(nvml_error_from(AttributeError("nvmlDeviceGetMigMode"))) is NvmlNotSupported
    assert type(nvml_error_from(ImportError("no pynvml"))) is NvmlLibraryNotFound
    assert type(nvml_error_from(OSError("boom"))) is NvmlError


def test_nvml_call_raises_typed_errors_and_readings_keep_them(fake: FakeNvml) -> None:
    fake.gpus[1].lost = True
    nvml = Nvml(fake)
    handle = nvml.call("nvmlDeviceGetHandleByIndex", 0)
    assert nvml.call("nvmlDeviceGetName", handle) == "Tesla V100-SXM2-16GB"
    with pytest.raises(NvmlInvalidArgument):
        nvml.call("nvmlDeviceGetHandleByIndex", 7)
    lost = nvml.call("nvmlDeviceGetHandleByIndex", 1)
    with pytest.raises(NvmlGpuLost) as excinfo:
        nvml.call("nvmlDeviceGetTotalEnergyConsumption", lost)
    assert excinfo.value.function == "nvmlDeviceGetTotalEnergyConsumption"
    assert isinstance(excinfo.value.__cause__, NVMLError)
    with pytest.raises(NvmlNotSupported):
        nvml.call("nvmlDeviceGetNoSuchThing", handle)  # older pynvml: the function is missing
    # the failure-safe readings: None, and the reason on the side
    assert nvml.energy_millijoules(1) is None
    assert isinstance(nvml.last_error, NvmlGpuLost)
    assert nvml.memory_info(7) is None
    assert isinstance(nvml.last_error, NvmlInvalidArgument)
    assert nvml.energy_millijoules(0) is not None
    assert nvml.last_error is None  # a success clears it
    failed = nvml.try_call("nvmlDeviceGetName", lost)
    assert isinstance(failed, NvmlGpuLost) and nvml.last_error is failed
    assert nvml.try_call("nvmlDeviceGetCount") == 2 and nvml.last_error is None
    nvml.close()
    with pytest.raises(NvmlNotInitialized):
        nvml.call("nvmlDeviceGetCount")
    assert nvml.device_count() == 0 and isinstance(nvml.last_error, NvmlNotInitialized)


def test_last_error_is_per_thread(fake: FakeNvml) -> None:
    import threading

    nvml = Nvml(fake)
    assert nvml.memory_info(7) is None
    seen: list[NvmlError | None] = []
    worker = threading.Thread(target=lambda: seen.append(nvml.last_error))
    worker.start()
    worker.join()
    assert seen == [None] and isinstance(nvml.last_error, NvmlInvalidArgument)


def test_failed_init_is_typed_and_calls_raise_it() -> None:
    nvml = Nvml(FakeNvml(fail_init=True, init_error=NVML_ERROR_DRIVER_NOT_LOADED))
    assert nvml.error() == "Driver Not Loaded"
    error = nvml.init_error()
    assert isinstance(error, NvmlDriverNotLoaded) and isinstance(error, NvmlUnavailable)
    with pytest.raises(NvmlDriverNotLoaded, match="Driver Not Loaded"):
        nvml.call("nvmlDeviceGetCount")
    assert Nvml(FakeNvml()).init_error() is None


def test_discovery_says_why_energy_is_unavailable() -> None:
    """The NVML reason reaches the device (and ``info --json``) instead of being dropped."""
    k80 = FakeGpu("Tesla K80", 12 * GiB, compute_capability=(3, 7), energy_supported=False)
    nvml, torch_cuda = fake_machine([k80, a100()], arch_list=["sm_37", "sm_80"])
    info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    old, new = info.gpus
    assert not old.energy_supported and old.energy_unsupported_reason == "NVML: Not Supported"
    assert new.energy_supported and new.energy_unsupported_reason is None
    assert info.cpu.energy_unsupported_reason is None
    data = json.loads(json.dumps(info.to_dict()))
    assert [d["energy_unsupported_reason"] for d in data["devices"]] == [
        "NVML: Not Supported", None, None,
    ]  # fmt: skip
    nvml.fail["nvmlDeviceGetTotalEnergyConsumption"] = NVML_ERROR_NO_PERMISSION
    again = discover(Nvml(nvml), torch_cuda=torch_cuda)
    reasons = [d.energy_unsupported_reason for d in again.gpus]
    assert reasons == ["NVML: Insufficient Permissions"] * 2


def test_mig_devices_say_why_they_have_no_energy_counter() -> None:
    parent = _mig_a100()
    nvml, torch_cuda = fake_machine([parent])
    for device in discover(Nvml(nvml), torch_cuda=torch_cuda).gpus:
        assert not device.energy_supported
        assert "board-wide" in (device.energy_unsupported_reason or "")


def test_discovery_says_why_memory_and_uuid_are_unknown(caplog: pytest.LogCaptureFixture) -> None:
    gpu = a100()
    nvml, torch_cuda = fake_machine([gpu])
    nvml.fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_NO_PERMISSION
    with caplog.at_level(logging.INFO, logger="engine.hardware"):
        (found,) = discover(Nvml(nvml), torch_cuda=torch_cuda).gpus
    assert found.memory_total_bytes == gpu.memory_total  # torch's figure stands in
    assert [r.getMessage() for r in caplog.records if r.name == "engine.hardware"] == [
        "NVML cannot read the memory of nvml:0 (NVIDIA A100-SXM4-80GB): "
        "NVML: Insufficient Permissions"
    ]
    nvml.fail = {"nvmlDeviceGetUUID": NVML_ERROR_GPU_IS_LOST}
    (unmatched,) = discover(Nvml(nvml), torch_cuda=torch_cuda).unusable_gpus
    assert unmatched.unusable_reason == (
        "NVML gives no UUID for it (NVML: GPU is lost), so it cannot be matched to a CUDA device"
    )
    parent = _mig_a100()  # a MIG instance without a UUID says why too
    nvml = FakeNvml(gpus=[parent], fail={"nvmlDeviceGetUUID": NVML_ERROR_NO_PERMISSION})
    instances = [m for m in parent.mig_instances if m is not None]
    info = discover(Nvml(nvml), torch_cuda=FakeTorchCuda.seeing(instances))
    assert [d.unusable_reason for d in info.unusable_gpus] == [
        "NVML gives no UUID for it (NVML: Insufficient Permissions), so it cannot be matched "
        "to a CUDA device"
    ] * 2


# --------------------------------------------------------------------------- cache dir


def test_engine_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cache import engine_cache_dir

    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(target))
    assert hardware.engine_cache_dir() == engine_cache_dir() == target  # the old name still works
    assert target.is_dir()


# --------------------------------------------------------------------------- module hygiene


def _imported(nodes: list[ast.stmt] | list[ast.AST]) -> list[str]:
    """The modules the ``import`` statements among ``nodes`` name."""
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_module_of_the_package_imports_torch_at_top_level() -> None:
    """Nor transformers or pynvml; and hardware never imports the benchmarks (bench may
    import hardware, not the other way round), not even inside a function."""
    modules = sorted(Path(hardware.__file__).parent.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "specs", "nvml", "cpu", "discovery"}
    for module in modules:
        tree = ast.parse(module.read_text())
        heavy = {"torch", "transformers", "pynvml"}
        assert not [m for m in _imported(tree.body) if m.split(".")[0] in heavy], module.name
        anywhere = _imported(list(ast.walk(tree)))
        assert not [m for m in anywhere if m.startswith("engine.bench")], module.name
