"""VOC detection AP, as the official devkit's ``VOCevaldet`` computes it, over arrays.

Detections of one class are sorted by descending score and matched greedily to the
not-yet-matched ground-truth box of the same image with the highest IoU, if that IoU is
``>= iou_threshold``: a match to a *difficult* object is neither TP nor FP; a second
detection of an already matched object is a FP. AP is the 2007 11-point interpolated
average (``use_07_metric=True``) or the area under the monotone precision envelope
(VOC2010+). Boxes are 0-based continuous xyxy, where plain IoU equals the devkit's
``+1`` inclusive IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .boxes import iou_matrix

__all__ = ["voc_ap", "match_detections", "classify_detections", "ap_from_kinds", "FP_KINDS", "voc_ap_for_class",
           "ClassResult", "detections_by_class", "evaluate_detections"]

# False-positive kinds of :func:`classify_detections` (after Hoiem et al.); "ignored" (a match to a
# difficult object) is neither a true nor a false positive.
FP_KINDS = ("localisation", "duplicate", "confusion", "background")


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a PR curve: 11-point (VOC2007) or area under the precision envelope."""
    rec = np.asarray(recall, np.float64)
    prec = np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t].max() if np.any(rec >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass
class ClassResult:
    ap: float
    recall: np.ndarray
    precision: np.ndarray
    num_positives: int  # non-difficult ground-truth objects
    num_detections: int


def match_detections(detections: Sequence, ground_truth: Mapping[str, tuple], iou_threshold: float = 0.5):
    """Greedy VOC matching. Returns ``(tp, fp, num_positives)`` in descending-score order.

    ``detections``: sequence of ``(image_id, score, x1, y1, x2, y2)``;
    ``ground_truth``: ``{image_id: (boxes (N, 4), difficult (N,) bool)}``.
    """
    annotations = {}
    npos = 0
    for img, (boxes, difficult) in ground_truth.items():
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        d = np.asarray(difficult, bool).reshape(-1)
        if len(d) != len(b):
            raise ValueError(f"ground truth of {img!r}: {len(b)} boxes but {len(d)} difficult flags")
        annotations[img] = (b, np.zeros(len(b), np.int64), d)
        npos += int((~d).sum())
    _, kinds = classify_detections(detections, 0, annotations, iou_threshold)
    return (*_tp_fp(kinds), npos)


def _tp_fp(kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP indicators of :func:`classify_detections` kinds (``"ignored"`` is neither)."""
    k = np.array(kinds, dtype=object)
    return (k == "correct").astype(np.float64), np.isin(k, FP_KINDS).astype(np.float64)


def _pr_curve(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos if npos > 0 else np.zeros_like(ctp)
    return rec, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)


def ap_from_kinds(kinds: Sequence[str], num_positives: int, use_07_metric: bool = True) -> float:
    """AP of one class from the kinds of its detections in descending-score order (as
    :func:`classify_detections` gives them); ``nan`` when the class has no positives. Removing
    false positives leaves the other detections' kinds unchanged, so the AP without a kind of
    mistake is this on the remaining kinds."""
    if num_positives <= 0:
        return float("nan")
    return voc_ap(*_pr_curve(*_tp_fp(kinds), num_positives), use_07_metric)


def classify_detections(detections: Sequence, k: int, annotations: Mapping[str, tuple],
                        iou_threshold: float = 0.5) -> tuple[list, list[str]]:
    """``(detections sorted by descending score, kind of each)`` for class ``k``.

    VOC matching: in descending-score order, each detection goes to the object of class ``k`` it
    overlaps most; at IoU >= ``iou_threshold`` it is ``"correct"`` (first match), ``"duplicate"``
    or ``"ignored"`` (a difficult object). Any other detection is a false positive of the kind it
    is (:data:`FP_KINDS`): ``"localisation"`` (IoU >= 0.1 with an object of class ``k``),
    ``"confusion"`` (IoU >= 0.1 with an object of another class) or ``"background"``.
    :func:`match_detections` is this with the objects of one class.

    ``detections``: ``(image_id, score, x1, y1, x2, y2)``; ``annotations``: ``{image_id: (boxes
    (N, 4), labels (N,), difficult (N,))}`` of every image of the split.
    """
    dets = list(detections)
    order = np.argsort(-np.array([float(d[1]) for d in dets], np.float64), kind="stable")
    used = {img: np.zeros(len(a[0]), bool) for img, a in annotations.items()}
    kinds = []
    for j in order:
        img = dets[j][0]
        if img not in annotations:
            raise KeyError(f"detection for image {img!r}, which is not in the ground truth of this split")
        boxes, labels, difficult = annotations[img]
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        ov = iou_matrix(np.asarray(dets[j][2:6], np.float64)[None], boxes)[0] if len(boxes) else np.zeros(0)
        same = np.asarray(labels) == k
        ov_same = np.where(same, ov, -1.0)
        m = int(np.argmax(ov_same)) if same.any() else -1
        if m >= 0 and ov_same[m] >= iou_threshold:
            if difficult[m]:
                kinds.append("ignored")
            elif used[img][m]:
                kinds.append("duplicate")
            else:
                used[img][m] = True
                kinds.append("correct")
        elif m >= 0 and ov_same[m] >= 0.1:
            kinds.append("localisation")
        elif (~same).any() and ov[~same].max() >= 0.1:
            kinds.append("confusion")
        else:
            kinds.append("background")
    return [dets[j] for j in order], kinds


def _class_result(detections, ground_truth, iou_threshold, use_07_metric) -> ClassResult:
    tp, fp, npos = match_detections(detections, ground_truth, iou_threshold)
    rec, prec = _pr_curve(tp, fp, npos)
    ap = voc_ap(rec, prec, use_07_metric) if npos > 0 else float("nan")
    return ClassResult(ap, rec, prec, npos, len(tp))


def voc_ap_for_class(detections: Sequence, ground_truth: Mapping[str, tuple], iou_threshold: float = 0.5,
                     use_07_metric: bool = True) -> float:
    """VOC AP of one class.

    Args:
        detections: ``(image_id, score, x1, y1, x2, y2)`` tuples, boxes 0-based continuous xyxy.
        ground_truth: every image of the split -> ``(boxes (N, 4), difficult (N,) bool)``.
        iou_threshold: 0.5 in VOC (an IoU exactly at the threshold counts).
        use_07_metric: 11-point (True) or area (False).

    Returns:
        AP in [0, 1]; ``nan`` if the class has no non-difficult object in the split; 0.0
        when there are objects but no detections.
    """
    return _class_result(detections, ground_truth, iou_threshold, use_07_metric).ap


def detections_by_class(detections: Mapping[str, object], num_classes: int) -> dict[int, list]:
    """``{image id: Detections}`` -> ``{class index: [(id, score, x1, y1, x2, y2), ...]}``, what
    :func:`evaluate_detections` reads."""
    out = {k: [] for k in range(num_classes)}
    for i, d in detections.items():
        for b, s, k in zip(d.boxes, d.scores, d.labels):
            out[int(k)].append((i, float(s), *map(float, b)))
    return out


def evaluate_detections(
    detections: Mapping[int, Sequence],
    ground_truth: Mapping[int, Mapping[str, tuple]],
    classes: Sequence[str],
    iou_threshold: float = 0.5,
) -> dict:
    """Per-class and mean AP under both metrics.

    ``detections[k]`` / ``ground_truth[k]``: as in :func:`voc_ap_for_class`, for class
    index ``k``. A class with no non-difficult ground truth is reported as ``None`` and
    left out of the means.
    """
    per_class = {}
    curves = {}
    for k, name in enumerate(classes):
        dets = detections.get(k, [])
        r07 = _class_result(dets, ground_truth[k], iou_threshold, True)
        area = voc_ap(r07.recall, r07.precision, False) if r07.num_positives else float("nan")
        per_class[name] = {
            "ap07": None if np.isnan(r07.ap) else r07.ap,
            "ap": None if np.isnan(area) else area,
            "num_positives": r07.num_positives,
            "num_detections": r07.num_detections,
        }
        curves[name] = (r07.recall, r07.precision)
    valid07 = [v["ap07"] for v in per_class.values() if v["ap07"] is not None]
    valid = [v["ap"] for v in per_class.values() if v["ap"] is not None]
    return {
        "per_class": per_class,
        "map07": float(np.mean(valid07)) if valid07 else float("nan"),
        "map": float(np.mean(valid)) if valid else float("nan"),
        "iou_threshold": iou_threshold,
        "curves": curves,
    }


def format_table(result: dict) -> str:
    """A per-class AP table for the terminal."""
    rows = [f"{'class':<14} {'AP (07)':>8} {'AP (area)':>10} {'#gt':>6} {'#det':>7}"]
    for name, v in result["per_class"].items():
        f = lambda x: "   n/a" if x is None else f"{x:8.3f}"  # noqa: E731
        rows.append(f"{name:<14} {f(v['ap07']):>8} {f(v['ap']):>10} {v['num_positives']:>6} {v['num_detections']:>7}")
    rows.append(f"{'mean':<14} {result['map07']:8.3f} {result['map']:10.3f}")
    return "\n".join(rows)
