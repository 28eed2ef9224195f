"""A stage folder and its manifest: the settings its outputs were made with, the fingerprints of its inputs,
``complete``; reopening it with other settings or inputs is a :class:`StaleCacheError` naming what differs.

Layout of a stage folder::

    <dir>/manifest.json   stage, schema, package version, resolved config, its fingerprint,
                          fingerprints of the inputs, item count, complete, seconds, bytes
    <dir>/<item>.npz      one shard per item, written to a temp file and ``os.replace``d
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import diff_keys, fingerprint, with_defaults, without_keys
from .store import ShardError, StaleCacheError, atomic_write_text, dir_bytes, remove_stale_temps

__all__ = ["SCHEMA", "Stage", "require_complete"]

SCHEMA = 2  # 2: every manifest records its inputs' contents; no per-field shims for older ones
log = logging.getLogger(__name__)


class Stage:
    """A stage's output folder with its manifest.

    Args:
        directory: the folder.
        stage: the stage's name (``"proposals"``, ``"features"``...).
        config: the resolved config (a JSON-able dict) that determines the outputs.
        inputs: fingerprints of the inputs (other stages, weights, data).
        overwrite: delete existing outputs instead of checking them.
        defaults: the default of each option in ``config`` (same nesting). One rule for every option a
            later version adds: a manifest written before it existed matches while it is at its default (whose
            behaviour is the old one), and the outputs keep their manifest's config and fingerprint, so the stages
            after them stay valid too. Anything else a later version changes in what a manifest means bumps
            :data:`SCHEMA`: folders from before are then refused by name (:meth:`read_manifest`).
        ignore: dotted keys of ``config`` that older manifests recorded and the outputs do not depend on (e.g.
            ``features.levels`` in a conv5 cache): not compared, and kept in an old manifest's config (and so in
            its fingerprint, which the stages after it recorded).
    """

    def __init__(self, directory: str | Path, stage: str, config: dict, inputs: dict | None = None,
                 overwrite: bool = False, defaults: dict | None = None,
                 item_inputs: dict[str, str] | None = None, per_item: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = ()):
        self.dir = Path(directory)
        self.ignore = tuple(ignore)
        self.stage = stage
        self.config = json.loads(json.dumps(config, default=str))
        self.defaults = json.loads(json.dumps(defaults or {}, default=str))
        self.inputs = dict(inputs or {})
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
        """A stage folder's manifest; one written by a version of sppdet with another manifest schema is a
        :class:`StaleCacheError` naming the folder and how to rebuild it."""
        path = Path(directory) / "manifest.json"
        if not path.is_file():
            raise ShardError(f"{path}: manifest is missing; run the stage that writes {Path(directory)}")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: manifest is not valid JSON ({e})") from e
        if m.get("schema", 1) != SCHEMA:
            raise StaleCacheError(
                f"{Path(directory)}: made by another version of sppdet (manifest schema {m.get('schema', 1)}, this "
                f"version reads {SCHEMA}); rebuild its {m.get('stage', '?')!r} stage with its tool and --overwrite, "
                "or all such stages of the run folder with tools/demo.py --rebuild-stale", folder=Path(directory))
        return m

    def _check_compatible(self, old: dict) -> None:
        if old.get("stage") != self.stage:
            raise StaleCacheError(f"{self.manifest_path}: folder belongs to stage {old.get('stage')!r}, not {self.stage!r}")
        saved, saved_inputs = old.get("config", {}), old.get("inputs", {})
        compared = with_defaults(without_keys(saved, self.ignore), self.defaults)
        changes = diff_keys(compared, self.config, "config.") + diff_keys(saved_inputs, self.inputs, "inputs.")
        if changes and self._rebuild_changed_items(old, changes):
            return
        if changes:
            content = sorted({c.split(":")[0].split(".")[1] for c in changes
                              if c.startswith(("inputs.images", "inputs.annotations"))})
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
