"""Building and loading the CPU kernel's shared library, and nothing another user wrote.

Loading a shared library runs its code (its constructors run inside
``dlopen``, before any check of what it computes), so the engine loads only a
library it built itself, in a folder only it can write:

* ``<cache>/kernels`` is made with mode 0700. One that belongs to another user
  is refused (nothing in it is loaded, nothing in it is deleted); one of ours
  that is looser than 0700 is tightened to 0700 with a warning (each file in
  it is still checked, so whatever another user put there while it was loose
  is refused below).
* The compiler runs with umask 077; the library is made 0600 (``dlopen`` needs
  no exec bit) and written atomically, and beside it goes its build record
  ``rowgemm-<key>.json`` (0600): the library's sha256 and size, the compiler,
  its version line, the flags, and the instruction-set features the build
  targeted (the compiler's predefined macros under those flags: ``avx2``,
  ``fma``, ``avx512f``, ``neon`` ...). Builds are serialised by a lock file.
* Before loading, the library and its record are opened (no symbolic links)
  and checked on the open descriptors: a regular file, owned by this user,
  writable by nobody else; then the library's bytes, read from that same
  descriptor, must have the recorded sha256 and size. The library is then
  loaded through ``/proc/self/fd/N`` (the very file checked; elsewhere, its
  path, after checking it still names that file). Any failure refuses the
  kernel with a reason naming the file and the problem, and the engine keeps
  BLAS. A refused file is never deleted or overwritten, even one of ours with
  a wrong digest (that means someone changed it): the reason says to delete
  it, and the next run builds afresh.

The build record is `KernelStatus.build`; results computed by the kernel carry
its compiler, version, flags and features in their execution profile, since
they change the floats (a build without FMA differs in most output floats).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache import engine_cache_dir
from engine.errors import EngineError
from engine.hardware import cpu_identity
from engine.settings import settings
from engine.state import write_private

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
# The C files compiled together into the one library, and the header they share.
SOURCES = tuple(_HERE / name for name in ("pool.c", "rowgemm.c", "blockgemm.c", "decoder.c"))
HEADERS = (_HERE / "kernel.h",)
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-ffp-contract=fast", "-pthread",
         "-shared", "-fPIC")
# The layout of the kernel folder and build record; part of the library's key, so a
# library left by an engine that kept no record is never looked at.
RECORD_FORMAT = "aitbc-rowgemm/3"
FOLDER_MODE = 0o700
FILE_MODE = 0o600
_RECORD_LIMIT = 64 * 1024
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
__all__ = ["FLAGS", "RECORD_FORMAT", "SOURCES", "KernelBuild", "KernelRefusedError",
           "KernelUnavailableError", "library_path", "load_library", "record_path",
           "target_features"]


@dataclass(frozen=True)
class KernelBuild:
    """How the loaded library was built: what changes the floats it computes, and its digest."""

    compiler: str
    compiler_version: str
    flags: tuple[str, ...]
    isa: tuple[str, ...]  # the instruction-set features the build targeted, e.g. ("avx2", "fma")
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (the build record file holds the same keys)."""
        return {"compiler": self.compiler, "compiler_version": self.compiler_version,
                "flags": list(self.flags), "isa": list(self.isa), "sha256": self.sha256,
                "size": self.size}


class KernelUnavailableError(EngineError):
    """The kernel's library cannot be built or loaded here; ``path`` is the file, when known."""

    code = "kernel_unavailable"

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class KernelRefusedError(KernelUnavailableError):
    """The kernel's folder or files fail the ownership, mode or digest checks: not loaded."""

    code = "kernel_refused"


def _compiler() -> str | None:
    named = settings().cc
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
        return done.stdout.splitlines()[0] if done.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# The predefined macros that name instruction-set features which change floating-point
# results or speed: x86 (SSE*, AVX*, FMA, F16C) and Arm (NEON, FMA, SVE, FP16, BF16, ...).
_ISA_MACRO = re.compile(r"__(SSE[0-9A-Z_]*|SSSE3|AVX[0-9A-Z_]*|FMA4?|F16C)__"
                        r"|__ARM_(NEON|FEATURE_(?:FMA|SVE[0-9A-Z_]*|FP16[0-9A-Z_]*|BF16[0-9A-Z_]*"
                        r"|DOTPROD|MATMUL_INT8))")


def target_features(compiler: str) -> tuple[str, ...]:
    """The instruction-set features ``compiler`` targets under the kernel's flags, sorted.

    Read from its predefined macros (``-dM -E``, which gcc and clang both
    answer): ``__AVX2__`` gives ``avx2``, ``__ARM_FEATURE_FMA`` gives ``fma``.
    Empty when the compiler cannot say.
    """
    flags = [flag for flag in FLAGS if flag != "-shared"]
    try:
        done = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    found: set[str] = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "#define":
            match = _ISA_MACRO.fullmatch(parts[1])
            if match and not parts[1].endswith("_MATH__"):
                found.add((match.group(1) or match.group(2)).lower().removeprefix("feature_"))
    return tuple(sorted(found))


def library_path(compiler: str, cache_dir: Path | None = None) -> Path:
    """Where the library built by ``compiler`` for this CPU lives in the engine cache."""
    key = hashlib.sha256()
    for part in (RECORD_FORMAT.encode(), *(f.read_bytes() for f in SOURCES + HEADERS),
                 " ".join(FLAGS).encode(),
                 compiler.encode(), _compiler_version(compiler).encode(),
                 cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    return (cache_dir or engine_cache_dir()) / "kernels" / f"rowgemm-{key.hexdigest()[:16]}.so"


def record_path(library: Path) -> Path:
    """The build record kept beside ``library`` (``rowgemm-<key>.json``)."""
    return library.with_suffix(".json")


# --------------------------------------------------------------------------- integrity


def _refuse(path: Path, problem: str) -> KernelRefusedError:
    return KernelRefusedError(f"the CPU linear kernel's {path} was refused: {problem}")


def _open_private_folder(folder: Path) -> int:
    """Make ``folder`` (0700) or open it; refuse another user's, tighten a loose one of ours.

    Returns a descriptor of the folder; every later open is relative to it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, FOLDER_MODE)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        info = os.fstat(fd)
        me = os.geteuid()
        if info.st_uid != me:
            raise _refuse(folder, f"the folder belongs to uid {info.st_uid}, not to you (uid "
                                  f"{me}), so another user could put code in it; nothing in it "
                                  "is loaded (set AITBC_ENGINE_CACHE to a folder of your own)")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            os.fchmod(fd, FOLDER_MODE)
            log.warning("the CPU kernel folder %s had mode %04o; tightened it to %04o (each "
                        "file in it is still checked before it is loaded)", folder, mode,
                        FOLDER_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_own_file(folder_fd: int, path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` (in the folder ``folder_fd``) for reading, if it is a regular file of ours
    that nobody else can write; returns the descriptor and its status."""
    try:
        fd = os.open(path.name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK,
                     dir_fd=folder_fd)
    except OSError as exc:
        if os.path.islink(path):
            raise _refuse(path, "it is a symbolic link") from exc
        raise _refuse(path, f"it cannot be opened ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        me = os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "it is not a regular file")
        if info.st_uid != me:
            raise _refuse(path, f"it belongs to uid {info.st_uid}, not to you (uid {me}); it "
                                "was not built by you and is left where it is")
        if info.st_mode & 0o022:
            raise _refuse(path, f"its mode {stat.S_IMODE(info.st_mode):04o} lets other users "
                                "write it (delete it and the engine builds a new one)")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _digest(fd: int) -> tuple[str, int]:
    """The sha256 and size of the bytes read from ``fd``, from its start."""
    h, size = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, size):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _read_record(fd: int, path: Path) -> KernelBuild:
    """The build record read from ``fd``, validated."""
    data = os.pread(fd, _RECORD_LIMIT + 1, 0)
    try:
        if len(data) > _RECORD_LIMIT:
            raise ValueError("it is too large")
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise ValueError(f"it is not a {RECORD_FORMAT} record")
        build = KernelBuild(
            compiler=_text(doc, "compiler"), compiler_version=_text(doc, "compiler_version"),
            flags=_texts(doc, "flags"), isa=_texts(doc, "isa"), sha256=_text(doc, "sha256"),
            size=doc["size"])
        if not re.fullmatch(r"[0-9a-f]{64}", build.sha256) or type(build.size) is not int:
            raise ValueError("its sha256 or size is malformed")
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"the build record is unreadable ({exc}); delete it and the "
                            "library beside it, and the engine builds a new one") from exc
    return build


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _texts(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} is not a list of strings")
    return tuple(value)


def _verified(folder_fd: int, library: Path) -> tuple[int, KernelBuild]:
    """Open ``library`` and its record, check both; returns the library's open descriptor
    (its bytes have the recorded digest) and the record. Raises `KernelRefusedError`."""
    record = record_path(library)
    try:
        os.stat(record.name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.close(_open_own_file(folder_fd, library)[0])  # another user's file: say so first
        raise _refuse(library, f"it has no build record ({record.name}), so it was not built "
                               "by this engine; delete it and the engine builds a new one") \
            from None
    record_fd, _ = _open_own_file(folder_fd, record)
    try:
        build = _read_record(record_fd, record)
    finally:
        os.close(record_fd)
    fd, info = _open_own_file(folder_fd, library)
    try:
        sha256, size = _digest(fd)
        if (sha256, size) != (build.sha256, build.size):
            raise _refuse(library, f"its sha256 {sha256[:16]}... ({size} bytes) is not the "
                                   f"{build.sha256[:16]}... ({build.size} bytes) recorded when "
                                   "it was built, so it changed since; delete it (and "
                                   f"{record.name}) and the engine builds a new one")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            log.info("the CPU kernel %s has mode %04o, not %04o", library,
                     stat.S_IMODE(info.st_mode), FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd, build


def _loadable_name(fd: int, library: Path) -> str:
    """The name ``dlopen`` should open so that it maps the file open on ``fd``, checked."""
    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        return proc
    now, then = os.stat(library, follow_symlinks=False), os.fstat(fd)
    if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
        raise _refuse(library, "it was replaced while it was being checked")
    return str(library)


@contextlib.contextmanager
def _build_lock(folder_fd: int, library: Path) -> Iterator[None]:
    """Hold ``rowgemm-<key>.lock`` (0600, ours) so one process at a time builds a library."""
    lock = library.with_suffix(".lock")
    try:
        fd = os.open(lock.name, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK,
                     FILE_MODE, dir_fd=folder_fd)
    except OSError as exc:
        raise _refuse(lock, f"the lock file cannot be opened ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise _refuse(lock, "the lock file is not a regular file of yours")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- build and load


def _build(compiler: str, target: Path) -> str | None:
    """Compile the sources into ``target`` (0600, atomically) and write its build record first;
    returns an error text, or None."""
    fd, temporary = tempfile.mkstemp(prefix=target.stem, suffix=".so.part", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", temporary],
                              capture_output=True, text=True, timeout=300, check=False,
                              umask=0o077)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-600:] or f"exit status {done.returncode}"
        os.chmod(temporary, FILE_MODE)  # the linker gives 0700 under umask 077: no exec bit
        built = os.open(temporary, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            sha256, size = _digest(built)
        finally:
            os.close(built)
        record = KernelBuild(compiler=compiler, compiler_version=_compiler_version(compiler),
                             flags=FLAGS, isa=target_features(compiler), sha256=sha256,
                             size=size)
        document = {"format": RECORD_FORMAT, **record.to_dict()}
        # The record goes first: a crash between the two leaves no library, so the next
        # run builds again, never a library whose record is another build's.
        write_private(record_path(target), json.dumps(document, indent=2).encode())
        os.replace(temporary, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_library(cache_dir: Path | None = None) -> tuple[ctypes.CDLL, Path, KernelBuild, str]:
    """Build the library if needed, check it, load it; returns it, its path, build and compiler.

    Raises :class:`KernelUnavailableError` (with a reason that ends in what the
    engine does instead) when there is no compiler, the build fails, or the
    files fail their checks (:class:`KernelRefusedError`, also logged).
    """
    if platform.system() not in ("Linux", "Darwin", "FreeBSD"):
        raise KernelUnavailableError(f"the kernel is built for POSIX systems, not "
                                     f"{platform.system()}")
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailableError("no C compiler found (set CC, or install gcc) to build the "
                                     "CPU linear kernel; using torch's BLAS")
    try:
        path = library_path(compiler, cache_dir)
        folder_fd = _open_private_folder(path.parent)
    except EngineError as exc:
        raise KernelUnavailableError(f"{exc}; using torch's BLAS") from exc
    except OSError as exc:
        raise KernelUnavailableError(f"the CPU linear kernel's folder cannot be made or opened "
                                     f"({exc}); using torch's BLAS") from exc
    try:
        with _build_lock(folder_fd, path):
            try:
                os.stat(path.name, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                error = _build(compiler, path)
                if error is not None:
                    raise KernelUnavailableError(f"building the CPU linear kernel with "
                                                 f"{compiler} failed: {error}") from None
            fd, build = _verified(folder_fd, path)
    except KernelRefusedError as exc:
        log.warning("%s", exc)
        raise KernelUnavailableError(f"{exc}; using torch's BLAS", path) from exc
    except OSError as exc:
        raise KernelUnavailableError(f"checking the CPU linear kernel {path} failed: {exc}; "
                                     "using torch's BLAS", path) from exc
    finally:
        os.close(folder_fd)
    # ``fd`` stays open while the library is mapped (ctypes never unloads it), so the name
    # /proc/self/fd/N that dlopen knows it by never comes to mean another file.
    try:
        library = ctypes.CDLL(_loadable_name(fd, path))
    except KernelRefusedError as exc:
        os.close(fd)
        raise KernelUnavailableError(f"{exc}; using torch's BLAS", path) from exc
    except OSError as exc:
        os.close(fd)
        raise KernelUnavailableError(f"loading the CPU linear kernel {path} failed: {exc}") \
            from exc
    return library, path, build, compiler
