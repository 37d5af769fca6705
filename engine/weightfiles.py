"""Weight files at rest: the digest cache and the verified converted-weights cache.

The weight digest of a model is ``sha256:`` over its weight files. Each file's
own sha256 is cached in ``<cache>/weight_digests.json`` under a key that
changes whenever the content can have changed (absolute path, inode, size,
mtime and ctime in nanoseconds). The cache is written to a unique temporary
file and renamed into place, merged with what other processes wrote meanwhile;
an unreadable cache counts as empty and a failed write only loses cache
entries, never a load.

A GGUF source is de-quantized once into ``<cache>/converted/<name>-<digest16>/``
(folders 0700, files 0600). The conversion carries ``aitbc-manifest.json``,
written before the folder is renamed into place: the source's digest, and the
size, sha256 and identity (inode, size, mtime_ns, ctime_ns) of every file.
Every load checks each file's size and safetensors header; a file whose
identity differs from its record is hashed in full and its record updated when
the bytes still match. Damage of any kind (a changed byte, truncation, a bad
header, a missing file or manifest) rebuilds the conversion from the source
with a warning, so the GGUF's digest always names the bytes actually loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache import engine_cache_dir
from engine.errors import WeightsUnavailableError
from engine.state import write_private

__all__ = [
    "DIGEST_CACHE_FILE",
    "MANIFEST_FILE",
    "FileIdentity",
    "WeightFileProblem",
    "changed_file",
    "check_safetensors",
    "check_weight_files",
    "ensure_conversion",
    "sha256_file",
    "staged_conversion",
    "verify_conversion",
    "weights_digest",
    "weights_digest_and_identities",
]

log = logging.getLogger(__name__)

DIGEST_CACHE_FILE = "weight_digests.json"
MANIFEST_FILE = "aitbc-manifest.json"
MANIFEST_VERSION = 1
# safetensors refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 2**20
CHUNK_BYTES = 1 << 22
# Attempts at hashing a file that changes while it is read before giving up.
HASH_ATTEMPTS = 3
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}

_digest_lock = threading.Lock()


# ------------------------------------------------------------------ files

@dataclass(frozen=True)
class FileIdentity:
    """What changes whenever a file's content can have changed: inode, size, mtime, ctime."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        """The identity in a ``stat`` result."""
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """The identity of the file at ``path`` (symlinks followed)."""
        return cls.from_stat(os.stat(path))

    @classmethod
    def from_dict(cls, raw: Any) -> FileIdentity | None:
        """An identity from its manifest record, or None when the record is malformed."""
        if not isinstance(raw, dict):
            return None
        values: list[int] = []
        for k in ("inode", "size", "mtime_ns", "ctime_ns"):
            v = raw.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                return None
            values.append(v)
        return cls(*values)

    def to_dict(self) -> dict[str, int]:
        """The identity as a manifest record."""
        return {"inode": self.inode, "size": self.size, "mtime_ns": self.mtime_ns,
                "ctime_ns": self.ctime_ns}


class WeightFileProblem(Exception):
    """A weight file (or a conversion's manifest) is missing, damaged or does not match."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value)


def check_safetensors(path: Path, size: int | None = None) -> None:
    """Check a safetensors file's header against its size; raises :class:`WeightFileProblem`.

    The first 8 bytes are a little-endian header length N, then N bytes of
    JSON. N must fit the file, the JSON must be an object, and the tensors'
    data offsets must tile the data that follows the header exactly, each
    tensor as long as its dtype and shape say.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size if size is None else size
            if size < 8:
                raise WeightFileProblem(path, f"{size} bytes: too short for a safetensors "
                                              "header (truncated or empty)")
            length = int.from_bytes(fh.read(8), "little")
            if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
                raise WeightFileProblem(path, f"header length {length} does not fit a "
                                              f"{size}-byte file (truncated or overwritten)")
            raw = fh.read(length)
    except OSError as exc:
        raise WeightFileProblem(path, f"unreadable ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightFileProblem(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightFileProblem(path, "header is not a JSON object")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1] or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WeightFileProblem(path, f"tensor {name!r} has a malformed header entry")
        item = SAFETENSORS_DTYPE_BYTES.get(str(info.get("dtype")))
        if item is not None:
            count = 1
            for d in shape:
                count *= d
            if count * item != offsets[1] - offsets[0]:
                raise WeightFileProblem(path, f"tensor {name!r}: offsets {offsets} do not hold "
                                              f"{info.get('dtype')}{shape}")
        spans.append((offsets[0], offsets[1], name))
    data_bytes = size - 8 - length
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise WeightFileProblem(path, f"tensor {name!r} starts at {begin}, expected {end}")
        end = stop
    if end != data_bytes:
        raise WeightFileProblem(path, f"the tensors end at byte {end} of the data but the file "
                                      f"holds {data_bytes} (truncated or grown)")


def check_weight_files(files: Sequence[Path]) -> None:
    """Size and header check of every safetensors file in ``files`` (cheap: no hashing)."""
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def changed_file(identities: Mapping[Path, FileIdentity]) -> Path | None:
    """The first file whose identity is no longer the one recorded (None when none changed)."""
    for path, identity in identities.items():
        try:
            if FileIdentity.of(path) != identity:
                return path
        except OSError:
            return path
    return None


def _write_json_private(path: Path, doc: Any, *, sync: bool = False) -> None:
    """Write ``doc`` to ``path`` atomically, mode 0600 (:func:`engine.state.write_private`)."""
    write_private(path, json.dumps(doc, indent=0, sort_keys=True).encode(), sync=sync)


def _read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or malformed file reads as empty."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# ------------------------------------------------------------------ digest cache

def _cache_key(path: Path, identity: FileIdentity) -> str:
    return (f"{path}|{identity.inode}|{identity.size}|{identity.mtime_ns}|"
            f"{identity.ctime_ns}")


def _key_path(key: str) -> str | None:
    """The path of a current-format cache key, or None for a stale or malformed key."""
    parts = key.rsplit("|", 4)
    if len(parts) != 5 or not all(p.isdigit() for p in parts[1:]):
        return None
    return parts[0]


def _hash_stable(path: Path) -> tuple[FileIdentity, str]:
    """The file's identity and sha256, hashed again if it changed while it was read."""
    for _ in range(HASH_ATTEMPTS):
        before = FileIdentity.of(path)
        digest = sha256_file(path)
        if FileIdentity.of(path) == before:
            return before, digest
    raise WeightsUnavailableError(f"weight file {path} kept changing while it was read; "
                                  "let whatever is writing it finish, then try again",
                                  field="model")


def _save_digests(cache_file: Path, new: dict[str, str]) -> None:
    """Merge ``new`` into the on-disk cache and replace it; a failure only loses entries."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        merged = {k: v for k, v in _read_json_dict(cache_file).items()
                  if isinstance(k, str) and _is_hex_digest(v) and _key_path(k) is not None}
        fresh_paths = {_key_path(k) for k in new}
        merged = {k: v for k, v in merged.items() if _key_path(k) not in fresh_paths}
        merged.update(new)
        _write_json_private(cache_file, merged)
    except OSError as exc:
        log.warning("could not save the weight digest cache %s (%s); the digests will be "
                    "computed again next time", cache_file, exc.strerror or exc)


def weights_digest_and_identities(files: Sequence[Path], cache_dir: Path | None = None,
                                  ) -> tuple[str, dict[Path, FileIdentity]]:
    """:func:`weights_digest`, and the identity of each file whose digest it used."""
    cache_file = (cache_dir or engine_cache_dir()) / DIGEST_CACHE_FILE
    identities: dict[Path, FileIdentity] = {}
    with _digest_lock:
        cache = _read_json_dict(cache_file)
        new: dict[str, str] = {}
        outer = hashlib.sha256(b"aitbc-weights/1\n")
        for path in sorted(files, key=lambda p: p.name):
            absolute = path.resolve()
            identity = FileIdentity.of(absolute)
            key = _cache_key(absolute, identity)
            digest = cache.get(key)
            if not _is_hex_digest(digest):
                identity, digest = _hash_stable(absolute)
                key = _cache_key(absolute, identity)
                new[key] = digest
            assert isinstance(digest, str)
            identities[path] = identity
            outer.update(f"{path.name}\n{identity.size}\n{digest}\n".encode())
        if new:
            _save_digests(cache_file, new)
    return "sha256:" + outer.hexdigest(), identities


def weights_digest(files: Sequence[Path], cache_dir: Path | None = None) -> str:
    """``sha256:`` over the weight files (name, size and bytes of each, in name order).

    Each file's own digest is cached under its absolute path, inode, size,
    mtime and ctime, so a second call on unchanged files reads nothing but the
    cache, and any change to a file (even with its mtime put back) hashes it again.
    """
    return weights_digest_and_identities(files, cache_dir)[0]


# ------------------------------------------------------------------ converted weights

def _private_folder(path: Path) -> Path:
    """Make ``path`` with mode 0700 (tightening one of ours that is looser)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def _make_private(folder: Path) -> None:
    """Folders under ``folder`` 0700, files 0600."""
    folder.chmod(0o700)
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
        for n in names:
            os.chmod(os.path.join(root, n), 0o600)


def _manifest_temp(name: str) -> bool:
    return name.startswith(f".{MANIFEST_FILE}.") and name.endswith(".tmp")


def write_manifest(folder: Path, *, source_file: Path, source_digest: str) -> dict[str, Any]:
    """Record size, sha256 and identity of every file in ``folder`` in its manifest (0600)."""
    files: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_FILE:
            continue
        if path.is_symlink() or not path.is_file():
            raise WeightFileProblem(path, "not a regular file; a conversion holds files only")
        identity, digest = _hash_stable(path)
        files[path.name] = {"size": identity.size, "sha256": digest,
                            "identity": identity.to_dict()}
    doc = {"version": MANIFEST_VERSION, "created_at": time.time(),
           "source": {"file": str(source_file), "digest": source_digest}, "files": files}
    _write_json_private(folder / MANIFEST_FILE, doc, sync=True)
    return doc


def _read_manifest(folder: Path, source_digest: str) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WeightFileProblem(path, "the manifest is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightFileProblem(path, f"the manifest is unreadable ({exc})") from exc
    files = doc.get("files") if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION
            or not isinstance(files, dict) or not files):
        raise WeightFileProblem(path, "the manifest is malformed")
    source = doc.get("source")
    made_from = source.get("digest") if isinstance(source, dict) else None
    if made_from != source_digest:
        raise WeightFileProblem(path, f"the manifest says it was made from {made_from}, not "
                                      f"{source_digest}")
    for name, record in files.items():
        if (not isinstance(record, dict) or not isinstance(record.get("size"), int)
                or not _is_hex_digest(record.get("sha256")) or "/" in name
                or name in (".", "..")):
            raise WeightFileProblem(path, f"the manifest's record of {name!r} is malformed")
    return doc


def verify_conversion(folder: Path, source_digest: str) -> dict[Path, FileIdentity]:
    """Check a conversion against its manifest; returns each file's verified identity.

    Every file: present, a regular file, of the recorded size, and (for
    safetensors) with a sound header. A file whose identity differs from its
    record is hashed in full; when its sha256 still matches, the record is
    updated (atomically) so the next load does not hash it again. Raises
    :class:`WeightFileProblem` naming the first file that fails.
    """
    doc = _read_manifest(folder, source_digest)
    files: dict[str, dict[str, Any]] = doc["files"]
    try:
        present = {p.name for p in folder.iterdir()}
    except OSError as exc:
        raise WeightFileProblem(folder, f"unreadable ({exc.strerror or exc})") from exc
    for extra in sorted(present - set(files) - {MANIFEST_FILE}):
        if not _manifest_temp(extra):
            raise WeightFileProblem(folder / extra, "not in the manifest")
    verified: dict[Path, FileIdentity] = {}
    updated = False
    for name, record in sorted(files.items()):
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError as exc:
            raise WeightFileProblem(path, "missing") from exc
        except OSError as exc:
            raise WeightFileProblem(path, f"unreadable ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(st.st_mode):
            raise WeightFileProblem(path, "not a regular file")
        identity = FileIdentity.from_stat(st)
        if identity.size != record["size"]:
            how = "truncated" if identity.size < record["size"] else "grown"
            raise WeightFileProblem(path, f"{identity.size} bytes where the manifest says "
                                          f"{record['size']} ({how})")
        if name.endswith(".safetensors"):
            check_safetensors(path, identity.size)
        if identity != FileIdentity.from_dict(record.get("identity")):
            identity, digest = _hash_stable(path)
            if digest != record["sha256"]:
                raise WeightFileProblem(path, f"sha256 {digest[:16]}… does not match the "
                                              f"manifest's {record['sha256'][:16]}… (changed "
                                              "or corrupted)")
            record["identity"] = identity.to_dict()
            updated = True
        verified[path] = identity
    if updated:
        try:
            _write_json_private(folder / MANIFEST_FILE, doc, sync=True)
        except OSError as exc:
            log.warning("could not update the manifest of %s (%s); its files will be hashed "
                        "again on the next load", folder, exc.strerror or exc)
    return verified


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock (across processes) on the conversion at ``target``."""
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _swap_into_place(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``, moving an existing ``target`` aside and deleting it."""
    if not os.path.lexists(target):
        staged.rename(target)
        return
    old = target.parent / f".{target.name}.{os.getpid()}.{time.time_ns()}.old"
    target.rename(old)
    staged.rename(target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_conversion(target: Path, *, source_file: Path, source_digest: str) -> Iterator[Path]:
    """A private empty folder to write a conversion into; published to ``target`` on success.

    On leaving the block its files are made 0600, the manifest is written in
    it, and it is renamed into place (replacing any older ``target``). On an
    error it is deleted and ``target`` is left as it was.
    """
    parent = _private_folder(target.parent)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield staged
        _make_private(staged)
        write_manifest(staged, source_file=source_file, source_digest=source_digest)
        _swap_into_place(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def ensure_conversion(target: Path, *, source_file: Path, source_digest: str,
                      convert: Callable[[Path], object]) -> dict[Path, FileIdentity]:
    """Verify the conversion at ``target``, (re)building it with ``convert`` when needed.

    ``convert(target)`` must write the conversion through :func:`staged_conversion`.
    A missing conversion is built (logged at INFO); a damaged one is rebuilt
    with a WARNING naming the file and the problem. When the source is gone
    too, :class:`WeightsUnavailableError` says so. Returns the verified
    identities of the conversion's files (for :func:`changed_file` after loading).
    """
    _private_folder(target.parent)
    with _conversion_lock(target):
        if os.path.lexists(target):
            try:
                return verify_conversion(target, source_digest)
            except WeightFileProblem as damage:
                if not source_file.is_file():
                    raise WeightsUnavailableError(
                        f"the converted weights in {target} are damaged ({damage.path.name}: "
                        f"{damage.problem}) and their source {source_file} is gone, so they "
                        "cannot be rebuilt; reinstall or restore the source weights",
                        field="model") from damage
                log.warning("converted weights %s: %s; rebuilding them from %s",
                            damage.path, damage.problem, source_file)
        else:
            if not source_file.is_file():
                raise WeightsUnavailableError(f"the source weights {source_file} are gone; "
                                              "reinstall or restore them", field="model")
            log.info("converting %s once to safetensors in %s", source_file.name, target)
        convert(target)
        try:
            return verify_conversion(target, source_digest)
        except WeightFileProblem as damage:
            raise WeightsUnavailableError(
                f"the conversion of {source_file} just written to {target} does not verify "
                f"({damage}); check the disk", field="model") from damage
