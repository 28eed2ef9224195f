#!/usr/bin/env python
"""What fine-tuning pays per step before the fc layers run: drawing one mini-batch (``finetune.images_per_batch``
images, ``batch_size / images_per_batch`` windows each) and pooling its windows from a run's conv5 cache, with the
cached maps as stored on disk (channels outermost) and as the cache now loads them (channels innermost, the layout
the sparse-table pooling builds its tables in), side by side in one run on the same draws.

    python benchmarks/bench_finetune_batch.py --run runs/real/raccoon [--batches 60] [--images 8,4]

Needs a run whose proposals and train-split conv5 cache exist (tools/demo.py or tools/extract_features.py).
Fine-tuning draws each training image ~100 times (1500 steps x 8 images over ~130 images), so a copy per draw
counts; the fc layers' own step is ``bench_finetune_step.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet.config import load_config  # noqa: E402
from sppdet.finetune import FeatureLRU, _make_batch  # noqa: E402
from sppdet.run import Run  # noqa: E402
from sppdet.stages.common import feature_cache, split_windows  # noqa: E402
from sppdet.store import atomic_write_text  # noqa: E402


class _AsStored(FeatureLRU):
    """The LRU with every map made contiguous ``(C, H, W)`` again: the layout before the cache loaded maps
    channels-last."""

    def get(self, image_id):
        f = super().get(image_id)
        if not f.maps[0].is_contiguous():
            f.maps = [m.contiguous() for m in f.maps]
            f.flipped_maps = [m.contiguous() for m in f.flipped_maps] if f.flipped_maps is not None else None
        return f


def median_ms(lru: FeatureLRU, ids: list, windows: dict, cfg, classes: int, images: int, batches: int) -> float:
    """Median milliseconds of building one training batch (the same seeded draws for every layout)."""
    rng = np.random.default_rng(0)
    times = []
    for k in range(batches + 5):
        pick = list(rng.choice(ids, min(images, len(ids)), replace=False))
        t = time.perf_counter()
        _make_batch(pick, windows, lru, cfg, classes, rng, train=True)
        if k >= 5:  # the first draws fill the LRU from disk
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with proposals and the train split's conv5 cache")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--images", default="8", help="images per batch, comma-separated (finetune.images_per_batch)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    run = Run(load_config(Path(args.run) / "config.yaml"), args.run, log_fn=lambda s: None)
    split = run.cfg.data.train_split
    cache, windows = feature_cache(run, split), split_windows(run, split)
    ids = [i for i, w in windows.items() if len(w.boxes)]
    fresh, stored = FeatureLRU(cache), _AsStored(cache)
    for i in ids:  # both hold the whole split, as fine-tuning's LRU does (2 GiB)
        fresh.get(i), stored.get(i)
    rows = []
    print(f"{'images':>6} {'windows':>7} {'as stored ms':>12} {'channels-last ms':>16} {'ratio':>6}")
    for n in (int(v) for v in args.images.split(",")):
        cfg = dataclasses.replace(run.cfg.finetune, images_per_batch=n)
        a = median_ms(stored, ids, windows, cfg, len(run.classes), n, args.batches)
        b = median_ms(fresh, ids, windows, cfg, len(run.classes), n, args.batches)
        rows.append({"images": n, "windows": cfg.batch_size, "as_stored_ms": a, "channels_last_ms": b})
        print(f"{n:>6} {cfg.batch_size:>7} {a:>12.1f} {b:>16.1f} {a / b:>5.2f}x")
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
