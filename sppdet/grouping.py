"""Selective search's hierarchical grouping, compiled (numba), on the regions of one segmentation
(:mod:`sppdet.regions`: sizes, boxes, neighbours, colour and texture histograms).

:func:`hierarchical_grouping` merges the two most similar neighbouring regions until one is left (Uijlings
et al., IJCV 2013) and returns every region's box, initial regions first and each merged region in merge order.

The grouping reproduces the former pure-Python implementation (a ``heapq`` of ``(-similarity, i, j)``)
exactly, including its floating-point arithmetic, so that the same image gives the same boxes in the same
order:

- a histogram intersection is the float32 sum of the element-wise minima in NumPy's pairwise order (what
  ``np.minimum(h[a], h[b]).sum(-1)`` computes: eight accumulators over blocks of up to 128 elements);
- colour and texture similarities are added in float32; size and fill are float64 and added after them;
- a merged region's histogram is ``float32((h_i * s_i + h_j * s_j) / s_t)`` computed in float64;
- candidates are popped in the order of ``(-similarity, i, j)``: every key is distinct, so any heap pops them
  in the same order as ``heapq``.

A region's neighbours are kept as lists that may name regions merged since; each name is resolved to the
region that absorbed it (union-find), which is what the Python version maintained by rewriting its sets.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["hierarchical_grouping", "MEASURES"]

MEASURES = "ctsf"  # colour, texture, size, fill

@numba.njit(cache=True, nogil=True)
def _block_sum(h, a, b, lo, n):
    """float32 sum of ``min(h[a, lo + i], h[b, lo + i])`` for ``i < n <= 128``, in NumPy's order for such a
    block: sequential below 8 elements, else eight interleaved accumulators, combined pairwise, then the rest."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(n):
            res += min(h[a, lo + i], h[b, lo + i])
        return res
    r0 = min(h[a, lo], h[b, lo])
    r1 = min(h[a, lo + 1], h[b, lo + 1])
    r2 = min(h[a, lo + 2], h[b, lo + 2])
    r3 = min(h[a, lo + 3], h[b, lo + 3])
    r4 = min(h[a, lo + 4], h[b, lo + 4])
    r5 = min(h[a, lo + 5], h[b, lo + 5])
    r6 = min(h[a, lo + 6], h[b, lo + 6])
    r7 = min(h[a, lo + 7], h[b, lo + 7])
    i = 8
    end = n - n % 8
    while i < end:
        q = lo + i
        r0 += min(h[a, q], h[b, q])
        r1 += min(h[a, q + 1], h[b, q + 1])
        r2 += min(h[a, q + 2], h[b, q + 2])
        r3 += min(h[a, q + 3], h[b, q + 3])
        r4 += min(h[a, q + 4], h[b, q + 4])
        r5 += min(h[a, q + 5], h[b, q + 5])
        r6 += min(h[a, q + 6], h[b, q + 6])
        r7 += min(h[a, q + 7], h[b, q + 7])
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += min(h[a, lo + i], h[b, lo + i])
        i += 1
    return res


@numba.njit(cache=True, nogil=True)
def _intersection(h, a, b):
    """Histogram intersection of rows ``a`` and ``b`` of ``h``: float32, summed in NumPy's pairwise order (blocks
    of at most 128; a longer range is split at ``n2 = n // 2 - (n // 2) % 8`` and its halves' sums added). The
    splits are walked with an explicit stack: numba's cache mishandles recursive functions (a cached recursive
    function crashed when loaded)."""
    n = h.shape[1]
    if n <= 128:
        return _block_sum(h, a, b, 0, n)
    los = np.empty(64, np.int64)
    ns = np.empty(64, np.int64)
    phase = np.empty(64, np.int64)  # 0: not split yet, 1: left half running, 2: right half running
    left = np.empty(64, np.float32)
    top = 0
    los[0], ns[0], phase[0] = 0, n, 0
    while True:
        lo, m = los[top], ns[top]
        if m > 128 and phase[top] == 0:
            m2 = m // 2
            m2 -= m2 % 8
            phase[top] = 1
            top += 1
            los[top], ns[top], phase[top] = lo, m2, 0
            continue
        val = _block_sum(h, a, b, lo, m)
        top -= 1
        while True:  # hand the finished sum to the frame that split
            if top < 0:
                return val
            if phase[top] == 1:
                left[top] = val
                phase[top] = 2
                m = ns[top]
                m2 = m // 2
                m2 -= m2 % 8
                lo = los[top]
                top += 1
                los[top], ns[top], phase[top] = lo + m2, m - m2, 0
                break
            val = left[top] + val
            top -= 1


@numba.njit(cache=True, nogil=True)
def _similarity(a, b, size, box, hc, ht, use_c, use_t, use_s, use_f, im_size):
    have32 = False
    s32 = np.float32(0.0)
    if use_c:
        s32 = _intersection(hc, a, b)
        have32 = True
    if use_t:
        t32 = _intersection(ht, a, b)
        s32 = s32 + t32 if have32 else t32
        have32 = True
    s = np.float64(s32) if have32 else 0.0
    if use_s:
        s = s + (1.0 - (size[a] + size[b]) / im_size)
    if use_f:
        bw = max(box[a, 2], box[b, 2]) - min(box[a, 0], box[b, 0])
        bh = max(box[a, 3], box[b, 3]) - min(box[a, 1], box[b, 1])
        s = s + (1.0 - (bw * bh - size[a] - size[b]) / im_size)
    return s


@numba.njit(cache=True, nogil=True)
def _less(k1, i1, j1, k2, i2, j2):
    if k1 != k2:
        return k1 < k2
    if i1 != i2:
        return i1 < i2
    return j1 < j2


@numba.njit(cache=True, nogil=True)
def _push(hk, hi, hj, m, key, i, j):
    """Push onto the binary min-heap of its first ``m`` entries (arrays large enough); returns the new size."""
    c = m
    while c > 0:
        p = (c - 1) // 2
        if not _less(key, i, j, hk[p], hi[p], hj[p]):
            break
        hk[c], hi[c], hj[c] = hk[p], hi[p], hj[p]
        c = p
    hk[c], hi[c], hj[c] = key, i, j
    return m + 1


@numba.njit(cache=True, nogil=True)
def _pop(hk, hi, hj, m):
    """Remove the smallest entry of the heap of size ``m`` (returned by the caller from index 0 first)."""
    m -= 1
    key, i, j = hk[m], hi[m], hj[m]
    c = 0
    while True:
        l = 2 * c + 1
        if l >= m:
            break
        r = l + 1
        s = r if r < m and _less(hk[r], hi[r], hj[r], hk[l], hi[l], hj[l]) else l
        if not _less(hk[s], hi[s], hj[s], key, i, j):
            break
        hk[c], hi[c], hj[c] = hk[s], hi[s], hj[s]
        c = s
    hk[c], hi[c], hj[c] = key, i, j
    return m


@numba.njit(cache=True, nogil=True)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _grow(a, need):
    if need <= a.shape[0]:
        return a
    out = np.empty(max(need, 2 * a.shape[0]), a.dtype)
    out[:a.shape[0]] = a
    return out


@numba.njit(cache=True, nogil=True)
def _group(size0, box0, pairs, im_size, hc0, ht0, use_c, use_t, use_s, use_f):
    n = size0.shape[0]
    total = max(2 * n - 1, n)
    size = np.zeros(total)
    size[:n] = size0
    box = np.zeros((total, 4))
    box[:n] = box0
    hc = np.zeros((total if use_c else 0, hc0.shape[1]), np.float32)
    ht = np.zeros((total if use_t else 0, ht0.shape[1]), np.float32)
    if use_c:
        hc[:n] = hc0
    if use_t:
        ht[:n] = ht0
    # Neighbour lists: region r's are buf[start[r]:start[r] + count[r]]; merged regions' lists are appended.
    p = pairs.shape[0]
    count = np.zeros(total, np.int64)
    for e in range(p):
        count[pairs[e, 0]] += 1
        count[pairs[e, 1]] += 1
    start = np.zeros(total, np.int64)
    for r in range(1, n):
        start[r] = start[r - 1] + count[r - 1]
    buf = np.empty(max(2 * p, 16), np.int64)
    fill = start[:n].copy()
    for e in range(p):
        a, b = pairs[e, 0], pairs[e, 1]
        buf[fill[a]] = b
        fill[a] += 1
        buf[fill[b]] = a
        fill[b] += 1
    used = 2 * p
    cap = max(p, 16)
    hk = np.empty(cap)
    hi = np.empty(cap, np.int64)
    hj = np.empty(cap, np.int64)
    m = 0
    for e in range(p):
        a, b = pairs[e, 0], pairs[e, 1]
        m = _push(hk, hi, hj, m, -_similarity(a, b, size, box, hc, ht, use_c, use_t, use_s, use_f, im_size), a, b)
    alive = np.zeros(total, np.bool_)
    alive[:n] = True
    parent = np.arange(total)
    mark = np.full(total, -1, np.int64)
    t = n
    while m > 0:
        i, j = hi[0], hj[0]
        m = _pop(hk, hi, hj, m)
        if not (alive[i] and alive[j]):
            continue
        si, sj = size[i], size[j]
        size[t] = si + sj
        box[t, 0] = min(box[i, 0], box[j, 0])
        box[t, 1] = min(box[i, 1], box[j, 1])
        box[t, 2] = max(box[i, 2], box[j, 2])
        box[t, 3] = max(box[i, 3], box[j, 3])
        st = size[t]
        if use_c:
            for c in range(hc.shape[1]):
                hc[t, c] = np.float32((np.float64(hc[i, c]) * si + np.float64(hc[j, c]) * sj) / st)
        if use_t:
            for c in range(ht.shape[1]):
                ht[t, c] = np.float32((np.float64(ht[i, c]) * si + np.float64(ht[j, c]) * sj) / st)
        alive[i] = alive[j] = False
        alive[t] = True
        parent[i] = parent[j] = t
        buf = _grow(buf, used + count[i] + count[j])
        first = used
        for src in (i, j):
            for q in range(start[src], start[src] + count[src]):
                r = _find(parent, buf[q])
                if r != t and mark[r] != t:
                    mark[r] = t
                    buf[used] = r
                    used += 1
        start[t], count[t] = first, used - first
        need = m + count[t]
        if need > hk.shape[0]:
            hk, hi, hj = _grow(hk, need), _grow(hi, need), _grow(hj, need)
        for q in range(first, used):
            k = buf[q]
            m = _push(hk, hi, hj, m, -_similarity(t, k, size, box, hc, ht, use_c, use_t, use_s, use_f, im_size), t, k)
        t += 1
    return box[:t].copy()


def hierarchical_grouping(regions: tuple, colour_hist: np.ndarray, texture_hist: np.ndarray,
                          measures: str = "ctsf") -> np.ndarray:
    """Greedy merging of adjacent regions by the sum of the similarity ``measures`` (letters of "ctsf").

    Args:
        regions: :func:`region_stats` of the segmentation: sizes ``(n,)``, boxes ``(n, 4)``, neighbour pairs
            ``(P, 2)`` and the image area.
        colour_hist, texture_hist: ``(n, bins)`` float32 L1-normalised histograms (:func:`region_histograms`).
        measures: which similarities to add.

    Returns:
        ``(2n - 1, 4)`` float64 xyxy boxes (fewer when the regions are not all connected): the initial regions,
        then each merged region in merge order.
    """
    if not measures or set(measures) - set(MEASURES):
        raise ValueError(f"unknown similarity set {measures!r}: letters of 'ctsf'")
    size0, box0, pairs, im_size = regions
    return _group(np.ascontiguousarray(size0, np.float64), np.ascontiguousarray(box0, np.float64),
                  np.ascontiguousarray(pairs, np.int64).reshape(-1, 2), float(im_size),
                  np.ascontiguousarray(colour_hist, np.float32), np.ascontiguousarray(texture_hist, np.float32),
                  "c" in measures, "t" in measures, "s" in measures, "f" in measures)
