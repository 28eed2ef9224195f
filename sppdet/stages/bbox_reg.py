"""Stage 6: per-class box regressors (R-CNN's ridge regression on pooled features, whitened targets).

Reads: ``<run>/features/<train>/``, the train split's annotations and proposals. Writes:
``<run>/model/bbox_reg/bbox_reg.npz`` and its manifest.
"""

from __future__ import annotations

import numpy as np

from ..bbox_reg import BoxRegressor, fit_class_regressor
from ..run import Run
from ..manifest import Stage
from .common import StageSpec, feature_cache, split_windows, stage_folder


def stage_bbox_reg(run: Run, overwrite: bool = False, max_per_class: int = 3000) -> dict:
    """Per-class ridge regressors on pooled features (scaled to mean norm ``bbox_reg.target_norm``)."""
    cfg = run.cfg
    tr = cfg.data.train_split
    cache = feature_cache(run, tr)
    path = run.bbox_reg_path
    inputs = {"features": Stage.read_manifest(cache.dir)["fingerprint"], "annotations": run.content(tr, "annotations")}
    stage = stage_folder(path.parent, "bbox_reg", {"bbox_reg": cfg.bbox_reg}, {"max_per_class": max_per_class}, inputs,
                   overwrite)
    if path.is_file():
        run.log(f"bbox_reg: reusing {path}")
        return stage.finish(1)
    ds = run.dataset(tr)
    windows = split_windows(run, tr, ds)  # ds's annotations are parsed once and reused below
    feats, props, gts, norms = _samples(run, ds, windows, cache)
    rng = np.random.default_rng(cfg.seed)
    if not norms:
        raise ValueError(f"bbox regression: no window of split {tr!r} overlaps an object by > {cfg.bbox_reg.min_overlap}")
    scale = cfg.bbox_reg.target_norm / float(np.concatenate(norms).mean())
    reg, stats = fit_regressors(run, feats, props, gts, scale, max_per_class, rng, run.log)
    reg.save(path, run.classes)
    return stage.finish(1, stats=stats, feature_scale=scale)


def fit_regressors(run: Run, feats: list, props: list, gts: list, scale: float, max_per_class: int = 0,
                   rng: np.random.Generator | None = None, log=None) -> tuple[BoxRegressor, dict]:
    """Per class ``k``, a ridge regressor (``bbox_reg.lam``, ``bbox_reg.whiten``) from ``feats[k]`` (features,
    multiplied by ``scale``), ``props[k]`` (windows) and ``gts[k]`` (their objects' boxes), on at most
    ``max_per_class`` random samples (0: all); a class with fewer than 2 samples stays the identity. Returns the
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
        idx = np.arange(len(feats[k]))
        if max_per_class and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        X = np.stack([feats[k][j] for j in idx]) * scale
        r = fit_class_regressor(X, np.stack([props[k][j] for j in idx]), np.stack([gts[k][j] for j in idx]),
                                cfg.lam, cfg.whiten)
        W[k], b[k], mu[k], T_inv[k], trained[k] = r["W"], r["b"], r["mu"], r["T_inv"], True
        stats[name] = {"samples": r["samples"], "train_mse_whitened": r["train_mse"]}
        log(f"bbox_reg {name}: {r['samples']} samples, training MSE (whitened targets) {r['train_mse']:.3f}")
    return BoxRegressor(W, b, mu, T_inv, scale, trained), stats


def _samples(run: Run, ds, windows: dict, cache) -> tuple[list, list, list, list]:
    """Per class, the pooled features, proposal boxes and matched ground-truth boxes of the train split's windows
    overlapping an object by more than ``bbox_reg.min_overlap``; and the features' norms."""
    from tqdm import tqdm

    cfg = run.cfg
    k_cls = len(run.classes)
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
    return feats, props, gts, norms


SPEC = StageSpec("bbox_reg", "tools/train_bbox_reg.py", False,
                 ("features/<train>/", "data: train annotations", "proposals/<train>/"),
                 "model/bbox_reg/", ("bbox_reg", "seed"), stage_bbox_reg,
                 "multi-stage training: regressors fit apart")
