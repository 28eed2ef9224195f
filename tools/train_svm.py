#!/usr/bin/env python
"""Per-class linear SVMs with hard-negative mining (and, with --bbox-reg, the box regressors).

    python tools/train_svm.py --config configs/demo.yaml                    # svm.feature (+ test.combine's)
    python tools/train_svm.py --config configs/demo.yaml --feature pool5 --tag _pool5
    python tools/train_svm.py --config configs/demo.yaml --bbox-reg         # also per-class ridge regressors
Prints per class the positives, the final negative cache and the objective after each retrain.
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import combined_svms, stage_bbox_reg, stage_svm, stage_svms


def _arguments(ap) -> None:
    ap.add_argument("--feature", choices=["pool5", "fc6", "fc7", "fc6_noft", "fc7_noft"], default=None,
                    help="features for the SVMs (default: svm.feature)")
    ap.add_argument("--tag", default="", help="suffix of the model folder (model/svm<tag>), for ablations")
    ap.add_argument("--bbox-reg", action="store_true", help="also train the bounding-box regressors")


def _body(run, args) -> None:
    if args.feature is None and not args.tag:  # what testing scores with: svm.feature and test.combine
        stage_svms(run, args.overwrite)
        tags = [t for _, t in combined_svms(run.cfg)]
    else:
        stage_svm(run, args.feature, args.tag, args.overwrite)
        tags = [args.tag]
    print(f"SVMs: {', '.join(str(run.svm_path(t)) for t in tags)}")
    if args.bbox_reg:
        stage_bbox_reg(run, args.overwrite)
        print(f"box regressors: {run.bbox_reg_path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
