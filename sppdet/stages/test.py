"""Stage 7: detection on a whole split from its caches (proposals, conv5), scored by the SVMs, per-class NMS,
box regression; VOC evaluation, PR curves, error analysis and drawn examples.

Reads: ``<run>/proposals/<split>/``, ``<run>/features/<split>/``, ``<run>/model/{finetune,svm*,bbox_reg}/`` (each
made with the settings now in force), the split's annotations. Writes: ``<run>/detections/<split><tag>/``
(detections.npz, comp4 files, metrics.json, PNGs), replaced whole.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..bbox_reg import BoxRegressor
from ..detector import Detector, HeadBoxRegressor, load_svms
from ..malloc import large_blocks_reused
from ..proposals import ProposalStore
from ..run import Run
from ..store import ShardError, atomic_save_npz, atomic_write_text
from ..voc import VOCDataset
from .common import (StageSpec, config_cache, feature_cache, pooling_before, pooling_record, require_current,
                     require_settings)
from .finetune import load_head, pretrained_head
from .proposals import require_proposals
from .svm import combined_svms, settings_before, svm_settings


def build_detector(run: Run, split: str, svm_tag: str = "", use_bbox_reg: bool | None = None,
                   combine: bool = True, check: bool = True, device: str | None = None) -> Detector:
    """The test-time detector: the SVMs of ``svm_tag``; with the default tag and ``combine``, also those
    of ``test.combine`` (their scores combined by ``test.combine_by``). ``check``: each model is refused when
    made with other settings than those now in force (False: each is used as it was made, for detection with a
    finished run's models). ``use_bbox_reg``: None follows ``test.bbox_reg``. ``device``: where its fc layers run
    (None: the config's ``device``)."""
    cache = (feature_cache(run, split, verify=False) if (run.features_dir(split) / "manifest.json").is_file()
             else None)
    if cache is None:
        cache = config_cache(run, run.features_dir(split))
    sets = combined_svms(run.cfg) if combine and not svm_tag else [(None, svm_tag)]
    for feature, t in sets[1:]:
        if not run.svm_path(t).is_file():
            raise ShardError(f"{run.svm_path(t)}: missing; test.combine lists {feature}, whose SVMs "
                             f"tools/train_svm.py trains (or leave them out: --set 'test.combine=[]')")
    svms = [load_svms(run.svm_path(t)) for _, t in sets]
    if check:
        for s, (_, t) in zip(svms, sets):
            sections, extra = svm_settings(run, str(s["feature"]))
            require_settings(run, run.svm_path(t).parent, "tools/train_svm.py", sections, extra,
                             extra_defaults=settings_before(run, extra))
    head = None
    if svms[0]["feature"] in ("fc6_noft", "fc7_noft"):
        head = pretrained_head(run)
    elif any(s["layer"] in ("fc6", "fc7") for s in svms):
        head = load_head(run, check)
    reg = None
    if use_bbox_reg is None:
        use_bbox_reg = run.cfg.test.bbox_reg
    if use_bbox_reg and run.cfg.bbox_reg.source == "finetune":
        head = load_head(run, check) if head is None else head
        try:
            reg = HeadBoxRegressor(head)
        except ValueError as e:  # the head these SVMs score with: name its file and the way out
            raise ShardError(f"{run.finetune_path}: {e}; rerun tools/finetune_fc.py --overwrite with that setting, "
                             "or use bbox_reg.source: ridge") from None
    elif use_bbox_reg and run.bbox_reg_path.is_file():
        if check:
            require_settings(run, run.bbox_reg_path.parent, "tools/train_bbox_reg.py", {"bbox_reg": run.cfg.bbox_reg},
                             pooling_record(run), extra_defaults=pooling_before(run))
        reg = BoxRegressor.load(run.bbox_reg_path)
    return Detector(head, svms, reg, cache, run.cfg.test, run.classes, device or run.device)


def _draw_examples(run: Run, ds: VOCDataset, dets: dict, out_dir: Path, n: int, threshold: float) -> list[Path]:
    from ..images import save_image
    from ..visualize import draw_boxes

    paths = []
    for i in list(dets)[:n]:
        d = dets[i]
        m = d.scores > threshold
        img = draw_boxes(ds.image(i), d.boxes[m], d.labels[m], run.classes, d.scores[m])
        p = out_dir / f"{i}.png"
        save_image(p, img)
        paths.append(p)
    return paths


def stage_test(run: Run, split: str | None = None, svm_tag: str = "", tag: str = "", draw: int = 4,
               progress: bool = True, combine: bool = True, from_images: bool = False) -> dict:
    """Detect on a whole split from the caches; evaluate without and with box regression. The SVMs are
    those of ``svm_tag``, or by default ``svm.feature``'s combined with ``test.combine``'s (``combine``).
    ``from_images``: conv5 computed per image on the fly instead of read from the cache (the same features:
    rounded to the cache's dtype; what the cache saves is this time)."""
    split = split or run.cfg.data.test_split
    require_proposals(run, split)
    require_current(run, split, run.proposals_dir(split))
    if not from_images:
        feature_cache(run, split)  # made with the feature settings now in force, from the split's images
    det = build_detector(run, split, svm_tag, combine=combine)
    for k, s in enumerate(det.svm_sets[0]["trained"]):
        if not s:
            run.log(f"warning: class {run.classes[k]!r} has no SVM (no training positives): it is not scored, AP 0")
    return stage_test_with(run, det, split, tag, draw, progress, from_images,
                           svm=svm_tag or "+".join(s["feature"] for s in det.svm_sets))


def stage_test_with(run: Run, det: Detector, split: str | None = None, tag: str = "", draw: int = 0,
                    progress: bool = False, from_images: bool = False, **extra) -> dict:
    """:func:`stage_test`'s detection, evaluation and writing with a given detector (e.g. one whose scoring
    was replaced, for a benchmark); ``extra`` goes into metrics.json."""
    from tqdm import tqdm

    from ..analysis import miss_reasons

    split = split or run.cfg.data.test_split
    ds = run.dataset(split)
    store = ProposalStore(run.proposals_dir(split))
    plain_all, reg_all = {}, {}
    timing = {"conv": 0.0, "pool": 0.0, "fc": 0.0, "svm": 0.0, "post": 0.0}
    t0 = time.time()
    annotations, misses = {}, []
    backbone = run.backbone().to(det.device) if from_images else None
    with large_blocks_reused():  # each image's activations and pooled windows
        for i in tqdm(ds.ids, desc=f"test {split}", unit="img", disable=not progress):
            props = store.load(i)
            feats, t_conv = det.image_features(backbone, ds.image(i), run.cfg.features, det.device) if from_images else (
                det.cache.load(i, device=det.device), 0.0)
            pooled, scores, t = det.score(feats, props)
            # Per-class cap only (R-CNN); the scores are kept for the miss analysis.
            plain, reg, t["post"] = det.postprocess(pooled, scores, props, feats.width, feats.height, max_per_image=0)
            t["conv"] = t_conv
            for k in timing:
                timing[k] += t[k]
            plain_all[i] = plain
            if reg is not None:
                reg_all[i] = reg
            annotations[i] = boxes, labels, difficult = annotations_of(run, ds, i)
            misses += list(zip(labels[~difficult].tolist(), miss_reasons(boxes, labels, difficult, props, scores, plain,
                                                                          reg, det.test.score_threshold)))
    n = len(ds.ids)
    results = {"without_bbox_reg": evaluate(run, ds, plain_all)}
    if reg_all:
        results["with_bbox_reg"] = evaluate(run, ds, reg_all)
    metrics = {
        "seconds_per_image": {k: v / max(n, 1) for k, v in timing.items()},
        "combine_by": det.test.combine_by if len(det.svm_sets) > 1 else None,
        "features": "computed per image" if from_images else "read from the conv5 cache",
        **extra,
    }
    return write_results(run, ds, split, run.detections_dir(split, tag), results, reg_all or plain_all, annotations,
                         misses, metrics, draw, t0)


def evaluate(run: Run, ds: VOCDataset, dets: dict) -> dict:
    from ..evaluation import detections_by_class, evaluate_detections

    gt = {k: ds.ground_truth(k) for k in range(len(run.classes))}
    return evaluate_detections(detections_by_class(dets, len(run.classes)), gt, run.classes)


def annotations_of(run: Run, ds: VOCDataset, i: str) -> tuple:
    a = ds.annotation(i)
    return a.boxes, a.labels(run.classes), np.asarray(a.difficult, bool)


def write_results(run: Run, ds: VOCDataset, split: str, out: Path, results: dict, final: dict, annotations: dict,
                   misses: list, metrics: dict, draw: int, started: float, draw_threshold: float | None = None) -> dict:
    """A test's artefacts in ``out``: the PR curves and error analysis of the last of ``results`` (with box
    regression where there is any), comp4 files, detections.npz and drawn examples of ``final``, metrics.json
    (``metrics`` plus the results, the data's fingerprints and the seconds since ``started``, writing
    included); the tables and the error summary are logged. Drawn: scores above ``draw_threshold`` (default
    ``test.draw_threshold``). Everything is written into a new folder beside
    ``out`` that then replaces it whole: a failed write (a full disk) leaves the previous results as they were."""
    from ..analysis import format_report
    from ..evaluation import format_table
    from ..store import swap_in_folder

    with swap_in_folder(out) as tmp:
        metrics, errors = _write_artefacts(run, ds, split, tmp, results, final, annotations, misses, metrics, draw,
                                           started, out, draw_threshold)
    for k, v in results.items():
        run.log(f"\n{k.replace('_', ' ')} ({out.name}, {len(ds.ids)} images):\n" + format_table(v))
    run.log("\n" + format_report(errors)
            + f"\n  (per class: {out / 'error_analysis.json'}, {out / 'error_analysis.png'})")
    return metrics


def _write_artefacts(run: Run, ds: VOCDataset, split: str, out: Path, results: dict, final: dict, annotations: dict,
                     misses: list, metrics: dict, draw: int, started: float, final_dir: Path,
                     draw_threshold: float | None = None) -> tuple[dict, dict]:
    """:func:`_write_results`' files, written into ``out`` (a folder that becomes ``final_dir``); returns the metrics
    and the error report."""
    from ..analysis import error_report
    from ..evaluation import detections_by_class
    from ..visualize import plot_error_analysis, plot_pr_curves
    from ..voc import write_comp4

    best = list(results.values())[-1]
    plot_pr_curves(best["curves"], {c: v["ap07"] for c, v in best["per_class"].items()}, out / "pr_curves.png",
                   title=f"{run.cfg.name} {final_dir.name}: mAP (VOC07) {best['map07']:.3f}")
    write_comp4(out, split, run.classes, [(i, int(k), float(s), b) for i, d in final.items()
                                          for b, s, k in zip(d.boxes, d.scores, d.labels)])
    arrays = {}
    for i, d in final.items():
        arrays[f"{i}/boxes"], arrays[f"{i}/scores"], arrays[f"{i}/labels"] = d.boxes, d.scores, d.labels
    atomic_save_npz(out / "detections.npz", **arrays)
    threshold = run.cfg.test.draw_threshold if draw_threshold is None else draw_threshold
    drawn = [final_dir / p.name for p in _draw_examples(run, ds, final, out, draw, threshold)]
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


SPEC = StageSpec("test", "tools/test_net.py", False,
                 ("proposals/<test>/", "features/<test>/", "model/finetune/", "model/svm*/", "model/bbox_reg/",
                  "data: test annotations"),
                 "detections/<test><tag>/", ("test",), stage_test)
