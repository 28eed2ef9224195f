#!/usr/bin/env python
"""Fast R-CNN mode: train the whole network (conv layers above a frozen stem, fc6/fc7, softmax classifier and box
regressors) in one stage from the images and the proposals, then test it on the test split.

    python tools/propose.py --config configs/tiny.yaml --split train   # (and --split test): the shared proposals
    python tools/train_fast_rcnn.py --config configs/tiny.yaml [--set fast_rcnn.pooling=roi --tag _roi]

No feature cache, no SVMs, no separate regressors. Writes model/fast_rcnn<tag>/ and detections/<split>_fast_rcnn<tag>/.
`--set fast_rcnn.train_conv=false --tag _frozen` trains the fc layers only (SPP-net's limitation, measured).
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages.fast_rcnn import stage_fast_rcnn, stage_fast_rcnn_test


def _arguments(ap) -> None:
    ap.add_argument("--tag", default="", help="suffix of the model and detections folders (e.g. for a variant)")
    ap.add_argument("--split", default=None, help="split to test on (default: data.test_split)")
    ap.add_argument("--no-test", action="store_true", help="train only")


def _body(run, args) -> None:
    m = stage_fast_rcnn(run, args.tag, args.overwrite)
    print(f"fast r-cnn model: {run.dir / 'model' / f'fast_rcnn{args.tag}'} (trained in {m.get('seconds', 0):.0f} s, "
          f"conv layers changed: {m.get('conv_changed')})")
    if not args.no_test:
        r = stage_fast_rcnn_test(run, args.split, args.tag)
        print(f"mAP (VOC07 11-point): {r['map07']:.3f}")
        print(f"results: {run.detections_dir(args.split or run.cfg.data.test_split, f'_fast_rcnn{args.tag}')}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
