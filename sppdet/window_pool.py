"""SPP pooling of many windows of conv5 maps at once (the detector's inner loop): a sparse-table max pooling,
several times faster on CPU than ``torchvision.ops.roi_pool`` and equal to it bit for bit (tested), which stays
the reference and the differentiable path; average pooling by summed-area table."""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

from .bin_max import direct_bins_max, direct_is_cheaper
from .spp import _check_levels, check_deep, spp_output_dim

__all__ = ["pool_windows", "release_workspace"]


def _edges(lo: torch.Tensor, size: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, n)`` half-open bin edges ``lo + [floor(i*size/n), ceil((i+1)*size/n))`` (integer arithmetic)."""
    i = torch.arange(n, device=lo.device)
    start = lo[:, None] + torch.div(i[None] * size[:, None], n, rounding_mode="floor")
    end = lo[:, None] - torch.div(-(i[None] + 1) * size[:, None], n, rounding_mode="floor")
    return start, end


def _avg_pool_windows(fmap: torch.Tensor, cells: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Average pooling of integer windows through a summed-area table (vectorised)."""
    c, h, w = fmap.shape
    sat = F.pad(fmap.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, H+1, W+1)
    l, t, r, b = cells.unbind(1)
    ww, hh = r - l + 1, b - t + 1
    outs = []
    for n in levels:
        x0, x1 = _edges(l, ww, n)
        y0, y1 = _edges(t, hh, n)
        # (R, n_y, n_x) corner indices
        Y0, X0 = y0[:, :, None].expand(-1, n, n), x0[:, None, :].expand(-1, n, n)
        Y1, X1 = y1[:, :, None].expand(-1, n, n), x1[:, None, :].expand(-1, n, n)
        s = sat[:, Y1, X1] - sat[:, Y0, X1] - sat[:, Y1, X0] + sat[:, Y0, X0]  # (C, R, n, n)
        area = ((Y1 - Y0) * (X1 - X0)).to(torch.float64)
        outs.append((s / area).permute(1, 0, 2, 3).reshape(cells.shape[0], -1))
    return torch.cat(outs, dim=1).to(fmap.dtype)


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """``floor(log2(v))`` of positive integers, exactly (no float rounding)."""
    out = torch.zeros_like(v)
    p = 1
    while True:
        more = v >= 2 * p
        if not bool(more.any()):
            return out
        out += more.to(out.dtype)
        p *= 2


class _Workspace(threading.local):
    """Scratch buffers of the sparse-table pooling, kept between calls (one set per thread).

    Pooling 2000 windows gathers ~4 x 37 MB per image; fresh buffers of that size come from
    ``mmap`` and every call paid their page faults (measured: a 37 MB ``index_select`` into a
    fresh tensor took 10x as long as into a reused one). Buffers only grow; :func:`release_workspace`
    frees them."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        b = self.bufs.get(key)
        if b is None or b.numel() < numel:
            b = self.bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel].view(shape)


_WS = _Workspace()


def release_workspace() -> None:
    """Free the pooling scratch buffers of the calling thread."""
    _WS.bufs.clear()


def _table_layout(maps: Sequence[torch.Tensor], needed: list[int], na: int, nb: int):
    """Row offset and width of every needed sparse table (key ``(map * na + a) * nb + b``) in one stacked
    buffer, its total rows, and per map the row exponents -> column exponents needed."""
    off = torch.zeros(len(maps) * na * nb, dtype=torch.int64)
    width = torch.zeros_like(off)
    total = 0
    by_map: dict[int, dict[int, set[int]]] = {}
    for k in needed:
        s, a, bb = k // (na * nb), (k // nb) % na, k % nb
        h, w = maps[s].shape[-2:]
        off[k], width[k] = total, w - (1 << bb) + 1
        total += (h - (1 << a) + 1) * (w - (1 << bb) + 1)
        by_map.setdefault(s, {}).setdefault(a, set()).add(bb)
    return off, width, total, by_map


def _fill_tables(maps: Sequence[torch.Tensor], table: torch.Tensor, off: torch.Tensor, width: torch.Tensor,
                 by_map: dict, na: int, nb: int) -> None:
    """Write each needed table (blocks ``2^a x 2^b``) into its rows of ``table`` by repeated pairwise maxima."""
    c = table.shape[1]
    for s, want in by_map.items():
        rows = maps[s].permute(1, 2, 0).contiguous()  # (H, W, C); free for a channels-last map
        for a in range(max(want) + 1):
            if a:
                h = 1 << (a - 1)
                rows = torch.maximum(rows[:-h], rows[h:])  # blocks 2^a rows high
            if a not in want:
                continue
            tab = rows
            for bb in range(max(want[a]) + 1):
                k = (s * na + a) * nb + bb
                o, wt = int(off[k]), int(width[k])
                dst = table[o:o + tab.shape[0] * wt].view(tab.shape[0], wt, c) if bb in want[a] else None
                if bb:
                    h = 1 << (bb - 1)
                    tab = torch.maximum(tab[:, :-h], tab[:, h:], out=dst)  # straight into the stack when needed
                elif dst is not None:
                    dst.copy_(tab)


def _sparse_table_max(maps: Sequence[torch.Tensor], cells: torch.Tensor, map_index: torch.Tensor, n: int,
                      name: str) -> torch.Tensor:
    """Max over the ``n x n`` floor/ceil bins of every window: ``(R, n, n, C)``, in the workspace
    buffer ``name``.

    A 2-D sparse table (range-maximum query): ``T[a][b][y, x]`` is the max over the
    ``2^a x 2^b`` block at ``(y, x)``; the max over a bin is the max of four such blocks
    anchored at its corners (they overlap, which max does not mind). Building a table
    costs an elementwise maximum over the map; each bin then costs four contiguous
    C-vector reads, independent of its area, where a direct pool reads every cell of
    every bin.

    One exponent per window and axis serves all its bins: floor/ceil bins of one window
    differ in size by at most one cell, so with ``a = floor(log2(smallest bin))`` two
    blocks of ``2^a`` (``2^(a+1) >= smallest + 1 >= largest``) cover every bin. Only the
    tables some window needs are kept, for all maps (scales) together, stacked in one
    ``(rows, C)`` buffer; every bin's four corners are row indices into it, so one gather
    per corner serves all windows of all scales, in window order (no grouping, no scatter).
    """
    c = maps[0].shape[0]
    dev, dt = maps[0].device, maps[0].dtype
    r = cells.shape[0]
    l, t, rr, b = cells.unbind(1)
    y0, y1 = _edges(t, b - t + 1, n)  # (R, n)
    x0, x1 = _edges(l, rr - l + 1, n)
    ka = _floor_log2((y1 - y0).min(1).values)  # (R,) block exponents per window
    kb = _floor_log2((x1 - x0).min(1).values)
    na, nb = int(ka.max()) + 1, int(kb.max()) + 1
    key = (map_index * na + ka) * nb + kb
    off, width, total, by_map = _table_layout(maps, torch.unique(key).tolist(), na, nb)
    table = _WS.get("table", (total, c), dt, dev)
    _fill_tables(maps, table, off, width, by_map, na, nb)
    # Per window, per bin: the two anchor rows and columns, as rows of the stacked buffer.
    o, wt = off.to(dev)[key], width.to(dev)[key]
    ya = o[:, None] + y0 * wt[:, None]  # (R, n)
    yb = o[:, None] + (y1 - (1 << ka)[:, None]) * wt[:, None]
    xa, xb = x0, x1 - (1 << kb)[:, None]
    vals = _WS.get(name, (r * n * n, c), dt, dev)
    tmp = _WS.get("tmp", (r * n * n, c), dt, dev)
    first = True
    for ry in (ya, yb):
        for cx in (xa, xb):
            idx = (ry[:, :, None] + cx[:, None, :]).reshape(-1)
            torch.index_select(table, 0, idx, out=vals if first else tmp)
            if not first:
                torch.maximum(vals, tmp, out=vals)
            first = False
    return vals.view(r, n, n, c)


def _group_max(p: torch.Tensor, n: int, g: int, name: str) -> torch.Tensor:
    """``(R, n*g, n*g, C) -> (R, n, n, C)``: max over each ``g x g`` group of bins, by pairwise
    maxima over slices into workspace buffers (a reduction over two strided middle dims is several
    times slower), or for groups wider than 2 by a channels-last max pool."""
    r, c = p.shape[0], p.shape[-1]
    if g != 2:  # oneDNN/ATen's channels-last max pool is faster here (3x3 groups: 3.6 vs 6.6 ms for 2000 windows)
        return F.max_pool2d(p.permute(0, 3, 1, 2), g, g).permute(0, 2, 3, 1)
    v = p.view(r, n, g, n, g, c)
    m = _WS.get(name + "_cols", (r, n, n * g, c), p.dtype, p.device).view(r, n, g, n, c)
    torch.maximum(v[:, :, :, :, 0], v[:, :, :, :, 1], out=m)  # g == 2 here
    out = _WS.get(name, (r, n, n, c), p.dtype, p.device)
    torch.maximum(m[:, :, 0], m[:, :, 1], out=out)
    return out


def _max_pool_windows(maps: Sequence[torch.Tensor], cells: torch.Tensor, map_index: torch.Tensor,
                      levels: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Max pooling of integer windows, computed in the maps' dtype (max is exact in any
    dtype, so a float16 map gives the float32 result bit for bit at half the memory traffic).

    The finest level by sparse table, or for a few windows by reading their cells (:mod:`sppdet.bin_max`,
    whichever costs less); every other level from the smallest finer level it
    divides (with floor/ceil bins, bin ``j`` of level ``n`` is exactly the union of bins
    ``j*g .. j*g+g-1`` of level ``n*g``): {6,3,2,1} needs one sparse-table query, then
    3 and 2 from 6 and 1 from 2. Levels that divide no finer one get their own query.
    Written straight into ``out``'s float32 ``(C, n, n)``-per-level layout."""
    r, c = cells.shape[0], maps[0].shape[0]
    order = sorted(set(levels), reverse=True)
    source = {n: min((m for m in order[:i] if m % n == 0), default=None) for i, n in enumerate(order)}
    queried = [n for n in order if source[n] is None]
    done: dict[int, torch.Tensor] = {}
    if direct_is_cheaper(maps, cells, map_index):  # a few windows (fine-tuning's): read their cells, keyed once
        outs = [_WS.get(f"level{n}", (r, n, n, c), maps[0].dtype, maps[0].device) for n in queried]
        done.update(zip(queried, direct_bins_max(maps, cells, map_index, queried, outs)))
    for n in order:
        if source[n] is not None:
            done[n] = _group_max(done[source[n]], n, source[n] // n, f"level{n}")
        elif n not in done:
            done[n] = _sparse_table_max(maps, cells, map_index, n, f"level{n}")
    off = 0
    for n in levels:
        out[:, off:off + c * n * n].view(r, c, n, n).copy_(done[n].permute(0, 3, 1, 2))
        off += c * n * n
    return out


def _pool_one_map(fmap: torch.Tensor, cells: torch.Tensor, levels: Sequence[int], mode: str) -> torch.Tensor:
    """The reference paths on one float32 map: roi_pool per level (max) or summed-area table (avg)."""
    if mode == "avg":
        return _avg_pool_windows(fmap, cells, levels)
    r = cells.shape[0]
    rois = torch.cat([fmap.new_zeros((r, 1)), cells.to(fmap.dtype)], dim=1)
    x = fmap.unsqueeze(0)
    return torch.cat([roi_pool(x, rois, output_size=(n, n), spatial_scale=1.0).reshape(r, -1) for n in levels], dim=1)


def _output(out: torch.Tensor | None, r: int, dim: int, device) -> torch.Tensor:
    """The caller's ``out`` checked, or a new ``(r, dim)`` float32 tensor."""
    if out is None:
        return torch.empty((r, dim), dtype=torch.float32, device=device)
    if out.shape != (r, dim) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(r, dim)}, got {out.dtype} {tuple(out.shape)}")
    return out


def _checked(fmap, cells: torch.Tensor, levels: tuple[int, ...], mode: str, method: str,
             map_index: torch.Tensor | None, out: torch.Tensor | None):
    """:func:`pool_windows`' inputs checked and normalised: ``(maps, cells, map_index, out, fast)``."""
    maps = [fmap] if isinstance(fmap, torch.Tensor) else list(fmap)
    if not maps or any(m.dim() != 3 for m in maps):
        raise ValueError(f"pool_windows expects (C, H, W) maps, got shapes {[tuple(m.shape) for m in maps]}")
    if len({(m.shape[0], m.dtype, m.device) for m in maps}) > 1:
        raise ValueError("pool_windows: all maps need the same channels, dtype and device")
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    if method not in ("sparse_table", "roi_pool"):
        raise ValueError(f"method must be 'sparse_table' or 'roi_pool', got {method!r}")
    fast = mode == "max" and method == "sparse_table"
    if not (fast and maps[0].dtype in (torch.float16, torch.bfloat16)):
        maps = [m.float() for m in maps]
    dev = maps[0].device
    cells = cells.to(device=dev, dtype=torch.int64).reshape(-1, 4)
    r, dim = cells.shape[0], spp_output_dim(maps[0].shape[0], levels)
    if map_index is None:
        if len(maps) > 1:
            raise ValueError("pool_windows: map_index is needed with more than one map")
        map_index = torch.zeros(r, dtype=torch.int64, device=dev)
    map_index = torch.as_tensor(map_index, dtype=torch.int64).to(dev).reshape(-1)
    if len(map_index) != r or (r and (int(map_index.min()) < 0 or int(map_index.max()) >= len(maps))):
        raise ValueError(f"map_index must give one map in [0, {len(maps)}) per window")
    out = _output(out, r, dim, dev)
    if r == 0:
        return maps, cells, map_index, out, fast
    sizes = torch.tensor([list(m.shape[-2:]) for m in maps], device=dev)[map_index]  # (R, 2): H, W
    l, t, rr, b = cells.unbind(1)
    if bool(((l < 0) | (t < 0) | (rr >= sizes[:, 1]) | (b >= sizes[:, 0]) | (rr < l) | (b < t)).any()):
        shapes = ", ".join(f"{m.shape[-2]}x{m.shape[-1]}" for m in maps)
        raise ValueError(f"cell windows must satisfy 0 <= l <= r < W and 0 <= t <= b < H of their map ({shapes})")
    return maps, cells, map_index, out, fast


def pool_windows(
    fmap: torch.Tensor | Sequence[torch.Tensor], cells: torch.Tensor, levels: Sequence[int] = (6, 3, 2, 1),
    mode: str = "max", method: str = "sparse_table", map_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None, deep: tuple[int, Sequence[int]] | None = None,
) -> torch.Tensor:
    """SPP-pool many integer cell windows of one or more feature maps in one vectorised call.

    Equal to ``SpatialPyramidPooling(levels, mode)`` applied to each crop
    ``fmap[:, t:b+1, l:r+1]`` (tested). Max mode: ``method="sparse_table"`` (default;
    see :func:`_sparse_table_max`, several times faster on CPU) or ``"roi_pool"``
    (``torchvision.ops.roi_pool`` per level with ``spatial_scale=1`` on the integer window,
    which computes exactly the floor/ceil bins; the reference). Avg mode: summed-area table.

    Args:
        fmap: a ``(C, H, W)`` feature map, or a list of them (one per scale; same ``C``, dtype and
            device), float32 or float16 (the cache's dtype; max pooling by sparse table runs in
            float16 then, exactly, at half the memory traffic; the rest in float32). Any memory
            layout; channels-last maps are read without a copy.
        cells: ``(R, 4)`` int64 inclusive ``(l, t, r, b)`` from :func:`project_boxes_to_cells`,
            inside the map of each window.
        levels: pyramid levels.
        mode: ``"max"`` or ``"avg"``.
        method: max-mode algorithm, ``"sparse_table"`` or ``"roi_pool"``.
        map_index: ``(R,)`` which map each window lies in (needed with a list of maps).
        out: an ``(R, C * sum(n*n))`` float32 tensor to write into (e.g. one buffer reused per image,
            which saves the page faults of a fresh 100 MB output); a new one when None.
        deep: ``(first, levels)``: channels ``first`` onwards pooled with a pyramid of their own, written
            after the first channels' bins (:class:`~sppdet.spp.SpatialPyramidPooling`'s ``deep``).

    Returns:
        ``(R, spp_output_dim(C, levels, deep))`` float32 (``out`` when given).
    """
    levels = _check_levels(levels)
    if deep is not None:
        return _pool_deep(fmap, cells, levels, mode, method, map_index, out, deep)
    maps, cells, map_index, out, fast = _checked(fmap, cells, levels, mode, method, map_index, out)
    if cells.shape[0] == 0:
        return out
    if fast:
        return _max_pool_windows(maps, cells, map_index, levels, out)
    for s, m in enumerate(maps):
        sel = torch.nonzero(map_index == s).reshape(-1)
        if len(sel) == cells.shape[0]:
            out.copy_(_pool_one_map(m, cells, levels, mode))
        elif len(sel):
            out[sel] = _pool_one_map(m, cells[sel], levels, mode)
    return out


def _pool_deep(fmap, cells: torch.Tensor, levels: tuple[int, ...], mode: str, method: str,
               map_index: torch.Tensor | None, out: torch.Tensor | None, deep) -> torch.Tensor:
    """:func:`pool_windows` with ``deep``: each channel group pooled straight into its columns of ``out``."""
    maps = [fmap] if isinstance(fmap, torch.Tensor) else list(fmap)
    if not maps or maps[0].dim() != 3:
        raise ValueError(f"pool_windows expects (C, H, W) maps, got shapes {[tuple(m.shape) for m in maps]}")
    c = maps[0].shape[0]
    first, deep_levels = check_deep(deep, c)
    r, dim = cells.reshape(-1, 4).shape[0], spp_output_dim(c, levels, (first, deep_levels))
    out = _output(out, r, dim, maps[0].device)
    d1 = spp_output_dim(first, levels)
    pool_windows([m[:first] for m in maps], cells, levels, mode, method, map_index, out[:, :d1])
    pool_windows([m[first:] for m in maps], cells, deep_levels, mode, method, map_index, out[:, d1:])
    return out
