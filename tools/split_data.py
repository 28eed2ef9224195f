#!/usr/bin/env python
"""Make train / val / test splits for labelled photos that have none, stratified by class.

    python tools/split_data.py /path/to/VOC2007                          # JPEGImages/ + Annotations/
    python tools/split_data.py --format coco /path/to/annotations/instances_default.json

VOC: writes ROOT/ImageSets/Main/{train,val,test,trainval}.txt. COCO: writes ROOT/annotations/instances_{train,val,
test}.json from the one file (ROOT: the folder above annotations/, else the file's folder; the images stay where
they are). Then train with --set data.root=ROOT (and --set data.format=coco). Every annotation is read first:
a file the pipeline would refuse is named and nothing is written. Existing split files are kept unless
--overwrite. The same data and --seed give the same splits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sppdet.cli import run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a VOC year folder, or with --format coco one instances JSON")
    ap.add_argument("--format", choices=("voc", "coco"), default="voc")
    ap.add_argument("--val", type=float, default=0.15, help="fraction of the images for val (default 0.15)")
    ap.add_argument("--test", type=float, default=0.2, help="fraction of the images for test (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = ap.parse_args(argv)

    def body() -> int:
        from sppdet.splits import split_coco, split_voc

        split = split_coco if args.format == "coco" else split_voc
        report = split(args.source, val=args.val, test=args.test, seed=args.seed, overwrite=args.overwrite)
        for line in report.left_out:
            print(f"left out: {line}")
        print(report.table())
        for line in report.warnings():
            print(f"warning: {line}")
        print("wrote " + ", ".join(str(p) for p in report.written))
        coco = " --set data.format=coco" if args.format == "coco" else ""
        print(f"next: python tools/demo.py --config configs/custom.yaml --run runs/mine --set data.root={report.root}"
              f"{coco}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
