"""Stage 6: per-class box regressors (R-CNN's ridge regression on pooled features, whitened targets).

Reads: ``<run>/features/<train>/``, the train split's annotations and proposals. Writes:
``<run>/model/bbox_reg/bbox_reg.npz`` and its manifest.
"""

from __future__ import annotations

import numpy as np

from ..bbox_reg import BoxRegressor, fit_class_regressor
from ..run import Run
from ..manifest import Stage
from .common import StageSpec, feature_cache, pooling_before, pooling_record, split_windows, stage_folder


# Box-regression samples kept per class (a uniform draw of the windows over bbox_reg.min_overlap), both routes.
REGRESSION_SAMPLES = 3000


def stage_bbox_reg(run: Run, overwrite: bool = False, max_per_class: int = REGRESSION_SAMPLES) -> dict:
    """Per-class ridge regressors on pooled features (scaled to mean norm ``bbox_reg.target_norm``)."""
    cfg = run.cfg
    if cfg.bbox_reg.source != "ridge":
        raise ValueError(f"bbox_reg.source is {cfg.bbox_reg.source!r}: the fine-tuned head's box layer regresses "
                         "(finetune.bbox_loss), there are no ridge regressors to fit; --set bbox_reg.source=ridge")
    tr = cfg.data.train_split
    cache = feature_cache(run, tr)
    path = run.bbox_reg_path
    inputs = {"features": Stage.read_manifest(cache.dir)["fingerprint"], "annotations": run.content(tr, "annotations")}
    stage = stage_folder(path.parent, "bbox_reg", {"bbox_reg": cfg.bbox_reg},
                         {"max_per_class": max_per_class, "sampling": "reservoir", **pooling_record(run)}, inputs,
                         overwrite, extra_defaults=pooling_before(run))
    if path.is_file():
        run.log(f"bbox_reg: reusing {path}")
        return stage.finish(1)
    ds = run.dataset(tr)
    windows = split_windows(run, tr, ds)  # ds's annotations are parsed once and reused below
    samples = _samples(run, ds, windows, cache, max_per_class, np.random.default_rng(cfg.seed))
    scale = samples.feature_scale(run)
    reg, stats = fit_regressors(run, *samples.lists(), scale, log=run.log)
    for r, name in zip(samples.reservoirs, run.classes):
        if name in stats:
            stats[name]["windows"] = r.seen
    reg.save(path, run.classes)
    return stage.finish(1, stats=stats, feature_scale=scale)


def fit_regressors(run: Run, feats: list, props: list, gts: list, scale: float,
                   log=None) -> tuple[BoxRegressor, dict]:
    """Per class ``k``, a ridge regressor (``bbox_reg.lam``, ``bbox_reg.whiten``) from ``feats[k]`` (features,
    multiplied by ``scale``), ``props[k]`` (windows) and ``gts[k]`` (their objects' boxes), all of them (the SPP-net
    stage bounds them beforehand: :class:`Reservoir`); a class with fewer than 2 samples stays the identity. Returns the
    regressors and per-class stats; ``log`` gets a line per class. Serves the SPP-net route and R-CNN mode."""
    cfg, k_cls = run.cfg.bbox_reg, len(run.classes)
    log = log or (lambda s: None)
    dim = next(len(f[0]) for f in feats if f)
    W = np.zeros((k_cls, dim, 4), np.float32)
    b = np.zeros((k_cls, 4), np.float32)
    mu = np.zeros((k_cls, 4))
    T_inv = np.tile(np.eye(4), (k_cls, 1, 1))
    trained = np.zeros(k_cls, bool)
    stats = {}
    for k, name in enumerate(run.classes):
        if len(feats[k]) < 2:
            log(f"bbox_reg {name}: too few samples ({len(feats[k])}); left as identity")
            continue
        r = fit_class_regressor(np.stack(feats[k]) * scale, np.stack(props[k]), np.stack(gts[k]), cfg.lam, cfg.whiten)
        W[k], b[k], mu[k], T_inv[k], trained[k] = r["W"], r["b"], r["mu"], r["T_inv"], True
        stats[name] = {"samples": r["samples"], "train_mse_whitened": r["train_mse"]}
        log(f"bbox_reg {name}: {r['samples']} samples, training MSE (whitened targets) {r['train_mse']:.3f}")
    return BoxRegressor(W, b, mu, T_inv, scale, trained), stats


class Reservoir:
    """A uniform random sample of at most ``cap`` of the items offered one at a time (Vitter's algorithm R), so
    that memory stays ``cap`` items however many are offered; ``cap`` 0 keeps every item. While no more than
    ``cap`` have been offered it holds all of them, in order."""

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap, self.rng, self.items, self.seen = int(cap), rng, [], 0

    def offer(self, item) -> None:
        self.seen += 1
        if not self.cap or len(self.items) < self.cap:
            self.items.append(item)
            return
        j = int(self.rng.integers(self.seen))
        if j < self.cap:
            self.items[j] = item


class RegressionSamples:
    """Per class, a :class:`Reservoir` of at most ``max_per_class`` (feature, proposal box, matched ground-truth box)
    of the windows offered, drawn uniformly from all of them, and the mean norm of all those windows' features:
    memory bounded by classes x ``max_per_class`` features however many images. Serves the SPP-net stage and
    R-CNN mode."""

    def __init__(self, classes: int, max_per_class: int, rng: np.random.Generator):
        self.reservoirs = [Reservoir(max_per_class, rng) for _ in range(classes)]
        self.norm_sum, self.norms = 0.0, 0

    def offer(self, feats: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray, labels: np.ndarray) -> None:
        """One image's windows: their features ``(N, D)``, boxes, matched objects' boxes and classes."""
        if len(feats) == 0:
            return
        norms = np.linalg.norm(feats, axis=1)
        self.norm_sum, self.norms = self.norm_sum + float(norms.astype(np.float64).sum()), self.norms + len(norms)
        for j in range(len(feats)):
            self.reservoirs[int(labels[j])].offer((feats[j].copy(), boxes[j], gt_boxes[j]))

    def feature_scale(self, run: Run) -> float:
        """``bbox_reg.target_norm`` over the mean norm of every window offered; an error naming the split when none
        was."""
        cfg = run.cfg
        if not self.norms:
            raise ValueError(f"bbox regression: no window of split {cfg.data.train_split!r} overlaps an object by > "
                             f"{cfg.bbox_reg.min_overlap}")
        return cfg.bbox_reg.target_norm / (self.norm_sum / self.norms)

    def lists(self) -> tuple[list, list, list]:
        """Per class the kept features, proposal boxes and objects' boxes (:func:`fit_regressors`' arguments)."""
        return tuple([[item[m] for item in r.items] for r in self.reservoirs] for m in range(3))


def _samples(run: Run, ds, windows: dict, cache, max_per_class: int,
             rng: np.random.Generator) -> RegressionSamples:
    """The train split's windows overlapping an object by more than ``bbox_reg.min_overlap``, pooled from the conv5
    cache, offered to a :class:`RegressionSamples`."""
    from tqdm import tqdm

    samples = RegressionSamples(len(run.classes), max_per_class, rng)
    for i in tqdm(windows, desc="bbox regression samples", unit="img"):
        w = windows[i]
        sel = np.nonzero(w.max_iou > run.cfg.bbox_reg.min_overlap)[0]
        if len(sel):
            samples.offer(cache.pooled(i, w.boxes[sel]).numpy(), w.boxes[sel], ds.annotation(i).boxes[w.gt_index[sel]],
                          w.label[sel])
    return samples


SPEC = StageSpec("bbox_reg", "tools/train_bbox_reg.py", False,
                 ("features/<train>/", "data: train annotations", "proposals/<train>/"),
                 "model/bbox_reg/", ("bbox_reg", "seed", "features' pooling keys"), stage_bbox_reg,
                 "multi-stage training: regressors fit apart")
