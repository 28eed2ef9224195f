"""Stage 1 (optional): classifier pre-training of the trunk (the paper's multi-size 224/180 training), for
``backbone.weights: pretrain``; ImageNet trunks skip it.

Reads: the pre-training images (``pretrain.root``, or the detection train split's ground-truth crops).
Writes: ``<run>/pretrain/checkpoint.pt`` (trunk + fc head) and its manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from ..config import section_changes
from ..manifest import SCHEMA
from ..pretrain import load_checkpoint, train_classifier, voc_items
from ..run import Run
from ..store import StaleCacheError, atomic_write_text, dir_bytes
from ..voc import VOCDataset
from .common import StageSpec


def stage_pretrain(run: Run, split: str | None = None, folder: str | None = None, device: str | None = None,
                   overwrite: bool = False) -> dict:
    """Classifier pre-training on VOC ground-truth crops (default: the train split) or a folder, on ``device``
    (None: the config's ``device``)."""
    cfg = run.cfg
    if run.pretrain_ckpt.is_file() and not overwrite:
        ck = load_checkpoint(run.pretrain_ckpt)
        changes = (section_changes(ck.get("pretrain_cfg"), cfg.pretrain, "pretrain.")
                   + section_changes(ck.get("backbone_cfg"), cfg.backbone, "backbone."))
        data = None if folder or "data" not in ck else _pretrain_data(run, split, existing=True)
        if data is not None and data != ck["data"]:
            changes.append("the pre-training split's " + " and ".join(k for k in data if data[k] != ck["data"].get(k))
                           + " differ from those it was trained on")
        if changes:
            raise StaleCacheError(f"{run.pretrain_ckpt}: made with another pretrain/backbone config or data "
                                  f"({'; '.join(changes)}); use --overwrite", folder=run.pretrain_ckpt.parent)
        run.log(f"pretrain: reusing {run.pretrain_ckpt}")
        return ck
    device = device or run.device
    rng = np.random.default_rng(cfg.seed)
    if folder:
        from ..pretrain import folder_items

        items, classes = folder_items(folder)
    else:
        ds = run.dataset(split) if split else run.pretrain_dataset()
        items, classes = voc_items(ds, cfg.pretrain.background_per_image, rng, cfg.pretrain.jitters)
    run.log(f"pretrain: {len(items)} crops, {len(classes)} classes, sizes {cfg.pretrain.sizes}")
    # A VOC-format source's contents are recorded (an image folder's are not: ImageNet is too big to hash).
    record = {} if folder else {"data": _pretrain_data(run, split)}
    ck = train_classifier(items, classes, cfg.backbone, cfg.pretrain, run.pretrain_ckpt.parent, cfg.seed, device,
                          log_fn=run.log, record=record)
    atomic_write_text(run.pretrain_ckpt.parent / "manifest.json", json.dumps(
        {"stage": "pretrain", "schema": SCHEMA, "config": {"pretrain": asdict(cfg.pretrain), "backbone": asdict(cfg.backbone)},
         "seconds": ck["seconds"], "complete": True, "history": ck["history"],
         "bytes": dir_bytes(run.pretrain_ckpt.parent)}, indent=2))
    return ck


def _pretrain_data(run: Run, split: str | None, existing: bool = False) -> dict | None:
    """The images' and annotations' fingerprints of the VOC split pre-training reads (``split`` of the
    detection data, else ``pretrain.root``'s or the detection train split); ``existing``: None where that
    split is not on disk (a reused checkpoint is not checked against data that is gone, nor makes it).
    A detection split's fingerprints are :meth:`Run.content`'s, which the later stages reuse."""
    p, d = run.cfg.pretrain, run.cfg.data
    root, name = ((run.path(p.root), p.split) if p.root and not split else (run.path(d.root), split or d.train_split))
    if existing and not (root / "ImageSets" / "Main" / f"{name}.txt").is_file():
        return None
    what = ("images", "annotations")
    if root == run.path(d.root):
        return {w: run.content(name, w) for w in what}
    ds = VOCDataset(root, name)
    return {w: ds.content_fingerprint(w) for w in what}


SPEC = StageSpec("pretrain", "tools/pretrain.py", False, ("pretrain.root or the data.train_split crops",),
                 "pretrain/", ("pretrain", "backbone", "seed"), stage_pretrain)
