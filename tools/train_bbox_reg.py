#!/usr/bin/env python
"""Per-class ridge bounding-box regressors on pooled features (lambda 4000, IoU > 0.5, whitened targets).

    python tools/train_bbox_reg.py --config configs/demo.yaml
"""

from __future__ import annotations

import sys

from sppdet.cli import make_run, parser, run_main
from sppdet.pipeline import stage_bbox_reg


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    def body() -> int:
        run = make_run(args)
        stage_bbox_reg(run, args.overwrite)
        print(f"box regressors: {run.bbox_reg_path}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
