"""The max over each floor/ceil bin of windows, read cell by cell (compiled, numba): the pooling of fine-tuning's
mini-batches, where :mod:`sppdet.window_pool`'s sparse tables cost more to build than they save.

A sparse table costs an elementwise maximum over the whole map per block size, whatever the number of windows; a
direct read costs the windows' area. Measured on raccoon's Lite2 maps (472 channels, finest level 6x6, selective
search windows, 2 cores), tables / direct, ms per image: 64 windows (their area 6x the map's) 3.5 / 1.4; 512
(50x) 11.0 / 7.5; 2000 (190x) 37 / 31. Fine-tuning pools ~32 windows per image (8 images per step; ~9x the map,
its windows being larger). :func:`direct_is_cheaper` picks by the windows' total area, leaving the SVM and test
stages' 2000 windows per image (where the two are close) with the tables.

Exact: float16 and bfloat16 values are compared as 16-bit integer keys that order like the floats they encode
(sign-magnitude turned into two's complement: ``v ^ ((v >> 15) & 0x7FFF)``, its own inverse; one pass over the map,
then plain integer maxima, which the compiler vectorises), so every bin's maximum is one of its values, bit for
bit, where the tables give the same value (of -0.0 and +0.0 this keeps +0.0; conv maps hold no NaN).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["direct_bins_max", "direct_is_cheaper", "DIRECT_AREA_RATIO"]

# Direct reads while the windows' summed area (cells) is at most this many times the maps' area (measured faster
# up to 190x, by less as the area grows: see above).
DIRECT_AREA_RATIO = 64


def direct_is_cheaper(maps: Sequence[torch.Tensor], cells: torch.Tensor, map_index: torch.Tensor) -> bool:
    """Whether :func:`direct_bins_max` is the cheaper way to pool these windows (16-bit CPU maps only)."""
    m0 = maps[0]
    if m0.device.type != "cpu" or m0.dtype not in (torch.float16, torch.bfloat16):
        return False
    area = int(((cells[:, 2] - cells[:, 0] + 1) * (cells[:, 3] - cells[:, 1] + 1)).sum())
    used = torch.unique(map_index).tolist()
    return area <= DIRECT_AREA_RATIO * sum(int(maps[s].shape[-2] * maps[s].shape[-1]) for s in used)


def _kernels():
    import numba  # imported on first use: a process that never pools few windows never loads it

    @numba.njit(cache=True, nogil=True, inline="always")
    def key(v):
        """A 16-bit float pattern -> an integer key that orders like the float (and back: its own inverse)."""
        return v ^ ((v >> 15) & 0x7FFF)

    @numba.njit(cache=True, nogil=True)
    def to_keys(bits, out):
        """:func:`key` of every element."""
        a, o = bits.reshape(-1), out.reshape(-1)
        for i in range(a.size):
            o[i] = key(a[i])

    @numba.njit(cache=True, nogil=True)
    def bins_max(keys, cells, n, out):
        """``out[k, i, j]`` = the max over bin (i, j) of window ``k``, as float bit patterns. keys: (H, W, C) int16
        (:func:`to_keys`); cells: (R, 4) inclusive (l, t, r, b); out: (R, n, n, C) int16."""
        c_n = keys.shape[2]
        for k in range(cells.shape[0]):
            l, t, r, b = cells[k, 0], cells[k, 1], cells[k, 2], cells[k, 3]
            hh, ww = b - t + 1, r - l + 1
            for i in range(n):
                y0, y1 = t + (i * hh) // n, t - ((-(i + 1) * hh) // n)  # [floor(i*h/n), ceil((i+1)*h/n))
                for j in range(n):
                    x0, x1 = l + (j * ww) // n, l - ((-(j + 1) * ww) // n)
                    acc = out[k, i, j]
                    acc[:] = keys[y0, x0]
                    for y in range(y0, y1):
                        for x in range(x0, x1):
                            row = keys[y, x]
                            for c in range(c_n):
                                acc[c] = max(acc[c], row[c])
                    for c in range(c_n):
                        acc[c] = key(acc[c])

    return to_keys, bins_max


_KERNELS = None


def direct_bins_max(maps: Sequence[torch.Tensor], cells: torch.Tensor, map_index: torch.Tensor, ns: Sequence[int],
                    outs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Max over the ``n x n`` floor/ceil bins of every window for each ``n`` of ``ns``, written into the matching
    ``outs`` ``(R, n, n, C)`` in the maps' 16-bit dtype (the values :func:`sppdet.window_pool._sparse_table_max`
    returns). Each map is keyed once for all the levels; channels-last maps are read in place, others copied once
    per call."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernels()
    to_keys, bins_max = _KERNELS
    dsts = [o.view(torch.int16).numpy() for o in outs]
    cl = cells.numpy()
    mi = map_index.numpy()
    for s, m in enumerate(maps):
        sel = np.nonzero(mi == s)[0]
        if len(sel) == 0:
            continue
        bits = np.ascontiguousarray(m.permute(1, 2, 0).view(torch.int16).numpy())  # no copy when channels-last
        keys = np.empty(bits.shape, np.int16)
        to_keys(bits, keys)
        every = len(sel) == len(cl)
        mine = np.ascontiguousarray(cl if every else cl[sel])
        for n, dst in zip(ns, dsts):
            if every:
                bins_max(keys, mine, n, dst)
            else:
                part = np.empty((len(sel),) + dst.shape[1:], np.int16)
                bins_max(keys, mine, n, part)
                dst[sel] = part
    return outs
