"""conv5's channels projected onto their principal components before pooling (``backbone.project``).

A wide conv5 (Lite2's hypercolumn: 472 channels, pool5 23,600-d) makes every per-window cost large: the pooling,
the cache on disk, fc6 in fine-tuning, the SVMs on pool5, the box regressors. A fixed 1x1 projection onto the
first ``k`` principal components of the train split's conv5 vectors (mean removed) shrinks all of them by
``channels / k``. It is part of the trunk: every route (SPP-net, R-CNN, Fast R-CNN modes, detect.py) sees a
``k``-channel conv5, and the projection's numbers are in the trunk's weights' fingerprint, so caches made
without it (or with another) are stale.

Fitted once per run folder on conv5 vectors sampled from a few train images (:func:`fit_projection`), written to
``<run>/model/projection/projection.npz`` with a fingerprint of what it was fitted from (``source``).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Backbone, SpatialOp

__all__ = ["ProjectedBackbone", "fit_projection"]


class ProjectedBackbone(Backbone):
    """``trunk``'s conv5 minus ``mean`` (C,), times ``weight`` (k, C): a ``k``-channel conv5 on the same grid."""

    def __init__(self, trunk: Backbone, weight: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        weight, mean = torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(mean, dtype=torch.float32)
        if weight.dim() != 2 or weight.shape[1] != trunk.out_channels or mean.shape != (trunk.out_channels,):
            raise ValueError(f"a projection of {trunk.out_channels} channels needs weight (k, {trunk.out_channels}) "
                             f"and mean ({trunk.out_channels},), got {tuple(weight.shape)} and {tuple(mean.shape)}")
        self.trunk = trunk
        self.name, self.pixel_mean, self.pixel_std = trunk.name, trunk.pixel_mean, trunk.pixel_std
        self.out_channels = int(weight.shape[0])
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", -(weight @ mean))

    def spatial_layers(self) -> list[SpatialOp]:
        return self.trunk.spatial_layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        return F.conv2d(y, self.weight[:, :, None, None].to(y.dtype), self.bias.to(y.dtype))


def fit_projection(maps: Iterable[torch.Tensor], k: int, per_map: int = 2000, seed: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(weight (k, C), mean (C,), explained)``: the first ``k`` principal components of the conv5 vectors
    (channels at one cell) of ``maps`` (each (C, h, w)), up to ``per_map`` cells drawn from each, and the share of
    their variance those components hold. Each component's sign is fixed (its largest weight positive), so the
    same vectors give the same projection on any LAPACK."""
    rng = np.random.default_rng(seed)
    sample = []
    for m in maps:
        x = m.detach().float().cpu().numpy().reshape(m.shape[0], -1).T
        sample.append(x[np.sort(rng.choice(len(x), min(per_map, len(x)), replace=False))])
    if not sample:
        raise ValueError("no conv5 map to fit the projection on")
    x = np.concatenate(sample).astype(np.float64)
    c = x.shape[1]
    if not 0 < k < c:
        raise ValueError(f"backbone.project must be between 1 and conv5's {c - 1} channels, not {k}")
    if len(x) < c:
        raise ValueError(f"{len(x)} conv5 vectors sampled: too few to fit a projection of {c} channels")
    mean = x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    order = np.argsort(values)[::-1][:k]
    w = vectors[:, order].T
    w *= np.sign(w[np.arange(k), np.abs(w).argmax(1)])[:, None]
    explained = float(values[order].sum() / max(values.sum(), 1e-12))
    return w.astype(np.float32), mean.astype(np.float32), explained
