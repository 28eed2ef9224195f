#!/usr/bin/env python
"""R-CNN mode, the baseline SPP-net was measured against: every window cropped with context, warped and pushed
through the trunk on its own; per-class SVMs (hard-negative mining) and box regressors on those pool5 features;
then tested on the test split.

    python tools/propose.py --config configs/tiny.yaml --split train   # (and --split test): the shared proposals
    python tools/train_rcnn.py --config configs/tiny.yaml

On a CPU every window of every image is too slow: rcnn.max_windows (default 300) caps the proposals scored per image
(their ranked order), for training and testing. Writes features_rcnn/<train>/ (the training windows' pool5, one
file per image, as R-CNN wrote them; an interrupted run resumes there), model/rcnn/ and detections/<split>_rcnn/.
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages.rcnn import stage_rcnn, stage_rcnn_test


def _arguments(ap) -> None:
    ap.add_argument("--split", default=None, help="split to test on (default: data.test_split)")
    ap.add_argument("--no-test", action="store_true", help="train only")


def _body(run, args) -> None:
    m = stage_rcnn(run, args.overwrite)
    print(f"r-cnn model: {run.dir / 'model' / 'rcnn'} ({m.get('windows')} training windows warped, "
          f"{m.get('feature_seconds', 0):.0f} s of features)")
    if not args.no_test:
        r = stage_rcnn_test(run, args.split)
        print(f"mAP (VOC07 11-point): {r['map07']:.3f}")
        print(f"results: {run.detections_dir(args.split or run.cfg.data.test_split, '_rcnn')}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
