#!/usr/bin/env python
"""conv5 once per image (one or five scales), cached as float16; SPP pooling happens on read.

    python tools/extract_features.py --config configs/demo.yaml --split trainval
    python tools/extract_features.py --config configs/voc07_zf5.yaml --split test --shard 0/4   # 4 workers/machines
Computes missing proposals first. Resumes; a changed config, backbone or proposal set is an error naming what
changed (--overwrite rebuilds). Prints seconds per image for conv and pooling, bytes per image, and the
projection to VOC 2007 (9963 images) for the conv5 cache and for caching pooled vectors instead.
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_features


def _shard(s: str) -> tuple[int, int]:
    import argparse

    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like i/n (shard i of n, counted from 0), got {s!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{s}: shards count from 0: with n = {n} they are "
                                         + " ".join(f"{k}/{n}" for k in range(min(n, 4))) + (" ..." if n > 4 else ""))
    return i, n


def _arguments(ap) -> None:
    ap.add_argument("--split", required=True)
    ap.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: process every n-th image starting at i; shards count from 0 (0/2 and 1/2)")
    ap.add_argument("--flip", action="store_true", help="also cache the flipped image's conv5 (default: for the train split "
                    "when finetune.flip, as fine-tuning needs them)")


def _body(run, args) -> None:
    m = stage_features(run, args.split, args.shard, args.overwrite, flip=True if args.flip else None)
    print(f"features {args.split}: {'complete' if m['complete'] else 'partial (other shards pending)'} in "
          f"{run.features_dir(args.split)}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
