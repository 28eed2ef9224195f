#!/usr/bin/env python
"""Which boxes a proposal cap keeps: recall of a split's objects by the best N boxes, in rank order and with
`proposals.cap_nms` (near-copies of better-ranked boxes moved behind the others), and what the cap costs.

    python benchmarks/bench_proposal_cap.py --root <VOC year folder> [--split val] [--caps 2000,4000]
        [--cap-nms 0.7,0.8] [--images 0] [--out cap.json]

Selective search (`fast`, the run's default parameters) runs once per photo, uncapped; each cap and ordering is
then applied to the same boxes. Recall at IoU 0.5 / 0.7 over the split's objects (difficult ones included); "all":
every box selective search gives. Seconds: the ordering's own time per photo over the cap (one core), beside
selective search's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a VOC year folder (JPEGImages/, Annotations/, ImageSets/Main/)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--caps", default="2000,4000", help="comma-separated max_boxes values")
    ap.add_argument("--cap-nms", default="0.7,0.8", help="comma-separated cap_nms values (0: rank order, always run)")
    ap.add_argument("--images", type=int, default=0, help="the first N photos of the split (0: all)")
    ap.add_argument("--min-size", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="JSON file for the table")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from tqdm import tqdm

    from sppdet.boxes import diverse_first, iou_matrix
    from sppdet.selective_search import fast_selective_search, finalize_boxes
    from sppdet.voc import VOCDataset, class_names_in

    caps = [int(c) for c in _floats(args.caps)]
    orders = [0.0] + [t for t in _floats(args.cap_nms) if t > 0]
    root = Path(args.root)
    ds = VOCDataset(root, args.split, class_names_in(root, args.split))
    ids = ds.ids[: args.images] if args.images else ds.ids
    hits = {(t, c, q): 0 for t in orders for c in caps + [0] for q in (0.5, 0.7)}
    raw_counts, ss_seconds, order_seconds, objects = [], [], [], 0
    diverse_first(np.zeros((2, 4)) + [0, 0, 1, 1], 1, 0.5)  # compile before timing
    for i in tqdm(ids, desc="photos", unit="img"):
        rgb = ds.image(i)
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        raw = fast_selective_search(rgb)
        ss_seconds.append(time.perf_counter() - t0)
        boxes = finalize_boxes(raw, w, h, args.min_size, 0)  # clipped, small ones dropped, deduplicated
        raw_counts.append(len(boxes))
        gt = ds.annotation(i).boxes
        objects += len(gt)
        if not len(gt):
            continue
        for t in orders:
            for c in caps + [0]:
                if c == 0 or len(boxes) <= c or t == 0:
                    kept = boxes[:c] if c else boxes
                else:
                    t0 = time.perf_counter()
                    kept = boxes[diverse_first(boxes, c, t)]
                    order_seconds.append(time.perf_counter() - t0)
                best = iou_matrix(gt, kept).max(1) if len(kept) else np.zeros(len(gt))
                for q in (0.5, 0.7):
                    hits[t, c, q] += int((best >= q).sum())
    table = {
        "root": str(root), "split": args.split, "photos": len(ids), "objects": objects,
        "median_boxes": float(np.median(raw_counts)) if raw_counts else 0.0,
        "photos_over_cap": {c: int(sum(n > c for n in raw_counts)) for c in caps},
        "selective_search_s": float(np.median(ss_seconds)) if ss_seconds else 0.0,
        "cap_nms_s_median": float(np.median(order_seconds)) if order_seconds else 0.0,
        "cap_nms_s_max": float(max(order_seconds)) if order_seconds else 0.0,
        "recall": {f"cap_nms {t:g}" if t else "rank order": {
            ("all" if c == 0 else str(c)): [hits[t, c, 0.5] / max(objects, 1), hits[t, c, 0.7] / max(objects, 1)]
            for c in caps + [0]} for t in orders},
    }
    print(f"{root} {args.split}: {len(ids)} photos, {objects} objects, median {table['median_boxes']:.0f} boxes; "
          "photos over the cap: " + ", ".join(f"{c}: {n}" for c, n in table["photos_over_cap"].items()))
    print("recall at IoU 0.5 / 0.7 of the best N boxes")
    print(f"{'ordering':<14}" + "".join(f"{c:>16}" for c in [str(c) for c in caps] + ["all"]))
    for name, row in table["recall"].items():
        print(f"{name:<14}" + "".join(f"{r[0]:>9.3f} / {r[1]:.3f}" for r in row.values()))
    print(f"selective search {table['selective_search_s']:.3f} s per photo (median); the cap_nms ordering "
          f"{table['cap_nms_s_median'] * 1000:.1f} ms median, {table['cap_nms_s_max'] * 1000:.1f} ms max, per photo "
          "over the cap")
    if args.out:
        from sppdet.store import atomic_write_text

        atomic_write_text(args.out, json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
