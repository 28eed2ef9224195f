"""On-disk artefacts: atomic per-item shards and a stage manifest with fingerprints.

Layout of a stage folder::

    <dir>/manifest.json   stage, schema, package version, resolved config, its fingerprint,
                          fingerprints of the inputs, item count, complete, seconds, bytes
    <dir>/<item>.npz      one shard per item, written to a temp file and ``os.replace``d

A shard that exists is whole. Re-opening a folder whose manifest has other fingerprints
is a :class:`StaleCacheError` naming the keys that differ (``overwrite=True`` rebuilds).
A missing or unreadable shard is an error naming the file, never an empty result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import diff_keys, fingerprint, with_defaults

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
    "Stage",
    "dir_bytes",
]

SCHEMA = 1
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


class Stage:
    """A stage's output folder with its manifest.

    Args:
        directory: the folder.
        stage: the stage's name (``"proposals"``, ``"features"``...).
        config: the resolved config (a JSON-able dict) that determines the outputs.
        inputs: fingerprints of the inputs (other stages, weights, data).
        overwrite: delete existing outputs instead of checking them.
        defaults: the default of each option in ``config`` (same nesting). A manifest written before
            an option existed matches while that option is at its default, and the outputs keep
            their manifest's config and fingerprint, so the stages after them stay valid too.
        added_inputs: keys of ``inputs`` that manifests written before they were recorded lack (the
            images' and annotations' contents): such a manifest is not checked on them and keeps its own
            inputs and fingerprint, as for ``defaults``; one that records them is checked.
    """

    def __init__(self, directory: str | Path, stage: str, config: dict, inputs: dict | None = None,
                 overwrite: bool = False, defaults: dict | None = None, added_inputs: tuple[str, ...] = (),
                 item_inputs: dict[str, str] | None = None, per_item: tuple[str, ...] = ()):
        self.dir = Path(directory)
        self.stage = stage
        self.config = json.loads(json.dumps(config, default=str))
        self.defaults = json.loads(json.dumps(defaults or {}, default=str))
        self.inputs = dict(inputs or {})
        self.added_inputs = tuple(added_inputs)
        # Per-item inputs (one fingerprint per shard, e.g. of its image file) and the ``inputs`` keys they explain:
        # when only those keys changed, the shards of the items whose fingerprint changed are deleted and rebuilt,
        # the others kept (a fixed image rebuilds only itself).
        self.item_inputs = dict(item_inputs) if item_inputs is not None else None
        self.per_item = tuple(per_item)
        self.manifest_path = self.dir / "manifest.json"
        self._t0 = time.time()
        if overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.dir)
        old = self.read_manifest(self.dir) if self.manifest_path.exists() else None
        self._old = old if old is not None and old.get("complete") else None
        # What a finished run recorded beyond the base fields (e.g. fine-tuning's conv fingerprint)
        # stays in the manifest when a rerun reuses the outputs.
        self._recorded: dict = {}
        if old is not None:
            self._check_compatible(old)
            self.previous_seconds = float(old.get("seconds", 0.0))
            self._recorded = {k: v for k, v in old.items() if k not in self._base_fields(False)}
        else:
            self.previous_seconds = 0.0
        if self._old is None:  # a finished stage whose outputs are only reused keeps its manifest as it is
            self.write_manifest(complete=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint({"config": self.config, "inputs": self.inputs})

    @staticmethod
    def read_manifest(directory: str | Path) -> dict:
        path = Path(directory) / "manifest.json"
        if not path.is_file():
            raise ShardError(f"{path}: manifest is missing; run the stage that writes {Path(directory)}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: manifest is not valid JSON ({e})") from e

    def _check_compatible(self, old: dict) -> None:
        if old.get("stage") != self.stage:
            raise StaleCacheError(f"{self.manifest_path}: folder belongs to stage {old.get('stage')!r}, not {self.stage!r}")
        saved, saved_inputs = old.get("config", {}), old.get("inputs", {})
        inputs = {k: v for k, v in self.inputs.items() if k in saved_inputs or k not in self.added_inputs}
        changes = diff_keys(with_defaults(saved, self.defaults), self.config, "config.") + diff_keys(
            saved_inputs, inputs, "inputs.")
        if changes and self._rebuild_changed_items(old, changes):
            return
        if changes:
            content = [k for k in self.added_inputs if any(c.startswith(f"inputs.{k}:") for c in changes)]
            raise StaleCacheError(
                f"{self.manifest_path}: outputs were made with other settings or inputs; changed: "
                + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else "")
                + (f" (the dataset's {', '.join(content)} differ from the files they were made from)" if content else "")
                + ". Use --overwrite to rebuild, or another run folder.", folder=self.dir)
        self.config = saved  # the same settings; options added since stay out of the fingerprint
        self.inputs = saved_inputs

    def _wrote(self) -> bool:
        """Whether any output file was written since the stage was opened."""
        return any(p.stat().st_mtime > self._t0 for p in self.dir.rglob("*")
                   if p.is_file() and p != self.manifest_path and not p.name.endswith(".tmp"))

    def _rebuild_changed_items(self, old: dict, changes: list[str]) -> bool:
        """Where every change is in a per-item input and the old manifest recorded per-item fingerprints: delete
        the shards of the items whose fingerprint differs (logged by name), take the new inputs, and return True."""
        saved = old.get("item_inputs")
        if self.item_inputs is None or saved is None or not self.per_item:
            return False
        if not all(any(c.startswith(f"inputs.{k}:") for k in self.per_item) for c in changes):
            return False
        changed = sorted(i for i, v in self.item_inputs.items() if saved.get(i) != v)
        for i in changed:
            for p in self.dir.glob(f"{i}.*"):
                p.unlink()
        log.warning("%s: %d item(s) changed since their shards were made (%s%s): rebuilding only those", self.dir,
                    len(changed), ", ".join(changed[:5]), " ..." if len(changed) > 5 else "")
        self._old = None  # outputs change: the manifest is rewritten
        self.config = old.get("config", {})  # the same settings (options added since stay out of the fingerprint)
        return True

    def _base_fields(self, complete: bool) -> dict:
        return {
            "stage": self.stage,
            "schema": SCHEMA,
            "sppdet_version": __version__,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "complete": bool(complete),
            **({"item_inputs": self.item_inputs} if self.item_inputs is not None else {}),
            "seconds": round(self.previous_seconds + time.time() - self._t0, 3),
        }

    def write_manifest(self, complete: bool, **extra: Any) -> None:
        m = self._base_fields(complete)
        m.update(self._recorded)
        m.update(extra)
        atomic_write_text(self.manifest_path, json.dumps(m, indent=2, sort_keys=True, default=str))

    def path(self, item: str, suffix: str = ".npz") -> Path:
        return self.dir / f"{item}{suffix}"

    def has(self, item: str, suffix: str = ".npz") -> bool:
        return self.path(item, suffix).is_file()

    def finish(self, items: int, **extra: Any) -> dict:
        """Mark the stage complete with its item count and bytes; a stage that was complete before and whose
        outputs were only reused (the same items, no file written since it was opened) keeps its manifest file
        untouched; the manifest returned then carries this call's ``extra`` values."""
        nbytes = dir_bytes(self.dir) - self.manifest_path.stat().st_size  # the outputs' bytes, manifest excluded
        if self._old is not None and self._old.get("items") == int(items) and not self._wrote():
            return {**self._old, **extra}  # what this call did (e.g. new_images 0); the file is left as it was
        self.write_manifest(True, items=int(items), bytes=nbytes, **extra)
        return self.read_manifest(self.dir)


def require_complete(directory: str | Path, stage: str) -> dict:
    """Read a finished stage's manifest, or fail naming the folder."""
    m = Stage.read_manifest(directory)
    if m.get("stage") != stage:
        raise ShardError(f"{directory}: expected a {stage!r} stage folder, found {m.get('stage')!r}")
    if not m.get("complete"):
        raise ShardError(f"{directory}: stage {stage!r} did not finish; rerun it (it resumes)")
    return m


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
