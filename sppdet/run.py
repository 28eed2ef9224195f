"""A run folder: the paths of every stage's outputs and the objects the stages share (config, datasets,
their contents' fingerprints, the trunk). The stages themselves are in :mod:`sppdet.stages`.

Run folder::

    <run>/config.yaml                          the settings of the run (written when the folder is made, or
                                               by a call without --set; see :meth:`Run.__init__`)
    <run>/pretrain/checkpoint.pt               trunk + fc head (classifier pre-training)
    <run>/proposals/<split>/<id>.npz           boxes (R, 4) original-image xyxy
    <run>/model/projection/projection.npz      conv5's principal components (backbone.project only)
    <run>/features/<split>/<id>.npz            conv5 per scale, float16
    <run>/model/finetune/finetune.pt           fine-tuned fc6/fc7/fc8 (conv frozen)
    <run>/model/svm/svm.npz                    per-class SVMs
    <run>/model/bbox_reg/bbox_reg.npz          per-class box regressors
    <run>/detections/<split>/                  detections.npz, comp4 txt, metrics.json, PNGs
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backbones import Backbone, build_backbone
from .config import Config, resolve_path
from .store import StaleCacheError, atomic_write_text
from .voc import VOCDataset

__all__ = ["Run"]


class Run:
    """Paths and shared objects of one experiment folder."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, log_fn: Callable[[str], None] = print,
                 save_config: bool | None = True):
        self.cfg = cfg
        self.dir = Path(run_dir) if run_dir else resolve_path(cfg, cfg.run_dir)
        self.log = log_fn
        self._backbone: Backbone | None = None
        self._content: dict[tuple[str, str], str] = {}
        self._hashes: dict[tuple[str, str], dict[str, str]] = {}
        self._classes: list[str] | None = None
        self._augmented: dict[str, VOCDataset] = {}
        if cfg.features.scales == "auto":
            self.cfg = cfg = self._auto_scale(cfg)
        # The run's settings, for tools that take only --run (detect.py, Predictor): written when the folder is
        # made, and by calls whose settings are the run's (``save_config`` True: no --set, or --overwrite, which
        # rebuilds with them); a one-off override (a tagged test with an SVD head) never becomes what later
        # detection uses. ``save_config`` None: only where there is none yet; False: never.
        if save_config or (save_config is None and not (self.dir / "config.yaml").is_file()):
            import yaml

            saved = asdict(cfg)
            if not cfg.data.classes and self._annotations_present():
                saved["data"]["classes"] = self.classes  # read from the annotations: kept, so detection needs no data
            atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))

    def _auto_scale(self, cfg: Config) -> Config:
        """``features.scales: auto`` resolved from the train split's object sizes (:func:`sppdet.features.auto_scale`):
        the run's config.yaml keeps the scale, so later calls and detection need no data and keep it."""
        from dataclasses import replace

        from .features import auto_scale, median_extent, object_extents

        f, split = cfg.features, cfg.data.train_split
        extents = object_extents(self.dataset(split, augmented=False))  # the photos' own objects
        s = auto_scale(extents, f.auto_object_px, f.auto_scales)
        med = median_extent(extents)  # the median auto_scale used, for the log
        self.log(f"features.scales auto: [{s}] of {list(f.auto_scales)} (the {split!r} split's median object, sqrt "
                 f"of its area, is {med:.2f} of its image's shorter side: {med * s:.0f} px at {s}, target "
                 f"{f.auto_object_px:g})")
        return replace(cfg, features=replace(f, scales=[s]))

    def _annotations_present(self) -> bool:
        d = self.cfg.data
        root = self.path(d.root)
        if d.format != "voc":
            return root.is_dir()
        from .voc import has_split

        return has_split(root, d.train_split)

    # ------------------------------------------------------------------ paths
    def proposals_dir(self, split: str) -> Path:
        return self.dir / "proposals" / split

    def features_dir(self, split: str) -> Path:
        return self.dir / "features" / split

    @property
    def pretrain_ckpt(self) -> Path:
        return self.dir / "pretrain" / "checkpoint.pt"

    @property
    def projection_path(self) -> Path:
        return self.dir / "model" / "projection" / "projection.npz"

    @property
    def finetune_path(self) -> Path:
        return self.dir / "model" / "finetune" / "finetune.pt"

    def svm_path(self, tag: str = "") -> Path:
        return self.dir / "model" / f"svm{tag}" / "svm.npz"

    @property
    def bbox_reg_path(self) -> Path:
        return self.dir / "model" / "bbox_reg" / "bbox_reg.npz"

    def detections_dir(self, split: str, tag: str = "") -> Path:
        return self.dir / "detections" / f"{split}{tag}"

    def path(self, p: str | Path) -> Path:
        """A path of the config, relative ones against its ``base_dir`` (not the current directory)."""
        return resolve_path(self.cfg, p)

    # ------------------------------------------------------------------- data
    @property
    def classes(self) -> list[str]:
        """``data.classes``, or when it is not set the classes the train split's annotations use (COCO: its
        categories in id order; VOC: the names in its XML files, sorted)."""
        d = self.cfg.data
        if d.classes:
            return list(d.classes)
        if self._classes is None:
            if d.format == "coco":
                from .coco import coco_classes

                self._classes = coco_classes(self.path(d.root), d.train_split)
            else:
                from .voc import class_names_in

                self._classes = class_names_in(self.path(d.root), d.train_split)
            self.log(f"classes read from the {d.train_split!r} annotations: {', '.join(self._classes)}")
        return list(self._classes)

    def dataset(self, split: str, augmented: bool = True) -> VOCDataset:
        """A split of the data; the train split with ``data.augment`` copies of each photo (made into
        ``<run>/augmented/`` once, :class:`sppdet.augment.AugmentedDataset`) unless ``augmented`` is False."""
        d = self.cfg.data
        copies = augmented and d.augment and split == d.train_split
        if copies and split in self._augmented:  # checked against its sources once per process
            return self._augmented[split]
        ds = self._dataset(self.path(d.root), split, d.synthetic_images, d.synthetic_seed, tuple(d.synthetic_splits),
                           coco=d.format == "coco")
        if not copies:
            return ds
        from .augment import AugmentedDataset

        self._augmented[split] = AugmentedDataset(ds, self.dir / "augmented" / split, d.augment, self.cfg.seed)
        return self._augmented[split]

    def content(self, split: str, what: str) -> str:
        """:meth:`VOCDataset.content_fingerprint` of a split's ``"images"`` or ``"annotations"`` (once per
        process): the input a stage records so that a changed dataset with the same ids is a stale cache."""
        if (split, what) not in self._content:
            ds = self.dataset(split)
            self._hashes[split, what] = hashes = ds.file_hashes(what)
            self._content[split, what] = ds.content_fingerprint(what, hashes)
        return self._content[split, what]

    def item_hashes(self, split: str, what: str) -> dict[str, str]:
        """``{id: first 16 hex digits of its file's sha256}`` of a split's images or annotations (read once with
        :meth:`content`): what a per-image stage records so that a changed file rebuilds only its own shards."""
        self.content(split, what)
        return {i: h[:16] for i, h in self._hashes[split, what].items()}

    def pretrain_dataset(self) -> VOCDataset:
        """The pre-training source: its own folder when ``pretrain.root`` is set, else the detection train split."""
        p = self.cfg.pretrain
        if not p.root:
            return self.dataset(self.cfg.data.train_split)
        # A pre-training set has no test use: its trainval is 95% of it.
        return self._dataset(self.path(p.root), p.split, p.synthetic_images, p.synthetic_seed, (0.9, 0.05),
                             p.synthetic_distractors, p.synthetic_extra_classes)

    def _dataset(self, root: Path, split: str, synthetic_images: int, synthetic_seed: int,
                 splits: tuple[float, float] = (0.4, 0.2), distractors: int = 0,
                 extra_classes: int = 0, coco: bool = False) -> VOCDataset:
        if coco:
            from .coco import CocoDataset

            return CocoDataset(root, split, self.classes)
        if synthetic_images and (root / "synthetic.json").is_file():
            from .synthetic import synthetic_params

            have = json.loads((root / "synthetic.json").read_text())
            want = synthetic_params(synthetic_images, synthetic_seed, splits, distractors, extra_classes)
            if have != want:
                raise StaleCacheError(f"{root}: generated with {have}, the config asks for {want}; delete the folder "
                                      "(make clean-demo) or point the config at another root")
        if synthetic_images and not (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            from .synthetic import make_toy_voc

            self.log(f"generating the synthetic dataset: {synthetic_images} images into {root}")
            make_toy_voc(root.parent, synthetic_images, synthetic_seed, splits=splits, year=root.name, progress=True,
                         distractors=distractors, extra_classes=extra_classes)
        classes = self.classes
        if synthetic_images and (distractors or extra_classes):
            from .synthetic import TOY_CLASSES, class_names

            classes = classes + list(class_names(extra_classes, distractors)[len(TOY_CLASSES):])  # the added ones
        return VOCDataset(root, split, classes)

    @property
    def device(self) -> str:
        """The config's ``device`` resolved on this machine (``auto``: CUDA when torch finds it); a CUDA device
        this machine lacks is refused naming the key."""
        from .config import ConfigError
        from .models import resolve_device

        try:
            return resolve_device(self.cfg.device)
        except ValueError as e:
            raise ConfigError(f"{self.dir / 'config.yaml'}: {e} (--set device=cpu)") from None

    # --------------------------------------------------------------- backbone
    def pool_deep(self) -> tuple[int, tuple[int, ...]] | None:
        """``(first channel, levels)`` of the trunk's coarse channels' own pyramid (``features.deep_levels``), or
        None: what :func:`sppdet.window_pool.pool_windows` takes as ``deep``."""
        levels = self.cfg.features.deep_levels
        return None if levels is None else (self.backbone().deep_from, tuple(levels))

    def backbone(self) -> Backbone:
        if self._backbone is None:
            b = self.cfg.backbone
            weights = b.weights
            if weights == "pretrain":
                if not self.pretrain_ckpt.is_file():
                    raise FileNotFoundError(f"{self.pretrain_ckpt}: backbone.weights is 'pretrain' but the trunk was "
                                            "not pre-trained yet; run tools/pretrain.py first")
                weights = str(self.pretrain_ckpt)
            elif weights not in (None, "imagenet"):
                weights = str(self.path(weights))
            trunk = build_backbone(b.name, weights, b.width, b.stride, b.hypercolumn).eval()
            for p in trunk.parameters():
                p.requires_grad_(False)
            self._backbone = trunk if b.project is None else self._projected(trunk)
        return self._backbone

    # conv5 vectors for backbone.project: up to PROJECTION_CELLS cells of each of PROJECTION_IMAGES train images
    # spread over the split, at the first scale (a 472 x 472 covariance from 32,000 vectors)
    PROJECTION_IMAGES = 16
    PROJECTION_CELLS = 2000

    def _projected(self, trunk: Backbone) -> Backbone:
        """``trunk`` with ``backbone.project``'s projection on top: read from :attr:`projection_path`, or fitted
        there first (when missing, or fitted from another trunk, split, image files or ``project``); ``trunk``
        itself where it has no more channels than that."""
        from .config import fingerprint
        from .features import conv5_maps, weights_fingerprint
        from .projection import ProjectedBackbone, fit_projection
        from .store import atomic_save_npz, load_npz

        cfg, k = self.cfg, self.cfg.backbone.project
        if k >= trunk.out_channels:  # e.g. custom.yaml's 256 with hypercolumn false (Lite2: 120 channels)
            self.log(f"backbone.project: {k} >= conv5's {trunk.out_channels} channels, conv5 used as it is")
            return trunk
        path = self.projection_path
        d = load_npz(path, ("weight", "mean", "source")) if path.is_file() else None
        # Checked against its source where the data is at hand (detection with a run folder alone uses it as is).
        if d is None or self._annotations_present():
            split = cfg.data.train_split
            ds = self.dataset(split)
            ids = [ds.ids[int(j)] for j in np.unique(np.linspace(0, len(ds.ids) - 1,
                                                                 min(self.PROJECTION_IMAGES, len(ds.ids))))]
            source = fingerprint({"project": k, "trunk": weights_fingerprint(trunk), "split": split, "ids": ids,
                                  "images": self.content(split, "images"), "scale": cfg.features.scales[0],
                                  "max_size": cfg.features.max_size, "cells": self.PROJECTION_CELLS,
                                  "seed": cfg.seed})
            if d is None or str(d["source"]) != source:
                from tqdm import tqdm

                maps = (conv5_maps(trunk, ds.image(i), cfg.features.scales[:1], cfg.features.max_size)[0][0]
                        for i in tqdm(ids, desc="conv5 projection", unit="img", leave=False))
                w, mean, explained = fit_projection(maps, k, self.PROJECTION_CELLS, cfg.seed)
                atomic_save_npz(path, weight=w, mean=mean, explained=np.float64(explained), source=np.array(source))
                self.log(f"backbone.project: conv5's {trunk.out_channels} channels -> their first {k} principal "
                         f"components ({explained:.1%} of the variance of {len(ids)} {split} images' conv5), {path}")
                d = {"weight": w, "mean": mean}
        return ProjectedBackbone(trunk, torch.from_numpy(d["weight"]), torch.from_numpy(d["mean"])).eval()
