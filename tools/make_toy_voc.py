#!/usr/bin/env python
"""Generate the deterministic synthetic VOC-format dataset (demo, tests, benchmarks).

    python tools/make_toy_voc.py --out data/toy --num-images 200 --seed 0
writes data/toy/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{train,val,trainval,test}.txt}.
"""

from __future__ import annotations

import argparse
import sys
import time

from sppdet.synthetic import TOY_CLASSES, make_toy_voc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (VOC2007/ is created inside)")
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=300)
    ap.add_argument("--max-side", type=int, default=500)
    args = ap.parse_args(argv)
    t0 = time.time()
    root = make_toy_voc(args.out, args.num_images, args.seed, args.min_side, args.max_side, progress=True)
    print(f"wrote {args.num_images} images of classes {', '.join(TOY_CLASSES)} to {root} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
