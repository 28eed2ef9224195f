"""Box operations. Every box array is ``(N, 4)`` float32 ``x1, y1, x2, y2`` in 0-based
continuous pixel coordinates (pixel ``i`` covers ``[i, i+1)``; width is ``x2 - x1``).

In this frame plain IoU equals the VOC devkit's inclusive (+1) IoU on the original
1-based boxes, so no ``+1`` appears anywhere outside :mod:`sppdet.voc`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_boxes",
    "BOX_STDS",
    "area",
    "intersection_matrix",
    "iou_matrix",
    "clip_boxes",
    "filter_small",
    "unique_boxes",
    "diverse_first",
    "encode",
    "decode",
    "nms",
]


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """Validate and convert to ``(N, 4)`` float32 (an empty input gives ``(0, 4)``)."""
    b = np.asarray(boxes, dtype=np.float32)
    if b.size == 0:
        return np.zeros((0, 4), np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name}: contains NaN or infinite coordinates")
    return b


def area(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` areas of ``(N, 4)`` xyxy boxes (0 for degenerate boxes)."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def intersection_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, M)`` float64 areas of the intersections of ``(N, 4)`` and ``(M, 4)`` xyxy boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    return iw * ih


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, M)`` float64 IoU between ``(N, 4)`` and ``(M, 4)`` xyxy boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    inter = intersection_matrix(a, b)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip ``(N, 4)`` boxes to the image ``[0, width] x [0, height]``."""
    b = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def filter_small(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Boolean keep-mask of boxes whose width and height are both >= ``min_size``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)


def unique_boxes(boxes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Indices of the first occurrence of each distinct box (after rounding ``box*scale``), in input order."""
    b = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale).astype(np.int64)
    if len(b) == 0:
        return np.zeros((0,), np.int64)
    _, idx = np.unique(b, axis=0, return_index=True)
    return np.sort(idx)


def diverse_first(boxes: np.ndarray, limit: int, iou_threshold: float) -> np.ndarray:
    """Indices of ``min(limit, N)`` of ``boxes`` (given best first): first those overlapping no box taken before
    them by IoU > ``iou_threshold`` (greedy NMS in the given order, stopped once ``limit`` are taken), then, where
    fewer than ``limit``, the others in the given order. How a cap keeps a spread of windows when a photo has
    many more than it holds: selective search puts near-copies of its large regions early, so rank order alone
    fills the cap with them and leaves out small objects further down."""
    b = np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 4))
    limit = min(int(limit), len(b))
    if limit <= 0:
        return np.zeros((0,), np.int64)
    taken = _greedy_kernel()(b, limit, float(iou_threshold))
    if len(taken) < limit:
        rest = np.ones(len(b), bool)
        rest[taken] = False
        taken = np.concatenate([taken, np.flatnonzero(rest)[:limit - len(taken)]])
    return taken.astype(np.int64)


_GREEDY = None


def _greedy_kernel():
    """The compiled greedy pass of :func:`diverse_first` (numba, compiled on first use)."""
    global _GREEDY
    if _GREEDY is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def greedy(b, limit, t):
            taken = np.empty(limit, np.int64)
            n_taken = 0
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            for i in range(b.shape[0]):
                if n_taken == limit:
                    break
                free = True
                for jj in range(n_taken - 1, -1, -1):  # the latest taken first: near in rank, likelier to overlap
                    j = taken[jj]
                    iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                    if iw <= 0:
                        continue
                    ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                    if ih <= 0:
                        continue
                    inter = iw * ih
                    if inter > t * (area[i] + area[j] - inter):
                        free = False
                        break
                if free:
                    taken[n_taken] = i
                    n_taken += 1
            return taken[:n_taken].copy()

        _GREEDY = greedy
    return _GREEDY


def _centre_size(b: np.ndarray, eps: float = 1e-6):
    w = b[:, 2] - b[:, 0] + eps
    h = b[:, 3] - b[:, 1] + eps
    return b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h, w, h


# Box-delta outputs of a network are these times its learnt targets (Fast R-CNN's BBOX_NORMALIZE_STDS: the targets
# are divided by them in training so that the four have similar size).
BOX_STDS = np.array([0.1, 0.1, 0.2, 0.2], np.float32)


def encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """R-CNN regression targets ``(dx, dy, dw, dh)`` taking ``proposals`` to ``gt`` (both ``(N, 4)``)."""
    px, py, pw, ph = _centre_size(np.asarray(proposals, np.float64))
    gx, gy, gw, gh = _centre_size(np.asarray(gt, np.float64))
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def decode(proposals: np.ndarray, deltas: np.ndarray, max_log: float = np.log(1000.0 / 16)) -> np.ndarray:
    """Inverse of :func:`encode`: apply ``(N, 4)`` deltas to ``(N, 4)`` boxes -> ``(N, 4)`` float32."""
    px, py, pw, ph = _centre_size(np.asarray(proposals, np.float64))
    d = np.asarray(deltas, np.float64).reshape(-1, 4)
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    w = pw * np.exp(np.minimum(d[:, 2], max_log))
    h = ph * np.exp(np.minimum(d[:, 3], max_log))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1).astype(np.float32)


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """xyxy boxes of an image ``width`` wide, mirrored left-right (continuous coordinates)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)


def soft_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, floor: float,
             limit: int = 0, power: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS (Bodla et al., 2017): greedily the best box is kept, and every box overlapping it by
    IoU > ``iou_threshold`` has its score lowered instead of being dropped, by the factor ``(1 - IoU) ** power``
    (1: the paper's linear rule; 2: quadratic, every such box lowered further, near-duplicates most: at IoU 0.7
    9% of the height is left instead of 30%) applied to its height above ``floor`` (scores are SVM margins or
    probabilities above a threshold: the decay acts on ``score - floor``, which must be >= 0). Boxes decayed to
    ``floor`` are dropped.
    Returns ``(indices, scores)`` in the order kept, scores descending; ``limit`` > 0 stops after that many."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h = np.asarray(scores, np.float64).reshape(-1) - floor
    if (h < 0).any():
        raise ValueError(f"soft_nms: every score must be >= floor {floor}")
    idx = np.arange(len(b))
    keep, kept = [], []
    while len(idx) and (limit <= 0 or len(keep) < limit):
        j = int(np.argmax(h))
        keep.append(idx[j])
        kept.append(h[j])
        rest = np.arange(len(idx)) != j
        iou = iou_matrix(b[j:j + 1], b[rest])[0]
        idx, b, h = idx[rest], b[rest], h[rest] * np.where(iou > iou_threshold, (1.0 - iou) ** power, 1.0)
        live = h > 0
        idx, b, h = idx[live], b[live], h[live]
    return np.asarray(keep, np.int64), (np.asarray(kept) + floor).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3) -> np.ndarray:
    """Indices kept by greedy NMS (suppress IoU > threshold), highest score first."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros((0,), np.int64)
    import torch  # on use: selective search imports this module, and Predictor loads that before torch
    from torchvision.ops import nms as tv_nms

    keep = tv_nms(torch.from_numpy(b), torch.from_numpy(np.asarray(scores, np.float32)), float(iou_threshold))
    return keep.numpy().astype(np.int64)
