#!/usr/bin/env python
"""Pre-train a trunk as an SPP-net classifier (single- or multi-size).

    python tools/pretrain.py --config configs/demo.yaml                  # ground-truth crops of pretrain.root (else data.train_split)
    python tools/pretrain.py --config configs/demo.yaml --folder imgs/   # an image folder, one sub-folder per class
    python tools/pretrain.py --config configs/demo.yaml --set pretrain.sizes=[224]   # single-size
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_pretrain


def _arguments(ap) -> None:
    ap.add_argument("--folder", help="image folder with one sub-folder per class (instead of VOC crops)")
    ap.add_argument("--split", help="a split of data.root whose ground-truth crops are used (default: pretrain.root/pretrain.split if set, else data.train_split)")


def _body(run, args) -> None:
    ck = stage_pretrain(run, args.split, args.folder, overwrite=args.overwrite)
    h = ck["history"][-1] if ck.get("history") else {}
    print(f"checkpoint: {run.pretrain_ckpt} (held-out accuracy {h.get('val_acc', float('nan')):.3f})")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv, _arguments)


if __name__ == "__main__":
    sys.exit(main())
