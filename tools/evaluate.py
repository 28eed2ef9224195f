#!/usr/bin/env python
"""Evaluate a detections file against a VOC-format split: per-class AP table (VOC07 11-point and area),
metrics.json and a PNG of precision-recall curves.

    python tools/evaluate.py --detections runs/demo/detections/test/detections.npz \
        --voc-root data/toy/VOC2007 --split test --classes disc,block,triangle,ring,cross --out eval/
detections.npz holds <id>/boxes (N, 4) 0-based xyxy, <id>/scores (N,), <id>/labels (N,) (as tools/test_net.py writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppdet.cli import run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detections", required=True)
    ap.add_argument("--voc-root", required=True, help="VOC year folder")
    ap.add_argument("--split", required=True)
    ap.add_argument("--classes", default=None, help="comma-separated class list (default: the 20 VOC classes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> int:
        from sppdet.evaluation import evaluate_detections, format_table
        from sppdet.store import atomic_write_text, load_npz
        from sppdet.visualize import plot_pr_curves
        from sppdet.voc import VOCDataset

        classes = args.classes.split(",") if args.classes else None
        ds = VOCDataset(args.voc_root, args.split, classes)
        d = load_npz(args.detections)
        dets = {k: [] for k in range(len(ds.classes))}
        for i in ds.ids:
            if f"{i}/boxes" not in d:
                continue
            for b, s, k in zip(d[f"{i}/boxes"], d[f"{i}/scores"], d[f"{i}/labels"]):
                if not 0 <= int(k) < len(ds.classes):
                    raise ValueError(f"{args.detections}: class index {int(k)} of image {i} is out of range")
                dets[int(k)].append((i, float(s), *map(float, b)))
        res = evaluate_detections(dets, {k: ds.ground_truth(k) for k in range(len(ds.classes))}, ds.classes)
        out = Path(args.out)
        plot_pr_curves(res["curves"], {c: v["ap07"] for c, v in res["per_class"].items()}, out / "pr_curves.png")
        atomic_write_text(out / "metrics.json", json.dumps({k: v for k, v in res.items() if k != "curves"}, indent=2))
        print(format_table(res))
        print(f"mAP (VOC07 11-point): {res['map07']:.3f}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
