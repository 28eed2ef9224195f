"""Object proposals: selective search (two implementations), precomputed boxes, a store.

Backends (``propose(image, backend=...)``):

- ``"fast"`` (default) and ``"selectivesearch"``: :mod:`sppdet.selective_search`.
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

import numpy as np

from .selective_search import as_rgb, fast_selective_search, finalize_boxes, selectivesearch_diversified
from .store import atomic_save_npz, load_npz
from .manifest import Stage

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
# Settings a proposal folder records since a later version, with the value a folder made before them was made with
# (compute_proposals and the later stages' check of the folder both fill them in so).
RECORDED_SINCE = {"cap_nms": 0.0}


# ----------------------------------------------------------------- helpers
def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or ``taskset`` may have narrowed
    below ``os.cpu_count()``); the default number of proposal workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


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
            cap_nms: float = 0.0, **params) -> np.ndarray:
    """Proposals for one image.

    Args:
        image: RGB uint8 ``(H, W, 3)`` (grayscale and RGBA are accepted too).
        backend: ``"fast"`` (default) or ``"selectivesearch"``.
        max_boxes: cap, in rank order.
        min_size: boxes whose width or height is smaller are dropped (R-CNN: 20 px).
        cap_nms: > 0: past the cap, near-copies (IoU > cap_nms) of better-ranked boxes go last
            (:func:`sppdet.selective_search.finalize_boxes`); 0: rank order alone.
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
    return finalize_boxes(raw, w, h, min_size, max_boxes, cap_nms)


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
    image_id, image_path, out_path, backend, max_boxes, min_size, cap_nms, params, fit = args
    from .images import fit_to_annotation, load_image

    img = load_image(image_path)
    if fit is not None:  # (H, W, the annotation file): the image as the dataset gives it
        img = fit_to_annotation(img, image_path, fit[1], fit[0], annotation=fit[2])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boxes = propose(img, backend=backend, max_boxes=max_boxes, min_size=min_size, cap_nms=cap_nms, **params)
    dt = time.perf_counter() - t0
    atomic_save_npz(out_path, boxes=boxes, size=np.array(img.shape[:2], np.int32))
    return image_id, len(boxes), dt


def compute_proposals(ids: Sequence[str], image_path: Callable[[str], Path], out_dir: str | Path,
                      backend: str = "fast", max_boxes: int = 2000, min_size: float = 20.0, params: dict | None = None,
                      precomputed: str | None = None, workers: int = 0, overwrite: bool = False,
                      progress: bool = True, image_size: Callable[[str], tuple[int, int]] | None = None,
                      inputs: dict | None = None, item_inputs: dict[str, str] | None = None,
                      annotation_path: Callable[[str], Path] | None = None, cap_nms: float = 0.0) -> dict:
    """Compute (or import) proposals for ``ids`` into a resumable store; returns the manifest.

    A finished image is skipped when the manifest's backend and parameters (and ``inputs``, e.g. the
    fingerprint of the images' contents) match; a change is a :class:`~sppdet.store.StaleCacheError`
    naming what changed. A manifest from before ``inputs`` were recorded is not checked on them.
    ``item_inputs`` (``{id: fingerprint of its image}``): when only images changed, only theirs are recomputed.
    With ``image_size`` (``id -> (H, W)``, the annotated size) and ``annotation_path`` (``id ->`` its annotation
    file, named in messages) each image is first fitted to its annotation as the dataset fits it
    (:func:`sppdet.images.fit_to_annotation`), so the boxes are in the same pixels as every later stage's.
    """
    params = dict(params or {})
    cfg = {"backend": backend, "max_boxes": max_boxes, "min_size": min_size, "cap_nms": float(cap_nms),
           "params": resolved_params(backend, params), "precomputed": precomputed}
    stage = Stage(out_dir, "proposals", cfg, inputs, overwrite=overwrite,
                  defaults={"params": resolved_params(backend, {}), **RECORDED_SINCE},
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
            b = finalize_boxes(raw, hw[1], hw[0], min_size, max_boxes, cap_nms)
            atomic_save_npz(stage.path(i), boxes=b, size=np.array(hw, np.int32))
            stats["boxes"] += len(b)
            stats["images"] += 1
    elif backend in ("fast", "selectivesearch"):
        jobs = [(i, str(image_path(i)), str(stage.path(i)), backend, max_boxes, min_size, cap_nms, params,
                 (*image_size(i), str(annotation_path(i))) if image_size and annotation_path else None)
                for i in todo]
        n_workers = workers if workers and workers > 0 else usable_cores()
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
