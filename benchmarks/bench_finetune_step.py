#!/usr/bin/env python
"""Fine-tuning's cost per window at two batch sizes and in two arithmetics, side by side in one run: one SGD step of
fc6/fc7/fc8 (forward, backward, sppdet's fused momentum update with Caffe's weight decay) on random pooled features
of the width of a trunk's pool5.

    python benchmarks/bench_finetune_step.py [--dim 23600] [--hidden 1024] [--batches 128,256] [--steps 30]
        [--precisions fp32,bf16]

The default width is custom.yaml's pool5 (Lite2's hypercolumn: 472 channels x 50 bins). A step's weight update
(fc6 alone is dim x hidden floats, read and written by the gradient, the momentum and the weights) does not depend
on the batch, so a larger batch over fewer steps sees the same windows for less time; the pooling of the windows
from the conv5 cache (per window, not measured here) does not change with the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet.config_sections import FinetuneConfig  # noqa: E402
from sppdet.finetune import sgd  # noqa: E402
from sppdet.models import FCHead, autocast, resolve_precision  # noqa: E402
from sppdet.store import atomic_write_text  # noqa: E402


def seconds_per_step(dim: int, hidden: int, classes: int, batch: int, steps: int, seed: int = 0,
                     precision: str = "fp32", rank: int = 0) -> float:
    """Median seconds of one training step at ``batch`` windows (after two warm-up steps), the fc layers' forward
    and backward in ``precision`` ("fp32" or "bf16" autocast, as ``finetune.precision``), fc6 of ``rank`` (0: full;
    ``finetune.fc6_rank``)."""
    torch.manual_seed(seed)
    head = FCHead(dim, hidden, classes + 1, fc6_rank=rank).train()
    opt, _ = sgd(head.named_parameters(), FinetuneConfig())  # fine-tuning's momentum and weight decay
    x = torch.randn(batch, dim)
    y = torch.randint(0, classes + 1, (batch,))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with autocast("cpu", precision):
            out = head(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=23600, help="pool5 width (Lite2 hypercolumn: 23600; Lite0: 5600)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--batches", default="128,256", help="windows per step, comma-separated (first: the reference)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precisions", default="fp32", help="fc arithmetic per row, comma-separated: fp32, bf16, auto "
                    "(bf16 where native; finetune.precision)")
    ap.add_argument("--ranks", default="0", help="fc6's rank per row, comma-separated (0: full; finetune.fc6_rank)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = []
        for p in [resolve_precision(q, "cpu", "--precisions") for q in args.precisions.split(",")]:
            for r in [int(q) for q in args.ranks.split(",")]:
                for b in batches:
                    s = seconds_per_step(args.dim, args.hidden, args.classes, b, args.steps, precision=p, rank=r)
                    rows.append({"batch": b, "precision": p, "fc6_rank": r, "s_per_step": s,
                                 "ms_per_window": 1000 * s / b})
    finally:
        torch.set_num_threads(threads)  # the caller's (a test process) as it was
    ref = rows[0]["ms_per_window"]
    print(f"fc6 {args.dim} -> {args.hidden}, fc7 {args.hidden}, {args.threads} threads")
    print(f"{'windows/step':>12} {'fc':>5} {'fc6 rank':>8} {'ms/step':>9} {'ms/window':>10} {'vs first':>9}")
    for r in rows:
        r["speedup"] = ref / r["ms_per_window"]
        print(f"{r['batch']:>12} {r['precision']:>5} {r['fc6_rank'] or 'full':>8} {1000 * r['s_per_step']:>9.1f} "
              f"{r['ms_per_window']:>10.3f} "
              f"{r['speedup']:>8.2f}x")
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
