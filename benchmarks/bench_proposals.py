#!/usr/bin/env python
"""Every proposal backend on the same images: seconds per image, boxes, recall@0.5/0.7, MABO, peak memory.

    python benchmarks/bench_proposals.py [--images 15] [--skip-selectivesearch]
Uses the real VOC sample when present (../shared/data/voc2007-sample), else generated images. Each backend runs
in its own process on one core (the selectivesearch backend with --ss-workers processes, default 1).
Peak MB: the largest resident size of the backend's process or any of its worker processes. s/img excludes the
first call, whose cost (loading compiled code) is given separately. `fast, before compiling` runs the pure-Python
region statistics and grouping that sppdet used until they were compiled (tests/reference_selective_search.py);
its boxes must equal `fast`'s. Then the time of each step of `fast` and OpenCV's selective search where the
contrib package (cv2.ximgproc) is installed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def dataset(n):
    from sppdet.voc import VOCDataset

    real = ROOT.parent / "shared" / "data" / "voc2007-sample" / "VOCdevkit" / "VOC2007"
    if real.is_dir():
        ds = VOCDataset(real, "test")
        return [(ds.image(i), ds.annotation(i).boxes, i) for i in ds.ids[:n]], "real VOC 2007 sample"
    from sppdet.synthetic import TOY_CLASSES, make_toy_voc
    from sppdet.voc import load_image, read_annotation

    root = make_toy_voc(ROOT / "data" / "bench_toy", max(n, 3), seed=5)
    ids = [p.stem for p in sorted((root / "JPEGImages").glob("*.jpg"))][:n]
    return [(load_image(root / "JPEGImages" / f"{i}.jpg"),
             read_annotation(root / "Annotations" / f"{i}.xml", TOY_CLASSES).boxes, i) for i in ids], "generated images"


def _use_python_steps() -> None:
    """Swap the compiled texture codes, region statistics and grouping for the pure-Python ones they replaced."""
    sys.path.insert(0, str(ROOT / "tests"))
    import reference_selective_search as ref

    from sppdet import grouping, regions

    regions.texture_codes, regions.region_stats = ref.texture_codes, ref.regions
    regions.region_histograms, grouping.hierarchical_grouping = ref.region_histograms, ref.hierarchical_grouping


def _opencv(img: np.ndarray, mode: str) -> np.ndarray:
    import cv2

    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img[:, :, ::-1]))
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    r = ss.process().astype(np.float32).reshape(-1, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], 1)


def run_backend(args):
    backend, items, params = args
    import warnings

    from sppdet.boxes import iou_matrix
    from sppdet.proposals import propose

    if backend == "fast_before":
        _use_python_steps()
        backend = "fast"

    def call(img):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend.startswith("opencv"):
                return _opencv(img, backend.split("_")[1])[:2000]
            return propose(img, backend=backend, **params)

    t0 = time.perf_counter()
    call(items[0][0])  # the first call loads compiled code: timed apart
    first = time.perf_counter() - t0
    best, nb, tt, boxes = [], [], 0.0, []
    for img, gt, _ in items:
        t0 = time.perf_counter()
        b = call(img)
        tt += time.perf_counter() - t0
        nb.append(len(b))
        boxes.append(b)
        if len(gt):
            best += list(iou_matrix(gt, b).max(1))
    best = np.array(best)
    return {"s/img": tt / len(items), "first": first, "boxes": float(np.mean(nb)), "R50": float((best >= 0.5).mean()),
            "R70": float((best >= 0.7).mean()), "MABO": float(best.mean()),
            # the largest of this process and its finished worker processes (selectivesearch runs in workers)
            "peak MB": max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)) / 1024,
            "boxes_list": boxes}


def stage_table(items) -> None:
    """Seconds per image of each step of the default `fast` backend (one core)."""
    from sppdet.selective_search import SS_STAGES, selective_search_timed

    selective_search_timed(items[0][0])
    t: dict = {}
    for img, _, _ in items:
        selective_search_timed(img, timing=t)
    n = len(items)
    print("fast, per step (s/img): " + ", ".join(f"{k} {t[k] / n:.3f}" for k in SS_STAGES)
          + f"; total {sum(t.values()) / n:.3f}")


def segmentation_table(items) -> None:
    """Fast mode's four FH segmentations per image (HSV, Lab x k 50, 100): scikit-image's
    ``felzenszwalb`` once per k against sppdet's one graph per colour space, same partitions."""
    from skimage.segmentation import felzenszwalb

    from sppdet.selective_search import _downscale, convert_colour
    from sppdet.segmentation import felzenszwalb_multi, same_partition

    felzenszwalb_multi(np.zeros((8, 8, 3), np.uint8), (50,))  # compiled code loaded outside the timing
    t_sk = t_own = 0.0
    same = total = 0
    for img, _, _ in items:
        rgb, _ = _downscale(img, 500)
        for space in ("hsv", "lab"):
            x = convert_colour(rgb, space)
            t0 = time.perf_counter()
            ref = [felzenszwalb(x, scale=float(k), sigma=0.8, min_size=k, channel_axis=-1) for k in (50, 100)]
            t1 = time.perf_counter()
            own = felzenszwalb_multi(x, (50, 100), 0.8)
            t_own += time.perf_counter() - t1
            t_sk += t1 - t0
            total += len(ref)
            same += sum(same_partition(r, o) for r, o in zip(ref, own))
    n = len(items)
    print(f"FH segmentations (4 per image): scikit-image {t_sk / n:.3f} s/img, sppdet {t_own / n:.3f} s/img "
          f"({t_sk / max(t_own, 1e-9):.1f}x); identical partitions {same}/{total}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=15)
    ap.add_argument("--skip-selectivesearch", action="store_true")
    ap.add_argument("--ss-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(3, os.cpu_count() or 1),
                    help="threads of the `fast, colour spaces in threads` row (Predictor's workers)")
    args = ap.parse_args(argv)
    items, what = dataset(args.images)
    threaded = f"  same, in {args.threads} threads"
    rows = [("fast (sppdet, default)", "fast", {}),
            (threaded, "fast", {"workers": args.threads}),
            ("  fast, before compiling", "fast_before", {}),
            ("  HSV+Lab only", "fast", {"colour_spaces": ("hsv", "lab")}),
            ("  fast mode (HSV+Lab, 2 sets)", "fast", {"colour_spaces": ("hsv", "lab"),
                                                      "similarity_sets": ("ctsf", "tsf")})]
    if not args.skip_selectivesearch:
        rows.append(("selectivesearch 0.4, 8 runs", "selectivesearch", {"workers": args.ss_workers}))
        rows.append(("  same, R-CNN's k 50/100", "selectivesearch", {"workers": args.ss_workers, "ks": (50, 100)}))
        rows.append(("  k 50/100, package as released", "selectivesearch",
                     {"workers": args.ss_workers, "ks": (50, 100), "repair": False}))
    import cv2

    if hasattr(cv2, "ximgproc"):
        rows += [("OpenCV contrib, fast", "opencv_fast", {}), ("OpenCV contrib, quality", "opencv_quality", {})]
    else:
        print("OpenCV's selective search: not installed (pip install opencv-contrib-python), not measured")
    print(f"{len(items)} {what}")
    print(f"{'backend':<32}{'s/img':>7}{'first':>7}{'boxes':>7}{'R@0.5':>7}{'R@0.7':>7}{'MABO':>7}{'peak MB':>9}")
    results = {}
    for label, backend, params in rows:
        with ProcessPoolExecutor(1) as ex:  # fresh process each: peak memory per backend
            r = ex.submit(run_backend, (backend, items, params)).result()
        results[label] = r
        print(f"{label:<32}{r['s/img']:7.3f}{r['first']:7.2f}{r['boxes']:7.0f}{r['R50']:7.3f}{r['R70']:7.3f}"
              f"{r['MABO']:7.3f}{r['peak MB']:9.0f}")
    ss = Path(ROOT.parent / "shared" / "data" / "voc2007-sample" / "selective_search")
    if ss.is_dir():
        from sppdet.boxes import iou_matrix
        from sppdet.proposals import load_demo_boxes

        best, nb = [], []
        for img, gt, i in items:
            f = ss / f"{i}_boxes.mat"
            if f.is_file():
                b = load_demo_boxes(f)
                nb.append(len(b))
                best += list(iou_matrix(gt, b).max(1))
        if best:
            best = np.array(best)
            print(f"{'original MATLAB fast mode':<32}{'-':>7}{np.mean(nb):7.0f}{(best >= .5).mean():7.3f}"
                  f"{(best >= .7).mean():7.3f}{best.mean():7.3f}{'-':>9}  ({len(nb)} images only)")
    a, b = results["fast (sppdet, default)"], results["  fast, before compiling"]
    same = all(np.array_equal(x, y) for x, y in zip(a["boxes_list"], b["boxes_list"]))
    print(f"fast before / after compiling: {b['s/img'] / a['s/img']:.1f}x; identical boxes in the same order: {same}")
    b = results[threaded]
    same = all(np.array_equal(x, y) for x, y in zip(a["boxes_list"], b["boxes_list"]))
    print(f"fast, one thread / {args.threads} threads: {a['s/img'] / b['s/img']:.2f}x; identical boxes: {same}")
    stage_table(items)
    segmentation_table(items)
    if "selectivesearch 0.4, 8 runs" in results:
        a, b = results["fast (sppdet, default)"], results["selectivesearch 0.4, 8 runs"]
        print(f"time ratio selectivesearch / fast: {b['s/img'] / a['s/img']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
