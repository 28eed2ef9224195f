"""Feature stage: conv5 once per image (one or more scales), cached; SPP pooling on read.

What is cached per image is the conv5 map at each scale as float16 (as the authors did:
they cached ``rsp{scale}`` and pooled on load). Pooled 12,800-d vectors for 2000 windows
would be ~100 MB per image. :class:`FeatureCache` gives, for an image and any boxes, the
pooled features, without loading a split into memory.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from .backbones import Backbone
from .boxes import flip_boxes
from .models import autocast
from .spp import check_deep, project_boxes_to_cells, spp_output_dim
from .window_pool import pool_windows
from .store import ShardError, atomic_save_npz, load_npz

log = logging.getLogger(__name__)

__all__ = [
    "POOLING_KEYS",
    "pooling_settings",
    "resize_factor",
    "prepare_image",
    "conv5_maps",
    "choose_scale",
    "auto_scale",
    "median_extent",
    "object_extents",
    "pool_boxes",
    "group_windows",
    "ImageFeatures",
    "FeatureCache",
    "weights_fingerprint",
    "FIVE_SCALES",
]

FIVE_SCALES = (480, 576, 688, 864, 1200)  # paper; the authors' code used 874 instead of 864

# The ``features`` keys that say how windows are pooled from the cached maps, not what the maps are: the conv5
# cache does not record them (changing one reuses the cache), the stages that pool from it do
# (:func:`pooling_settings`), so their outputs go stale instead.
POOLING_KEYS = ("levels", "deep_levels", "shrink", "target_size")


def pooling_settings(features) -> dict:
    """The pooling keys' values of a ``features`` config section (JSON-able), as a pooling stage records them."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in ((k, getattr(features, k)) for k in POOLING_KEYS)}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes (16 hex digits)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resize_factor(height: int, width: int, scale: int, max_size: int) -> float:
    """Factor that makes the shorter side ``scale`` (longer side capped at ``max_size``)."""
    f = scale / float(min(height, width))
    if max_size and max(height, width) * f > max_size:
        f = max_size / float(max(height, width))
    return f


def prepare_image(rgb: np.ndarray, factor: float, min_side: int) -> np.ndarray:
    """Resize an RGB uint8 image by ``factor`` (bilinear, no crop, no warp); an image
    smaller than the network's minimum input is padded (bottom/right, edge colour)."""
    h, w = rgb.shape[:2]
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    out = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else rgb
    if nh < min_side or nw < min_side:
        out = cv2.copyMakeBorder(out, 0, max(0, min_side - nh), 0, max(0, min_side - nw), cv2.BORDER_REPLICATE)
    return out


@torch.no_grad()
def conv5_maps(backbone: Backbone, rgb: np.ndarray, scales: Sequence[int], max_size: int,
               device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[list[torch.Tensor], list[float]]:
    """One forward per scale. Returns ``([(C, h, w) float32 on device], [factor per scale])``;
    ``precision`` ``"bf16"`` runs the convolutions under bfloat16 autocast (resolved, not ``"auto"``).

    The input is channels-last: oneDNN's convolutions are then 1.3x (ZF-5) to 2x (the demo's
    narrow ZF-5) faster on CPU, same arithmetic up to summation order. The maps come back in that
    layout (strides of an (h, w, C) array), which is the layout the sparse-table pooling reads."""
    maps, factors = [], []
    h, w = rgb.shape[:2]
    for s in scales:
        f = resize_factor(h, w, s, max_size)
        im = prepare_image(rgb, f, backbone.min_input_size)
        x = torch.from_numpy(np.ascontiguousarray(im)).to(device).permute(2, 0, 1)[None].float()
        with autocast(device, precision):
            y = backbone(backbone.normalize(x).contiguous(memory_format=torch.channels_last))[0]
        maps.append(y.float())
        factors.append(f)
    return maps, factors


def choose_scale(boxes: np.ndarray, factors: Sequence[float], target_size: float) -> np.ndarray:
    """Per box, the scale whose resized window side ``sqrt(area) * factor`` is closest to
    ``target_size`` (authors: 208 = 13 x 16; paper: 224), chosen in scale space like
    ``spm_expected_scale.m``. Returns ``(R,)`` int64 scale indices."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    f = np.asarray(factors, np.float64)
    if len(f) == 1 or len(b) == 0:
        return np.zeros(len(b), np.int64)
    side = np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0))
    expected = target_size / side
    return np.argmin(np.abs(f[None, :] - expected[:, None]), axis=1).astype(np.int64)


def median_extent(extents: np.ndarray) -> float:
    """The median of :func:`object_extents` over the objects with a positive area (NaN when there are none)."""
    e = np.asarray(extents, np.float64)
    e = e[np.isfinite(e) & (e > 0)]
    return float(np.median(e)) if len(e) else float("nan")


def auto_scale(extents: np.ndarray, object_px: float, candidates: Sequence[int]) -> int:
    """``features.scales: auto``: of ``candidates`` (shorter image sides, px), the one at which the median training
    object's side (the square root of its box's area) is nearest, as a ratio, to ``object_px``: the paper's rule
    for choosing each window's scale among five (:func:`choose_scale`), applied once to the median object.
    ``extents``: each object's side over its image's shorter side (:func:`object_extents`); none: the largest."""
    c = np.asarray(sorted(candidates), np.float64)
    med = median_extent(extents)
    if np.isnan(med):
        return int(c[-1])
    return int(c[np.argmin(np.abs(np.log(c * med / object_px)))])


def object_extents(ds) -> np.ndarray:
    """Per object of a dataset split (difficult ones left out, as evaluation leaves them out): the square root of
    its box's area over its image's shorter side, the size a scale makes ``scale`` times that in pixels."""
    out = []
    for i in ds.ids:
        a = ds.annotation(i)
        b = np.asarray(a.boxes, np.float64).reshape(-1, 4)[~np.asarray(a.difficult, bool)]
        area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
        out.append(np.sqrt(area) / float(min(a.width, a.height)))
    return np.concatenate(out) if out else np.zeros(0)


def pool_boxes(maps: Sequence[torch.Tensor], factors: Sequence[float], boxes: np.ndarray, scale_idx: np.ndarray,
               stride: float, center0: float, levels: Sequence[int], shrink: float,
               method: str = "sparse_table", out: torch.Tensor | None = None,
               deep: tuple[int, Sequence[int]] | None = None) -> torch.Tensor:
    """SPP features ``(R, C * sum(n*n))`` float32 of original-image ``boxes`` (R, 4) xyxy,
    each pooled from the map of its scale, all scales in one call (``method``, ``out``, ``deep``: see
    :func:`sppdet.window_pool.pool_windows`)."""
    sidx, cells = box_cells([m.shape[-2:] for m in maps], factors, boxes, scale_idx, stride, center0, shrink)
    return pool_windows(maps, cells, levels, method=method, map_index=torch.as_tensor(sidx), out=out, deep=deep)


def box_cells(map_sizes: Sequence[tuple[int, int]], factors: Sequence[float], boxes: np.ndarray,
              scale_idx: np.ndarray, stride: float, center0: float, shrink: float) -> tuple[np.ndarray, torch.Tensor]:
    """``(scale_idx (R,), cells (R, 4) int64)``: each original-image box projected onto the conv5
    map of its scale (inclusive ``(l, t, r, b)`` cells, :func:`sppdet.spp.project_boxes_to_cells`)."""
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    sidx = np.asarray(scale_idx, np.int64).reshape(-1)
    if len(sidx) != len(b) or (len(sidx) and (sidx.min() < 0 or sidx.max() >= len(map_sizes))):
        raise ValueError(f"scale_idx must give one scale in [0, {len(map_sizes)}) per box")
    cells = torch.empty((len(b), 4), dtype=torch.int64)
    for s in np.unique(sidx):
        sel = torch.as_tensor(np.nonzero(sidx == s)[0])
        cells[sel] = project_boxes_to_cells(b[sel] * factors[s], tuple(map_sizes[s]), stride, center0, shrink)
    return sidx, cells


@dataclass
class ImageFeatures:
    """Cached conv5 maps of one image: ``maps[s]`` (C, h, w), ``factors[s]``, image size."""

    maps: list[torch.Tensor]
    factors: list[float]
    height: int
    width: int
    flipped_maps: list[torch.Tensor] | None = None

    def mirrored(self) -> "ImageFeatures":
        """The mirrored image's features as an image of their own (its boxes: :func:`flip_boxes`)."""
        if self.flipped_maps is None:
            raise ValueError("these features were loaded without the flipped image's maps")
        return ImageFeatures(self.flipped_maps, self.factors, self.height, self.width, self.maps)


def _channels_last(m: torch.Tensor) -> torch.Tensor:
    """A ``(C, H, W)`` map with the channels innermost in memory (the same shape and values)."""
    return m.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class FeatureCache:
    """Reader (and writer) of ``<dir>/<id>.npz``: ``conv_<s>`` float16 (C, h, w), ``factors``,
    ``size`` (H, W); optionally ``flip_conv_<s>`` for the horizontally flipped image."""

    def __init__(self, directory: str | Path, stride: float, center0: float, levels: Sequence[int] = (6, 3, 2, 1),
                 shrink: float = 6.5, target_size: float = 208.0, deep: tuple[int, Sequence[int]] | None = None):
        self.dir = Path(directory)
        self.stride, self.center0 = float(stride), float(center0)
        self.levels, self.shrink, self.target_size = tuple(levels), float(shrink), float(target_size)
        self.deep = check_deep(deep)  # (first channel, levels) of a hypercolumn's coarse channels, or None

    def feature_dim(self, channels: int) -> int:
        """Length of a pooled window of ``channels``-channel maps."""
        return spp_output_dim(channels, self.levels, self.deep)

    @classmethod
    def from_manifest(cls, directory: str | Path, features,
                      deep: tuple[int, Sequence[int]] | None = None) -> "FeatureCache":
        """A finished cache, read with its manifest's geometry and pooled with ``features``' pooling settings
        (:data:`POOLING_KEYS`: those now in force, which the cache does not record) and ``deep`` (a hypercolumn's
        coarse channels' pyramid, ``Run.pool_deep``)."""
        from .manifest import require_complete

        g = require_complete(directory, "features")["geometry"]
        return cls(directory, g["stride"], g["center0"], features.levels, features.shrink, features.target_size, deep)

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npz"

    @staticmethod
    def write(path: Path, maps: Sequence[torch.Tensor], factors: Sequence[float], size: tuple[int, int],
              flipped: Sequence[torch.Tensor] | None = None, dtype: str = "float16") -> int:
        arrays = {f"conv_{i}": m.detach().cpu().numpy().astype(dtype) for i, m in enumerate(maps)}
        if flipped is not None:
            arrays.update({f"flip_conv_{i}": m.detach().cpu().numpy().astype(dtype) for i, m in enumerate(flipped)})
        arrays["factors"] = np.asarray(factors, np.float64)
        arrays["size"] = np.asarray(size, np.int32)
        return atomic_save_npz(path, **arrays)

    def load(self, image_id: str, device: str | torch.device = "cpu", flipped: bool = False,
             mirror_maps: bool = False) -> ImageFeatures:
        """An image's maps; ``flipped``: also the flipped image's, where the shard has them (only
        fine-tuning uses them, and they are as large as the maps themselves), or with ``mirror_maps`` the maps
        mirrored left-right (``finetune.flip_from: maps``: shards without the flipped image's maps)."""
        p = self.path(image_id)
        d = load_npz(p, ("factors", "size"),
                     skip=None if flipped and not mirror_maps else lambda k: k.startswith("flip_"))
        n = len(d["factors"])
        if any(f"conv_{i}" not in d for i in range(n)):
            raise ShardError(f"{p}: shard lacks a conv map for one of its {n} scales")
        # Kept in the stored dtype (max pooling runs on float16 maps directly: exact, half the traffic) and made
        # channels-last, the layout the pooling's tables are built in: one copy here rather than one per
        # pooling call (fine-tuning pools each training image ~100 times: 32 windows 7.3 -> 4.9 ms).
        maps = [_channels_last(torch.from_numpy(d[f"conv_{i}"]).to(device)) for i in range(n)]
        if flipped and mirror_maps:
            flipped = [_channels_last(m.flip(-1)) for m in maps]
        else:
            flipped = ([_channels_last(torch.from_numpy(d[f"flip_conv_{i}"]).to(device)) for i in range(n)]
                       if "flip_conv_0" in d else None)
        h, w = (int(v) for v in d["size"])
        return ImageFeatures(maps, [float(f) for f in d["factors"]], h, w, flipped)

    def pooled(self, feats: ImageFeatures | str, boxes: np.ndarray, flipped: bool = False,
               scale_idx: np.ndarray | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """SPP features ``(R, D)`` of ``boxes`` (R, 4) original-image xyxy.

        ``scale_idx`` overrides the per-box best scale (used for random-scale training);
        ``flipped`` pools from the flipped image's maps with mirrored boxes; ``out`` is written
        into when given (see :func:`sppdet.window_pool.pool_windows`). Pooled on the maps' device.
        """
        if isinstance(feats, str):
            feats = self.load(feats, flipped=flipped)
        return self.pooled_many([(feats, boxes, flipped, scale_idx)], out=out)

    def pooled_many(self, requests: Sequence[tuple[ImageFeatures, np.ndarray, bool, np.ndarray | None]],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`pooled` of several images' ``(feats, boxes, flipped, scale_idx)`` in one pooling call, their rows
        one after another in request order (a fine-tuning batch: one call for its 8 images instead of 8; on a GPU
        each call is a few dozen small kernels, so per-image calls would cost more than the pooling itself)."""
        if not requests:
            raise ValueError("pooled_many: no request")
        maps: list[torch.Tensor] = []
        sidx, cells = [], []
        for feats, boxes, flipped, scale_idx in requests:
            b, m = np.asarray(boxes, np.float32).reshape(-1, 4), feats.maps
            if flipped:
                if feats.flipped_maps is None:
                    raise ShardError(f"{self.dir}: features were cached without flipped maps (features.flip: true)")
                m, b = feats.flipped_maps, flip_boxes(b, feats.width)
            if scale_idx is None:
                scale_idx = choose_scale(b, feats.factors, self.target_size)
            s, c = box_cells([x.shape[-2:] for x in m], feats.factors, b, scale_idx, self.stride, self.center0,
                             self.shrink)
            sidx.append(s + len(maps))
            cells.append(c)
            maps.extend(m)
        return pool_windows(maps, torch.cat(cells), self.levels, map_index=torch.as_tensor(np.concatenate(sidx)),
                            out=out, deep=self.deep)

    def _cells(self, feats: ImageFeatures, boxes: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        return box_cells([m.shape[-2:] for m in feats.maps], feats.factors, b,
                         choose_scale(b, feats.factors, self.target_size), self.stride, self.center0, self.shrink)

    def window_groups(self, feats: ImageFeatures, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(first, group)``: ``boxes`` that fall on the same conv5 rectangle at the same (best) scale
        pool to identical features; ``first`` (G,) ascending holds the first window of each such group,
        ``group`` (R,) the group of every window (``boxes[first][group]`` pools like ``boxes``). The
        detector scores each group once; hard-negative mining keeps ``first`` (the authors' ``dedup``,
        their stand-in for the paper's "negatives overlapping another negative by more than 70% are
        removed")."""
        return group_windows(*self._cells(feats, boxes))

    def pooled_groups(self, feats: ImageFeatures, boxes: np.ndarray, out: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """``(pooled (G, D), first, group)``: SPP features of each group of ``boxes`` on one conv5
        rectangle and scale (:meth:`window_groups`), pooled once (row ``g`` is that of box ``first[g]``,
        row ``group[i]`` box ``i``'s). ``out`` (at least G rows) is written into when given."""
        sidx, cells = self._cells(feats, boxes)
        first, group = group_windows(sidx, cells)
        if out is not None:
            out = out[:len(first)]
        pooled = pool_windows(feats.maps, cells[torch.as_tensor(first)], self.levels,
                              map_index=torch.as_tensor(sidx[first]), out=out, deep=self.deep)
        return pooled, first, group


def group_windows(scale_idx: np.ndarray, cells: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, group)`` of windows given their scale (R,) and conv5 cells (R, 4): see
    :meth:`FeatureCache.window_groups`."""
    c = np.asarray(cells, np.int64).reshape(-1, 4)
    if not len(c):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = int(c.max()) + 1  # one integer key per (scale, l, t, r, b): a 1-d unique, far faster than axis=0
    key = np.asarray(scale_idx, np.int64).reshape(-1)
    for j in range(4):
        key = key * m + c[:, j]
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first)  # groups in the order of their first window
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order].astype(np.int64), rank[group.reshape(-1)].astype(np.int64)


def extract_image(backbone: Backbone, rgb: np.ndarray, scales: Sequence[int], max_size: int, flip: bool,
                  device: str | torch.device = "cpu", precision: str = "fp32"):
    """conv5 maps (and of the flipped image); returns ``(maps, factors, flipped_maps, seconds)``."""
    t0 = time.perf_counter()
    maps, factors = conv5_maps(backbone, rgb, scales, max_size, device, precision)
    flipped = (conv5_maps(backbone, np.ascontiguousarray(rgb[:, ::-1]), scales, max_size, device, precision)[0]
               if flip else None)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return maps, factors, flipped, time.perf_counter() - t0
