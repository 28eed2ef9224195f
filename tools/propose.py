#!/usr/bin/env python
"""Compute (or import) object proposals for a split into the run's proposal store.

    python tools/propose.py --config configs/demo.yaml --split test [--workers 2]
Resumes: finished images are skipped; a changed backend or parameter is an error (--overwrite rebuilds).
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_proposals


def _arguments(ap) -> None:
    ap.add_argument("--split", required=True)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: proposals.workers, 0 = all cores)")


def _body(run, args) -> None:
    m = stage_proposals(run, args.split, args.overwrite, args.workers)
    print(f"proposals {args.split}: {m['items']} images in {run.proposals_dir(args.split)} "
          f"({m['bytes'] / 1e6:.1f} MB, {m['seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
