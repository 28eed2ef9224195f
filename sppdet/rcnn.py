"""R-CNN mode (Girshick et al. 2014) as a trainable baseline on sppdet's trunk, proposals, SVM trainer and box
regressors: each window is cropped with 16 pixels of context (in the warped frame), warped to a fixed square and
pushed through the conv layers on its own; its pool5 vector is the conv map pooled by the same pyramid as SPP-net's
(so both routes' features have one size and the same SVM and regressor trainers serve them).

What R-CNN's route costs is the point: a full trunk forward per window instead of one per image. On a CPU that is
too slow for every window of every image, so ``rcnn.max_windows`` caps the windows per image (selective search's
ranking order: the first ones), for training and testing alike; the SPP-net route scores every window.
"""

from __future__ import annotations

import time
from typing import Sequence

import cv2
import numpy as np
import torch

from .spp import SpatialPyramidPooling

__all__ = ["warp_windows", "rcnn_features"]


def warp_windows(rgb: np.ndarray, boxes: np.ndarray, size: int, context: int = 16) -> np.ndarray:
    """``(R, size, size, 3)`` uint8: each box grown by ``context`` pixels of the warped frame on every side (R-CNN's
    padding: ``context * w / (size - 2 * context)`` image pixels), clipped to the image, warped (bilinear)."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    h, w = rgb.shape[:2]
    inner = max(size - 2 * context, 1)
    for j, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        px, py = context * (x2 - x1) / inner, context * (y2 - y1) / inner
        a, b = int(max(0, np.floor(x1 - px))), int(max(0, np.floor(y1 - py)))
        c, d = int(min(w, np.ceil(x2 + px))), int(min(h, np.ceil(y2 + py)))
        out[j] = cv2.resize(rgb[b:max(d, b + 1), a:max(c, a + 1)], (size, size), interpolation=cv2.INTER_LINEAR)
    return out


@torch.no_grad()
def rcnn_features(backbone, rgb: np.ndarray, boxes: np.ndarray, size: int, levels: Sequence[int],
                  batch: int = 64, deep: tuple[int, Sequence[int]] | None = None) -> tuple[np.ndarray, dict]:
    """R-CNN's pool5 of each window: ``(R, C * sum(n*n))`` float32 and the seconds spent warping and in the
    trunk (``{"warp", "conv"}``); ``deep``: a hypercolumn's coarse channels' own pyramid."""
    spp = SpatialPyramidPooling(levels, deep=deep)
    t0 = time.perf_counter()
    crops = warp_windows(rgb, boxes, size)
    t1 = time.perf_counter()
    out = []
    for i in range(0, len(crops), batch):
        x = torch.from_numpy(crops[i:i + batch]).permute(0, 3, 1, 2).float()
        y = backbone(backbone.normalize(x).contiguous(memory_format=torch.channels_last))
        out.append(spp(y.float()))
    feats = torch.cat(out).numpy() if out else np.zeros((0, spp.output_dim(backbone.out_channels)), np.float32)
    return feats, {"warp": t1 - t0, "conv": time.perf_counter() - t1}
