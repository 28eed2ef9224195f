#!/usr/bin/env python
"""Detect objects in image files (any JPEG/PNG) or a VOC split with a trained run.

    python tools/detect.py --run runs/demo --out out/ photo1.jpg photo2.png
    python tools/detect.py --run runs/demo --out out/ --split test      # a split of the run's dataset

For each image: proposals -> conv5 once per scale -> SPP pooling + fc head -> SVM scores -> per-class NMS ->
box regression -> clipping -> score threshold and per-image cap. Writes OUT/<stem>.json (a list of
{"class", "score", "box": [x1, y1, x2, y2]} in original-image pixels, 0-based continuous) and OUT/<stem>.png
with the boxes drawn, and prints the time of each stage. An unreadable image gets a one-line message; the
others are still processed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sppdet.cli import run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="image files")
    ap.add_argument("--run", required=True, help="a trained run folder (holds config.yaml)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--split", help="instead of files: every image of this split of the run's dataset")
    ap.add_argument("--threshold", type=float, default=None, help="SVM score threshold (default: test.draw_threshold)")
    ap.add_argument("--no-bbox-reg", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)

    def body() -> int:
        import warnings

        import numpy as np

        from sppdet.config import load_config
        from sppdet.pipeline import Run, build_detector
        from sppdet.proposals import propose
        from sppdet.visualize import draw_boxes, save_png
        from sppdet.voc import VOCError, load_image

        run_dir = Path(args.run)
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        run = Run(cfg, run_dir, save_config=False)
        det = build_detector(run, cfg.data.test_split, use_bbox_reg=not args.no_bbox_reg)
        backbone = run.backbone().to(args.device)
        thr = cfg.test.draw_threshold if args.threshold is None else args.threshold
        p = cfg.proposals
        backend = p.backend if p.backend in ("fast", "selectivesearch") else "fast"
        if args.split:
            ds = run.dataset(args.split)
            items = [(i, ds.image_path(i)) for i in ds.ids]
        else:
            items = [(Path(f).stem, Path(f)) for f in args.images]
        if not items:
            raise ValueError("no images given (pass image files or --split)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        failures = 0
        for stem, path in items:
            try:
                rgb = load_image(path)
            except VOCError as e:
                print(f"error: {e}", file=sys.stderr)
                failures += 1
                continue
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                boxes = propose(rgb, backend=backend, max_boxes=p.max_boxes, min_size=p.min_size, **p.params)
            t_prop = time.perf_counter() - t0
            plain, reg, t = det.detect_image(backbone, rgb, boxes, cfg.features, args.device, score_threshold=thr)
            d = reg if reg is not None else plain
            (out / f"{stem}.json").write_text(json.dumps(d.to_json(run.classes), indent=1))
            save_png(out / f"{stem}.png", draw_boxes(rgb, d.boxes, d.labels, run.classes, d.scores))
            print(f"{path}: {len(d.scores)} detections ({rgb.shape[1]}x{rgb.shape[0]}, {len(boxes)} proposals) | "
                  f"proposals {t_prop:.2f} s, conv {t['conv']:.3f} s, pooling+fc {t['pool'] + t['fc']:.3f} s, "
                  f"svm+reg+nms {t['svm'] + t['post']:.3f} s"
                  + (f" | best: {run.classes[int(d.labels[0])]} {float(d.scores[0]):.2f}" if len(d.scores) else ""))
        print(f"wrote {len(items) - failures} result(s) to {out}")
        return 1 if failures else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
