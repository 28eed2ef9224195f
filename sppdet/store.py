"""On-disk artefacts: atomic writes (a file that exists is whole), per-item ``.npz`` shards read back with errors
naming the file, content hashes, and the errors the stages raise. A stage folder's manifest is
:class:`sppdet.manifest.Stage`. A missing or unreadable shard is an error naming the file, never an empty result."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


__all__ = [
    "StaleCacheError",
    "ShardError",
    "WriteError",
    "atomic_write_bytes",
    "remove_stale_temps",
    "swap_in_folder",
    "atomic_write_text",
    "atomic_save_npz",
    "load_npz",
    "file_sha256",
    "files_fingerprint",
    "dir_bytes",
]

log = logging.getLogger(__name__)


class StaleCacheError(RuntimeError):
    """A stage folder was made with other settings or inputs; ``folder``: the stage folder that a
    rebuild would replace (None where the stale thing is not a stage's output, e.g. a dataset)."""

    def __init__(self, message: str, folder: str | Path | None = None):
        super().__init__(message)
        self.folder = Path(folder) if folder is not None else None


class ShardError(RuntimeError):
    """A shard is missing, truncated or lacks a field."""


class WriteError(OSError):
    """Writing a file failed (e.g. no space left on device); the message names the file, and nothing was
    half-written: the file it was replacing, if any, is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 would hide artefacts from a group


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``: a file that exists is
    whole. Failures (a full disk, a read-only folder) are a :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise WriteError(e.errno, f"{reason} while writing {path}") from e
        raise


@contextlib.contextmanager
def swap_in_folder(final: str | Path):
    """``with swap_in_folder(out) as tmp:`` write a result folder into ``tmp`` (a new folder beside ``out``); when
    the block succeeds it replaces ``out`` whole, when it fails (a full disk) ``tmp`` is deleted and ``out`` is
    left as it was: never a mix of new and old files."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise WriteError(e.errno, f"{e.strerror or e} while creating a folder beside {final}") from e
    try:
        yield tmp
        old = final.parent / f".{final.name}.{os.getpid()}.old.tmp"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | Path, min_age: float = 600.0) -> int:
    """Delete the temp files (``.<name>.<pid>.<random>.tmp``) that a writer killed mid-write left in
    ``directory``: those whose process is gone and that are older than ``min_age`` seconds (a shard being written
    by another process, here or on another machine sharing the folder, is left alone). Returns how many."""
    n, now = 0, time.time()
    for p in Path(directory).glob(".*.tmp"):
        parts = p.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        try:
            if (pid is None or not _alive(pid)) and now - p.stat().st_mtime > min_age:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def npz_bytes(compress: bool = False, **arrays: Any) -> bytes:
    """An ``.npz`` (readable by ``np.load``) whose bytes depend only on the arrays: members
    carry a fixed timestamp, where ``np.savez`` stamps the current time, so the same
    content gives the same file (resumed runs and reruns are byte-identical)."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def atomic_save_npz(path: str | Path, compress: bool = False, **arrays: Any) -> int:
    """Write arrays as one ``.npz`` atomically (deterministic bytes); returns the bytes written."""
    data = npz_bytes(compress, **arrays)
    atomic_write_bytes(path, data)
    return len(data)


def load_npz(path: str | Path, required: tuple[str, ...] = (),
             skip: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Load a ``.npz`` shard (every array but those ``skip`` names); any defect is a
    :class:`ShardError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard is missing (run the stage that writes it, or --overwrite)")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if skip is None or not skip(k)}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ShardError(f"{path}: shard is truncated or corrupt ({e}); delete it or rerun with --overwrite") from e
    missing = [k for k in required if k not in out]
    if missing:
        raise ShardError(f"{path}: shard lacks field(s) {', '.join(missing)}")
    return out


def file_sha256(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def file_hashes(paths: list[str | Path], what: str = "file") -> list[str]:
    """The sha256 (64 hex digits) of each file's contents; a missing file is a ``FileNotFoundError`` naming it
    as ``what``."""
    out = []
    for p in paths:
        try:
            out.append(file_sha256(p, 64))
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: {what} is missing") from None
    return out


def hashes_fingerprint(hashes: list[str]) -> str:
    """Fingerprint of a list of :func:`file_hashes` in order."""
    h = hashlib.sha256()
    for x in hashes:
        h.update(x.encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths: list[str | Path], what: str = "file") -> str:
    """Fingerprint of the contents of ``paths`` in order (their names excluded: a copied or moved dataset
    keeps its caches); a missing file is a ``FileNotFoundError`` naming it as ``what``."""
    return hashes_fingerprint(file_hashes(paths, what))


def dir_bytes(path: str | Path) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.name.endswith(".tmp"))


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs, in bytes.

    ``ru_maxrss`` only ever grows over a process's life, so a later stage could not be told
    from an earlier one; this samples ``/proc/self/statm`` from a thread (every
    ``interval`` s) and falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "PeakRSS":
        import threading

        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
