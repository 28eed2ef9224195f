"""Reference implementations of the `fast` selective search's per-segmentation steps: the pure-NumPy/Python code
that sppdet ran before :mod:`sppdet.grouping` compiled it. The tests check that the compiled steps give the same
arrays and boxes, bit for bit; :func:`naive_grouping` is the obviously-correct slow twin of the grouping."""

from __future__ import annotations

import heapq

import cv2
import numpy as np


def texture_codes(img: np.ndarray) -> np.ndarray:
    """(H, W, 24) bin codes 0..9 of Gaussian derivatives (sigma 1), 8 orientations x 3 channels."""
    f = img.astype(np.float32)
    out = []
    for c in range(3):
        g = cv2.GaussianBlur(f[:, :, c], (0, 0), 1.0)
        gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
        for th in (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4):
            d = gx * np.cos(th) + gy * np.sin(th)
            for resp in (np.maximum(d, 0), np.maximum(-d, 0)):  # orientation th and th + pi
                m = float(resp.max())
                out.append(np.minimum((resp * (10.0 / m)).astype(np.int32), 9) if m > 0 else np.zeros(resp.shape, np.int32))
    return np.stack(out, axis=2)


def region_histograms(labels: np.ndarray, n: int, codes: np.ndarray, bins: int) -> np.ndarray:
    """(n, channels*bins) L1-normalised histograms of integer ``codes`` (H, W, channels) per region."""
    ch = codes.shape[2]
    idx = (labels[:, :, None].astype(np.int64) * ch + np.arange(ch)) * bins + codes
    h = np.bincount(idx.ravel(), minlength=n * ch * bins).reshape(n, ch * bins).astype(np.float32)
    return h / np.maximum(h.sum(1, keepdims=True), 1e-12)


def adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """(P, 2) unique pairs (a < b) of 4-connected neighbouring labels."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        m = a != b
        if m.any():
            pairs.append(np.stack([np.minimum(a[m], b[m]), np.maximum(a[m], b[m])], 1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    p = np.concatenate(pairs).astype(np.int64)
    n = int(labels.max()) + 1
    key = np.unique(p[:, 0] * n + p[:, 1])
    return np.stack([key // n, key % n], 1)


def region_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) xyxy continuous boxes of each label (x2 = max column + 1)."""
    from scipy import ndimage

    sl = ndimage.find_objects(labels + 1, max_label=n)
    b = np.zeros((n, 4), np.float64)
    for i, s in enumerate(sl):
        if s is not None:
            b[i] = (s[1].start, s[0].start, s[1].stop, s[0].stop)
    return b


def regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """What every grouping of one segmentation shares: region sizes, boxes, adjacent pairs, image area."""
    n = int(labels.max()) + 1
    return (np.bincount(labels.ravel(), minlength=n).astype(np.float64), region_boxes(labels, n),
            adjacent_pairs(labels), float(labels.size))


def hierarchical_grouping(regions: tuple, colour_hist: np.ndarray, texture_hist: np.ndarray,
                           measures: str = "ctsf") -> np.ndarray:
    """Greedy merging of adjacent regions (``_regions(labels)``) by the sum of the similarity
    ``measures`` (letters of "ctsf": colour, texture, size, fill); returns the boxes of all
    regions (initial ones first, then each merged region in merge order)."""
    size0, box0, pairs, im_size = regions
    n = len(size0)
    total = 2 * n - 1
    size = np.zeros(total)
    size[:n] = size0
    box = np.zeros((total, 4))
    box[:n] = box0
    use_c, use_t = "c" in measures, "t" in measures
    # Histograms are carried through the merges only where a measure reads them.
    hc = np.zeros((total, colour_hist.shape[1]) if use_c else (0, 0), np.float32)
    ht = np.zeros((total, texture_hist.shape[1]) if use_t else (0, 0), np.float32)
    if use_c:
        hc[:n] = colour_hist
    if use_t:
        ht[:n] = texture_hist
    nbrs: list[set] = [set() for _ in range(total)]
    for a, b in pairs.tolist():
        nbrs[a].add(b)
        nbrs[b].add(a)

    def sim(a, b) -> np.ndarray:
        """Similarities of regions ``a`` and ``b`` (index arrays, or one index against an array)."""
        s = 0.0
        if use_c:
            s = s + np.minimum(hc[a], hc[b]).sum(-1)
        if use_t:
            s = s + np.minimum(ht[a], ht[b]).sum(-1)
        if "s" in measures:
            s = s + (1.0 - (size[a] + size[b]) / im_size)
        if "f" in measures:
            bw = np.maximum(box[a, 2], box[b, 2]) - np.minimum(box[a, 0], box[b, 0])
            bh = np.maximum(box[a, 3], box[b, 3]) - np.minimum(box[a, 1], box[b, 1])
            s = s + (1.0 - (bw * bh - size[a] - size[b]) / im_size)
        return s

    heap: list = []
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        heap = list(zip((-sim(a, b)).tolist(), a.tolist(), b.tolist()))
        heapq.heapify(heap)
    alive = np.zeros(total, bool)
    alive[:n] = True
    t = n
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        si, sj = size[i], size[j]
        size[t] = si + sj
        box[t] = (min(box[i, 0], box[j, 0]), min(box[i, 1], box[j, 1]), max(box[i, 2], box[j, 2]), max(box[i, 3], box[j, 3]))
        if use_c:
            hc[t] = (hc[i] * si + hc[j] * sj) / size[t]
        if use_t:
            ht[t] = (ht[i] * si + ht[j] * sj) / size[t]
        alive[i] = alive[j] = False
        alive[t] = True
        nb = (nbrs[i] | nbrs[j]) - {i, j}
        for k in nb:
            nbrs[k].discard(i)
            nbrs[k].discard(j)
            nbrs[k].add(t)
        nbrs[t] = nb
        nbrs[i] = nbrs[j] = set()
        if nb:
            js = np.fromiter(nb, np.int64, len(nb))
            for sv, k in zip((-sim(t, js)).tolist(), js.tolist()):
                heapq.heappush(heap, (sv, t, k))
        t += 1
    return box[:t]


def naive_grouping(regions: tuple, colour_hist: np.ndarray, texture_hist: np.ndarray, measures: str = "ctsf"):
    """The greedy merge written plainly: at every step recompute the similarity of every pair of neighbouring
    live regions (in float64) and merge the most similar one (ties: the smallest pair). O(n^3): tiny images only."""
    size0, box0, pairs, im_size = regions
    size = [float(s) for s in size0]
    box = [tuple(map(float, b)) for b in box0]
    hc = [np.asarray(h, np.float64) for h in colour_hist]
    ht = [np.asarray(h, np.float64) for h in texture_hist]
    nbrs = {i: set() for i in range(len(size))}
    for a, b in np.asarray(pairs).tolist():
        nbrs[a].add(b)
        nbrs[b].add(a)

    def sim(a, b):
        s = 0.0
        if "c" in measures:
            s += np.minimum(hc[a], hc[b]).sum()
        if "t" in measures:
            s += np.minimum(ht[a], ht[b]).sum()
        if "s" in measures:
            s += 1.0 - (size[a] + size[b]) / im_size
        if "f" in measures:
            bw = max(box[a][2], box[b][2]) - min(box[a][0], box[b][0])
            bh = max(box[a][3], box[b][3]) - min(box[a][1], box[b][1])
            s += 1.0 - (bw * bh - size[a] - size[b]) / im_size
        return s

    while True:
        cand = [(-sim(a, b), a, b) for a in nbrs for b in nbrs[a] if a < b]
        if not cand:
            return np.array(box, np.float64)
        _, i, j = min(cand)
        t = len(size)
        size.append(size[i] + size[j])
        box.append((min(box[i][0], box[j][0]), min(box[i][1], box[j][1]), max(box[i][2], box[j][2]),
                    max(box[i][3], box[j][3])))
        hc.append((hc[i] * size[i] + hc[j] * size[j]) / size[t] if hc else None)
        ht.append((ht[i] * size[i] + ht[j] * size[j]) / size[t] if ht else None)
        nb = (nbrs.pop(i) | nbrs.pop(j)) - {i, j}
        for k in nb:
            nbrs[k] -= {i, j}
            nbrs[k].add(t)
        nbrs[t] = nb
