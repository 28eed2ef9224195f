#!/usr/bin/env python
"""Test on a whole split from the caches: detections, VOC comp4 files, per-class AP table, mAP (VOC07 11-point
and area), PR-curve PNG, without and with box regression.

    python tools/test_net.py --config configs/demo.yaml [--split test] [--svm-tag _pool5]
"""

from __future__ import annotations

import sys

from sppdet.cli import make_run, parser, run_main
from sppdet.pipeline import stage_features, stage_test


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--split", default=None)
    ap.add_argument("--svm-tag", default="")
    ap.add_argument("--tag", default="", help="suffix of the detections folder")
    args = ap.parse_args(argv)

    def body() -> int:
        run = make_run(args)
        split = args.split or run.cfg.data.test_split
        stage_features(run, split)
        m = stage_test(run, split, args.svm_tag, args.tag)
        print(f"mAP (VOC07 11-point): {m['map07']:.3f}")
        print(f"results: {run.detections_dir(split, args.tag)}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
