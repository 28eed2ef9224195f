"""Felzenszwalb-Huttenlocher graph segmentation (IJCV 2004), several k from one graph.

Selective search starts each hierarchy from an FH segmentation, and fast mode needs two
(k = 50 and 100) per colour space. The graph (Gaussian-smoothed image, 8-connected pixel
edges weighted by the Euclidean colour distance) and the sort of its edges do not depend on
k, so :func:`felzenszwalb_multi` builds and sorts them once and runs only the union-find
pass per k (compiled with numba). The algorithm is the authors' ``segment-image``:

- edges in increasing weight; components ``A`` and ``B`` join when the edge weight is at
  most ``min(Int(A) + k/|A|, Int(B) + k/|B|)``, ``Int`` being the largest edge weight
  inside a component (the weight that last joined it, edges being sorted);
- then, over the same sorted edges, components smaller than ``min_size`` join their
  neighbour;
- pixel values on a 0..255 scale, ``k`` on that scale (what scikit-image's
  ``felzenszwalb(scale=k)`` means for a uint8 image).

It gives the same partitions as ``skimage.segmentation.felzenszwalb`` up to the order of
equal-weight edges (checked in the tests), at a fraction of its time. Equal weights are taken in one
fixed order (by pixel, then direction), so the partitions are the same on every CPU.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np

__all__ = ["felzenszwalb_multi", "pixel_graph", "same_partition"]


@numba.njit(cache=True, nogil=True)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _merge(keys, w, offsets, shift, n, k, min_size):
    """Union-find over the edges in ``keys`` order (weights ``w``; see :func:`_graph`); returns flat labels."""
    low = np.uint64((1 << shift) - 1)
    parent = np.arange(n, dtype=np.int32)  # 32-bit: half the memory traffic of the random accesses
    size = np.ones(n, np.int32)
    thresh = np.full(n, k, np.float64)  # Int(C) + k/|C| with Int = 0, |C| = 1 (k on the weights' 0..1 scale)
    for e in range(keys.shape[0]):
        code = np.int64(keys[e] & low)
        a = code >> 2
        ra = _find(parent, a)
        rb = _find(parent, a + offsets[code & 3])
        if ra == rb:
            continue
        we = w[e]
        if we <= thresh[ra] and we <= thresh[rb]:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
            thresh[ra] = we + k / size[ra]
    if min_size > 1:
        # An edge both of whose pixels lie in components of at least min_size now never joins anything in this
        # pass (components only grow): a flag per pixel skips it without the two finds (most edges; exact).
        small = np.empty(n, np.bool_)
        for p in range(n):
            small[p] = size[_find(parent, p)] < min_size
        for e in range(keys.shape[0]):
            code = np.int64(keys[e] & low)
            a = code >> 2
            b = a + offsets[code & 3]
            if not (small[a] or small[b]):
                continue
            ra = _find(parent, a)
            rb = _find(parent, b)
            if ra != rb and (size[ra] < min_size or size[rb] < min_size):
                if size[ra] < size[rb]:
                    ra, rb = rb, ra
                parent[rb] = ra
                size[ra] += size[rb]
    labels = np.empty(n, np.int64)
    new = np.full(n, -1, np.int64)
    count = 0
    for p in range(n):
        r = _find(parent, p)
        if new[r] < 0:
            new[r] = count
            count += 1
        labels[p] = new[r]
    return labels


# The edges are sorted as one uint64 key each: the weight's float64 bits (non-negative floats order as their
# bits do) with the lowest ``shift`` bits replaced by the edge's code, pixel * 4 + direction. NumPy sorts
# those in ~5 ms for ~750,000 edges, where np.argsort of the weights took ~17 ms and the gather of the edges
# in that order ~8 more; and equal weights then come in one order on every CPU (by code), where np.argsort's
# order of equal weights depends on the instruction set it dispatches to (AVX-512 and AVX2 differ). Where
# two keys share their leading bits, :func:`_sorted_weights` orders them by the full weight.
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (-1, 1))  # (dy, dx): right, down, down-right, up-right (the authors' four)


@numba.njit(cache=True, nogil=True)
def _graph(img, shift, directions):
    """8-connected edges of a (H, W, C) float image, weight = Euclidean distance: their keys (unsorted) and
    the weights indexed by code (``directions``: :data:`DIRECTIONS` as an array)."""
    h, w, c = img.shape
    flat = img.reshape(h * w, c)
    m = h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1)
    keys = np.empty(m, np.uint64)
    by_code = np.empty(4 * h * w, np.float64)
    low = np.uint64((1 << shift) - 1)
    e = 0
    for y in range(h):
        for x in range(w):
            p = y * w + x
            for d in range(4):
                yy, xx = y + directions[d, 0], x + directions[d, 1]
                if yy < 0 or yy >= h or xx < 0 or xx >= w:
                    continue  # no neighbour that way
                q = yy * w + xx
                s = 0.0
                for ch in range(c):
                    diff = flat[q, ch] - flat[p, ch]
                    s += diff * diff
                wt = np.sqrt(s)
                code = p * 4 + d
                by_code[code] = wt
                keys[e] = (np.float64(wt).view(np.uint64) & ~low) | np.uint64(code)
                e += 1
    return keys, by_code


@numba.njit(cache=True, nogil=True)
def _sorted_weights(keys, by_code, shift):
    """The weights in the order of the sorted ``keys``; each run of keys with equal leading bits reordered
    (in place, with its keys) by the full weight, equal weights keeping the order of their codes."""
    low = np.uint64((1 << shift) - 1)
    m = keys.shape[0]
    w = np.empty(m, np.float64)
    for e in range(m):
        w[e] = by_code[np.int64(keys[e] & low)]
    start = 0
    for e in range(1, m):  # apart from the gather: a branch on the gathered weights there made it twice as slow
        if (keys[e] ^ keys[e - 1]) > low:
            start = e
            continue
        j = e
        while j > start and w[j - 1] > w[j]:
            w[j - 1], w[j] = w[j], w[j - 1]
            keys[j - 1], keys[j] = keys[j], keys[j - 1]
            j -= 1
    return w


def _sorted_graph(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(keys, w, offsets, shift)``: the smoothed image's edges in increasing weight (see :func:`_graph`), the
    flat-index offset of each direction's neighbour, and the key's code bits."""
    from scipy import ndimage

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or 0 in img.shape:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, C) image, got shape {np.shape(image)}")
    img = img.astype(np.float64) / 255.0
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma=[sigma, sigma, 0])
    h, w = img.shape[:2]
    shift = max(1, (4 * h * w - 1).bit_length())  # bits of the largest code
    directions = np.array(DIRECTIONS, np.int64)
    keys, by_code = _graph(np.ascontiguousarray(img), shift, directions)
    keys.sort()
    return keys, _sorted_weights(keys, by_code, shift), directions @ np.array([w, 1]), shift


def pixel_graph(image: np.ndarray, sigma: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected edges of a (H, W[, C]) image (values 0..255) after Gaussian smoothing,
    sorted by weight.

    Returns ``(a, b, w)``: flat pixel indices of each edge's two pixels and its weight (the
    Euclidean distance of the smoothed values, on a 0..1 scale), in increasing weight, equal weights
    in the order of ``a * 4 + direction``. Smoothing and scale as scikit-image's ``felzenszwalb``
    (``scipy.ndimage.gaussian_filter`` over the two spatial axes, values / 255), so that the
    partitions are the same."""
    keys, w, offsets, shift = _sorted_graph(image, sigma)
    code = (keys & np.uint64((1 << shift) - 1)).astype(np.int64)
    a = code >> 2
    return a, a + offsets[code & 3], w


def felzenszwalb_multi(image: np.ndarray, ks: Sequence[float], sigma: float = 0.8,
                       min_sizes: Sequence[int] | None = None) -> list[np.ndarray]:
    """FH segmentations of ``image`` (values on a 0..255 scale) for each ``k`` in ``ks``.

    ``min_sizes`` defaults to ``ks`` (selective search's ``minSize = k``). Returns one
    (H, W) int64 label image per k, labels 0..n-1 in raster order of first appearance."""
    ks = [float(k) for k in ks]
    min_sizes = [int(k) for k in ks] if min_sizes is None else [int(m) for m in min_sizes]
    if len(min_sizes) != len(ks):
        raise ValueError(f"{len(ks)} values of k but {len(min_sizes)} min_sizes")
    if any(k <= 0 for k in ks):
        raise ValueError(f"k must be positive, got {ks}")
    h, w = np.shape(image)[:2]
    keys, wts, offsets, shift = _sorted_graph(image, sigma)
    return [_merge(keys, wts, offsets, shift, h * w, k / 255.0, m).reshape(h, w) for k, m in zip(ks, min_sizes)]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images group the pixels identically (labels may be numbered differently)."""
    pairs = np.unique(np.stack([np.ravel(a), np.ravel(b)], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))
