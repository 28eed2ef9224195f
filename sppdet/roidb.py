"""Per-image training windows: proposals + ground truth with their overlaps (R-CNN's roidb)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boxes import area, intersection_matrix, iou_matrix
from .voc import Annotation

__all__ = ["Windows", "make_windows", "group_windows_mask"]


@dataclass
class Windows:
    """``boxes`` (R, 4) original-image xyxy: ground truth first (``is_gt``), then proposals;
    ``max_iou`` (R,) best IoU with any object; ``gt_index`` (R,) that object (-1 if none);
    ``label`` (R,) its class; ``class_iou`` (R, K) best IoU with each class."""

    boxes: np.ndarray
    is_gt: np.ndarray
    max_iou: np.ndarray
    gt_index: np.ndarray
    label: np.ndarray
    class_iou: np.ndarray


def make_windows(ann: Annotation, labels: np.ndarray, proposals: np.ndarray, num_classes: int,
                 include_difficult: bool = True) -> Windows:
    """Ground-truth boxes (difficult ones too by default, as the authors' ``roidb_from_voc``)
    followed by the proposals, with overlaps."""
    keep = np.ones(len(ann.boxes), bool) if include_difficult else ~ann.difficult
    gt, gl = ann.boxes[keep], labels[keep]
    boxes = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)]).astype(np.float32)
    ov = iou_matrix(boxes, gt)  # (R, G)
    r = len(boxes)
    class_iou = np.zeros((r, num_classes), np.float32)
    for k in np.unique(gl):
        class_iou[:, k] = ov[:, gl == k].max(1)
    if ov.shape[1]:
        gi = ov.argmax(1)
        mx = ov[np.arange(r), gi]
        lab = gl[gi]
    else:
        gi = np.full(r, -1)
        mx = np.zeros(r)
        lab = np.full(r, -1)
    gi = np.where(mx > 0, gi, -1)
    return Windows(boxes, np.arange(r) < len(gt), mx.astype(np.float32), gi.astype(np.int64),
                   np.where(mx > 0, lab, -1).astype(np.int64), class_iou)


def group_windows_mask(w: Windows, rows: np.ndarray, num_classes: int, coverage: float, max_iou: float = 0.5
                       ) -> np.ndarray:
    """(len(rows), K): which of the windows ``rows`` hold at least ``coverage`` of the area of each of two or more
    objects of a class while overlapping none of them by IoU ``max_iou`` or more: one box around two people side by
    side, which the papers' negatives (IoU < 0.3) never include and their positives never reward."""
    out = np.zeros((len(rows), num_classes), bool)
    g = np.nonzero(w.is_gt)[0]
    if len(g) < 2 or not len(rows):
        return out
    held = intersection_matrix(w.boxes[rows], w.boxes[g]) >= coverage * area(w.boxes[g])[None]  # (R, G)
    for k in np.unique(w.label[g]):
        n = held[:, w.label[g] == k].sum(1)
        out[:, k] = (n >= 2) & (w.class_iou[rows, k] < max_iou)
    return out
