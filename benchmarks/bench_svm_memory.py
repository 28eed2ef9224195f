#!/usr/bin/env python
"""The SVM stage's hard-negative mining at many classes: seconds per image and peak memory, the per-class
reference trainer (what sppdet had: one float32 cache per class, each class scoring the windows on its own)
against the pooled one (one matrix product per image, a window cached once however many classes hold it).

    python benchmarks/bench_svm_memory.py [--images 60] [--classes 20] [--dim 5600] [--windows 1500]

Synthetic features stand in for pooled ones (Lite0's pool5 is 5,600-d): each class's positives around a centre
of its own, each image's windows a mixture of background and of parts of objects, every window a negative for
most classes (as on VOC, where few windows overlap an object of a given class). Each trainer runs in its own
process; peak RSS is that process's, sampled while the mining runs. Both must give the same SVMs (checked).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _data(seed: int, images: int, classes: int, dim: int, windows: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    x_pos = [(centres[k] + rng.normal(0, 0.7, (25, dim))).astype(np.float32) for k in range(classes)]

    def image(i):
        r = np.random.default_rng((seed, i))
        mix = r.random((windows, classes)) < 0.05  # a window shows a little of a few objects
        feats = (r.normal(0, 1, (windows, dim)) + 0.6 * mix.astype(np.float32) @ centres).astype(np.float32)
        return feats, ~mix

    return x_pos, image


def run(args) -> dict:
    kind, images, classes, dim, windows = args
    import torch

    torch.set_num_threads(1)
    from sppdet.config import SVMConfig
    from sppdet.store import PeakRSS

    if kind == "reference":
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_svm import HardNegativeTrainer
    else:
        from sppdet.svm import HardNegativeTrainer
    x_pos, image = _data(0, images, classes, dim, windows)
    norm = float(np.linalg.norm(image(0)[0], axis=1).mean())
    scale = 20.0 / norm  # the SVM stage scales features to mean norm 20
    x_pos = [x * scale for x in x_pos]
    trainer = HardNegativeTrainer(x_pos, dim, SVMConfig(C=0.001))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for i in range(images):
            feats, neg = image(i)
            trainer.add_image(i, feats * scale, neg, last=i == images - 1)
        seconds = time.perf_counter() - t0
    caches = trainer.finish()
    return {"seconds_per_image": seconds / images, "peak_rss_mb": mem.peak / 2**20,
            "negatives": sum(len(c.x_neg) for c in caches), "W": np.stack([c.w for c in caches])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--dim", type=int, default=5600)
    ap.add_argument("--windows", type=int, default=1500)
    args = ap.parse_args(argv)
    print(f"{args.images} images x {args.windows} windows, {args.classes} classes, {args.dim}-d features")
    print(f"{'trainer':<12}{'s/img':>8}{'peak RSS MB':>13}{'cached negatives':>18}")
    out = {}
    for kind in ("reference", "pooled"):
        with ProcessPoolExecutor(1) as ex:
            r = ex.submit(run, (kind, args.images, args.classes, args.dim, args.windows)).result()
        out[kind] = r
        print(f"{kind:<12}{r['seconds_per_image']:8.3f}{r['peak_rss_mb']:13.0f}{r['negatives']:18d}")
    a, b = out["reference"], out["pooled"]
    print(f"pooled / reference: time {b['seconds_per_image'] / a['seconds_per_image']:.2f}x, "
          f"peak memory {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x; same SVMs: {np.array_equal(a['W'], b['W'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
