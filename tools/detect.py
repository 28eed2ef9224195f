#!/usr/bin/env python
"""Detect objects in image files (any JPEG/PNG) or a VOC split with a trained run.

    python tools/detect.py --run runs/demo --out out/ photo1.jpg photo2.png
    python tools/detect.py --run runs/demo --out out/ --split test      # a split of the run's dataset

For each image: proposals -> conv5 once per scale -> SPP pooling + fc head -> SVM scores -> per-class NMS ->
box regression -> clipping -> score threshold and per-image cap (a `route: fast_rcnn` run: its network's softmax
scores and box regression). Writes OUT/<stem>.json (a list of
{"class", "score", "box": [x1, y1, x2, y2]} in original-image pixels, 0-based continuous) and OUT/<stem>.png
with the boxes drawn, and prints the time of each stage. An unreadable image gets a one-line message; the
others are still processed and the exit code is 1. Input files are never overwritten: an output that would
replace an input (OUT is the images' folder) is named <stem>_det.png, and inputs that share a stem (a.jpg, a.png)
get <stem>_<extension>.json / .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppdet.cli import add_device_argument, run_main


def output_names(paths: list[Path], out: Path) -> list[str]:
    """An output stem per input: its stem, or ``<stem>_<ext>`` where inputs share a stem; ``_det`` is added to a
    stem whose ``.json`` or ``.png`` would be one of the input files."""
    stems = [p.stem for p in paths]
    names = [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    inputs = {p.resolve() for p in paths}
    out_names = []
    for n in names:
        while any((out / f"{n}{ext}").resolve() in inputs for ext in (".json", ".png")):
            n += "_det"
        out_names.append(n)
    return out_names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="image files")
    ap.add_argument("--run", required=True, help="a trained run folder (holds config.yaml)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--split", help="instead of files: every image of this split of the run's dataset")
    ap.add_argument("--threshold", type=float, default=None,
                    help="score threshold (default: the run's test.draw_threshold, for SVM margins; for a route: "
                         "fast_rcnn run, whose scores are probabilities, its fast_rcnn.draw_threshold)")
    ap.add_argument("--no-bbox-reg", action="store_true")
    add_device_argument(ap)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)

    def body() -> int:
        from sppdet import Predictor
        from sppdet.detector import Detections
        from sppdet.malloc import large_blocks_reused
        from sppdet.store import atomic_write_text
        from sppdet.images import save_image
        from sppdet.visualize import draw_boxes
        from sppdet.voc import VOCError, load_image

        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: is a file; give a folder for the results")
        predictor = Predictor(args.run, args.device, args.threshold, not args.no_bbox_reg, args.overrides)
        classes = predictor.classes
        if args.split:
            ds = predictor.run.dataset(args.split)
            # a split's images as every stage reads them (fitted to their annotations)
            items = [(i, ds.image_path(i), lambda i=i: ds.image(i)) for i in ds.ids]
        else:
            # a photo as a viewer shows it (its EXIF orientation applied): the boxes are in those pixels
            paths = [Path(f) for f in args.images]
            items = [(n, p, lambda p=p: load_image(p, orient=True)) for n, p in zip(output_names(paths, out), paths)]
        if not items:
            raise ValueError("no images given (pass image files or --split)")
        out.mkdir(parents=True, exist_ok=True)
        failures = 0
        with large_blocks_reused():  # each photo's activations: the same large blocks
            for stem, path, load in items:
                try:
                    rgb = load()
                except VOCError as e:
                    print(f"error: {e}", file=sys.stderr)
                    failures += 1
                    continue
                r = predictor(rgb)
                d = Detections(r["boxes"], r["scores"], r["labels"])
                atomic_write_text(out / f"{stem}.json", json.dumps(d.to_json(classes), indent=1))
                save_image(out / f"{stem}.png", draw_boxes(rgb, d.boxes, d.labels, classes, d.scores))
                t = r["seconds"]
                print(f"{path}: {len(d.scores)} detections ({rgb.shape[1]}x{rgb.shape[0]}, {r['proposals']} proposals) | "
                      f"proposals {t['proposals']:.2f} s, conv {t['conv']:.3f} s, pooling+fc {t['pool_fc']:.3f} s, "
                      f"rest {t['rest']:.3f} s, total {r['wall_seconds']:.2f} s"
                      + (f" | best: {r['classes'][0]} {float(d.scores[0]):.2f}" if len(d.scores) else ""))
        print(f"wrote {len(items) - failures} result(s) to {out}")
        return 1 if failures else 0

    return run_main(body, on_interrupt=f"interrupted; the results written so far are in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
