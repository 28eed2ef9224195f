#!/usr/bin/env python
"""The SVM stage's sets (svm.feature and test.combine's) mined apart, one pass over the train split each, against
together, one pass pooling each image's windows once for every set: seconds side by side, and the SVMs checked
equal.

    python benchmarks/bench_svm_pass.py --run runs/real/raccoon [--repeats 1]

The run folder must hold a finished conv5 cache of the train split and a fine-tuned head (any run of
configs/custom.yaml after its fine-tuning stage). Its files are linked, not copied, into two scratch run folders
(under --scratch), whose SVM folders are then trained; the run itself is not written to. Run it alone: both sides
use the same two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _scratch(src: Path, dst: Path) -> None:
    """``dst``: a run folder sharing ``src``'s config, proposals, conv5 cache and fine-tuned head (hard links)."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "model").mkdir(parents=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    for part in ("proposals", "features", "model/finetune"):
        shutil.copytree(src / part, dst / part, copy_function=os.link)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run folder after its fine-tuning stage")
    ap.add_argument("--scratch", default="runs/bench_svm_pass", help="where the two scratch run folders go")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    from sppdet.config import load_config
    from sppdet.run import Run
    from sppdet.stages.svm import combined_svms, stage_svm, stage_svms

    src = Path(args.run)
    cfg = load_config(src / "config.yaml")
    sets = combined_svms(cfg)
    if len(sets) < 2:
        raise SystemExit(f"{src}: one SVM set ({sets[0][0]}); nothing to mine together (set test.combine)")
    names = "+".join(f for f, _ in sets)
    rows = []
    for rep in range(args.repeats):
        out = {}
        for way in ("apart", "together"):
            dst = Path(args.scratch) / way
            _scratch(src, dst)
            run = Run(load_config(dst / "config.yaml"), dst, log_fn=lambda msg: None, save_config=False)
            t0 = time.perf_counter()
            if way == "apart":
                for feature, tag in sets:
                    stage_svm(run, feature, tag)
            else:
                stage_svms(run)
            out[way] = time.perf_counter() - t0
            print(f"repeat {rep}: {names} mined {way}: {out[way]:.1f} s", flush=True)
        for _, tag in sets:
            a, b = (np.load(Path(args.scratch) / w / "model" / f"svm{tag}" / "svm.npz") for w in ("apart", "together"))
            if not all(np.array_equal(a[k], b[k]) for k in ("W", "b", "feature_scale")):
                raise SystemExit(f"svm{tag}: the SVMs mined together differ from those mined apart")
        rows.append(out)
    for r in rows:
        print(f"{src.name}: {names} apart {r['apart']:.1f} s, together {r['together']:.1f} s: "
              f"{r['apart'] / r['together']:.2f}x (SVMs identical)")
    shutil.rmtree(args.scratch)


if __name__ == "__main__":
    main()
