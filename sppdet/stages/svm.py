"""Stage 5: per-class linear SVMs with hard-negative mining (R-CNN's and SPP-net's second training stage: the
fine-tuned network's own softmax is not what scores windows).

Reads: ``<run>/features/<train>/``, the train split's annotations and proposals, and for fc6/fc7 features
``<run>/model/finetune/`` (made with the finetune settings now in force). Writes: ``<run>/model/svm<tag>/svm.npz``
(weights, biases, the feature scale, which classes were trained) and its manifest.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..boxes import flip_boxes
from ..config import Config
from ..config_sections import SVMConfig
from ..features import FeatureCache
from ..malloc import large_blocks_reused
from ..models import FCHead, fc_features, module_device, resolve_device, resolve_precision
from ..roidb import group_windows_mask
from ..run import Run
from ..store import atomic_save_npz
from ..manifest import Stage
from ..svm import HardNegativeTrainer, negatives_cap, pool_fits, pool_rows, positives_cap, svm_arrays
from .common import (StageSpec, config_cache, feature_cache, pooling_before, pooling_record, require_flipped_maps,
                     sample_norm, split_windows, stage_folder)
from .bbox_reg import Reservoir
from .finetune import load_head, pretrained_head

FEATURES = ("pool5", "fc6", "fc7", "fc6_noft", "fc7_noft")


def layer_features(head: FCHead | None, layer: str, pooled: torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """``pooled`` SPP vectors (pool5) or the head's ``layer`` activations of them (fc6/fc7 in ``precision``,
    resolved: ``"fp32"`` or ``"bf16"``, on the head's device), as float32 NumPy."""
    if layer == "pool5" or head is None:
        return pooled.cpu().numpy()
    return fc_features(head, pooled.to(module_device(head)), layer, precision).cpu().numpy()


def svm_fc_precision(cfg: Config, feature: str) -> str:
    """The precision the SVM stage computes ``feature`` in: ``svm.fc_precision`` resolved for fc6/fc7 on this
    machine's ``device`` (as the test stage resolves ``test.fc_precision``), ``"fp32"`` for pool5 (no fc layer)."""
    if feature == "pool5":
        return "fp32"
    return resolve_precision(cfg.svm.fc_precision, resolve_device(cfg.device), "svm.fc_precision")


def svm_head(run: Run, feature: str) -> tuple[FCHead | None, str]:
    """The fc head (None for pool5) and its layer that ``feature`` (an ``svm.feature`` value) names."""
    if feature in ("fc6", "fc7"):
        return load_head(run), feature
    if feature in ("fc6_noft", "fc7_noft"):
        return pretrained_head(run), feature[:3]
    if feature == "pool5":
        return None, "pool5"
    raise ValueError(f"svm.feature must be one of {', '.join(FEATURES)}, got {feature!r}")


def svm_section(cfg: Config) -> SVMConfig:
    """The ``svm`` section as stages record it: ``svm.fc_precision`` at its default, since what outputs depend on
    is the precision resolved, recorded apart where fc layers are used (:func:`svm_settings`), and R-CNN mode
    uses none."""
    return replace(cfg.svm, fc_precision=SVMConfig.fc_precision)


# SVMs made before svm.fc_precision existed computed fc6/fc7 in fp32.
SETTINGS_BEFORE = {"fc_precision": "fp32"}


def svm_settings(run: Run, feature: str) -> tuple[dict, dict]:
    """What an SVM set depends on, as the stage records it and later stages check it: the ``svm`` section, the
    feature, with the precision resolved (``"auto"`` is bf16 on one machine, fp32 on another; pool5 has no fc
    layer) recorded instead of the ``svm.fc_precision`` key, the caps on each class's negatives and positives, and
    the pooling keys its windows are pooled with."""
    cfg = run.cfg
    dim = svm_dim(run, feature)
    return {"svm": svm_section(cfg)}, {"feature": feature, "fc_precision": svm_fc_precision(cfg, feature),
                                       "negatives_cap": _negatives_cap(run, dim),
                                       "positives_cap": positives_cap(len(run.classes), dim, cfg.svm.max_pool_gb),
                                       **pooling_record(run)}


def settings_before(run: Run, extra: dict) -> dict:
    """``extra_defaults`` of an SVM set whose recorded values now in force are ``extra`` (:func:`svm_settings`): what
    its manifest lacking a recorded value was made with (before ``svm.max_pool_gb``, each class's negative cap was
    ``svm.max_negatives``; every positive was kept, which is the cap now in force while no class passes it)."""
    return {**SETTINGS_BEFORE, "negatives_cap": run.cfg.svm.max_negatives, "positives_cap": extra["positives_cap"],
            **pooling_before(run)}


def svm_dim(run: Run, feature: str) -> int:
    """The length of ``feature``'s rows: fc6/fc7 the head's width, pool5 a window pooled from the trunk's maps."""
    if feature == "pool5":
        return config_cache(run, run.features_dir(run.cfg.data.train_split)).feature_dim(run.backbone().out_channels)
    return run.cfg.finetune.hidden


def _negatives_cap(run: Run, dim: int) -> int:
    """Each class's cap on its negative cache for SVMs on ``dim``-d rows: ``svm.max_negatives``, lowered where
    ``svm.max_pool_gb`` could not hold every class's full cache (:func:`sppdet.svm.negatives_cap`)."""
    s = run.cfg.svm
    return negatives_cap(s.max_negatives, len(run.classes), dim, s.max_pool_gb, s.retrain_limit)


def stage_svm(run: Run, feature: str | None = None, tag: str = "", overwrite: bool = False) -> dict:
    """Per-class SVMs with hard-negative mining on the train split (one pass; with ``svm.flip`` also on its
    mirror images, positives and negatives)."""
    return _svm_sets(run, [(feature or run.cfg.svm.feature, tag)], overwrite)[0]


def stage_svms(run: Run, overwrite: bool = False) -> list[dict]:
    """The SVM sets that testing scores with (``combined_svms``), each a stage of its own (folder, manifest,
    resumable apart), those not yet trained mined in one pass: each image's windows pooled once and every set's
    features computed from them (the same SVMs as apart, in less time: pooling is ~40% of a pool5 set's pass)."""
    return _svm_sets(run, combined_svms(run.cfg), overwrite)


class _Set:
    """One SVM set being trained: its feature, file, stage folder, head and precision, then its views and trainer."""

    def __init__(self, feature: str, path, stage: Stage, head: FCHead | None, layer: str, precision: str,
                 negatives_cap: int, positives_cap: int):
        self.feature, self.path, self.stage, self.head, self.layer, self.precision = \
            feature, path, stage, head, layer, precision
        self.negatives_cap, self.positives_cap = negatives_cap, positives_cap
        self.views: _Views | None = None
        self.trainer: HardNegativeTrainer | None = None


def _svm_sets(run: Run, sets: list[tuple[str, str]], overwrite: bool) -> list[dict]:
    """The SVM sets ``(feature, tag)``: those already made reused, the others trained in one mining pass."""
    cfg = run.cfg
    device = run.device  # a device this machine lacks is refused before anything else
    tr = cfg.data.train_split
    cache = feature_cache(run, tr)
    if cfg.svm.flip:
        require_flipped_maps(cfg, cache.dir, Stage.read_manifest(cache.dir), tr, "svm.flip")
    results: list[dict | None] = [None] * len(sets)
    todo: dict[int, _Set] = {}
    shared = {"features": Stage.read_manifest(cache.dir)["fingerprint"], "annotations": run.content(tr, "annotations")}
    if any(f in ("fc6", "fc7") for f, _ in sets):
        shared["finetune"] = Stage.read_manifest(run.finetune_path.parent)["fingerprint"]
    for j, (feature, tag) in enumerate(sets):
        head, layer = svm_head(run, feature)
        if head is not None:
            head.to(device)  # fc6/fc7 of the mining pass on the config's device
        # what this set depends on: the cache and annotations, and the fine-tuned head for fc6/fc7
        inputs = {k: v for k, v in shared.items() if k != "finetune" or feature in ("fc6", "fc7")}
        path = run.svm_path(tag)
        sections, extra = svm_settings(run, feature)
        stage = stage_folder(path.parent, "svm", sections, extra, inputs, overwrite,
                             extra_defaults=settings_before(run, extra))
        if path.is_file():
            run.log(f"svm: reusing {path}")
            results[j] = stage.finish(1)
        else:
            todo[j] = _Set(feature, path, stage, head, layer, extra["fc_precision"], extra["negatives_cap"],
                           extra["positives_cap"])
    if not todo:
        return results
    windows = split_windows(run, tr)
    for s in todo.values():
        rng = np.random.default_rng(cfg.seed)  # each set's own draw, as when trained alone
        # Feature scale: mean norm over a sample of windows (spp_feature_stats.m).
        scale = cfg.svm.target_norm / sample_norm(
            cache, windows, rng, cfg.svm.norm_images, cfg.svm.norm_boxes,
            lambda x, s=s: layer_features(s.head, s.layer, x, s.precision))
        s.views = _Views(run, cache, windows, s.head, s.layer, scale, s.precision, device)
        s.trainer = HardNegativeTrainer(_positives(run, s.views, s.positives_cap), s.views.dim, cfg.svm, log_fn=run.log,
                                        max_negatives=s.negatives_cap,
                                        max_rows=pool_rows(s.views.dim, cfg.svm.max_pool_gb))
        if s.negatives_cap != cfg.svm.max_negatives:
            run.log(f"svm ({s.feature}): each class's negative cache capped at {s.negatives_cap} (svm.max_negatives "
                    f"{cfg.svm.max_negatives}) so that {len(run.classes)} classes of {s.views.dim}-d rows fit "
                    f"svm.max_pool_gb {cfg.svm.max_pool_gb:g}")
        if not pool_fits(len(run.classes), s.views.dim, cfg.svm.max_pool_gb, cfg.svm.retrain_limit):
            run.log(f"warning: svm.max_pool_gb {cfg.svm.max_pool_gb:g} cannot hold {len(run.classes)} classes' "
                    f"negatives between retrains (svm.retrain_limit {cfg.svm.retrain_limit}) at {s.views.dim}-d: the "
                    "pool will grow past it; raise it, or lower svm.retrain_limit")
    t0 = time.time()
    with large_blocks_reused():  # each image's pooled windows and their features: the same large blocks
        mined = _mine(run, list(todo.values()))
    mining_seconds = time.time() - t0
    together = [s.feature for s in todo.values()]
    for j, s in todo.items():
        results[j] = _save(run, s, mined, mining_seconds, together)
    return results


def _save(run: Run, s: _Set, mined: dict, mining_seconds: float, together: list[str]) -> dict:
    """Solve ``s``'s last retrain, write its ``svm.npz`` and finish its stage folder."""
    caches = s.trainer.finish()
    stats = {name: {"positives": int(len(c.x_pos)), "negative_cache": int(len(c.idx)), "retrains": c.retrains}
             for name, c in zip(run.classes, caches)}
    for name, st in stats.items():
        last = st["retrains"][-1]["objective"] if st["retrains"] else float("nan")
        run.log(f"svm {name} ({s.feature}): {st['positives']} positives, final negative cache "
                f"{st['negative_cache']}, {len(st['retrains'])} retrains, final objective {last:.4f}")
    atomic_save_npz(s.path, **svm_arrays(caches, s.views.dim), feature_scale=np.float64(s.views.scale),
                    layer=np.array(s.layer), classes=np.array(run.classes), feature=np.array(s.feature))
    # mining_seconds: the one pass that mined every set in ``mined_with`` (pooled once for them all)
    return s.stage.finish(1, stats=stats, feature_scale=s.views.scale, fc_precision=s.precision,
                          mining_seconds=mining_seconds, mined=mined, mined_with=together,
                          negative_pool=s.trainer.memory())


class _Views:
    """The train split's windows' SVM features: per image its own view, then (``svm.flip``) its mirror image's; the
    maps loaded onto ``device`` (the fc layers' on a GPU) and pooled there."""

    def __init__(self, run: Run, cache: FeatureCache, windows: dict, head: FCHead | None, layer: str, scale: float,
                 precision: str = "fp32", device: str = "cpu"):
        self.cache, self.windows, self.head, self.layer, self.scale = cache, windows, head, layer, scale
        self.precision, self.device = precision, device
        self.flip, self.mirror_maps = run.cfg.svm.flip, run.cfg.finetune.mirror_maps
        i0 = next(iter(windows))
        self.dim = self.features(cache.pooled(i0, windows[i0].boxes[:1])).shape[1]

    def features(self, pooled: torch.Tensor) -> np.ndarray:
        return layer_features(self.head, self.layer, pooled, self.precision) * self.scale

    def __call__(self, i: str):
        feats = self.cache.load(i, device=self.device, flipped=self.flip, mirror_maps=self.mirror_maps)
        boxes = self.windows[i].boxes
        yield feats, boxes
        if self.flip:
            yield feats.mirrored(), flip_boxes(boxes, feats.width)


def _positives(run: Run, views: _Views, cap: int = 0) -> list[np.ndarray]:
    """Per class, the features of its ground-truth boxes (difficult included, as the authors' roidb): all of them
    while a class has no more than ``cap`` (0: no cap), else a uniform sample of ``cap``, drawn as they come."""
    from tqdm import tqdm

    pos = ClassSample(len(run.classes), cap, np.random.default_rng([run.cfg.seed, 1]))
    for i in tqdm(views.windows, desc="svm positives", unit="img", leave=False):
        w = views.windows[i]
        g = np.nonzero(w.is_gt)[0]
        for feats, boxes in (views(i) if len(g) else ()):
            pos.offer(views.features(views.cache.pooled(feats, boxes[g])), w.label[g])
    return pos.finish(run, views.dim, f"svm ({views.layer})")


class ClassSample:
    """Per class, the rows offered, or a uniform sample of ``cap`` of them where a class is offered more
    (:class:`~sppdet.stages.bbox_reg.Reservoir`; in the order offered while it holds all): the SVMs' positives,
    bounded by ``svm.max_pool_gb`` (:func:`sppdet.svm.positives_cap`). Serves the SPP-net route and R-CNN mode."""

    def __init__(self, classes: int, cap: int, rng: np.random.Generator):
        self.cap, self.reservoirs = cap, [Reservoir(cap, rng) for _ in range(classes)]

    def offer(self, rows: np.ndarray, labels: np.ndarray) -> None:
        for j, k in enumerate(labels):
            self.reservoirs[int(k)].offer(np.array(rows[j], np.float32))

    def finish(self, run: Run, dim: int, what: str) -> list[np.ndarray]:
        """The rows per class as ``(n, dim)`` float32, with a line per class in the run's log (and a warning for a
        class without any, which is left out of scoring)."""
        out = []
        for name, r in zip(run.classes, self.reservoirs):
            out.append(np.stack(r.items) if r.items else np.zeros((0, dim), np.float32))
            kept = f" (a uniform sample of {r.seen}: svm.max_pool_gb caps each class at {self.cap})" \
                if r.seen > len(r.items) else ""
            run.log(f"{what} {name}: {len(r.items)} positives{kept}")
            if not r.items:
                run.log(f"warning: class {name!r} has no object in the training split {run.cfg.data.train_split!r}: no "
                        "SVM can be trained for it, so it is left out of scoring (never detected, AP 0); add labelled "
                        "examples of it")
        return out


def _mine(run: Run, sets: list[_Set]) -> dict:
    """One pass of hard-negative mining over the train split's proposals, each image's windows pooled once and
    scored for every class by every set in ``sets``; returns how many windows were scored and how many (window,
    class) negatives ``svm.group_negatives`` added."""
    from tqdm import tqdm

    svm = run.cfg.svm
    k_cls = len(run.classes)
    views = sets[0].views  # the images, their mirrors and windows: the same for every set
    n, last = 0, len(views.windows) * (2 if views.flip else 1) - 1
    scored = grouped = 0
    names = "+".join(s.feature for s in sets)
    for i in tqdm(views.windows, desc=f"svm hard negatives ({names})", unit="img"):
        w = views.windows[i]
        for feats, boxes in views(i):
            prop = np.nonzero(~w.is_gt)[0]
            if len(prop):
                if svm.dedup:  # one window per conv5 rectangle and scale, pooled once
                    x, first, _ = views.cache.pooled_groups(feats, boxes[prop])
                    prop = prop[first]
                else:
                    x = views.cache.pooled(feats, boxes[prop])
                if 0 < svm.mine_windows < len(prop):
                    keep = mining_sample(len(prop), svm.mine_windows, np.random.default_rng([run.cfg.seed, n]))
                    x, prop = x[torch.from_numpy(keep)], prop[keep]
                neg = w.class_iou[prop] < svm.neg_iou
                if svm.group_negatives:
                    group = group_windows_mask(w, prop, k_cls, svm.group_negatives)
                    grouped += int((group & ~neg).sum())
                    neg |= group
                scored += len(prop)
                for s in sets:
                    f = s.views.features(x)
                    s.trainer.add_image(n, f.astype(np.float32, copy=False), neg, last=n == last)
                    del f
            else:  # still called: the last image triggers the final retrain
                neg = np.zeros((0, k_cls), bool)
                for s in sets:
                    s.trainer.add_image(n, np.zeros((0, s.views.dim), np.float32), neg, last=n == last)
            n += 1
    return {"windows_scored": scored, "group_negatives": grouped}


def mining_sample(n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``budget`` of an image's ``n`` windows drawn uniformly without replacement
    (``svm.mine_windows``; on the 20-class benchmark set a uniform draw lost less than one favouring windows near
    objects: docs/experiments.md)."""
    return np.sort(rng.choice(n, budget, replace=False))


def combined_svms(cfg: Config) -> list[tuple[str, str]]:
    """``(feature, tag)`` of the SVM sets scored at test time: ``svm.feature`` (tag ``""``), then each
    feature of ``test.combine`` (tag ``_<feature>``, the folder the ablation uses for it too; ``Config``
    checks that they can share one detector)."""
    return [(cfg.svm.feature, "")] + [(f, f"_{f}") for f in dict.fromkeys(cfg.test.combine)]


SPEC = StageSpec("svm", "tools/train_svm.py", False,
                 ("features/<train>/", "data: train annotations", "proposals/<train>/",
                  "model/finetune/ (fc6/fc7 features)"),
                 "model/svm<tag>/", ("svm", "test.combine (which feature sets)", "seed", "features' pooling keys"),
                 stage_svms,
                 "multi-stage training: SVMs after fine-tuning")
