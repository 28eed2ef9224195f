"""The multi-stage SPP-net pipeline: each stage reads the previous stages' artefacts from
a run folder and writes its own, with a manifest (config, input fingerprints, seconds,
bytes). The tools in ``tools/`` are thin wrappers around these functions.

Run folder::

    <run>/pretrain/checkpoint.pt               trunk + fc head (classifier pre-training)
    <run>/proposals/<split>/<id>.npz           boxes (R, 4) original-image xyxy
    <run>/features/<split>/<id>.npz            conv5 per scale, float16
    <run>/model/finetune/finetune.pt           fine-tuned fc6/fc7/fc8 (conv frozen)
    <run>/model/svm/svm.npz                    per-class SVMs
    <run>/model/bbox_reg/bbox_reg.npz          per-class box regressors
    <run>/detections/<split>/                  detections.npz, comp4 txt, metrics.json, PNGs
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backbones import Backbone, build_backbone
from .bbox_reg import BoxRegressor, fit_class_regressor
from .boxes import flip_boxes
from .config import Config, fingerprint, resolve_path, section_changes, section_defaults
from .detector import Detector, load_svms
from .features import FeatureCache, ImageFeatures, extract_image, weights_fingerprint
from .finetune import finetune_head
from .models import FCHead, resolve_precision
from .pretrain import load_checkpoint, save_checkpoint, train_classifier, voc_items
from .proposals import ProposalStore, compute_proposals
from .roidb import make_windows
from .spp import spp_output_dim
from .store import Stage, ShardError, StaleCacheError, atomic_save_npz, atomic_write_text, dir_bytes, require_complete
from .svm import HardNegativeTrainer, mean_norm
from .voc import VOCDataset

log = logging.getLogger(__name__)


class Run:
    """Paths and shared objects of one experiment folder."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, log_fn: Callable[[str], None] = print,
                 save_config: bool = True):
        self.cfg = cfg
        self.dir = Path(run_dir) if run_dir else resolve_path(cfg, cfg.run_dir)
        self.log = log_fn
        self._backbone: Backbone | None = None
        self._content: dict[tuple[str, str], str] = {}
        self._hashes: dict[tuple[str, str], dict[str, str]] = {}
        self._classes: list[str] | None = None
        if save_config:  # the resolved config, for tools that take only --run (detect.py, Predictor)
            import yaml

            saved = asdict(cfg)
            if not cfg.data.classes and self._annotations_present():
                saved["data"]["classes"] = self.classes  # read from the annotations: kept, so detection needs no data
            atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))

    def _annotations_present(self) -> bool:
        d = self.cfg.data
        root = self.path(d.root)
        return (root / "ImageSets" / "Main" / f"{d.train_split}.txt").is_file() if d.format == "voc" else root.is_dir()

    # ------------------------------------------------------------------ paths
    def proposals_dir(self, split: str) -> Path:
        return self.dir / "proposals" / split

    def features_dir(self, split: str) -> Path:
        return self.dir / "features" / split

    @property
    def pretrain_ckpt(self) -> Path:
        return self.dir / "pretrain" / "checkpoint.pt"

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

    def dataset(self, split: str) -> VOCDataset:
        d = self.cfg.data
        return self._dataset(self.path(d.root), split, d.synthetic_images, d.synthetic_seed, tuple(d.synthetic_splits),
                             coco=d.format == "coco")

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

    # --------------------------------------------------------------- backbone
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
            self._backbone = build_backbone(b.name, weights, b.width).eval()
            for p in self._backbone.parameters():
                p.requires_grad_(False)
        return self._backbone


# ------------------------------------------------------------------ stages
# Inputs recorded since the dataset's contents were fingerprinted: manifests from before lack them.
_CONTENT_INPUTS = ("images", "annotations")


def _stage(directory: Path, name: str, sections: dict, extra: dict, inputs: dict, overwrite: bool,
           extra_defaults: dict | None = None, item_inputs: dict | None = None, per_item: tuple = ()) -> Stage:
    """A stage folder whose outputs depend on whole config ``sections`` (name -> dataclass) and ``extra``
    values; the sections' defaults (and ``extra_defaults``, for extra values added later) let a manifest
    from before an added option stay valid, as the dataset-content inputs (``images``, ``annotations*``)
    let one from before they were recorded."""
    return Stage(directory, name, {**{k: asdict(v) for k, v in sections.items()}, **extra}, inputs,
                 overwrite=overwrite,
                 defaults={**{k: section_defaults(v) for k, v in sections.items()}, **(extra_defaults or {})},
                 added_inputs=tuple(k for k in inputs if k.startswith(_CONTENT_INPUTS)), item_inputs=item_inputs,
                 per_item=per_item)


def stage_pretrain(run: Run, split: str | None = None, folder: str | None = None, device: str = "cpu",
                   overwrite: bool = False) -> dict:
    """Classifier pre-training on VOC ground-truth crops (default: the train split) or a folder."""
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
    rng = np.random.default_rng(cfg.seed)
    if folder:
        from .pretrain import folder_items

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
        {"stage": "pretrain", "config": {"pretrain": asdict(cfg.pretrain), "backbone": asdict(cfg.backbone)},
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


def stage_proposals(run: Run, split: str, overwrite: bool = False, workers: int | None = None) -> dict:
    p = run.cfg.proposals
    ds = run.dataset(split)
    return compute_proposals(ds.ids, ds.image_path, run.proposals_dir(split), p.backend, p.max_boxes, p.min_size,
                             p.params, p.precomputed and str(run.path(p.precomputed)), p.workers if workers is None else workers, overwrite,
                             image_size=lambda i: (ds.annotation(i).height, ds.annotation(i).width),
                             inputs={"images": run.content(split, "images")},
                             item_inputs=run.item_hashes(split, "images"))


def stage_features(run: Run, split: str, shard: tuple[int, int] = (0, 1), overwrite: bool = False,
                   device: str = "cpu", flip: bool | None = None) -> dict:
    """conv5 once per image and scale, cached as float16; prints the cost summary. ``flip``: also
    the flipped image's maps; None: for the train split when ``finetune.flip`` (the authors include
    flipped images in fine-tuning)."""
    from tqdm import tqdm

    cfg = run.cfg
    if flip is None:
        flip = split == cfg.data.train_split and cfg.finetune.flip
    ds = run.dataset(split)
    pm = run.proposals_dir(split) / "manifest.json"
    if not pm.is_file() or not json.loads(pm.read_text()).get("complete"):
        run.log(f"features: computing missing proposals for {split}")
        stage_proposals(run, split)
    prop_manifest = require_complete(run.proposals_dir(split), "proposals")
    backbone = run.backbone().to(device)
    g = backbone.geometry
    precision = resolve_precision(cfg.features.precision, device, "features.precision")
    inputs = {"weights": weights_fingerprint(backbone), "proposals": prop_manifest["fingerprint"],
              "split": fingerprint(ds.ids), "images": run.content(split, "images")}
    # The precision the pass resolved to ("auto" is bf16 on one machine, fp32 on another) is part of the
    # config, so a run resumed elsewhere cannot mix the two in one cache. Manifests from before it was
    # recorded there: the value they recorded beside it, else fp32 (the only precision then).
    mpath = run.features_dir(split) / "manifest.json"
    before = (Stage.read_manifest(mpath.parent).get("conv_precision", "fp32") if mpath.is_file() and not overwrite
              else "fp32")
    # Per image: its file and its proposals; when only some images changed, only their maps are recomputed.
    from .store import file_sha256

    images = run.item_hashes(split, "images")
    items = {i: images[i] + file_sha256(run.proposals_dir(split) / f"{i}.npz") for i in ds.ids}
    stage = _stage(run.features_dir(split), "features", {"features": cfg.features, "backbone": cfg.backbone},
                   {"flip": bool(flip), "conv_precision": precision}, inputs, overwrite and shard == (0, 1),
                   extra_defaults={"conv_precision": before}, item_inputs=items, per_item=("images", "proposals"))
    i_shard, n_shard = shard
    ids = ds.ids[i_shard::n_shard]
    todo = [i for i in ids if not stage.has(i)]
    store = ProposalStore(run.proposals_dir(split))
    cache = FeatureCache(stage.dir, g.stride, g.center0, cfg.features.levels, cfg.features.shrink,
                         cfg.features.target_size)
    t_conv = t_pool = 0.0
    nbytes = 0
    nbox = 0
    for i in tqdm(todo, desc=f"features {split}" + (f" shard {i_shard}/{n_shard}" if n_shard > 1 else ""), unit="img"):
        rgb = ds.image(i)
        maps, factors, flipped, dt = extract_image(backbone, rgb, cfg.features.scales, cfg.features.max_size, flip, device,
                                                   precision)
        t_conv += dt
        boxes = store.load(i)
        t0 = time.perf_counter()
        cache.pooled(ImageFeatures(maps, factors, rgb.shape[0], rgb.shape[1]), boxes)  # timed, not stored
        t_pool += time.perf_counter() - t0
        nbox += len(boxes)
        nbytes += cache.write(stage.path(i), maps, factors, rgb.shape[:2], flipped, cfg.features.dtype)
    done_all = all(stage.has(i) for i in ds.ids)
    n = len(todo)
    summary = {
        "new_images": n,
        "conv_seconds_per_image": t_conv / n if n else None,
        "pool_seconds_per_image": t_pool / n if n else None,
        "boxes_per_image": nbox / n if n else None,
        "geometry": {"stride": g.stride, "center0": g.center0, "receptive_field": g.receptive_field},
        "feature_dim": spp_output_dim(backbone.out_channels, cfg.features.levels),
        "conv_precision": precision,
    }
    if done_all:
        m = stage.finish(len(ds.ids), **summary)
    else:
        stage.write_manifest(False, **summary)
        m = Stage.read_manifest(stage.dir)
    total = dir_bytes(stage.dir)
    per_img = total / max(1, sum(stage.has(i) for i in ds.ids))
    pooled_per_img = 2000 * summary["feature_dim"] * 4
    run.log(f"features {split}: {n} new images"
            + (f", conv {summary['conv_seconds_per_image']:.3f} s/img, pooling {summary['boxes_per_image']:.0f} windows "
               f"{summary['pool_seconds_per_image'] * 1000:.1f} ms/img" if n else "")
            + f"; cache {per_img / 1e6:.2f} MB/img ({total / 1e6:.1f} MB in all). Projected to VOC 2007 trainval+test "
              f"(9963 images): conv5 cache {per_img * 9963 / 1e9:.1f} GB; caching pooled {summary['feature_dim']}-d "
              f"float32 vectors of 2000 windows instead: {pooled_per_img / 1e6:.0f} MB/img, "
              f"{pooled_per_img * 9963 / 1e9:.0f} GB")
    return m


def _require_current(run: Run, split: str, directory: Path) -> None:
    """Refuse a proposal or feature folder made from other image files than the split now holds (an
    image edited or regenerated under the same id); folders from before the images were recorded pass."""
    recorded = Stage.read_manifest(directory).get("inputs", {}).get("images")
    if recorded is not None and recorded != run.content(split, "images"):
        raise StaleCacheError(f"{directory}: made from other image files than split {split!r} holds now (an image "
                              f"changed under the same id); rebuild it with --overwrite (tools/demo.py: "
                              f"--rebuild-stale)", folder=directory)


def _windows(run: Run, split: str, ds: VOCDataset | None = None) -> dict:
    ds = ds or run.dataset(split)
    _require_current(run, split, run.proposals_dir(split))
    store = ProposalStore(run.proposals_dir(split))
    k = len(run.classes)
    return {i: make_windows(ds.annotation(i), ds.labels(i), store.load(i), k) for i in ds.ids}


def _feature_cache(run: Run, split: str, verify: bool = True) -> FeatureCache:
    """The split's conv5 cache; ``verify``: refused when made from other image files than the split holds
    (False where only its geometry is read)."""
    cache = FeatureCache.from_manifest(run.features_dir(split))
    if verify:
        _require_current(run, split, cache.dir)
    return cache


def _new_head(run: Run, in_dim: int, init_from_pretrain: bool) -> tuple[FCHead, str]:
    cfg = run.cfg.finetune
    head = FCHead(in_dim, cfg.hidden, len(run.classes) + 1, cfg.dropout)
    how = "random"
    if init_from_pretrain and run.pretrain_ckpt.is_file():
        ck = load_checkpoint(run.pretrain_ckpt)
        st = ck["head"]
        if st["fc6.weight"].shape == head.fc6.weight.shape and st["fc7.weight"].shape == head.fc7.weight.shape:
            head.fc6.load_state_dict({"weight": st["fc6.weight"], "bias": st["fc6.bias"]})
            head.fc7.load_state_dict({"weight": st["fc7.weight"], "bias": st["fc7.bias"]})
            how = "pre-trained fc6/fc7"
    return head, how


def pretrained_head(run: Run) -> FCHead | None:
    """The classifier's fc6/fc7 without fine-tuning (for the ablation's 'no fine-tuning' rows)."""
    cache = _feature_cache(run, run.cfg.data.train_split, verify=False)
    in_dim = spp_output_dim(run.backbone().out_channels, cache.levels)
    head, how = _new_head(run, in_dim, True)
    if how == "random":
        raise ShardError(f"{run.pretrain_ckpt}: no pre-trained fc6/fc7 matching the detection pyramid")
    return head.eval()


def _require_flipped_maps(directory: Path, manifest: dict, split: str, option: str) -> None:
    """Refuse, by name, a feature cache made without the mirror images' maps that ``option`` uses."""
    if not manifest["config"].get("flip"):
        raise ShardError(f"{directory}: cached without the flipped images' maps, which {option} asks for; rerun "
                         f"tools/extract_features.py --split {split} --flip --overwrite, or set {option}=false")


def stage_finetune(run: Run, overwrite: bool = False) -> dict:
    cfg = run.cfg
    tr, va = cfg.data.train_split, cfg.data.val_split
    cache_t, cache_v = _feature_cache(run, tr), _feature_cache(run, va)
    if va == cfg.data.test_split:
        run.log(f"warning: the validation split '{va}' is the test split (the authors' choice); "
                "the checkpoint is then selected on test")
    feats_t = Stage.read_manifest(cache_t.dir)
    if cfg.finetune.flip:
        _require_flipped_maps(cache_t.dir, feats_t, tr, "finetune.flip")
    conv_before = weights_fingerprint(run.backbone())
    in_dim = spp_output_dim(run.backbone().out_channels, cache_t.levels)
    inputs = {"features_" + tr: feats_t["fingerprint"],
              "features_" + va: Stage.read_manifest(cache_v.dir)["fingerprint"],
              "annotations_" + tr: run.content(tr, "annotations"), "annotations_" + va: run.content(va, "annotations")}
    stage = _stage(run.finetune_path.parent, "finetune", {"finetune": cfg.finetune}, {"seed": cfg.seed}, inputs,
                   overwrite)
    if run.finetune_path.is_file():
        run.log(f"finetune: reusing {run.finetune_path}")
        return stage.finish(1)
    # fc8 (and fc6/fc7 when not from the pre-trained classifier) start from random weights: seeded here, as
    # torch seeds each process differently, so that a run folder's fine-tuning is reproducible.
    torch.manual_seed(cfg.seed)
    head, how = _new_head(run, in_dim, cfg.finetune.init_from_pretrain)
    run.log(f"finetune: fc6/fc7 initialised from {how}; conv layers frozen (not loaded into the trainer)")
    windows_t = _windows(run, tr)
    if cfg.finetune.input_norm:
        norm = _sample_norm(cache_t, windows_t, np.random.default_rng(cfg.seed), cfg.svm.norm_images,
                            cfg.svm.norm_boxes)
        head.input_scale = cfg.finetune.input_norm / norm
        run.log(f"finetune: pooled features scaled by {head.input_scale:.4g} before fc6 (mean norm {norm:.1f} -> "
                f"{cfg.finetune.input_norm:g}, finetune.input_norm)")
    res = finetune_head(head, windows_t, _windows(run, va), cache_t, cache_v, len(run.classes), cfg.finetune,
                        cfg.seed, log_fn=run.log)
    assert weights_fingerprint(run.backbone()) == conv_before
    save_checkpoint(run.finetune_path, {"head": head.state_dict(), "in_dim": in_dim, "hidden": cfg.finetune.hidden,
                                        "classes": run.classes, "result": res, "init": how,
                                        "input_scale": head.input_scale})
    return stage.finish(1, best_iteration=res["best_iteration"], best_val_error=res["best_val_error"],
                        background_error=res["background_error"], prior_loss=res["prior_loss"],
                        best_val_loss=res["best_val_loss"], input_scale=head.input_scale,
                        conv_fingerprint_unchanged=conv_before, history=res["history"])


def load_head(run: Run) -> FCHead:
    ck = load_checkpoint(run.finetune_path)
    head = FCHead(ck["in_dim"], ck["hidden"], len(ck["classes"]) + 1, input_scale=ck.get("input_scale", 1.0))
    head.load_state_dict(ck["head"])
    return head.eval()


def _sample_norm(cache: FeatureCache, windows: dict, rng: np.random.Generator, images: int, boxes: int,
                 layer=lambda x: x.numpy()) -> float:
    """Mean L2 norm of ``layer``'s features of up to ``boxes`` random windows of each of the first ``images``."""
    sample = []
    for i in list(windows)[:images]:
        w = windows[i]
        sel = rng.choice(len(w.boxes), min(boxes, len(w.boxes)), replace=False)
        sample.append(layer(cache.pooled(i, w.boxes[sel])))
    norm = mean_norm(sample)
    if not norm > 0:
        raise ValueError(f"{cache.dir}: every sampled window's features are zero (for fc6/fc7: a fine-tuned head "
                         "whose units all died; see the fine-tuning stage's log), nothing to scale or train on")
    return norm


def _layer_features(head: FCHead | None, layer: str, pooled: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (pooled if layer == "pool5" or head is None else head.features(pooled, layer)).numpy()


def stage_svm(run: Run, feature: str | None = None, tag: str = "", overwrite: bool = False) -> dict:
    """Per-class SVMs with hard-negative mining on the train split (one pass; with ``svm.flip`` also on its
    mirror images, positives and negatives)."""
    from tqdm import tqdm

    cfg = run.cfg
    feature = feature or cfg.svm.feature
    tr = cfg.data.train_split
    cache = _feature_cache(run, tr)
    flip = cfg.svm.flip
    if flip:
        _require_flipped_maps(cache.dir, Stage.read_manifest(cache.dir), tr, "svm.flip")
    if feature in ("fc6", "fc7"):
        head, layer = load_head(run), feature
    elif feature in ("fc6_noft", "fc7_noft"):
        head, layer = pretrained_head(run), feature[:3]
    elif feature == "pool5":
        head, layer = None, "pool5"
    else:
        raise ValueError(f"svm.feature must be pool5, fc6, fc7, fc6_noft or fc7_noft, got {feature!r}")
    inputs = {"features": Stage.read_manifest(cache.dir)["fingerprint"], "annotations": run.content(tr, "annotations")}
    if feature in ("fc6", "fc7"):
        inputs["finetune"] = Stage.read_manifest(run.finetune_path.parent)["fingerprint"]
    path = run.svm_path(tag)
    stage = _stage(path.parent, "svm", {"svm": cfg.svm}, {"feature": feature}, inputs, overwrite)
    if path.is_file():
        run.log(f"svm: reusing {path}")
        return stage.finish(1)
    windows = _windows(run, tr)
    ids = list(windows)
    k_cls = len(run.classes)
    rng = np.random.default_rng(cfg.seed)
    # Feature scale: mean norm over a sample of windows (spp_feature_stats.m).
    scale = cfg.svm.target_norm / _sample_norm(cache, windows, rng, cfg.svm.norm_images, cfg.svm.norm_boxes,
                                               lambda x: _layer_features(head, layer, x))

    def views(i: str):
        """The image's features and windows, then (svm.flip) its mirror image's."""
        feats, boxes = cache.load(i, flipped=flip), windows[i].boxes
        yield feats, boxes
        if flip:
            yield feats.mirrored(), flip_boxes(boxes, feats.width)

    # Positives: ground-truth boxes (difficult included, as the authors' roidb).
    pos: list[list[np.ndarray]] = [[] for _ in range(k_cls)]
    for i in tqdm(ids, desc="svm positives", unit="img", leave=False):
        w = windows[i]
        g = np.nonzero(w.is_gt)[0]
        for feats, boxes in (views(i) if len(g) else ()):
            f = _layer_features(head, layer, cache.pooled(feats, boxes[g])) * scale
            for j, gi in enumerate(g):
                pos[int(w.label[gi])].append(f[j:j + 1])
    dim = _layer_features(head, layer, cache.pooled(ids[0], windows[ids[0]].boxes[:1])).shape[1]
    x_pos = [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in pos]
    for k, name in enumerate(run.classes):
        run.log(f"svm {name}: {len(x_pos[k])} positives")
        if not len(x_pos[k]):
            run.log(f"warning: class {name!r} has no object in the training split {tr!r}: no SVM can be trained for "
                    f"it, so it is left out of scoring (never detected, AP 0); add labelled examples of it")
    trainer = HardNegativeTrainer(x_pos, dim, cfg.svm, log_fn=run.log)
    t0 = time.time()
    n, last = 0, len(ids) * (2 if flip else 1) - 1
    for i in tqdm(ids, desc=f"svm hard negatives ({feature})", unit="img"):
        w = windows[i]
        for feats, boxes in views(i):
            prop = np.nonzero(~w.is_gt)[0]
            if len(prop):
                if cfg.svm.dedup:  # one window per conv5 rectangle and scale, pooled once
                    x, first, _ = cache.pooled_groups(feats, boxes[prop])
                    prop = prop[first]
                else:
                    x = cache.pooled(feats, boxes[prop])
                f = _layer_features(head, layer, x) * scale
                neg = w.class_iou[prop] < cfg.svm.neg_iou
            else:  # still called: the last image triggers the final retrain
                f, neg = np.zeros((0, dim), np.float32), np.zeros((0, k_cls), bool)
            trainer.add_image(n, f.astype(np.float32), neg, last=n == last)
            n += 1
    caches = trainer.finish()
    W = np.stack([c.w if c.w is not None else np.zeros(dim, np.float32) for c in caches])
    b = np.array([c.b for c in caches], np.float32)
    stats = {name: {"positives": int(len(c.x_pos)), "negative_cache": int(len(c.idx)), "retrains": c.retrains}
             for name, c in zip(run.classes, caches)}
    for name, s in stats.items():
        last = s["retrains"][-1]["objective"] if s["retrains"] else float("nan")
        run.log(f"svm {name}: {s['positives']} positives, final negative cache {s['negative_cache']}, "
                f"{len(s['retrains'])} retrains, final objective {last:.4f}")
    trained = np.array([c.w is not None for c in caches])
    atomic_save_npz(path, W=W, b=b, feature_scale=np.float64(scale), layer=np.array(layer),
                    classes=np.array(run.classes), feature=np.array(feature), trained=trained)
    return stage.finish(1, stats=stats, feature_scale=scale, mining_seconds=time.time() - t0,
                        negative_pool=trainer.memory())


def stage_bbox_reg(run: Run, overwrite: bool = False, max_per_class: int = 3000) -> dict:
    """Per-class ridge regressors on pooled features (scaled to mean norm 20)."""
    from tqdm import tqdm

    cfg = run.cfg
    tr = cfg.data.train_split
    cache = _feature_cache(run, tr)
    path = run.bbox_reg_path
    inputs = {"features": Stage.read_manifest(cache.dir)["fingerprint"], "annotations": run.content(tr, "annotations")}
    stage = _stage(path.parent, "bbox_reg", {"bbox_reg": cfg.bbox_reg}, {"max_per_class": max_per_class}, inputs,
                   overwrite)
    if path.is_file():
        run.log(f"bbox_reg: reusing {path}")
        return stage.finish(1)
    ds = run.dataset(tr)
    windows = _windows(run, tr, ds)  # ds's annotations are parsed once and reused below
    k_cls = len(run.classes)
    rng = np.random.default_rng(cfg.seed)
    feats, props, gts = [[] for _ in range(k_cls)], [[] for _ in range(k_cls)], [[] for _ in range(k_cls)]
    norms = []
    for i in tqdm(windows, desc="bbox regression samples", unit="img"):
        w = windows[i]
        sel = np.nonzero(w.max_iou > cfg.bbox_reg.min_overlap)[0]
        if len(sel) == 0:
            continue
        f = cache.pooled(i, w.boxes[sel]).numpy()
        norms.append(np.linalg.norm(f, axis=1))
        gt_boxes = ds.annotation(i).boxes
        for j, s in enumerate(sel):
            k = int(w.label[s])
            feats[k].append(f[j])
            props[k].append(w.boxes[s])
            gts[k].append(gt_boxes[w.gt_index[s]])
    if not norms:
        raise ValueError(f"bbox regression: no window of split {tr!r} overlaps an object by > {cfg.bbox_reg.min_overlap}")
    scale = cfg.bbox_reg.target_norm / float(np.concatenate(norms).mean())
    dim = next(len(f[0]) for f in feats if f)
    W = np.zeros((k_cls, dim, 4), np.float32)
    b = np.zeros((k_cls, 4), np.float32)
    mu = np.zeros((k_cls, 4))
    T_inv = np.tile(np.eye(4), (k_cls, 1, 1))
    trained = np.zeros(k_cls, bool)
    stats = {}
    for k, name in enumerate(run.classes):
        if len(feats[k]) < 2:
            run.log(f"bbox_reg {name}: too few samples ({len(feats[k])}); left as identity")
            continue
        idx = np.arange(len(feats[k]))
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        X = np.stack([feats[k][j] for j in idx]) * scale
        r = fit_class_regressor(X, np.stack([props[k][j] for j in idx]), np.stack([gts[k][j] for j in idx]),
                                cfg.bbox_reg.lam, cfg.bbox_reg.whiten)
        W[k], b[k], mu[k], T_inv[k], trained[k] = r["W"], r["b"], r["mu"], r["T_inv"], True
        stats[name] = {"samples": r["samples"], "train_mse_whitened": r["train_mse"]}
        run.log(f"bbox_reg {name}: {r['samples']} samples, training MSE (whitened targets) {r['train_mse']:.3f}")
    BoxRegressor(W, b, mu, T_inv, scale, trained).save(path, run.classes)
    return stage.finish(1, stats=stats, feature_scale=scale)


def combined_svms(cfg: Config) -> list[tuple[str, str]]:
    """``(feature, tag)`` of the SVM sets scored at test time: ``svm.feature`` (tag ``""``), then each
    feature of ``test.combine`` (tag ``_<feature>``, the folder the ablation uses for it too; ``Config``
    checks that they can share one detector)."""
    return [(cfg.svm.feature, "")] + [(f, f"_{f}") for f in dict.fromkeys(cfg.test.combine)]


def stage_svms(run: Run, overwrite: bool = False) -> list[dict]:
    """The SVM sets that testing scores with (``combined_svms``), each a stage of its own."""
    return [stage_svm(run, feature, tag, overwrite) for feature, tag in combined_svms(run.cfg)]


def build_detector(run: Run, split: str, svm_tag: str = "", use_bbox_reg: bool = True,
                   combine: bool = True) -> Detector:
    """The test-time detector: the SVMs of ``svm_tag``; with the default tag and ``combine``, also those
    of ``test.combine`` (their scores combined by ``test.combine_by``)."""
    cache = (_feature_cache(run, split, verify=False) if (run.features_dir(split) / "manifest.json").is_file()
             else None)
    if cache is None:
        g = run.backbone().geometry
        f = run.cfg.features
        cache = FeatureCache(run.features_dir(split), g.stride, g.center0, f.levels, f.shrink, f.target_size)
    sets = combined_svms(run.cfg) if combine and not svm_tag else [(None, svm_tag)]
    for feature, t in sets[1:]:
        if not run.svm_path(t).is_file():
            raise ShardError(f"{run.svm_path(t)}: missing; test.combine lists {feature}, whose SVMs "
                             f"tools/train_svm.py trains (or leave them out: --set 'test.combine=[]')")
    svms = [load_svms(run.svm_path(t)) for _, t in sets]
    head = None
    if svms[0]["feature"] in ("fc6_noft", "fc7_noft"):
        head = pretrained_head(run)
    elif any(s["layer"] in ("fc6", "fc7") for s in svms):
        head = load_head(run)
    reg = BoxRegressor.load(run.bbox_reg_path) if use_bbox_reg and run.bbox_reg_path.is_file() else None
    return Detector(head, svms, reg, cache, run.cfg.test, run.classes)


def _draw_examples(run: Run, ds: VOCDataset, dets: dict, out_dir: Path, n: int, threshold: float) -> list[Path]:
    from .visualize import draw_boxes, save_png

    paths = []
    for i in list(dets)[:n]:
        d = dets[i]
        m = d.scores > threshold
        img = draw_boxes(ds.image(i), d.boxes[m], d.labels[m], run.classes, d.scores[m])
        p = out_dir / f"{i}.png"
        save_png(p, img)
        paths.append(p)
    return paths


def stage_test(run: Run, split: str | None = None, svm_tag: str = "", tag: str = "", draw: int = 4,
               progress: bool = True, combine: bool = True) -> dict:
    """Detect on a whole split from the caches; evaluate without and with box regression. The SVMs are
    those of ``svm_tag``, or by default ``svm.feature``'s combined with ``test.combine``'s (``combine``)."""
    from tqdm import tqdm

    from .analysis import miss_reasons

    cfg = run.cfg
    split = split or cfg.data.test_split
    ds = run.dataset(split)
    det = build_detector(run, split, svm_tag, combine=combine)
    for d in (run.proposals_dir(split), det.cache.dir):  # the detector reads both for this split's images
        _require_current(run, split, d)
    store = ProposalStore(run.proposals_dir(split))
    out = run.detections_dir(split, tag)
    for k, s in enumerate(det.svm_sets[0]["trained"]):
        if not s:
            run.log(f"warning: class {run.classes[k]!r} has no SVM (no training positives): it is not scored, AP 0")
    plain_all, reg_all = {}, {}
    timing = {"pool": 0.0, "fc": 0.0, "svm": 0.0, "post": 0.0}
    t0 = time.time()
    annotations, misses = {}, []
    for i in tqdm(ds.ids, desc=f"test {split}", unit="img", disable=not progress):
        feats, props = det.cache.load(i), store.load(i)
        pooled, scores, t = det.score(feats, props)
        # Per-class cap only (R-CNN); the scores are kept for the miss analysis.
        plain, reg, t["post"] = det.postprocess(pooled, scores, props, feats.width, feats.height, max_per_image=0)
        for k in timing:
            timing[k] += t[k]
        plain_all[i] = plain
        if reg is not None:
            reg_all[i] = reg
        annotations[i] = boxes, labels, difficult = _annotations(run, ds, i)
        misses += list(zip(labels[~difficult].tolist(), miss_reasons(boxes, labels, difficult, props, scores, plain,
                                                                      reg, det.test.score_threshold)))
    n = len(ds.ids)
    results = {"without_bbox_reg": _evaluate(run, ds, plain_all)}
    if reg_all:
        results["with_bbox_reg"] = _evaluate(run, ds, reg_all)
    metrics = {
        "seconds_per_image": {k: v / max(n, 1) for k, v in timing.items()},
        "svm": svm_tag or "+".join(s["feature"] for s in det.svm_sets),
        "combine_by": det.test.combine_by if len(det.svm_sets) > 1 else None,
    }
    return _write_results(run, ds, split, out, results, reg_all or plain_all, annotations, misses, metrics, draw, t0)


def _evaluate(run: Run, ds: VOCDataset, dets: dict) -> dict:
    from .evaluation import detections_by_class, evaluate_detections

    gt = {k: ds.ground_truth(k) for k in range(len(run.classes))}
    return evaluate_detections(detections_by_class(dets, len(run.classes)), gt, run.classes)


def _annotations(run: Run, ds: VOCDataset, i: str) -> tuple:
    a = ds.annotation(i)
    return a.boxes, a.labels(run.classes), np.asarray(a.difficult, bool)


def _write_results(run: Run, ds: VOCDataset, split: str, out: Path, results: dict, final: dict, annotations: dict,
                   misses: list, metrics: dict, draw: int, started: float) -> dict:
    """A test's artefacts in ``out``: the PR curves and error analysis of the last of ``results`` (with box
    regression where there is any), comp4 files, detections.npz and drawn examples of ``final``, metrics.json
    (``metrics`` plus the results, the data's fingerprints and the seconds since ``started``, writing
    included); the tables and the error summary are logged. Everything is written into a new folder beside
    ``out`` that then replaces it whole: a failed write (a full disk) leaves the previous results as they were."""
    from .analysis import format_report
    from .evaluation import format_table
    from .store import swap_in_folder

    with swap_in_folder(out) as tmp:
        metrics, errors = _write_artefacts(run, ds, split, tmp, results, final, annotations, misses, metrics, draw,
                                           started, out)
    for k, v in results.items():
        run.log(f"\n{k.replace('_', ' ')} ({out.name}, {len(ds.ids)} images):\n" + format_table(v))
    run.log("\n" + format_report(errors)
            + f"\n  (per class: {out / 'error_analysis.json'}, {out / 'error_analysis.png'})")
    return metrics


def _write_artefacts(run: Run, ds: VOCDataset, split: str, out: Path, results: dict, final: dict, annotations: dict,
                     misses: list, metrics: dict, draw: int, started: float, final_dir: Path) -> tuple[dict, dict]:
    """:func:`_write_results`' files, written into ``out`` (a folder that becomes ``final_dir``); returns the metrics
    and the error report."""
    from .analysis import error_report
    from .evaluation import detections_by_class
    from .visualize import plot_error_analysis, plot_pr_curves
    from .voc import write_comp4

    best = list(results.values())[-1]
    plot_pr_curves(best["curves"], {c: v["ap07"] for c, v in best["per_class"].items()}, out / "pr_curves.png",
                   title=f"{run.cfg.name} {final_dir.name}: mAP (VOC07) {best['map07']:.3f}")
    write_comp4(out, split, run.classes, [(i, int(k), float(s), b) for i, d in final.items()
                                          for b, s, k in zip(d.boxes, d.scores, d.labels)])
    arrays = {}
    for i, d in final.items():
        arrays[f"{i}/boxes"], arrays[f"{i}/scores"], arrays[f"{i}/labels"] = d.boxes, d.scores, d.labels
    atomic_save_npz(out / "detections.npz", **arrays)
    drawn = [final_dir / p.name for p in _draw_examples(run, ds, final, out, draw, run.cfg.test.draw_threshold)]
    errors = error_report(detections_by_class(final, len(run.classes)), annotations, run.classes, misses)
    atomic_write_text(out / "error_analysis.json", json.dumps(errors, indent=2))
    plot_error_analysis(errors, out / "error_analysis.png", title=f"{run.cfg.name} {final_dir.name}: where the AP goes")
    metrics = {
        "split": split,
        "images": len(ds.ids),
        "classes": run.classes,
        # What the detections were made from: a combination of runs checks that they saw the same files.
        "inputs": {w: run.content(split, w) for w in ("images", "annotations")},
        "map07": best["map07"],
        "map": best["map"],
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "curves"} for k, v in results.items()},
        **metrics,
        "seconds": time.time() - started,
        "drawn": [str(p) for p in drawn],
        "error_analysis": errors["summary"],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics, errors


def stage_combine(run: Run, split: str, others: list[str | Path], tag: str = "_combined", draw: int = 4) -> dict:
    """The paper's model combination (section 4.4) across runs: per image and class, NMS on the union of this
    run's detections on ``split`` and those of each run folder in ``others`` (each tested on the same split
    first, e.g. with another trunk); a more confident box of one model suppresses the less confident boxes of
    another. Each run's boxes are its own final ones (box regression, where it has any, applied). Written to
    ``detections/<split><tag>`` with the usual artefacts."""
    from .detector import load_detections, union_nms

    t0 = time.time()
    if not others:
        raise ValueError("a combination needs at least one other run folder")
    ds = run.dataset(split)
    sources = [run.detections_dir(split)] + [Path(o) / "detections" / split for o in others]
    sets = []
    for src in sources:
        m_path, d_path = src / "metrics.json", src / "detections.npz"
        if not m_path.is_file() or not d_path.is_file():
            raise FileNotFoundError(f"{src}: no detections of split {split!r} (run tools/test_net.py --run "
                                    f"{src.parent.parent} --split {split} first)")
        m = json.loads(m_path.read_text())
        if list(m.get("classes", [])) != run.classes:
            raise ValueError(f"{m_path}: classes {m.get('classes')} differ from this run's {run.classes}")
        for w, fp in m.get("inputs", {}).items():  # detections made before this was recorded are not checked
            if fp != run.content(split, w):
                raise StaleCacheError(f"{m_path}: made from other {w} than split {split!r} holds now "
                                      f"(test that run again: tools/test_net.py --run {src.parent.parent} "
                                      f"--split {split})")
        sets.append(load_detections(d_path, ds.ids, len(run.classes)))
        run.log(f"combine: {src} (mAP {m.get('map07', float('nan')):.3f})")
    final = {i: union_nms([s[i] for s in sets if i in s], run.cfg.test.nms, run.cfg.test.max_per_class)
             for i in ds.ids}
    out = run.detections_dir(split, tag)
    results = {"combined": _evaluate(run, ds, final)}
    annotations = {i: _annotations(run, ds, i) for i in ds.ids}
    return _write_results(run, ds, split, out, results, final, annotations, [], {"combined": [str(s) for s in sources]},
                          draw, t0)
