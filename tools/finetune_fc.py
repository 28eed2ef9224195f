#!/usr/bin/env python
"""Fine-tune fc6, fc7 and a new (K+1)-way fc8 on pooled features from the conv5 cache.

    python tools/finetune_fc.py --config configs/demo.yaml
The conv layers stay frozen: they are not even part of the trainer (SPP-net's limitation). The checkpoint
kept is the best on data.val_split.
"""

from __future__ import annotations

import sys

from sppdet.cli import stage_main
from sppdet.stages import stage_finetune


def _body(run, args) -> None:
    m = stage_finetune(run, args.overwrite)
    print(f"fine-tuned head: {run.finetune_path} (best validation error {m.get('best_val_error', float('nan')):.4f})")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
