"""R-CNN mode, a trainable baseline beside SPP-net's route: per-class SVMs (hard-negative mining) and box regressors
on pool5 features of warped windows (:mod:`sppdet.rcnn`), then testing. The features are computed per window by
the trunk and written to disk, one shard per image, as R-CNN wrote them; the SVMs and regressors are then trained
from the shards one image at a time, so memory does not grow with the images (``feature_bytes``: the disk used).

Reads: the train (and test) split's images, annotations and ``<run>/proposals/<split>/``; the trunk.
Writes: ``<run>/features_rcnn/<train>/`` (the shards and their manifest), ``<run>/model/rcnn/rcnn.npz`` (SVMs and
regressors) and its manifest; testing writes ``<run>/detections/<split>_rcnn/`` (its windows scored in memory).
"""

from __future__ import annotations

import time

import numpy as np

from ..bbox_reg import BoxRegressor
from ..detector import cap_detections, class_detections
from ..proposals import ProposalStore
from ..rcnn import rcnn_features
from ..run import Run
from ..spp import SpatialPyramidPooling
from ..store import ShardError, StaleCacheError, atomic_save_npz, load_npz
from ..svm import HardNegativeTrainer, mean_norm, negatives_cap, pool_rows, positives_cap, svm_arrays
from .common import (StageSpec, image_route_inputs, require_current, require_settings, split_windows,
                     stage_folder)
from .bbox_reg import REGRESSION_SAMPLES, RegressionSamples, fit_regressors
from .proposals import require_proposals
from .svm import ClassSample, svm_section
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


def settings_before(run: Run, extra: dict) -> dict:
    """``extra_defaults`` of R-CNN mode's model whose recorded values now in force are ``extra`` (:func:`_settings`):
    :data:`SETTINGS_BEFORE`, each class's negative cap ``svm.max_negatives`` (before ``svm.max_pool_gb``), every
    regression sample kept (0), and every positive kept (the cap now in force while no class passes it)."""
    return {**SETTINGS_BEFORE, "negatives_cap": run.cfg.svm.max_negatives, "bbox_reg_samples": 0,
            "positives_cap": extra["positives_cap"]}


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


def rcnn_features_dir(run: Run, split: str):
    """R-CNN mode's feature shards of a split: ``<run>/features_rcnn/<split>/``."""
    return run.dir / "features_rcnn" / split


def stage_rcnn_features(run: Run, split: str, overwrite: bool = False, ds=None, windows: dict | None = None) -> dict:
    """R-CNN's first stage: each image's scored windows (:func:`_subset`) warped through the trunk, their pool5
    written to disk as one shard per image (``<id>.npz``: ``sel``, the windows' indices, and ``f``, float32), as R-CNN
    wrote its features before training its SVMs on them. Resumes: an image whose shard exists is not warped again.
    With ``overwrite`` a folder made with other settings is rebuilt; one made with these is reused. ``ds`` and
    ``windows``: the split's dataset and windows where the caller has read them already."""
    from tqdm import tqdm

    cfg = run.cfg
    d = rcnn_features_dir(run, split)
    inputs = image_route_inputs(run, split)
    extra = {"max_windows": cfg.rcnn.max_windows, **_pooling(run)}
    try:
        stage = stage_folder(d, "rcnn_features", {}, extra, inputs, False)
    except StaleCacheError:
        if not overwrite:
            raise
        stage = stage_folder(d, "rcnn_features", {}, extra, inputs, True)
    ds = ds if ds is not None else run.dataset(split)
    windows = windows if windows is not None else split_windows(run, split, ds)
    trunk, size, levels = run.backbone(), _warp_size(run), cfg.features.levels
    secs, new, n_windows = {"warp": 0.0, "conv": 0.0}, 0, 0
    for i in tqdm(windows, desc="r-cnn features (warped windows, to disk)", unit="img"):
        sel = _subset(windows[i], cfg.rcnn.max_windows)
        n_windows += len(sel)
        if stage.has(i):
            continue
        f, t = rcnn_features(trunk, ds.image(i), windows[i].boxes[sel], size, levels, deep=run.pool_deep())
        atomic_save_npz(stage.path(i), sel=sel.astype(np.int64), f=f)
        new += 1
        for k in secs:
            secs[k] += t[k]
    # the seconds of the call that last warped images (all of them unless it resumed); a call that warped none
    # keeps those recorded
    timing = {"warp_seconds": secs["warp"], "conv_seconds": secs["conv"]} if new else {}
    return stage.finish(len(windows), windows=n_windows, new_images=new, **timing)


def _shard(directory, i: str) -> tuple[np.ndarray, np.ndarray]:
    """An image's R-CNN shard: its scored windows' indices and their pool5 rows. A missing or unreadable one is an
    error naming it and the way out: deleting it, since the features stage resumes (``--overwrite`` keeps shards
    made with the settings in force)."""
    path = directory / f"{i}.npz"
    try:
        z = load_npz(path, required=("sel", "f"))
    except ShardError as e:
        cause = e.__cause__ or ("missing" if not path.is_file() else str(e).removeprefix(f"{path}: "))
        raise ShardError(f"{path}: R-CNN feature shard unreadable ({cause}); delete it and rerun "
                         "tools/train_rcnn.py: the features stage warps that image again") from None
    return z["sel"], z["f"]


def _rcnn_dim(run: Run) -> int:
    """The length of R-CNN mode's pool5 rows."""
    return SpatialPyramidPooling(run.cfg.features.levels, deep=run.pool_deep()).output_dim(run.backbone().out_channels)


def _train(run: Run, ds, windows: dict, d, dim: int, caps: dict) -> tuple[dict, BoxRegressor, float]:
    """SVMs (``svm`` settings, sppdet's hard-negative trainer) and ridge regressors (``bbox_reg``) on the shards in
    ``d``, read one image at a time: a pass for the feature scale and the positives, one mining the negatives and
    drawing the regressors' samples (the feature scale comes from the first pass's first ``svm.norm_images`` shards,
    and the positives are scaled once it is known). Memory: one image's rows, the negative pool and the positives
    (each bounded by ``svm.max_pool_gb``: ``caps``' per-class ``negatives_cap`` and ``positives_cap``), and at most
    ``REGRESSION_SAMPLES`` regression samples per class."""
    from tqdm import tqdm

    cfg, k_cls = run.cfg, len(run.classes)
    ids = list(windows)
    pos = ClassSample(k_cls, caps["positives_cap"], np.random.default_rng([cfg.seed, 1]))
    norm_sample = []
    for n, i in enumerate(ids):
        sel, f = _shard(d, i)
        if n < cfg.svm.norm_images:
            norm_sample.append(f[:cfg.svm.norm_boxes])
        g = np.nonzero(windows[i].is_gt[sel])[0]
        pos.offer(f[g], windows[i].label[sel[g]])
    scale = cfg.svm.target_norm / mean_norm(norm_sample)
    del norm_sample
    x_pos = [p * np.float32(scale) for p in pos.finish(run, dim, "rcnn svm")]
    trainer = HardNegativeTrainer(x_pos, dim, cfg.svm, log_fn=run.log,
                                  max_negatives=caps["negatives_cap"],
                                  max_rows=pool_rows(dim, cfg.svm.max_pool_gb))
    samples = RegressionSamples(k_cls, REGRESSION_SAMPLES, np.random.default_rng(cfg.seed))
    for n, i in enumerate(tqdm(ids, desc="r-cnn svm + bbox_reg (from disk)", unit="img")):
        sel, f = _shard(d, i)
        w = windows[i]
        prop = ~w.is_gt[sel]
        neg = w.class_iou[sel[prop]] < cfg.svm.neg_iou
        trainer.add_image(n, (f[prop] * scale).astype(np.float32), neg, last=n == len(ids) - 1)
        r = np.nonzero(w.max_iou[sel] > cfg.bbox_reg.min_overlap)[0]
        if len(r):
            samples.offer(f[r], w.boxes[sel[r]], ds.annotation(i).boxes[w.gt_index[sel[r]]], w.label[sel[r]])
    svms = svm_arrays(trainer.finish(), dim)
    return svms, fit_regressors(run, *samples.lists(), samples.feature_scale(run))[0], scale


def _settings(run: Run) -> tuple[dict, dict]:
    """What R-CNN mode's model depends on: its config sections; the pooling, each class's caps on its negatives and
    positives, and the regression samples kept per class."""
    cfg = run.cfg
    s = cfg.svm
    dim, k_cls = _rcnn_dim(run), len(run.classes)
    return ({"rcnn": cfg.rcnn, "svm": svm_section(cfg), "bbox_reg": cfg.bbox_reg},
            {**_pooling(run),
             "negatives_cap": negatives_cap(s.max_negatives, k_cls, dim, s.max_pool_gb, s.retrain_limit),
             "positives_cap": positives_cap(k_cls, dim, s.max_pool_gb), "bbox_reg_samples": REGRESSION_SAMPLES})


def stage_rcnn(run: Run, overwrite: bool = False) -> dict:
    """Train R-CNN mode's SVMs and box regressors on the train split's warped windows (their features written to
    disk first by :func:`stage_rcnn_features`)."""
    cfg = run.cfg
    tr = cfg.data.train_split
    inputs = image_route_inputs(run, tr)
    path = run.dir / "model" / "rcnn" / "rcnn.npz"
    sections, extra = _settings(run)
    stage = stage_folder(path.parent, "rcnn", sections, extra, inputs, overwrite,
                         extra_defaults=settings_before(run, extra))
    if path.is_file():
        run.log(f"rcnn: reusing {path}")
        return stage.finish(1)
    ds = run.dataset(tr)
    windows = split_windows(run, tr, ds)  # read once, for both stages
    feats = stage_rcnn_features(run, tr, overwrite, ds, windows)
    t1 = time.time()
    svms, reg, scale = _train(run, ds, windows, rcnn_features_dir(run, tr), _rcnn_dim(run), extra)
    atomic_save_npz(path, **svms, feature_scale=np.float64(scale), classes=np.array(run.classes),
                    reg_W=reg.W, reg_b=reg.b, reg_mu=reg.mu, reg_T_inv=reg.T_inv,
                    reg_scale=np.float64(reg.feature_scale), reg_trained=reg.trained)
    warp, conv = feats.get("warp_seconds", 0.0), feats.get("conv_seconds", 0.0)
    return stage.finish(1, feature_seconds=warp + conv, train_seconds=time.time() - t1, warp_seconds=warp,
                        conv_seconds=conv, windows=feats["windows"], feature_bytes=feats["bytes"])


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
    sections, extra = _settings(run)
    require_settings(run, d, "tools/train_rcnn.py", sections, extra, extra_defaults=settings_before(run, extra))
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
                 "features_rcnn/<train>/, model/rcnn/",
                 ("rcnn", "svm", "bbox_reg", "features.levels", "features.deep_levels", "pretrain.sizes"), stage_rcnn)
