#!/usr/bin/env python
"""The R-CNN family side by side on one trunk, one set of proposals and one train/val/test split: R-CNN mode,
SPP-net (the project's pipeline) and Fast R-CNN mode, with what each of SPP-net's limitations costs.

    python benchmarks/bench_family.py --config configs/tiny.yaml --run-root runs/family --out runs/family/family.json
    python benchmarks/bench_family.py --config configs/custom.yaml --set data.root=../shared/data/real/raccoon \\
        --run-root runs/family --out runs/family/raccoon.json

Every number comes from this one run: training wall time per stage (proposals and the trunk's pre-training are
shared inputs, timed once and counted in no route), test seconds per image split into proposals (shared) / conv /
pooling / heads / rest, bytes of feature cache written to disk, the number of training stages, VOC07 mAP on the
test split (box regression on; without it in the JSON). The limitation rows change one thing each:

- conv layers frozen vs trained: Fast R-CNN mode with ``fast_rcnn.train_conv=false`` (only fc layers learn, as
  SPP-net's must) against the full mode, everything else equal;
- SVMs vs softmax: SPP-net's fine-tuned head scored by its own softmax layer (each class's log-odds against
  background) instead of the SVMs, the rest of the SPP-net route equal;
- features on disk vs none: SPP-net tested with conv5 computed per image on the fly instead of read from the cache
  (the same float16 rounding, so the same features: what the cache costs is disk and time, not accuracy);
- regressors fit apart vs learnt in fine-tuning: SPP-net with a box layer fine-tuned beside fc8 and regressing
  (``finetune.bbox_loss: 1``, ``bbox_reg.source: finetune``; its own fine-tuning and SVMs in a second run folder
  that links the first's proposals and conv5 cache), one training stage fewer;
- the pyramid: Fast R-CNN mode with a single 7x7 RoI level instead of the SPP pyramid (``--no-roi`` skips it).

R-CNN mode scores at most ``rcnn.max_windows`` proposals per image (CPU time; said in its row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sppdet.cli import run_main
from sppdet.config import load_config
from sppdet.run import Run
from sppdet.store import atomic_write_text, dir_bytes
from sppdet.manifest import Stage

PAPERS = """the papers' own numbers (other data and trunks: for the ordering, not the values)
  SPP-net vs R-CNN (He et al. 2014, ZF-5 / AlexNet-like, VOC 2007): 24-102x faster at test, mAP comparable or
    better (SPP-net 5 scales 59.2 vs R-CNN 58.5, both with fine-tuned fc7 and box regression)
  Fast R-CNN vs SPP-net (Girshick 2015, VGG16, VOC 2007): 3x faster training, 10x faster testing,
    mAP 63.1 (SPP-net, 5 scales) -> 66.9 (Fast R-CNN)
  within Fast R-CNN (VGG16): fine-tuning only fc6 and up, as SPP-net must: 61.4; from conv3_1 up: 66.9
  SVMs vs softmax within Fast R-CNN (VGG16): 66.8 vs 66.9"""


def timed(fn):
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


def variant(run: Run, **sections) -> Run:
    """The same run folder with some config sections' fields changed (e.g. ``fast_rcnn={"train_conv": False}``)."""
    cfg = run.cfg
    cfg = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})
    return Run(cfg, run.dir, save_config=False, log_fn=run.log)


def shared(run: Run, splits: list[str]) -> dict:
    """The inputs every route shares: the data, the pre-trained trunk (if the config pre-trains one), proposals."""
    from sppdet.stages import stage_pretrain, stage_proposals

    out = {}
    _, out["data"] = timed(lambda: [run.dataset(s) for s in splits])
    if run.cfg.backbone.weights == "pretrain":
        _, out["pretrain"] = timed(lambda: stage_pretrain(run))
    _, out["proposals"] = timed(lambda: [stage_proposals(run, s) for s in splits])
    test = run.cfg.data.test_split
    m = Stage.read_manifest(run.proposals_dir(test))
    n = max(len(run.dataset(test).ids), 1)
    out["proposal_seconds_per_image"] = float(m.get("proposal_seconds", 0.0)) / n if m.get("new_images") else None
    return out


def _row(method: str, variant_name: str, metrics: dict, train: dict, test_split: dict, cache: int, stages: int,
         limitation: str, **extra) -> dict:
    r = metrics["results"]
    return {"method": method, "variant": variant_name, "map07": float(metrics["map07"]),
            "map07_without_bbox_reg": float(r["without_bbox_reg"]["map07"]),
            "train_seconds": float(sum(train.values())), "train_seconds_by_stage": train,
            "test_seconds_per_image": float(sum(test_split.values())), "test_seconds_split": test_split,
            "feature_cache_bytes": int(cache), "stages": stages, "limitation": limitation, **extra}


def sppnet(run: Run, splits: list[str]) -> tuple[dict, list]:
    """The SPP-net route; returns its row and what the SVM/softmax and cache rows reuse."""
    from sppdet.stages import stage_bbox_reg, stage_features, stage_finetune, stage_svms, stage_test

    test = run.cfg.data.test_split
    train = {}
    _, train["features"] = timed(lambda: [stage_features(run, s) for s in splits if s != test])
    _, train["finetune"] = timed(lambda: stage_finetune(run))
    _, train["svm"] = timed(lambda: stage_svms(run))
    _, train["bbox_reg"] = timed(lambda: stage_bbox_reg(run))
    m_feat, t_feat = timed(lambda: stage_features(run, test))
    m = stage_test(run, test, tag="_family", draw=0, progress=False)
    n = max(len(run.dataset(test).ids), 1)
    s = m["seconds_per_image"]
    conv = m_feat.get("conv_seconds_per_image") or t_feat / n  # measured by the stage (None when it reused maps)
    train_conv = dict(train)
    train["conv_per_image"] = conv
    split = {"conv": conv, "pool": s["pool"], "heads": s["fc"] + s["svm"], "rest": s["post"]}
    cache = sum(dir_bytes(run.features_dir(x)) for x in splits)
    row = _row("sppnet", "SVMs on fine-tuned fc7, conv5 cached", m, train_conv, split, cache, 4,
               "all three: 4 training stages with hand-offs on disk, conv5 cache, conv frozen")
    return row, train


def sppnet_pool5(run: Run, train: dict) -> dict:
    """SPP-net's SVMs on pool5 (no fine-tuning): the features R-CNN mode's SVMs use, for a like-for-like row."""
    from sppdet.stages import stage_svm, stage_test

    _, t_svm = timed(lambda: stage_svm(run, "pool5", "_pool5"))
    # reused where the SPP-net row trained them beside fc7's (test.combine: pool5): their stage's recorded seconds
    # (that pass mined both sets at once), not the ~0 s of reading them
    t_svm = max(t_svm, float(Stage.read_manifest(run.svm_path("_pool5").parent).get("seconds", 0.0)))
    m = stage_test(run, run.cfg.data.test_split, svm_tag="_pool5", tag="_family_pool5", draw=0, progress=False,
                   combine=False)
    s = m["seconds_per_image"]
    return _row("sppnet", "SVMs on pool5 (as the R-CNN row)", m, {"features": train["features"], "svm": t_svm,
                "bbox_reg": train["bbox_reg"]}, {"conv": train["conv_per_image"], "pool": s["pool"],
                "heads": s["fc"] + s["svm"], "rest": s["post"]}, 0, 3, "as the SPP-net row, without fine-tuning "
                "(cache: the SPP-net row's)")


def sppnet_softmax(run: Run, train: dict) -> dict:
    """SPP-net's head scored by its softmax (log-odds of each class against background) instead of SVMs."""
    from sppdet.stages import build_detector
    from sppdet.stages.test import stage_test_with

    det = build_detector(run, run.cfg.data.test_split, combine=False)
    fc8 = det.head.fc8
    k = len(run.classes)
    with torch.no_grad():
        W = (fc8.weight[:k] - fc8.weight[k]).numpy().astype(np.float32)
        b = (fc8.bias[:k] - fc8.bias[k]).numpy().astype(np.float32)
    det.svm_sets = [{"W": W, "b": b, "feature_scale": 1.0, "layer": "fc7", "feature": "softmax",
                     "trained": np.ones(k, bool)}]
    det.test = dataclasses.replace(det.test, score_threshold=-1e9)  # log-odds, not margins: every window ranked
    m = stage_test_with(run, det, tag="_family_softmax", svm="softmax")
    s = m["seconds_per_image"]
    return _row("sppnet", "softmax of the fine-tuned head instead of SVMs", m,
                {k: train[k] for k in ("features", "finetune", "bbox_reg")},
                {"conv": train["conv_per_image"], "pool": s["pool"], "heads": s["fc"] + s["svm"], "rest": s["post"]},
                0, 3, "SVMs vs softmax (cache: the SPP-net row's)")


def sppnet_no_cache(run: Run, train: dict) -> dict:
    """SPP-net tested with conv5 computed per image on the fly (no cache read)."""
    from sppdet.stages.test import stage_test

    m = stage_test(run, run.cfg.data.test_split, tag="_family_nocache", draw=0, progress=False, from_images=True)
    s = m["seconds_per_image"]
    return _row("sppnet", "test without the conv5 cache (conv per image)", m,
                {k: v for k, v in train.items() if k != "conv_per_image"},
                {"conv": s["conv"], "pool": s["pool"], "heads": s["fc"] + s["svm"], "rest": s["post"]}, 0, 4,
                "features on disk vs none")


def sppnet_joint_boxes(run: Run, train: dict) -> dict:
    """SPP-net whose box regression is learnt with the fc layers (a box layer beside fc8, Fast R-CNN's loss) instead
    of ridge regressors fit apart, in ``<run folder>_joint_boxes`` (its proposals and conv5 cache linked in)."""
    from sppdet.stages import stage_finetune, stage_svms, stage_test

    joint = Path(str(run.dir) + "_joint_boxes")
    joint.mkdir(parents=True, exist_ok=True)
    for name in ("pretrain", "proposals", "features"):
        link = joint / name
        if (run.dir / name).exists() and not link.exists():
            link.symlink_to((run.dir / name).resolve(), target_is_directory=True)
    cfg = run.cfg
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, bbox_loss=1.0),
                              bbox_reg=dataclasses.replace(cfg.bbox_reg, source="finetune"))
    jr = Run(cfg, joint, save_config=False, log_fn=run.log)
    t = {"features": train["features"]}
    _, t["finetune"] = timed(lambda: stage_finetune(jr))
    _, t["svm"] = timed(lambda: stage_svms(jr))
    m = stage_test(jr, cfg.data.test_split, tag="_family", draw=0, progress=False)
    s = m["seconds_per_image"]
    return _row("sppnet", "box regression learnt in fine-tuning, no ridge stage", m, t,
                {"conv": train["conv_per_image"], "pool": s["pool"], "heads": s["fc"] + s["svm"], "rest": s["post"]},
                0, 3, "regressors fit apart vs learnt with the fc layers (cache: the SPP-net row's)")


def rcnn(run: Run) -> dict:
    from sppdet.stages.rcnn import stage_rcnn, stage_rcnn_test

    before = dir_bytes(run.dir)
    man, t = timed(lambda: stage_rcnn(run))
    m = stage_rcnn_test(run, draw=0, progress=False)
    cache = dir_bytes(run.dir) - before - dir_bytes(run.dir / "model" / "rcnn") - dir_bytes(
        run.detections_dir(run.cfg.data.test_split, "_rcnn"))
    s = m["seconds_per_image"]
    train = {"features": man.get("feature_seconds", t), "svm+bbox_reg": man.get("train_seconds", 0.0)}
    return _row("rcnn", f"warped windows, SVMs on pool5, {run.cfg.rcnn.max_windows or 'all'} windows/img", m, train,
                {"conv": s["warp"] + s["conv"], "rest": s["post"]}, max(cache, 0), 3,
                "features per window, written to disk as R-CNN wrote them (features_rcnn/)")


def fast_rcnn(run: Run, tag: str, label: str, limitation: str) -> dict:
    from sppdet.stages.fast_rcnn import stage_fast_rcnn, stage_fast_rcnn_test

    before = dir_bytes(run.dir)
    man, t = timed(lambda: stage_fast_rcnn(run, tag))
    m = stage_fast_rcnn_test(run, tag=tag, draw=0, progress=False)
    # what it wrote besides its model and its detections: no feature cache
    cache = dir_bytes(run.dir) - before - dir_bytes(run.dir / "model" / f"fast_rcnn{tag}") - dir_bytes(
        run.detections_dir(run.cfg.data.test_split, f"_fast_rcnn{tag}"))
    s = m["seconds_per_image"]
    return _row("fast_rcnn", label, m, {"train": man.get("train_seconds", t)},
                {"conv": s["conv"], "pool": s["pool"], "heads": s["fc"], "rest": s["post"]},
                max(cache, 0), 1, limitation,
                conv_changed=man.get("conv_changed"))


def table(rows: list[dict], common: dict) -> str:
    lines = [f"{'method':10} {'variant':52} {'mAP':>6} {'(no bb)':>7} {'train s':>8} {'test s/img':>10} "
             f"{'cache MB':>8} {'stages':>6}"]
    for r in rows:
        lines.append(f"{r['method']:10} {r['variant'][:52]:52} {r['map07']:6.3f} {r['map07_without_bbox_reg']:7.3f} "
                     f"{r['train_seconds']:8.0f} {r['test_seconds_per_image']:10.3f} "
                     f"{r['feature_cache_bytes'] / 1e6:8.1f} {r['stages']:6d}")
    p = common.get("proposal_seconds_per_image")
    lines.append("shared inputs, in no row: " + ", ".join(f"{k} {v:.0f} s" for k, v in common.items()
                                                         if k in ("data", "pretrain", "proposals"))
                 + (f"; proposals {p:.3f} s per test image, to add to every test s/img" if p else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--run-root", default="runs/family", help="the run folder is <run-root>/<config name>")
    ap.add_argument("--out", default=None, help="rows as JSON (default: <run folder>/family.json)")
    ap.add_argument("--no-roi", action="store_true", help="skip the single-level RoI pooling row")
    args = ap.parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        run = Run(cfg, Path(args.run_root) / cfg.name)
        d = cfg.data
        splits = list(dict.fromkeys([d.train_split, d.val_split, d.test_split]))
        t0 = time.time()
        common = shared(run, splits)
        rows = [rcnn(run)]
        row, train = sppnet(run, splits)
        rows += [sppnet_pool5(run, train), row]
        rows.append(fast_rcnn(run, "", "conv above the stem trained, SPP pyramid", "none of the three"))
        rows.append(fast_rcnn(variant(run, fast_rcnn={"train_conv": False}), "_frozen",
                              "conv frozen (fc layers only, as SPP-net)", "conv frozen vs trained"))
        rows.append(sppnet_softmax(run, train))
        rows.append(sppnet_no_cache(run, train))
        rows.append(sppnet_joint_boxes(run, train))
        if not args.no_roi:
            rows.append(fast_rcnn(variant(run, fast_rcnn={"pooling": "roi"}), "_roi",
                                  "single 7x7 RoI pooling instead of the pyramid", "(the pyramid's contribution)"))
        out = Path(args.out) if args.out else run.dir / "family.json"
        atomic_write_text(out, json.dumps(rows, indent=2))
        print(f"\nthe R-CNN family on {cfg.name} ({args.config}; {len(run.dataset(d.test_split).ids)} test images, "
              f"trunk {cfg.backbone.name}, {time.time() - t0:.0f} s in all)")
        print(table(rows, common))
        print(PAPERS)
        print(f"rows: {out}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
