"""R-CNN mode, a trainable baseline beside SPP-net's route: per-class SVMs (hard-negative mining) and box regressors
on pool5 features of warped windows (:mod:`sppdet.rcnn`), then testing. The features are computed per window by
the trunk and held in memory for this stage's run (R-CNN itself wrote them to disk: ``feature_bytes`` says how much).

Reads: the train (and test) split's images, annotations and ``<run>/proposals/<split>/``; the trunk.
Writes: ``<run>/model/rcnn/rcnn.npz`` (SVMs and regressors) and its manifest; testing writes
``<run>/detections/<split>_rcnn/``.
"""

from __future__ import annotations

import time

import numpy as np

from ..bbox_reg import BoxRegressor
from ..detector import cap_detections, class_detections
from ..proposals import ProposalStore
from ..rcnn import rcnn_features
from ..run import Run
from ..store import atomic_save_npz, load_npz
from ..svm import HardNegativeTrainer, mean_norm
from .common import (StageSpec, image_route_inputs, require_current, require_settings, split_windows,
                     stage_folder)
from .bbox_reg import fit_regressors
from .proposals import require_proposals
from .svm import svm_section
from .test import annotations_of, evaluate, write_results


def _warp_size(run: Run) -> int:
    """The warped window's side: ``rcnn.size``, else the trunk's classifier input (``pretrain.sizes[0]`` for a
    pre-trained trunk, 224 for ImageNet ones)."""
    r = run.cfg.rcnn
    if r.size:
        return r.size
    return run.cfg.pretrain.sizes[0] if run.cfg.backbone.weights == "pretrain" else 224


# What a setting recorded since was before it existed: models from before it stay valid at its default.
SETTINGS_BEFORE = {"deep_levels": None}


def _pooling(run: Run) -> dict:
    """The settings R-CNN mode's pool5 depends on beyond its config sections."""
    f = run.cfg.features
    return {"levels": list(f.levels), "size": _warp_size(run), "deep_levels": f.deep_levels}


def _subset(w, max_windows: int) -> np.ndarray:
    """Indices of an image's windows R-CNN mode scores: every ground-truth box, then the first ``max_windows``
    proposals in selective search's ranking (0: all)."""
    gt = np.nonzero(w.is_gt)[0]
    prop = np.nonzero(~w.is_gt)[0]
    return np.concatenate([gt, prop[:max_windows] if max_windows else prop])


def _train_features(run: Run, ds, windows: dict) -> tuple[dict, dict]:
    """Per training image its scored windows' indices and their pool5 features; the seconds spent."""
    from tqdm import tqdm

    trunk, size, levels = run.backbone(), _warp_size(run), run.cfg.features.levels
    out, secs = {}, {"warp": 0.0, "conv": 0.0}
    for i in tqdm(windows, desc="r-cnn features (warped windows)", unit="img"):
        sel = _subset(windows[i], run.cfg.rcnn.max_windows)
        f, t = rcnn_features(trunk, ds.image(i), windows[i].boxes[sel], size, levels, deep=run.pool_deep())
        out[i] = (sel, f)
        for k in secs:
            secs[k] += t[k]
    return out, secs


def _svms(run: Run, windows: dict, feats: dict, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class SVMs by sppdet's hard-negative trainer (``svm`` settings) on the warped windows' features."""
    k_cls = len(run.classes)
    pos = [[] for _ in range(k_cls)]
    for i, (sel, f) in feats.items():
        w = windows[i]
        for j, s in enumerate(sel):
            if w.is_gt[s]:
                pos[int(w.label[s])].append(f[j] * scale)
    dim = next(iter(feats.values()))[1].shape[1]
    x_pos = [np.stack(p).astype(np.float32) if p else np.zeros((0, dim), np.float32) for p in pos]
    trainer = HardNegativeTrainer(x_pos, dim, run.cfg.svm, log_fn=run.log)
    ids = list(feats)
    for n, i in enumerate(ids):
        sel, f = feats[i]
        prop = ~windows[i].is_gt[sel]
        neg = windows[i].class_iou[sel[prop]] < run.cfg.svm.neg_iou
        trainer.add_image(n, (f[prop] * scale).astype(np.float32), neg, last=n == len(ids) - 1)
    caches = trainer.finish()
    W = np.stack([c.w if c.w is not None else np.zeros(dim, np.float32) for c in caches])
    b = np.array([c.b for c in caches], np.float32)
    return W, b, np.array([c.w is not None for c in caches])


def _regressors(run: Run, ds, windows: dict, feats: dict) -> BoxRegressor:
    """Per-class ridge regressors (``bbox_reg`` settings) on the warped windows' features."""
    cfg, k_cls = run.cfg.bbox_reg, len(run.classes)
    xs, ps, gs = [[] for _ in range(k_cls)], [[] for _ in range(k_cls)], [[] for _ in range(k_cls)]
    for i, (sel, f) in feats.items():
        w, gt = windows[i], ds.annotation(i).boxes
        for j, s in enumerate(sel):
            if w.max_iou[s] > cfg.min_overlap:
                k = int(w.label[s])
                xs[k].append(f[j])
                ps[k].append(w.boxes[s])
                gs[k].append(gt[w.gt_index[s]])
    scale = cfg.target_norm / mean_norm([np.stack(x) for x in xs if x])
    return fit_regressors(run, xs, ps, gs, scale)[0]


def stage_rcnn(run: Run, overwrite: bool = False) -> dict:
    """Train R-CNN mode's SVMs and box regressors on the train split's warped windows."""
    cfg = run.cfg
    tr = cfg.data.train_split
    inputs = image_route_inputs(run, tr)
    path = run.dir / "model" / "rcnn" / "rcnn.npz"
    stage = stage_folder(path.parent, "rcnn",
                         {"rcnn": cfg.rcnn, "svm": svm_section(cfg), "bbox_reg": cfg.bbox_reg},
                         _pooling(run), inputs, overwrite, extra_defaults=SETTINGS_BEFORE)
    if path.is_file():
        run.log(f"rcnn: reusing {path}")
        return stage.finish(1)
    ds = run.dataset(tr)
    windows = split_windows(run, tr, ds)
    t0 = time.time()
    feats, secs = _train_features(run, ds, windows)
    t1 = time.time()
    scale = cfg.svm.target_norm / mean_norm([f[:cfg.svm.norm_boxes] for _, f in list(feats.values())[:cfg.svm.norm_images]])
    W, b, trained = _svms(run, windows, feats, scale)
    reg = _regressors(run, ds, windows, feats)
    atomic_save_npz(path, W=W, b=b, trained=trained, feature_scale=np.float64(scale), classes=np.array(run.classes),
                    reg_W=reg.W, reg_b=reg.b, reg_mu=reg.mu, reg_T_inv=reg.T_inv,
                    reg_scale=np.float64(reg.feature_scale), reg_trained=reg.trained)
    n_feat = sum(len(s) for s, _ in feats.values())
    return stage.finish(1, feature_seconds=t1 - t0, train_seconds=time.time() - t1, warp_seconds=secs["warp"],
                        conv_seconds=secs["conv"], windows=n_feat,
                        feature_bytes=int(sum(f.nbytes for _, f in feats.values())), feature_cache_bytes=0)


def stage_rcnn_test(run: Run, split: str | None = None, draw: int = 4, progress: bool = True) -> dict:
    """Detect on a whole split with R-CNN mode (the first ``rcnn.max_windows`` proposals of each image, each
    warped through the trunk); evaluated without and with box regression, written to ``detections/<split>_rcnn``."""
    from tqdm import tqdm

    cfg = run.cfg
    split = split or cfg.data.test_split
    ds = run.dataset(split)
    require_proposals(run, split)
    require_current(run, split, run.proposals_dir(split))
    d = run.dir / "model" / "rcnn"
    require_settings(run, d, "tools/train_rcnn.py",
                     {"rcnn": cfg.rcnn, "svm": svm_section(cfg), "bbox_reg": cfg.bbox_reg},
                     _pooling(run), extra_defaults=SETTINGS_BEFORE)
    m = load_npz(d / "rcnn.npz")
    reg = BoxRegressor(m["reg_W"], m["reg_b"], m["reg_mu"], m["reg_T_inv"], float(m["reg_scale"]), m["reg_trained"])
    store = ProposalStore(run.proposals_dir(split))
    t, trunk = cfg.test, run.backbone()
    plain_all, reg_all, annotations = {}, {}, {}
    timing = {"warp": 0.0, "conv": 0.0, "post": 0.0}
    t0 = time.time()
    for i in tqdm(ds.ids, desc=f"r-cnn test {split}", unit="img", disable=not progress):
        rgb, props = ds.image(i), store.load(i)
        if cfg.rcnn.max_windows:
            props = props[:cfg.rcnn.max_windows]
        f, secs = rcnn_features(trunk, rgb, props, _warp_size(run), cfg.features.levels, deep=run.pool_deep())
        t1 = time.perf_counter()
        scores = (f * float(m["feature_scale"])) @ m["W"].T + m["b"]
        scores[:, ~m["trained"].astype(bool)] = -np.inf
        plain, refined = class_detections(props, scores, t.score_threshold, t,
                                          lambda k, idx: reg.predict(k, f[idx], props[idx]), rgb.shape[:2],
                                          competition=t.class_competition)
        plain_all[i] = cap_detections(plain, t.max_per_class, 0)
        reg_all[i] = cap_detections(refined, t.max_per_class, 0)
        secs["post"] = time.perf_counter() - t1
        for k in timing:
            timing[k] += secs[k]
        annotations[i] = annotations_of(run, ds, i)
    n = max(len(ds.ids), 1)
    results = {"without_bbox_reg": evaluate(run, ds, plain_all), "with_bbox_reg": evaluate(run, ds, reg_all)}
    metrics = {"seconds_per_image": {k: v / n for k, v in timing.items()}, "method": "rcnn",
               "windows_per_image": cfg.rcnn.max_windows or None}
    return write_results(run, ds, split, run.detections_dir(split, "_rcnn"), results, reg_all, annotations, [],
                         metrics, draw, t0)


SPEC = StageSpec("rcnn", "tools/train_rcnn.py", False,
                 ("data: train images and annotations", "proposals/<train>/", "the trunk"),
                 "model/rcnn/", ("rcnn", "svm", "bbox_reg", "features.levels", "features.deep_levels",
                                "pretrain.sizes"), stage_rcnn)
