#!/usr/bin/env python
"""Per-class ridge bounding-box regressors on pooled features (lambda 4000, IoU > 0.5, whitened targets).

    python tools/train_bbox_reg.py --config configs/demo.yaml
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_bbox_reg


def _body(run, args) -> None:
    stage_bbox_reg(run, args.overwrite)
    print(f"box regressors: {run.bbox_reg_path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
