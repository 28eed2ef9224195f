"""Object proposals: selective search (two implementations), precomputed boxes, a store.

Backends (``propose(image, backend=...)``):

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
- ``"precomputed"``: R-CNN/Fast R-CNN ``.mat`` files (``load_precomputed_mat``) or the
  per-image demo files (``load_demo_boxes``).

All backends return ``(N, 4)`` float32 boxes, original-image 0-based continuous xyxy,
deduplicated, boxes with width or height under ``min_size`` removed, in rank order,
at most ``max_boxes``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from .boxes import filter_small, unique_boxes
from .store import Stage, atomic_save_npz, load_npz

log = logging.getLogger(__name__)

__all__ = [
    "propose",
    "fast_selective_search",
    "selectivesearch_diversified",
    "load_precomputed_mat",
    "load_demo_boxes",
    "finalize_boxes",
    "ProposalStore",
    "compute_proposals",
    "BACKENDS",
]

BACKENDS = ("fast", "selectivesearch", "precomputed")


# ----------------------------------------------------------------- helpers
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


def finalize_boxes(boxes: np.ndarray, width: int, height: int, min_size: float, max_boxes: int) -> np.ndarray:
    """Clip, drop boxes under ``min_size``, deduplicate (first kept: rank order), cap."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    b = b[filter_small(b, min(min_size, width, height))]
    b = b[unique_boxes(b)]
    if max_boxes and max_boxes > 0:
        b = b[:max_boxes]
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
                          seed: int = 0) -> np.ndarray:
    """Selective search: fast mode's segmentations in three colour spaces, fast + quality mode's
    similarity sets; segmentation, region statistics and grouping compiled (:mod:`sppdet.segmentation`,
    :mod:`sppdet.grouping`). Returns ranked raw boxes (xyxy, original frame)."""
    return selective_search_timed(image, colour_spaces, ks, sigma, similarity_sets, max_side, seed)


SS_STAGES = ("conversions", "segmentation", "regions", "grouping", "ranking")


def selective_search_timed(image: np.ndarray, colour_spaces: Sequence[str] = ("hsv", "lab", "rgi"),
                           ks: Sequence[int] = (50, 100), sigma: float = 0.8,
                           similarity_sets: Sequence[str] = ("ctsf", "tsf", "f", "s"), max_side: int = 500,
                           seed: int = 0, timing: dict | None = None) -> np.ndarray:
    """:func:`fast_selective_search`, adding the seconds of each of :data:`SS_STAGES` to ``timing`` when given:
    conversions (downscaling, colour spaces, colour and texture codes), segmentation (Felzenszwalb-Huttenlocher),
    regions (sizes, boxes, neighbours, histograms), grouping, ranking."""
    from .grouping import MEASURES, hierarchical_grouping, region_histograms, region_stats, texture_codes
    from .segmentation import felzenszwalb_multi

    for simset in similarity_sets:
        if not simset or set(simset) - set(MEASURES):
            raise ValueError(f"unknown similarity set {simset!r}: letters of 'ctsf' (colour, texture, size, fill), "
                             "e.g. 'ctsf', 'tsf' (fast mode), 'f', 's' (quality mode adds these)")
    t = {k: 0.0 for k in SS_STAGES}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[stage] += now - clock
        clock = now

    rgb, scale = _downscale(as_rgb(image), max_side)
    hierarchies = []
    for space in colour_spaces:
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
                hierarchies.append(hierarchical_grouping(regions, hc, ht, simset))
            lap("grouping")
    ranked = (rank_hierarchies(hierarchies, np.random.default_rng(seed)) / scale).astype(np.float32)
    lap("ranking")
    if timing is not None:
        for k, v in t.items():
            timing[k] = timing.get(k, 0.0) + v
    return ranked


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
def _loadmat(path: Path, keys: tuple[str, ...]) -> dict:
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read .mat file ({e})") from e
    for key in keys:
        if key not in m:
            raise ValueError(f"{path}: no {key!r} variable")
    return m


def load_demo_boxes(path: str | Path) -> np.ndarray:
    """Fast R-CNN demo file (``boxes``: N x 4, 0-based *inclusive* x1 y1 x2 y2) -> continuous xyxy."""
    m = _loadmat(Path(path), ("boxes",))
    b = np.asarray(m["boxes"], np.float64).reshape(-1, 4)
    b[:, 2:] += 1.0  # inclusive last pixel -> continuous right/bottom edge
    return b.astype(np.float32)


def load_precomputed_mat(path: str | Path) -> dict[str, np.ndarray]:
    """R-CNN / Fast R-CNN ``selective_search_data/voc_2007_<split>.mat`` -> ``{image_id: boxes}``.

    The file holds a cell array ``boxes`` (one N x 4 array per image, 1-based inclusive
    ``y1 x1 y2 x2``) and ``images`` (the ids). Output boxes: 0-based continuous xyxy.
    """
    path = Path(path)
    m = _loadmat(path, ("boxes", "images"))
    cells = m["boxes"].ravel()
    ids = [str(np.asarray(x).ravel()[0]) for x in m["images"].ravel()]
    if len(ids) != len(cells):
        raise ValueError(f"{path}: {len(ids)} images but {len(cells)} box arrays")
    out = {}
    for image_id, b in zip(ids, cells):
        b = np.asarray(b, np.float64).reshape(-1, 4)
        # 1-based inclusive (y1, x1, y2, x2) -> 0-based continuous (x1 - 1, y1 - 1, x2, y2)
        out[image_id] = np.stack([b[:, 1] - 1, b[:, 0] - 1, b[:, 3], b[:, 2]], 1).astype(np.float32)
    return out


# -------------------------------------------------------------- the interface
def propose(image: np.ndarray, backend: str = "fast", max_boxes: int = 2000, min_size: float = 20.0,
            **params) -> np.ndarray:
    """Proposals for one image.

    Args:
        image: RGB uint8 ``(H, W, 3)`` (grayscale and RGBA are accepted too).
        backend: ``"fast"`` (default) or ``"selectivesearch"``.
        max_boxes: cap, in rank order.
        min_size: boxes whose width or height is smaller are dropped (R-CNN: 20 px).
        **params: backend parameters (``colour_spaces``, ``ks``, ``sigma``, ``max_side``, ``seed``...).

    Returns:
        ``(N, 4)`` float32, original-image 0-based continuous xyxy, in rank order.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    if backend == "fast":
        raw = fast_selective_search(rgb, **params)
    elif backend == "selectivesearch":
        raw = selectivesearch_diversified(rgb, **params)
    else:
        raise ValueError(f"unknown proposal backend {backend!r}; choose 'fast' or 'selectivesearch' "
                         "(precomputed boxes go through the proposal store)")
    return finalize_boxes(raw, w, h, min_size, max_boxes)


def _check_param(backend: str, name: str, value, default) -> None:
    """A backend parameter of the kind its default is: a number, a flag, a string, or a list of numbers/strings."""
    def kind(x):
        return "flag" if isinstance(x, bool) else "number" if isinstance(x, (int, float)) else \
            "string" if isinstance(x, str) else "list" if isinstance(x, (list, tuple)) else None

    want, got = kind(default), kind(value)
    ok = want is None or want == got
    if ok and want == "list" and len(default):
        item = kind(default[0])
        ok = len(value) > 0 and all(kind(x) == item for x in value)
        want = f"a non-empty list of {item}s"
    if not ok:
        raise ValueError(f"parameter {name!r} of proposal backend {backend!r} must be {want if want.startswith('a ') else 'a ' + want} "
                         f"(default {json.dumps(default)}), got {value!r}")


def resolved_params(backend: str, params: dict | None) -> dict:
    """A backend's parameters with its defaults filled in (what the store records, so that a
    changed default is seen as a changed parameter, not silently reused); ``workers`` is left
    out (it does not change the boxes). Unknown names are an error that lists the known ones."""
    import inspect

    params = dict(params or {})
    fn = {"fast": fast_selective_search, "selectivesearch": selectivesearch_diversified}.get(backend)
    if fn is None:
        return params
    sig = {k: v for k, v in inspect.signature(fn).parameters.items() if k != "image"}
    unknown = sorted(set(params) - set(sig))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for proposal backend {backend!r}; "
                         f"known: {', '.join(sig)}")
    for k, v in params.items():
        _check_param(backend, k, v, sig[k].default)
    out = {k: v.default for k, v in sig.items() if k != "workers"}
    out.update({k: v for k, v in params.items() if k != "workers"})
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from a manifest


# ----------------------------------------------------------------- the store
class ProposalStore:
    """Per-image proposal files ``<dir>/<id>.npz`` (``boxes`` (N, 4) float32, image ``size``)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npz"

    def load(self, image_id: str) -> np.ndarray:
        d = load_npz(self.path(image_id), ("boxes",))
        b = d["boxes"].astype(np.float32).reshape(-1, 4)
        if len(b) == 0:
            raise ValueError(f"{self.path(image_id)}: empty proposal set")
        return b

    def manifest(self) -> dict:
        return Stage.read_manifest(self.dir)


def _propose_one(args) -> tuple[str, int, float]:
    image_id, image_path, out_path, backend, max_boxes, min_size, params = args
    from .voc import load_image

    img = load_image(image_path)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boxes = propose(img, backend=backend, max_boxes=max_boxes, min_size=min_size, **params)
    dt = time.perf_counter() - t0
    atomic_save_npz(out_path, boxes=boxes, size=np.array(img.shape[:2], np.int32))
    return image_id, len(boxes), dt


def compute_proposals(ids: Sequence[str], image_path: Callable[[str], Path], out_dir: str | Path,
                      backend: str = "fast", max_boxes: int = 2000, min_size: float = 20.0, params: dict | None = None,
                      precomputed: str | None = None, workers: int = 0, overwrite: bool = False,
                      progress: bool = True, image_size: Callable[[str], tuple[int, int]] | None = None,
                      inputs: dict | None = None, item_inputs: dict[str, str] | None = None) -> dict:
    """Compute (or import) proposals for ``ids`` into a resumable store; returns the manifest.

    A finished image is skipped when the manifest's backend and parameters (and ``inputs``, e.g. the
    fingerprint of the images' contents) match; a change is a :class:`~sppdet.store.StaleCacheError`
    naming what changed. A manifest from before ``inputs`` were recorded is not checked on them.
    ``item_inputs`` (``{id: fingerprint of its image}``): when only images changed, only theirs are recomputed.
    """
    params = dict(params or {})
    cfg = {"backend": backend, "max_boxes": max_boxes, "min_size": min_size,
           "params": resolved_params(backend, params), "precomputed": precomputed}
    stage = Stage(out_dir, "proposals", cfg, inputs, overwrite=overwrite,
                  defaults={"params": resolved_params(backend, {})}, added_inputs=tuple(inputs or {}),
                  item_inputs=item_inputs, per_item=("images",))
    todo = [i for i in ids if not stage.has(i)]
    stats = {"seconds": 0.0, "boxes": 0, "images": 0}
    if backend == "precomputed":
        if not precomputed:
            raise ValueError("proposals.backend 'precomputed' needs proposals.precomputed (a .mat file or folder)")
        src = Path(precomputed)
        table = load_precomputed_mat(src) if src.is_file() else None
        for i in todo:
            if table is not None:
                if i not in table:
                    raise KeyError(f"{src}: no boxes for image {i!r}")
                raw = table[i]
            else:
                raw = load_demo_boxes(src / f"{i}_boxes.mat")
            hw = image_size(i) if image_size else (int(raw[:, 3].max()), int(raw[:, 2].max()))
            b = finalize_boxes(raw, hw[1], hw[0], min_size, max_boxes)
            atomic_save_npz(stage.path(i), boxes=b, size=np.array(hw, np.int32))
            stats["boxes"] += len(b)
            stats["images"] += 1
    elif backend in ("fast", "selectivesearch"):
        jobs = [(i, str(image_path(i)), str(stage.path(i)), backend, max_boxes, min_size, params) for i in todo]
        n_workers = workers if workers and workers > 0 else (os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, len(jobs)))
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"proposals ({backend})", unit="img", disable=not progress)
        with (ProcessPoolExecutor(max_workers=n_workers) if n_workers > 1 else contextlib.nullcontext()) as ex:
            results = ex.map(_propose_one, jobs, chunksize=1) if ex else map(_propose_one, jobs)
            for _, nb, dt in results:
                stats["boxes"] += nb
                stats["seconds"] += dt
                stats["images"] += 1
                bar.update(1)
        bar.close()
    else:
        raise ValueError(f"unknown proposal backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    missing = [i for i in ids if not stage.has(i)]
    if missing:  # pragma: no cover - defensive
        raise RuntimeError(f"{stage.dir}: proposals missing for {len(missing)} images, e.g. {missing[0]}")
    return stage.finish(len(ids), new_images=stats["images"], new_boxes=stats["boxes"],
                        proposal_seconds=round(stats["seconds"], 3))
