"""Fast R-CNN mode, a separate route beside SPP-net's (not a change to it): one stage trains the whole network end to
end from the images and the proposals, a second tests it. No feature cache, no SVMs, no separate box regressors.

Reads: the train split's images, annotations and ``<run>/proposals/<train>/``; the trunk (``backbone.weights``;
for ``pretrain``, ``<run>/pretrain/checkpoint.pt``, whose fc6/fc7 also start the head where the pooling matches).
Writes: ``<run>/model/fast_rcnn<tag>/model.pt`` (trunk + head) and its manifest; testing writes
``<run>/detections/<split>_fast_rcnn<tag>/`` like the SPP-net test stage.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..fast_rcnn import FastRCNN, set_trainable, train_fast_rcnn
from ..features import weights_fingerprint
from ..malloc import large_blocks_reused
from ..pretrain import load_checkpoint, save_checkpoint
from ..proposals import ProposalStore
from ..run import Run
from .common import (StageSpec, image_route_inputs, require_current, require_settings, split_windows,
                     stage_folder)
from .proposals import require_proposals
from .test import annotations_of, evaluate, write_results

SETTINGS = ("fast_rcnn", "finetune.hidden", "finetune.dropout", "finetune.input_norm", "finetune.fc6_rank",
            "features.scales", "features.max_size", "features.levels", "features.deep_levels", "features.shrink",
            "features.target_size", "backbone", "seed")


def model_dir(run: Run, tag: str = ""):
    return run.dir / "model" / f"fast_rcnn{tag}"


# What a setting recorded since was before it existed: models from before it stay valid at its default.
SETTINGS_BEFORE = {"features": {"deep_levels": None}, "finetune_head": {"fc6_rank": 0}}


def _settings(run: Run) -> dict:
    cfg = run.cfg
    f = cfg.features
    return {"finetune_head": {"hidden": cfg.finetune.hidden, "dropout": cfg.finetune.dropout,
                              "input_norm": cfg.finetune.input_norm, "fc6_rank": cfg.finetune.fc6_rank},
            "features": {"scales": list(f.scales), "max_size": f.max_size, "levels": list(f.levels),
                         "shrink": f.shrink, "target_size": f.target_size, "deep_levels": f.deep_levels},
            "seed": cfg.seed}


def build_model(run: Run) -> FastRCNN:
    """A Fast R-CNN network on a copy of the run's trunk (the trunk on disk is never changed)."""
    cfg, fr = run.cfg, run.cfg.fast_rcnn
    levels = (fr.roi_size,) if fr.pooling == "roi" else tuple(cfg.features.levels)
    deep = None if fr.pooling == "roi" else run.pool_deep()  # RoI pooling: one 7x7 level for every channel
    trunk = copy.deepcopy(run.backbone())
    model = FastRCNN(trunk, len(run.classes), levels, cfg.finetune.hidden, cfg.finetune.dropout, cfg.features.shrink,
                     deep, cfg.finetune.fc6_rank)
    set_trainable(trunk, fr.train_conv, fr.frozen_convs)
    return model


def _init_head(run: Run, model: FastRCNN) -> str:
    """fc6/fc7 from the pre-trained classifier where it has them in this shape; returns where they came from."""
    if not run.pretrain_ckpt.is_file():
        return "random"
    st = load_checkpoint(run.pretrain_ckpt)["head"]
    h = model.head
    if h.fc6_rank:
        return "random (fc6 factored: finetune.fc6_rank)"
    if st["fc6.weight"].shape != h.fc6.weight.shape or st["fc7.weight"].shape != h.fc7.weight.shape:
        return "random (the pre-trained fc6 has another input size)"
    for name in ("fc6", "fc7"):
        getattr(h, name).load_state_dict({"weight": st[f"{name}.weight"], "bias": st[f"{name}.bias"]})
    return "pre-trained fc6/fc7"


def _input_scale(run: Run, model: FastRCNN, ds, windows: dict) -> float:
    """``finetune.input_norm`` / the mean norm of pooled windows of a few training images (1: input_norm 0)."""
    target = run.cfg.finetune.input_norm
    if not target:
        return 1.0
    rng = np.random.default_rng(run.cfg.seed)
    norms = []
    with torch.no_grad():
        for i in list(windows)[:run.cfg.svm.norm_images]:
            w = windows[i]
            sel = rng.choice(len(w.boxes), min(run.cfg.svm.norm_boxes, len(w.boxes)), replace=False)
            fmap, f = model.conv_map(ds.image(i), (run.cfg.fast_rcnn.scales or run.cfg.features.scales)[0],
                                     run.cfg.features.max_size)
            norms.append(model.pool([fmap], [f], w.boxes[sel], np.zeros(len(sel), np.int64)).norm(dim=1).numpy())
    return float(target / np.concatenate(norms).mean())


def stage_fast_rcnn(run: Run, tag: str = "", overwrite: bool = False) -> dict:
    """Train the Fast R-CNN network on the train split (fixed schedule: ``fast_rcnn.iterations``)."""
    cfg = run.cfg
    tr = cfg.data.train_split
    inputs = image_route_inputs(run, tr)
    path = model_dir(run, tag) / "model.pt"
    stage = stage_folder(path.parent, "fast_rcnn", {"fast_rcnn": cfg.fast_rcnn, "backbone": cfg.backbone},
                         _settings(run), inputs, overwrite, extra_defaults=SETTINGS_BEFORE)
    if path.is_file():
        run.log(f"fast_rcnn: reusing {path}")
        return stage.finish(1)
    if run.device != "cpu":
        run.log(f"warning: route fast_rcnn trains on the CPU; device {cfg.device!r} is not used by this stage")
    torch.manual_seed(cfg.seed)
    model = build_model(run)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    how = _init_head(run, model)
    ds = run.dataset(tr)
    windows = split_windows(run, tr, ds)
    model.head.input_scale = _input_scale(run, model, ds, windows)
    run.log(f"fast_rcnn: {len(trainable)} trunk parameter tensors trained (frozen stem: the first "
            f"{cfg.fast_rcnn.frozen_convs} convolution(s)), pooling levels {model.levels}, fc6/fc7 from {how}")
    res = train_fast_rcnn(model, ds.image, windows, cfg.fast_rcnn, cfg.fast_rcnn.scales or cfg.features.scales,
                          cfg.features.max_size,
                          cfg.seed, log_fn=run.log)
    save_checkpoint(path, {"model": model.state_dict(), "classes": run.classes, "levels": model.levels,
                           "input_scale": model.head.input_scale, "trainable": trainable})
    conv_changed = weights_fingerprint(model.backbone) != inputs["weights"]
    return stage.finish(1, history=res["history"], train_seconds=res["seconds"], trained_conv_tensors=len(trainable),
                        conv_changed=conv_changed, head_init=how, feature_cache_bytes=0)


def load_model(run: Run, tag: str = "", check: bool = True) -> FastRCNN:
    """The trained network of ``model/fast_rcnn<tag>``; ``check``: refused when made with other settings."""
    d = model_dir(run, tag)
    if check:
        require_settings(run, d, "tools/train_fast_rcnn.py", {"fast_rcnn": run.cfg.fast_rcnn,
                                                              "backbone": run.cfg.backbone}, _settings(run),
                         extra_defaults=SETTINGS_BEFORE)
    ck = load_checkpoint(d / "model.pt")
    model = build_model(run)
    model.head.input_scale = float(ck["input_scale"])
    model.load_state_dict(ck["model"])
    return model.eval()


def stage_fast_rcnn_test(run: Run, split: str | None = None, tag: str = "", draw: int = 4,
                         progress: bool = True) -> dict:
    """Detect on a whole split with the trained network (conv once per image and scale, the proposals of the
    proposals stage); evaluate without and with its box regression. Written to ``detections/<split>_fast_rcnn<tag>``."""
    from tqdm import tqdm

    from ..analysis import miss_reasons

    cfg = run.cfg
    split = split or cfg.data.test_split
    ds = run.dataset(split)
    require_proposals(run, split)
    require_current(run, split, run.proposals_dir(split))
    model = load_model(run, tag)
    store = ProposalStore(run.proposals_dir(split))
    fr, f, t = cfg.fast_rcnn, cfg.features, cfg.test
    plain_all, reg_all, annotations, misses = {}, {}, {}, []
    timing = {"conv": 0.0, "pool": 0.0, "fc": 0.0, "post": 0.0}
    t0 = time.time()
    with large_blocks_reused():  # each image's activations
        for i in tqdm(ds.ids, desc=f"fast r-cnn test {split}", unit="img", disable=not progress):
            props = store.load(i)
            plain, reg, scores, secs = model.detect(ds.image(i), props, fr.scales or f.scales, f.max_size,
                                                    f.target_size, t, fr.score_threshold)
            for k in timing:
                timing[k] += secs[k]
            plain_all[i], reg_all[i] = plain, reg
            annotations[i] = boxes, labels, difficult = annotations_of(run, ds, i)
            misses += list(zip(labels[~difficult].tolist(), miss_reasons(boxes, labels, difficult, props, scores, plain,
                                                                          reg, fr.score_threshold)))
    n = max(len(ds.ids), 1)
    results = {"without_bbox_reg": evaluate(run, ds, plain_all), "with_bbox_reg": evaluate(run, ds, reg_all)}
    metrics = {"seconds_per_image": {k: v / n for k, v in timing.items()}, "method": "fast_rcnn",
               "model": str(model_dir(run, tag))}
    return write_results(run, ds, split, run.detections_dir(split, f"_fast_rcnn{tag}"), results, reg_all,
                         annotations, misses, metrics, draw, t0, fr.draw_threshold)


SPEC = StageSpec("fast_rcnn", "tools/train_fast_rcnn.py", False,
                 ("data: train images and annotations", "proposals/<train>/", "the trunk (pretrain/checkpoint.pt)"),
                 "model/fast_rcnn<tag>/", SETTINGS, stage_fast_rcnn)
