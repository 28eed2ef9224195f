"""What one Felzenszwalb-Huttenlocher segmentation (a ``(H, W)`` label image, labels ``0..n-1``) gives every
grouping that starts from it, compiled (numba); :mod:`sppdet.grouping` merges the regions.

- :func:`texture_codes`: per pixel and channel, the quantised Gaussian-derivative orientation and magnitude;
- :func:`region_stats`: each region's size (pixels), box (continuous xyxy) and its 4-connected neighbours;
- :func:`region_histograms`: L1-normalised histograms of integer codes per region (colour: 25 bins per
  channel; texture: 10 bins per orientation and channel).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["texture_codes", "region_stats", "region_histograms"]

# Gaussian-derivative orientations of the texture histograms (and their opposites, th + pi).
_ORIENTATIONS = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
_COS = np.array([np.cos(th) for th in _ORIENTATIONS])
_SIN = np.array([np.sin(th) for th in _ORIENTATIONS])


@numba.njit(cache=True, nogil=True)
def _quantise_derivatives(gx, gy, cos, sin, out, channel):
    """Codes 0..9 of the oriented derivative responses of one channel into ``out[:, :, channel*8:(channel+1)*8]``:
    for orientation o, ``d = gx cos + gy sin`` (float64), responses ``max(d, 0)`` (code ``2o``) and ``max(-d, 0)``
    (``2o + 1``), each scaled by 10 over its image maximum and truncated, at most 9. Two passes over the image
    for all orientations (their maxima, then the codes), each pixel's eight codes written side by side."""
    h, w = gx.shape
    no = cos.shape[0]
    mp = np.zeros(no)
    mn = np.zeros(no)
    for y in range(h):
        for x in range(w):
            fx, fy = np.float64(gx[y, x]), np.float64(gy[y, x])
            for o in range(no):
                d = fx * cos[o] + fy * sin[o]
                if d > mp[o]:
                    mp[o] = d
                if -d > mn[o]:
                    mn[o] = -d
    fp = np.zeros(no)
    fn = np.zeros(no)
    for o in range(no):
        fp[o] = 10.0 / mp[o] if mp[o] > 0 else 0.0
        fn[o] = 10.0 / mn[o] if mn[o] > 0 else 0.0
    base = channel * 2 * no
    for y in range(h):
        for x in range(w):
            fx, fy = np.float64(gx[y, x]), np.float64(gy[y, x])
            for o in range(no):
                d = fx * cos[o] + fy * sin[o]
                # a response that is never positive has factor 0, so its codes are all 0
                out[y, x, base + 2 * o] = min(np.int32(max(d, 0.0) * fp[o]), 9)
                out[y, x, base + 2 * o + 1] = min(np.int32(max(-d, 0.0) * fn[o]), 9)


def texture_codes(img: np.ndarray) -> np.ndarray:
    """``(H, W, 24)`` uint8 bin codes 0..9 of Gaussian derivatives (sigma 1) of a 3-channel uint8 image:
    8 orientations (4 and their opposites) x 3 channels, each response scaled by its image maximum."""
    import cv2

    f = img.astype(np.float32)
    out = np.empty(img.shape[:2] + (24,), np.uint8)
    for c in range(3):
        g = cv2.GaussianBlur(f[:, :, c], (0, 0), 1.0)
        gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
        _quantise_derivatives(gx, gy, _COS, _SIN, out, c)
    return out


@numba.njit(cache=True, nogil=True)
def _stats(labels, n):
    h, w = labels.shape
    size = np.zeros(n)
    box = np.empty((n, 4))
    box[:, 0] = w
    box[:, 1] = h
    box[:, 2] = 0.0
    box[:, 3] = 0.0
    keys = np.empty(2 * h * w, np.int64)
    m = 0
    for y in range(h):
        last = -1
        for x in range(w):
            a = labels[y, x]
            size[a] += 1.0
            box[a, 0] = min(box[a, 0], x)
            box[a, 1] = min(box[a, 1], y)
            box[a, 2] = max(box[a, 2], x + 1)
            box[a, 3] = max(box[a, 3], y + 1)
            if x + 1 < w:
                b = labels[y, x + 1]
                if a != b:
                    k = min(a, b) * n + max(a, b)
                    if k != last:  # runs along a boundary give the same pair
                        keys[m] = k
                        m += 1
                        last = k
            if y + 1 < h:
                b = labels[y + 1, x]
                if a != b:
                    keys[m] = min(a, b) * n + max(a, b)
                    m += 1
    keys = np.unique(keys[:m])
    pairs = np.empty((keys.shape[0], 2), np.int64)
    for e in range(keys.shape[0]):
        pairs[e, 0] = keys[e] // n
        pairs[e, 1] = keys[e] % n
    return size, box, pairs


def region_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """What every grouping of one segmentation shares: region sizes ``(n,)`` float64, boxes ``(n, 4)`` float64
    continuous xyxy (x2 = last column + 1), 4-connected neighbour pairs ``(P, 2)`` (a < b, sorted) and the image
    area. ``labels``: ``(H, W)`` integers ``0..n-1``, each present."""
    lab = np.ascontiguousarray(labels, np.int64)
    n = int(lab.max()) + 1
    size, box, pairs = _stats(lab, n)
    return size, box, pairs, float(lab.size)


@numba.njit(cache=True, nogil=True)
def _histograms(labels, codes, n, bins):
    h, w, ch = codes.shape
    out = np.zeros((n, ch * bins), np.int32)  # counts up to a region's size
    for y in range(h):
        for x in range(w):
            r = labels[y, x]
            for c in range(ch):
                out[r, c * bins + codes[y, x, c]] += 1
    return out


def region_histograms(labels: np.ndarray, n: int, codes: np.ndarray, bins: int) -> np.ndarray:
    """``(n, channels * bins)`` float32 L1-normalised histograms of integer ``codes`` ``(H, W, channels)`` (each in
    ``0..bins-1``) per region of ``labels``."""
    h = _histograms(np.ascontiguousarray(labels, np.int64), np.ascontiguousarray(codes), int(n), int(bins))
    h = h.astype(np.float32)
    return h / np.maximum(h.sum(1, keepdims=True), 1e-12)
