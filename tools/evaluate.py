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


def _matching_splits(detections: Path, root: Path) -> str:
    """`` They are the images of split(s) X.`` for the split files of ``root`` that hold every image of the
    detections file, else ``""``."""
    import numpy as np

    with np.load(detections) as z:
        ids = {k.rsplit("/", 1)[0] for k in z.files if "/" in k}
    splits = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt")
                    if ids <= set(p.read_text().split()))
    return f" They are all in split(s) {', '.join(splits)}: pass --split accordingly." if splits else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detections", required=True)
    ap.add_argument("--voc-root", required=True, help="VOC year folder")
    ap.add_argument("--split", required=True)
    ap.add_argument("--classes", default=None, help="comma-separated class list (default: the 20 VOC classes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> int:
        from sppdet.detector import load_detections
        from sppdet.evaluation import detections_by_class, evaluate_detections, format_table
        from sppdet.store import atomic_write_text
        from sppdet.visualize import plot_pr_curves
        from sppdet.voc import VOCDataset

        classes = args.classes.split(",") if args.classes else None
        ds = VOCDataset(args.voc_root, args.split, classes)
        k = len(ds.classes)
        try:
            loaded = load_detections(args.detections, ds.ids, k)
        except ValueError as e:
            raise ValueError(f"{e}{_matching_splits(Path(args.detections), Path(args.voc_root))}") from None
        dets = detections_by_class(loaded, k)
        res = evaluate_detections(dets, {c: ds.ground_truth(c) for c in range(k)}, ds.classes)
        out = Path(args.out)
        plot_pr_curves(res["curves"], {c: v["ap07"] for c, v in res["per_class"].items()}, out / "pr_curves.png")
        atomic_write_text(out / "metrics.json", json.dumps({k: v for k, v in res.items() if k != "curves"}, indent=2))
        print(format_table(res))
        print(f"mAP (VOC07 11-point): {res['map07']:.3f}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
