"""Where a detector's AP goes: the kinds of its false positives and why objects are missed.

Two views, both over a whole split:

- **False positives** (after Hoiem et al., "Diagnosing error in object detectors"): each
  detection of class ``k`` is, in descending-score order, ``correct`` (matched as VOC matches),
  ``ignored`` (on a difficult object), or a false positive of kind ``localisation`` (IoU 0.1-0.5
  with an object of its class), ``duplicate`` (that object was already matched),
  ``confusion`` (IoU >= 0.1 with an object of another class) or ``background``. The counts among
  the top ``N`` detections (``N`` = the class's non-difficult objects) say what the most
  confident mistakes are; the AP with one kind removed says what each kind costs.
- **Misses**: each non-difficult object is ``detected`` (a final detection of its class at IoU
  >= 0.5) or lost at one stage: ``no proposal`` (no window at IoU >= 0.5), ``score below
  threshold`` (every such window scored at most ``test.score_threshold``), ``suppressed`` (one
  scored above it, but non-maximum suppression by a higher-scoring window of the class, or the
  per-class cap, removed it) or ``lost by box regression`` (found before regression, moved off
  after it). Only detected objects can be recalled, so the AP with every false positive removed
  is the ceiling the misses leave at that score threshold (a lower threshold detects more
  objects, at the bottom of the ranking).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .boxes import iou_matrix
from .evaluation import FP_KINDS, ap_from_kinds, classify_detections

__all__ = ["FP_KINDS", "MISS_REASONS", "classify_detections", "miss_reasons", "error_report", "format_report"]

MISS_REASONS = ("no proposal", "score below threshold", "suppressed", "lost by box regression")


def miss_reasons(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_difficult: np.ndarray, proposals: np.ndarray,
                 scores: np.ndarray, plain, refined, score_threshold: float,
                 iou_threshold: float = 0.5) -> list[str]:
    """For each non-difficult object of one image, ``"detected"`` or the stage that lost it
    (one of :data:`MISS_REASONS`). ``scores``: ``(R, K)`` of ``proposals``; ``plain`` / ``refined``:
    the final detections (``.boxes``, ``.labels``) without / with box regression (``refined`` None
    when there is no regression)."""
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    props = np.asarray(proposals, np.float64).reshape(-1, 4)
    ov_p = iou_matrix(gt, props) if len(props) else np.zeros((len(gt), 0))
    final = refined if refined is not None else plain

    def found(dets, j: int, k: int) -> bool:
        b = np.asarray(dets.boxes, np.float64)[np.asarray(dets.labels) == k]
        return bool(len(b)) and iou_matrix(gt[j:j + 1], b)[0].max() >= iou_threshold

    out = []
    for j in range(len(gt)):
        if gt_difficult[j]:
            continue
        k = int(gt_labels[j])
        hit = ov_p[j] >= iou_threshold
        if found(final, j, k):
            out.append("detected")
        elif not hit.any():
            out.append("no proposal")
        elif scores[hit, k].max() <= score_threshold:
            out.append("score below threshold")
        elif refined is not None and found(plain, j, k):
            out.append("lost by box regression")
        else:
            out.append("suppressed")
    return out


def error_report(detections: Mapping[int, Sequence], annotations: Mapping[str, tuple], classes: Sequence[str],
                 misses: Sequence[tuple[int, str]] = ()) -> dict:
    """Per class: objects, AP, the kinds of the top-``N`` detections, the AP with each false-positive
    kind removed (and with all removed), and the miss reasons (``misses``: ``(class index, reason)``
    per non-difficult object, from :func:`miss_reasons`)."""
    per_class = {}
    for k, name in enumerate(classes):
        npos = int(sum(((np.asarray(a[1]) == k) & ~np.asarray(a[2], bool)).sum() for a in annotations.values()))
        dets, kinds = classify_detections(detections.get(k, []), k, annotations)
        top = kinds[:npos]
        row = {"objects": npos, "detections": len(dets), "ap07": ap_from_kinds(kinds, npos) if npos else None,
               "top": {kind: top.count(kind) for kind in ("correct",) + FP_KINDS}}
        removed = {}
        for kind in FP_KINDS + ("all",):
            drop = FP_KINDS if kind == "all" else (kind,)
            removed[kind] = ap_from_kinds([t for t in kinds if t not in drop], npos) if npos else None
        row["ap07_without"] = removed
        reasons = [r for c, r in misses if c == k]
        row["objects_by_outcome"] = {r: reasons.count(r) for r in ("detected",) + MISS_REASONS} if reasons else {}
        per_class[name] = row

    def mean(values):
        v = [x for x in values if x is not None]
        return float(np.mean(v)) if v else float("nan")

    summary = {
        "map07": mean(r["ap07"] for r in per_class.values()),
        "map07_without": {kind: mean(r["ap07_without"][kind] for r in per_class.values())
                          for kind in FP_KINDS + ("all",)},
        "top": {kind: sum(r["top"][kind] for r in per_class.values()) for kind in ("correct",) + FP_KINDS},
        "objects_by_outcome": {r: sum(row["objects_by_outcome"].get(r, 0) for row in per_class.values())
                               for r in ("detected",) + MISS_REASONS} if misses else {},
    }
    return {"per_class": per_class, "summary": summary}


def format_report(report: dict) -> str:
    """The summary for the terminal: what the top detections are, what each false-positive kind
    costs, and where missed objects were lost."""
    s = report["summary"]
    top = s["top"]
    n_top = sum(top.values())
    lines = [f"where the AP goes ({n_top} top-ranked detections, as many per class as it has objects):",
             "  top detections: " + ", ".join(f"{k} {v}" for k, v in top.items()),
             f"  mAP {s['map07']:.3f}; without " + ", ".join(
                 f"{k} FPs {v:.3f}" for k, v in s["map07_without"].items() if k != "all")
             + f"; without any FP {s['map07_without']['all']:.3f}"
             + " (the ceiling the misses leave at this score threshold)"]
    if s["objects_by_outcome"]:
        n = sum(s["objects_by_outcome"].values())
        lines.append(f"  objects ({n}): " + ", ".join(f"{k} {v}" for k, v in s["objects_by_outcome"].items()))
    return "\n".join(lines)
