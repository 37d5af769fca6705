"""The compiled CPU kernel cannot be subverted (issue 15, item 4).

The engine loads only a library it built itself, from a 0700 folder of its own,
after checking the owner and mode of the folder and the file (on the open
descriptors) and the library's sha256 against the build record written when it
was built. A library planted by someone else never runs: its constructor, which
would run inside ``dlopen`` before any self-check, must not run at all. Results
computed by the kernel record its compiler, version, flags and instruction set.

The second local user is simulated: by ``chown`` where the tests run as root,
and by making ``os.geteuid`` answer another uid otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_NAME

from engine import Engine
from engine.jobs import ExecutionProfile, JobResult
from engine.kernels import KERNEL_NAME, rowgemm
from engine.kernels import library as kernel_library
from engine.registry import Registry

PLANTED_C = r"""
#include <fcntl.h>
#include <unistd.h>

__attribute__((constructor)) static void planted(void) {
    int fd = open(MARKER, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
        (void)write(fd, "ran\n", 4);
        close(fd);
    }
}

int rowgemm_panel_width(void) { return 32; }
void rowgemm(void) {}
"""


def _compiler() -> str:
    compiler = kernel_library._compiler()
    if compiler is None:
        pytest.skip("no C compiler here")
    return compiler


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test loads the kernel afresh, with the kernel on, and leaves no state behind."""
    monkeypatch.delenv("AITBC_ENGINE_LINEAR", raising=False)
    monkeypatch.delenv("CC", raising=False)
    rowgemm.reset_for_tests()
    yield
    rowgemm.reset_for_tests()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(library, marker)``: a library whose constructor writes ``marker`` when it is loaded."""
    base = tmp_path_factory.mktemp("planted")
    source, library, marker = base / "planted.c", base / "planted.so", base / "ran"
    source.write_text(PLANTED_C)
    subprocess.run([_compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source),
                    "-o", str(library)], check=True, capture_output=True, timeout=120)
    return library, marker


def _plant(planted: tuple[Path, Path], cache: Path, *, folder_mode: int = 0o700,
           record: str | None = None) -> Path:
    """Put the planted library where the engine looks for its kernel under ``cache``.

    ``record``: ``"matching"`` writes a build record with the planted library's own digest
    (as an attacker who can write the folder would), ``"other"`` one with another digest
    (as the engine wrote for its own build); None writes none.
    """
    library, marker = planted
    marker.unlink(missing_ok=True)
    target = kernel_library.library_path(_compiler(), cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(folder_mode)
    shutil.copyfile(library, target)
    target.chmod(0o600)
    if record is not None:
        data = target.read_bytes() if record == "matching" else b"the engine's own build"
        doc = {"format": kernel_library.RECORD_FORMAT, "compiler": _compiler(),
               "compiler_version": "cc 1.0", "flags": list(kernel_library.FLAGS), "isa": ["fma"],
               "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        kernel_library.record_path(target).write_text(json.dumps(doc))
        kernel_library.record_path(target).chmod(0o600)
    return target


def _falls_back_to_blas() -> bool:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    return rowgemm.pack_linear_layers(model, respect_setting=False) == 0 and \
        isinstance(model[0], torch.nn.Linear)


def test_a_planted_library_without_a_build_record_never_runs(
        planted: tuple[Path, Path], tmp_path: Path) -> None:
    target = _plant(planted, tmp_path / "cache")
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists(), "the planted library's constructor ran"
    assert not status.available and status.build is None
    assert str(target) in status.reason and "no build record" in status.reason
    assert _falls_back_to_blas()
    assert target.exists()  # refused, not deleted


def test_a_library_whose_digest_is_not_the_recorded_one_never_runs(
        planted: tuple[Path, Path], tmp_path: Path) -> None:
    target = _plant(planted, tmp_path / "cache", record="other")
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists(), "the planted library's constructor ran"
    assert not status.available
    assert str(target) in status.reason and "sha256" in status.reason
    assert "recorded" in status.reason and "delete it" in status.reason
    assert _falls_back_to_blas()
    assert target.exists() and kernel_library.record_path(target).exists()


@pytest.mark.parametrize("mode", [0o666, 0o620], ids=oct)
def test_a_library_others_can_write_never_runs(
        planted: tuple[Path, Path], tmp_path: Path, mode: int) -> None:
    target = _plant(planted, tmp_path / "cache", record="matching")
    target.chmod(mode)
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists()
    assert not status.available and f"mode {mode:04o}" in status.reason


def test_a_symbolic_link_in_place_of_the_library_is_refused(
        planted: tuple[Path, Path], tmp_path: Path) -> None:
    target = _plant(planted, tmp_path / "cache", record="matching")
    target.unlink()
    target.symlink_to(planted[0])
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists()
    assert not status.available and "symbolic link" in status.reason


@pytest.mark.parametrize("mode", [0o777, 0o755], ids=oct)
def test_a_loose_folder_of_ours_is_tightened_with_a_warning(
        planted: tuple[Path, Path], tmp_path: Path, mode: int,
        caplog: pytest.LogCaptureFixture) -> None:
    target = _plant(planted, tmp_path / "cache", folder_mode=mode)
    with caplog.at_level(logging.WARNING, logger="engine.kernels.library"):
        status = rowgemm.kernel_status(tmp_path / "cache")
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert any("tightened" in r.getMessage() and f"{mode:04o}" in r.getMessage()
               for r in caplog.records)
    assert not planted[1].exists() and not status.available  # its files are still checked


@pytest.mark.parametrize("how", ["geteuid", "chown"])
def test_a_folder_of_another_user_is_refused_and_left_alone(
        planted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        how: str) -> None:
    # Everything else about the planted library passes (its record matches its bytes), so
    # only the owner check stands between it and dlopen.
    target = _plant(planted, tmp_path / "cache", folder_mode=0o755, record="matching")
    owner = target.parent.stat().st_uid
    if how == "chown":
        if os.geteuid() != 0:
            pytest.skip("making a folder of another user needs root")
        os.chown(target.parent, 4242, 4242)
        os.chown(target, 4242, 4242)
        owner = 4242
    with monkeypatch.context() as patched:
        if how == "geteuid":  # this process plays another user, to whom the folder is foreign
            real = os.geteuid()
            patched.setattr(os, "geteuid", lambda: real + 4242)
        status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists(), "the planted library's constructor ran"
    assert not status.available
    assert str(target.parent) in status.reason and f"belongs to uid {owner}" in status.reason
    assert "AITBC_ENGINE_CACHE" in status.reason
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o755  # another's folder: untouched
    assert target.exists() and kernel_library.record_path(target).exists()  # and nothing deleted


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
@pytest.mark.parametrize("which", ["library", "record"])
def test_a_file_of_another_user_in_our_folder_is_refused(
        planted: tuple[Path, Path], tmp_path: Path, which: str) -> None:
    target = _plant(planted, tmp_path / "cache", record="matching")
    planted_file = target if which == "library" else kernel_library.record_path(target)
    os.chown(planted_file, 4242, 4242)
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists(), "the planted library's constructor ran"
    assert not status.available
    assert str(planted_file) in status.reason and "belongs to uid 4242" in status.reason
    assert planted_file.exists()


def test_an_unreadable_build_record_is_refused(
        planted: tuple[Path, Path], tmp_path: Path) -> None:
    target = _plant(planted, tmp_path / "cache", record="matching")
    kernel_library.record_path(target).write_text('{"format": "something else"}')
    status = rowgemm.kernel_status(tmp_path / "cache")
    assert not planted[1].exists()
    assert not status.available and "build record is unreadable" in status.reason


def test_profiles_without_the_kernel_build_still_parse_and_new_ones_round_trip() -> None:
    old = {"model": "m", "weights": "random", "weights_digest": "sha256:" + "0" * 64,
           "dtype": "float32", "device_class": "cpu", "device_count": 1, "torch_version": "2",
           "transformers_version": "4", "engine_version": "0.1", "hash_version": "1",
           "linear_kernel": KERNEL_NAME}
    profile = ExecutionProfile.model_validate(old)
    assert profile.kernel_compiler is None and profile.kernel_isa is None
    new = profile.model_copy(update={"kernel_compiler": "/usr/bin/cc",
                                     "kernel_compiler_version": "cc 12",
                                     "kernel_flags": ("-O3",), "kernel_isa": ("avx2", "fma")})
    assert ExecutionProfile.model_validate_json(new.model_dump_json()) == new
    assert "kernel_isa" not in json.loads(
        JobResult(job_id="j", model="m", task="text-generation", status="completed",
                  profile=profile).to_json())["profile"]


# --------------------------------------------------------------------------- a real build


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a fresh build of the kernel (shared by the tests below)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    _compiler()
    rowgemm.reset_for_tests()
    status = rowgemm.kernel_status(cache)
    rowgemm.reset_for_tests()
    if not status.available:
        pytest.skip(f"the CPU kernel is not available here: {status.reason}")
    return cache


def _use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> rowgemm.KernelStatus:
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(cache))
    rowgemm.reset_for_tests()
    return rowgemm.kernel_status()


@pytest.mark.slow
def test_a_fresh_build_is_private_and_recorded(built: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    status = _use_cache(monkeypatch, built)
    assert status.available and status.library is not None and status.build is not None
    library, record = status.library, kernel_library.record_path(status.library)
    assert stat.S_IMODE(library.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(library.stat().st_mode) == 0o600  # no exec bit: dlopen needs none
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    doc = json.loads(record.read_text())
    assert doc["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert doc["size"] == library.stat().st_size
    build = status.build
    assert doc == {"format": kernel_library.RECORD_FORMAT, **build.to_dict()}
    assert build.compiler == _compiler() and build.flags == kernel_library.FLAGS
    version = subprocess.run([build.compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    assert build.compiler_version == version
    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in build.isa  # every x86-64 target has it
    assert list(build.isa) == sorted(set(build.isa))
    mtime = library.stat().st_mtime_ns
    assert _use_cache(monkeypatch, built).available  # loaded again, not rebuilt
    assert library.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_cpu_job_through_the_kernel_records_its_build(
        built: Path, registry_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _use_cache(monkeypatch, built).build
    assert build is not None
    with Engine(devices=["cpu"], registry=Registry.load(registry_path)) as engine:
        result = engine.run({"task": "text-generation", "model": TINY_NAME,
                             "prompt": "Hello GPU", "params": {"max_tokens": 4}})
    assert result.status == "completed" and result.profile is not None
    profile = result.profile
    assert profile.linear_kernel == KERNEL_NAME
    assert (profile.kernel_compiler, profile.kernel_compiler_version, profile.kernel_flags,
            profile.kernel_isa) == (build.compiler, build.compiler_version, build.flags,
                                    build.isa)
    shown = json.loads(result.to_json())["profile"]
    assert shown["kernel_flags"] == list(build.flags) and shown["kernel_isa"] == list(build.isa)
    assert JobResult.model_validate_json(result.to_json()).profile == profile


@pytest.mark.slow
def test_a_refused_kernel_leaves_jobs_on_blas_with_no_build_in_the_profile(
        planted: tuple[Path, Path], tmp_path: Path, registry_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(planted, tmp_path / "cache", record="other")
    assert not _use_cache(monkeypatch, tmp_path / "cache").available
    with Engine(devices=["cpu"], registry=Registry.load(registry_path)) as engine:
        result = engine.run({"task": "text-generation", "model": TINY_NAME,
                             "prompt": "Hello GPU", "params": {"max_tokens": 4}})
    assert not planted[1].exists()
    assert result.status == "completed" and result.profile is not None
    assert result.profile.linear_kernel == "blas" and result.profile.kernel_compiler is None


@pytest.mark.slow
def test_info_shows_the_kernel_build(built: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main
    from engine.inventory import hardware_document

    build = _use_cache(monkeypatch, built).build
    assert build is not None
    assert hardware_document()["cpu_linear_kernel"]["build"] == build.to_dict()
    assert main(["info", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["cpu_linear_kernel"]
    assert shown["in_use"] and shown["build"] == build.to_dict()
    assert main(["info"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert build.compiler_version in text and build.sha256 in text
    assert " ".join(build.flags) in text and " ".join(build.isa) in text


@pytest.mark.slow
def test_a_tampered_build_is_refused_until_deleted_then_rebuilt(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    library = next((cache / "kernels").glob("rowgemm-*.so"))
    with library.open("ab") as fh:
        fh.write(b"\0")
    status = _use_cache(monkeypatch, cache)
    assert not status.available and "sha256" in status.reason and str(library) in status.reason
    library.unlink()
    kernel_library.record_path(library).unlink()
    status = _use_cache(monkeypatch, cache)
    assert status.available and status.library == library
