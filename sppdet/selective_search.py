"""Selective search (Uijlings et al., IJCV 2013) as R-CNN ran it, two implementations; :mod:`sppdet.proposals`
serves them (and precomputed boxes) per image and per dataset.

- ``"fast"`` (default): the project's own vectorised selective search following
  Uijlings et al. (IJCV 2013) "fast" mode as R-CNN ran it (``selective_search_boxes.m``):
  Felzenszwalb-Huttenlocher regions with k = 50 and 100 (``min_size = k``, sigma 0.8;
  :mod:`sppdet.segmentation`: the same partitions as scikit-image's ``felzenszwalb``, one
  graph and one edge sort per colour space for both k, 3.5x faster); colour histograms (25
  bins per channel) and texture histograms (Gaussian derivatives, sigma 1, 8 orientations x
  10 bins per channel) by ``bincount``; true 4-connected pixel adjacency; greedy merging
  with a heap; the paper's randomised ranking (hierarchy level x U(0, 1), ascending);
  images are processed at ``max_side`` 500 px as R-CNN does and boxes scaled back.
  Diversification by default a step towards the paper's quality mode, bought with the
  segmentation's speed-up: colour spaces HSV, Lab and rgI (fast mode: HSV, Lab) and
  similarity sets colour+texture+size+fill, texture+size+fill (fast mode's two) plus fill
  only and size only. On the 15-image VOC sample over ranking seeds 0/1/2, at the same
  2000 boxes: R@0.5 0.885/0.865/0.923, R@0.7 0.750/0.788/0.750, MABO 0.767/0.783/0.784
  (HSV+Lab: 0.923/0.904/0.904, 0.712/0.731/0.692, 0.771/0.774/0.765; fast mode's
  ``colour_spaces=("hsv", "lab"), similarity_sets=("ctsf", "tsf")``: 0.885, 0.673-0.692,
  0.752-0.756).
- ``"selectivesearch"``: the PyPI package ``selectivesearch`` 0.4, always diversified
  (HSV, Lab, RGB, rgI x k = 50, 200; merged; duplicates and boxes under ``min_size``
  removed; same ranking) and run in parallel over the 8 runs. k = 200 instead of R-CNN's
  100: a wider spread of starting segmentations (the paper's quality mode spans 50..300);
  on the 15-image VOC sample it found one more of 52 objects at IoU 0.5 and lost none at
  0.7 (``ks=(50, 100)`` stays selectable). Its defects, read in its
  source: hue/saturation in [0, 1] are binned over (0, 255) and LBP codes in 0..255 over
  (0, 1), so colour and texture similarity barely discriminate; "neighbours" are regions
  whose box corners lie strictly inside another's box (misses many adjacent pairs, adds
  many that do not touch); per-pixel Python loops and a full re-sort of all similarities
  at every merge make it slow; no diversification or ranking of its own; box width and
  height one pixel short (corrected here).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import cv2
import numpy as np

from .boxes import diverse_first, filter_small, unique_boxes

__all__ = ["as_rgb", "convert_colour", "rank_hierarchies", "finalize_boxes", "fast_selective_search", "SS_STAGES",
           "selective_search_timed", "selectivesearch_diversified", "warm_up", "start_warm_up"]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8-like arrays; return RGB uint8."""
    im = np.asarray(image)
    if im.ndim == 2:
        im = im[:, :, None]
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4) or im.shape[0] < 1 or im.shape[1] < 1:
        raise ValueError(f"expected an image (H, W[, 1|3|4]), got shape {im.shape}")
    if im.dtype != np.uint8:
        im = np.clip(im, 0, 255).astype(np.uint8)
    if im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    return np.ascontiguousarray(im[:, :, :3])


def convert_colour(rgb: np.ndarray, space: str) -> np.ndarray:
    """RGB uint8 -> a 3-channel uint8 image in ``space`` (hsv, lab, rgb, rgi), each channel 0..255."""
    if space == "rgb":
        return rgb
    if space == "hsv":
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue over 0..255
        return hsv
    if space == "lab":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    if space == "rgi":
        f = rgb.astype(np.float32)
        s = f.sum(2, keepdims=True) + 1e-6
        out = np.concatenate([f[:, :, :2] / s * 255.0, s / 3.0], axis=2)
        return np.clip(out, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown colour space {space!r}")


def rank_hierarchies(box_lists: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The paper's ranking: in each hierarchy (boxes in creation order) the last-created
    region has level 1; priority = level x U(0, 1); all hierarchies sorted ascending."""
    boxes, prio = [], []
    for b in box_lists:
        if len(b) == 0:
            continue
        level = np.arange(len(b), 0, -1, dtype=np.float64)
        boxes.append(b)
        prio.append(level * rng.random(len(b)))
    if not boxes:
        return np.zeros((0, 4), np.float32)
    b = np.concatenate(boxes)
    return b[np.argsort(np.concatenate(prio), kind="stable")]


def finalize_boxes(boxes: np.ndarray, width: int, height: int, min_size: float, max_boxes: int,
                   cap_nms: float = 0.0) -> np.ndarray:
    """Clip, drop boxes under ``min_size``, deduplicate (first kept: rank order), cap. ``cap_nms`` > 0: where more
    than ``max_boxes`` remain, the cap takes first the boxes overlapping no better-ranked box it took by more than
    this IoU (:func:`sppdet.boxes.diverse_first`); 0: rank order alone (R-CNN's)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    b = b[filter_small(b, min(min_size, width, height))]
    b = b[unique_boxes(b)]
    if max_boxes and max_boxes > 0:
        b = b[diverse_first(b, max_boxes, cap_nms)] if cap_nms > 0 and len(b) > max_boxes else b[:max_boxes]
    if len(b) == 0:
        warnings.warn(f"no proposal survived for a {width}x{height} image; returning the whole image", stacklevel=3)
        b = np.array([[0, 0, width, height]], np.float32)
    return b.astype(np.float32)


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longer side is at most ``max_side`` (R-CNN runs selective search at 500 px)."""
    h0, w0 = rgb.shape[:2]
    if not max_side or max(h0, w0) <= max_side:
        return rgb, 1.0
    scale = max_side / float(max(h0, w0))
    return cv2.resize(rgb, (max(1, round(w0 * scale)), max(1, round(h0 * scale))), interpolation=cv2.INTER_AREA), scale


# ------------------------------------------------ project-owned selective search
def fast_selective_search(image: np.ndarray, colour_spaces: Sequence[str] = ("hsv", "lab", "rgi"),
                          ks: Sequence[int] = (50, 100), sigma: float = 0.8,
                          similarity_sets: Sequence[str] = ("ctsf", "tsf", "f", "s"), max_side: int = 500,
                          seed: int = 0, workers: int = 1) -> np.ndarray:
    """Selective search: fast mode's segmentations in three colour spaces, fast + quality mode's
    similarity sets; segmentation, region statistics and grouping compiled (:mod:`sppdet.segmentation`,
    :mod:`sppdet.grouping`). Returns ranked raw boxes (xyxy, original frame). ``workers`` > 1: the colour
    spaces in that many threads (the compiled steps release the GIL; the same boxes)."""
    return selective_search_timed(image, colour_spaces, ks, sigma, similarity_sets, max_side, seed, workers=workers)


SS_STAGES = ("conversions", "segmentation", "regions", "grouping", "ranking")


def selective_search_timed(image: np.ndarray, colour_spaces: Sequence[str] = ("hsv", "lab", "rgi"),
                           ks: Sequence[int] = (50, 100), sigma: float = 0.8,
                           similarity_sets: Sequence[str] = ("ctsf", "tsf", "f", "s"), max_side: int = 500,
                           seed: int = 0, timing: dict | None = None, workers: int = 1) -> np.ndarray:
    """:func:`fast_selective_search`, adding the seconds of each of :data:`SS_STAGES` to ``timing`` when given:
    conversions (downscaling, colour spaces, colour and texture codes), segmentation (Felzenszwalb-Huttenlocher),
    regions (sizes, boxes, neighbours, histograms), grouping, ranking (with ``workers`` > 1: summed over the
    threads)."""
    from .grouping import MEASURES, hierarchical_grouping
    from .regions import region_histograms, region_stats, texture_codes
    from .segmentation import felzenszwalb_multi

    for simset in similarity_sets:
        if not simset or set(simset) - set(MEASURES):
            raise ValueError(f"unknown similarity set {simset!r}: letters of 'ctsf' (colour, texture, size, fill), "
                             "e.g. 'ctsf', 'tsf' (fast mode), 'f', 's' (quality mode adds these)")
    t = {k: 0.0 for k in SS_STAGES}
    t0 = time.perf_counter()
    rgb, scale = _downscale(as_rgb(image), max_side)
    t["conversions"] += time.perf_counter() - t0

    def space_hierarchies(space: str) -> tuple[list, dict]:
        """One colour space's hierarchies (every k, every similarity set) and its seconds per step."""
        own = {k: 0.0 for k in SS_STAGES}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            own[stage] += now - clock
            clock = now

        out = []
        img = convert_colour(rgb, space)
        texture = texture_codes(img)
        colour_codes = ((img.astype(np.int32) * 25) >> 8).astype(np.uint8)  # 25 bins over 0..255
        lap("conversions")
        for labels in felzenszwalb_multi(img, ks, sigma):  # one graph and edge sort for all k
            lap("segmentation")
            regions = region_stats(labels)
            n = len(regions[0])
            hc = region_histograms(labels, n, colour_codes, 25)
            ht = region_histograms(labels, n, texture, 10)
            lap("regions")
            for simset in similarity_sets:
                out.append(hierarchical_grouping(regions, hc, ht, simset))
            lap("grouping")
        return out, own

    if workers and workers > 1 and len(colour_spaces) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(colour_spaces)), thread_name_prefix="selective-search") as ex:
            per_space = list(ex.map(space_hierarchies, colour_spaces))  # in colour-space order: the same ranking
    else:
        per_space = [space_hierarchies(space) for space in colour_spaces]
    hierarchies = [h for hs, _ in per_space for h in hs]
    for _, own in per_space:
        for k, v in own.items():
            t[k] += v
    t1 = time.perf_counter()
    ranked = (rank_hierarchies(hierarchies, np.random.default_rng(seed)) / scale).astype(np.float32)
    t["ranking"] += time.perf_counter() - t1
    if timing is not None:
        for k, v in t.items():
            timing[k] = timing.get(k, 0.0) + v
    return ranked


_WARM_UP: list = []  # the one warm-up thread of this process, once started
_WARM_UP_LOCK = threading.Lock()


def warm_up() -> float:
    """Load the compiled selective search (numba's functions, from its on-disk cache: ~0.4 s in a new process) by
    running it on a small generated image, so that a process's first photo does not pay for it. Returns seconds."""
    t0 = time.perf_counter()
    y, x = np.mgrid[:48, :64]
    img = np.stack([x * 4, y * 5, (x + y) * 2], 2).astype(np.uint8)  # a few regions with edges between them
    img[10:30, 20:40] = (200, 30, 60)
    fast_selective_search(img)
    return time.perf_counter() - t0


def start_warm_up():
    """:func:`warm_up` in a daemon thread, started once per process (later calls return the same thread).
    ``Predictor`` starts it first, so it runs while the models load; importing this module does not import
    torch, so a program may start it even earlier."""
    with _WARM_UP_LOCK:
        if not _WARM_UP:
            t = threading.Thread(target=warm_up, name="selective-search-warm-up", daemon=True)
            t.start()
            _WARM_UP.append(t)
        return _WARM_UP[0]


# ------------------------------------------------------- selectivesearch package
@contextlib.contextmanager
def _repaired_selectivesearch():
    """Swap three defective functions of ``selectivesearch`` 0.4 for corrected ones while a
    call runs (its public API and merging loop are kept):

    - colour histograms: it bins HSV values that lie in [0, 1] over (0, 255), so every
      region falls in the first bin and colour similarity is constant; binned over (0, 1);
    - texture histograms: it bins LBP codes that lie in 0..255 over (0, 1); binned over
      (0, 256);
    - neighbours: it calls two regions adjacent when a corner of one bounding box lies
      strictly inside the other (missing about a third of touching pairs and adding many
      that do not touch); replaced by true 4-connected pixel adjacency of the segments.
    """
    import selectivesearch.selectivesearch as ss

    saved = {k: getattr(ss, k) for k in ("_calc_colour_hist", "_calc_texture_hist", "_extract_regions",
                                         "_extract_neighbours")}
    label_image: list[np.ndarray] = []

    def colour_hist(img):
        return np.concatenate([np.histogram(img[:, c], 25, (0.0, 1.0))[0] for c in range(3)]) / len(img)

    def texture_hist(img):
        return np.concatenate([np.histogram(img[:, c], 10, (0.0, 256.0))[0] for c in range(3)]) / len(img)

    def extract_regions(img):
        label_image.append(img[:, :, 3].astype(np.int64))
        return saved["_extract_regions"](img)

    def extract_neighbours(regions):
        lab = label_image[-1]
        a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
        b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
        d = a != b
        pairs = np.unique(np.stack([np.minimum(a[d], b[d]), np.maximum(a[d], b[d])], 1), axis=0)
        return [((int(i), regions[int(i)]), (int(j), regions[int(j)])) for i, j in pairs
                if int(i) in regions and int(j) in regions]

    ss._calc_colour_hist, ss._calc_texture_hist = colour_hist, texture_hist
    ss._extract_regions, ss._extract_neighbours = extract_regions, extract_neighbours
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ss, k, v)


def _ss_package_run(args) -> np.ndarray:
    img, k, sigma, repair = args
    import selectivesearch

    with warnings.catch_warnings(), (_repaired_selectivesearch() if repair else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        _, regions = selectivesearch.selective_search(img, scale=float(k), sigma=sigma, min_size=int(k))
    # 'rect' is (min_x, min_y, max_x - min_x, max_y - min_y): one pixel short; fix to continuous xyxy.
    b = np.array([[r["rect"][0], r["rect"][1], r["rect"][0] + r["rect"][2] + 1, r["rect"][1] + r["rect"][3] + 1]
                  for r in regions], np.float32).reshape(-1, 4)
    return b


def selectivesearch_diversified(image: np.ndarray, colour_spaces: Sequence[str] = ("hsv", "lab", "rgb", "rgi"),
                                ks: Sequence[int] = (50, 200), sigma: float = 0.8, max_side: int = 500,
                                workers: int = 1, seed: int = 0, repair: bool = True) -> np.ndarray:
    """The ``selectivesearch`` package run once per (colour space, k), merged and ranked.

    ``repair=True`` (default) runs it with three of its defects corrected (see
    :func:`_repaired_selectivesearch`); ``repair=False`` runs it exactly as released.
    """
    rgb, scale = _downscale(as_rgb(image), max_side)
    jobs = [(convert_colour(rgb, s), k, sigma, bool(repair)) for s in colour_spaces for k in ks]
    if workers and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            hier = list(ex.map(_ss_package_run, jobs))
    else:
        hier = [_ss_package_run(j) for j in jobs]
    return (rank_hierarchies(hier, np.random.default_rng(seed)) / scale).astype(np.float32)


# --------------------------------------------------------------- precomputed
