"""Spatial pyramid pooling: the layer, the article's (broken) window formula, and
window pooling for detection.

Bin convention (He et al., Appendix; the authors' ``spm_pool_caffe_mex.cpp``):
bin ``i`` of ``n`` over a side of length ``a`` spans ``[floor(i*a/n), ceil((i+1)*a/n))``.
This gives exactly ``n`` non-empty bins for every ``a >= 1`` (also ``a < n``, where
bins overlap) and is what ``adaptive_max_pool2d`` and ``torchvision.ops.roi_pool``
compute. Each level is flattened ``(C, n, n)`` and levels are concatenated in the
configured order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SpatialPyramidPooling",
    "paper_window_stride",
    "bin_edges",
    "spp_output_dim",
    "check_deep",
    "project_boxes_to_cells",
]


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"pyramid levels must be positive integers, got {levels!r}")
    return levels


def check_deep(deep, channels: int | None = None) -> tuple[int, tuple[int, ...]] | None:
    """``deep`` normalised: None, or ``(first, levels)``: the channels from ``first`` on (of ``channels``, when
    given) pooled with a pyramid of their own, ``levels``, after the channels before it."""
    if deep is None:
        return None
    first, levels = int(deep[0]), _check_levels(deep[1])
    if first < 1 or (channels is not None and first >= int(channels)):
        raise ValueError(f"deep channels must start inside the map (1 <= first < {channels}), got {first}")
    return first, levels


def spp_output_dim(channels: int, levels: Sequence[int], deep: tuple[int, Sequence[int]] | None = None) -> int:
    """Length of the SPP vector: ``channels * sum(n*n)`` (256 * 50 = 12,800 for {6,3,2,1}); with ``deep``
    (:func:`check_deep`), the first channels' with ``levels`` plus the rest's with their own levels."""
    deep = check_deep(deep, channels)
    if deep is None:
        return int(channels) * sum(n * n for n in _check_levels(levels))
    first, deep_levels = deep
    return spp_output_dim(first, levels) + spp_output_dim(int(channels) - first, deep_levels)


def bin_edges(a: int, n: int) -> list[tuple[int, int]]:
    """The ``n`` half-open bins ``[floor(i*a/n), ceil((i+1)*a/n))`` over a side of length ``a``."""
    if a < 1 or n < 1:
        raise ValueError(f"side a={a} and bins n={n} must both be >= 1")
    return [((i * a) // n, -((-(i + 1) * a) // n)) for i in range(n)]


def paper_window_stride(a: int, n: int) -> tuple[int, int, int]:
    """The article's pooling parameters for an ``a x a`` map and ``n x n`` output.

    Returns ``(win, stride, bins_produced)`` with ``win = ceil(a/n)``,
    ``stride = floor(a/n)`` and the number of bins per side that a plain (floor-mode,
    unpadded) pooling layer with that window and stride really produces:
    ``floor((a - win) / stride) + 1``. That is ``n`` only for some sizes:
    ``a=7, n=4`` gives 6, ``a=10, n=6`` gives 9 and for ``a < n`` the stride is 0, so
    no pooling layer can be built at all (``bins_produced`` is then 0).
    """
    if a < 1 or n < 1:
        raise ValueError(f"side a={a} and bins n={n} must both be >= 1")
    win = math.ceil(a / n)
    stride = a // n
    produced = (a - win) // stride + 1 if stride > 0 else 0
    return win, stride, produced


class SpatialPyramidPooling(nn.Module):
    """Pool a feature map of any size into a fixed-length vector.

    Input ``(N, C, H, W)`` with any ``H, W >= 1``; output ``(N, C * sum(n*n))``:
    for each level ``n`` (in the given order) an ``n x n`` grid of bins
    ``[floor(i*a/n), ceil((i+1)*a/n))`` per side, flattened ``(C, n, n)``.

    Args:
        levels: bins per side of each pyramid level, e.g. ``(4, 2, 1)`` (the article's
            illustration) or ``(6, 3, 2, 1)`` (the paper's detection pyramid).
        mode: ``"max"`` or ``"avg"``.
        deep: ``(first, levels)``: channels ``first`` onwards pooled with these levels instead, their bins
            after all of the first channels' (a hypercolumn's coarse channels: ``features.deep_levels``).
    """

    def __init__(self, levels: Sequence[int] = (4, 2, 1), mode: str = "max",
                 deep: tuple[int, Sequence[int]] | None = None):
        super().__init__()
        self.levels = _check_levels(levels)
        self.deep = check_deep(deep)
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        self.mode = mode
        self._pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d

    def output_dim(self, channels: int) -> int:
        return spp_output_dim(channels, self.levels, self.deep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SpatialPyramidPooling expects (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-1] < 1 or x.shape[-2] < 1:
            raise ValueError(f"feature map is empty: shape {tuple(x.shape)}")
        n = x.shape[0]
        groups = [(x, self.levels)]
        if self.deep is not None:
            first, deep_levels = check_deep(self.deep, x.shape[1])
            groups = [(x[:, :first], self.levels), (x[:, first:], deep_levels)]
        # adaptive pooling uses exactly the floor/ceil bins above (ATen start/end_index).
        return torch.cat([self._pool(g, lv).reshape(n, -1) for g, lvs in groups for lv in lvs], dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}" + (f", deep={self.deep}" if self.deep else "")


def project_boxes_to_cells(
    boxes: torch.Tensor,
    map_size: tuple[int, int],
    stride: float,
    center0: float,
    shrink: float = 6.5,
) -> torch.Tensor:
    """Project image-space windows onto inclusive integer cell windows of a feature map.

    The paper's rule (Appendix) generalised by the backbone's receptive-field geometry,
    as in the authors' ``spm_response_boxes``: the centre of feature cell ``j`` lies at
    pixel ``stride * j + center0`` (0-based pixel index). The left/top edge goes to the
    nearest cell whose centre is at or right of ``x1 + shrink``; the right/bottom edge to
    the nearest cell whose centre is at or left of the last pixel minus ``shrink``::

        l = floor((x1       - center0 + shrink) / stride + 0.5)
        r = ceil ((x2 - 1   - center0 - shrink) / stride - 0.5)

    (the authors' 1-based formulas with ``offset0 = center0 + 1`` and ``offset = shrink``).
    A window that collapses (``l > r``) becomes the single cell ``(l + r) // 2``; all
    cells are clamped inside the map.

    Args:
        boxes: ``(R, 4)`` float xyxy in the pixel frame of the (resized) image that was
            fed to the backbone, 0-based continuous (pixel i covers [i, i+1)).
        map_size: ``(H, W)`` of the feature map.
        stride: the backbone's total stride in pixels.
        center0: 0-based pixel index of the centre of cell 0.
        shrink: inward shrink in pixels (authors: 6.5 for ZF-5).

    Returns:
        ``(R, 4)`` int64 ``(l, t, r, b)``, inclusive cell indices, ``0 <= l <= r < W``.
    """
    h, w = int(map_size[0]), int(map_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"feature map size must be >= 1x1, got {map_size}")
    b = boxes.to(torch.float64).reshape(-1, 4)
    lo = torch.floor((b[:, :2] - center0 + shrink) / stride + 0.5)
    hi = torch.ceil((b[:, 2:] - 1.0 - center0 - shrink) / stride - 0.5)
    lo, hi = lo.to(torch.int64), hi.to(torch.int64)
    collapsed = lo > hi
    mid = torch.div(lo + hi, 2, rounding_mode="floor")
    lo = torch.where(collapsed, mid, lo)
    hi = torch.where(collapsed, mid, hi)
    limit = torch.tensor([w - 1, h - 1], dtype=torch.int64, device=b.device)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1)
