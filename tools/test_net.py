#!/usr/bin/env python
"""Test on a whole split from the caches: detections, VOC comp4 files, per-class AP table, mAP (VOC07 11-point
and area), PR-curve PNG, without and with box regression.

    python tools/test_net.py --config configs/demo.yaml [--split test] [--svm-tag _pool5 | --no-combine]

The paper's model combination of two networks (section 4.4): test another run on the same split first, then

    python tools/test_net.py --config configs/demo.yaml --combine-with runs/toy_lite0

NMS on the union of both runs' detections, written to detections/<split>_combined.
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_combine, stage_test


def _arguments(ap) -> None:
    ap.add_argument("--split", default=None)
    ap.add_argument("--svm-tag", default="", help="only the SVMs of model/svm<tag> (default: svm.feature's, combined "
                                                 "with test.combine's)")
    ap.add_argument("--no-combine", action="store_true", help="svm.feature's SVMs alone, without test.combine's")
    ap.add_argument("--tag", default="", help="suffix of the detections folder")
    ap.add_argument("--combine-with", action="append", default=[], metavar="RUN_DIR",
                    help="another run folder tested on the same split (repeatable): also writes the combination, "
                         "NMS on the union of the runs' detections, to detections/<split>_combined")


def _body(run, args) -> None:
    split = args.split or run.cfg.data.test_split
    if args.combine_with and (args.tag or args.svm_tag or args.no_combine):
        raise ValueError("--combine-with combines the run's default detections: leave out --tag, --svm-tag "
                         "and --no-combine")
    m = stage_test(run, split, args.svm_tag, args.tag, combine=not args.no_combine)
    print(f"mAP (VOC07 11-point): {m['map07']:.3f}")
    print(f"results: {run.detections_dir(split, args.tag)}")
    if args.combine_with:
        c = stage_combine(run, split, args.combine_with)
        print(f"combined with {', '.join(args.combine_with)}: mAP (VOC07 11-point): {c['map07']:.3f}")
        print(f"results: {run.detections_dir(split, '_combined')}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments, overwrite=False)


if __name__ == "__main__":
    sys.exit(main())
