#!/usr/bin/env python
"""The paper's ablation (Table 9 rows) on the synthetic benchmark, one run:

    SVMs on pool5 | on fc7 without fine-tuning | on fine-tuned fc7 | + box regression
    (| + the SVMs of test.combine, where the config combines feature layers: the paper's Table 12 idea),
    for each scale set (default: one scale, 688, and the config's own scales; --scales repeatable).

    python benchmarks/bench_ablation.py [--config configs/demo.yaml] [--scales 688 --scales 480,576,688,864,1200]

The config's own scales use its run folder (whatever `make demo` built is reused); every other scale set
runs beside it (``<run_dir>_s<scales>``) and shares its pre-trained trunk and proposals.
Both are evaluated on the same test split with the VOC07 11-point metric. The data is synthetic, so
the numbers are not comparable with the paper's VOC 2007 numbers, only the ordering is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sppdet.cli import run_main
from sppdet.config import load_config
from sppdet.run import Run
from sppdet.stages import plan, stage_pretrain, stage_svm, stage_svms, stage_test

PAPER = {  # VOC 2007 test mAP, SPP-net ZF-5 (He et al. 2014, Table 9)
    "pool5": (43.0, 44.9), "fc6_noft": (42.5, 44.8), "fc7_noft": (None, None), "ftfc7": (54.5, 55.2),
    "ftfc7_bb": (58.0, 59.2),
    "combined_bb": (None, 60.9)}  # Table 12: two SPP-nets (other initialisations), union of their windows + NMS


def ablate(run: Run, log) -> dict:
    cfg = run.cfg
    t0 = time.time()
    stage_pretrain(run)  # also for an ImageNet trunk: the fc6/fc7 of the 'no fine-tuning' rows
    for step in plan(run):  # the pipeline's own order, up to what the SVM rows share
        if step.spec.name in ("proposals", "features", "finetune", "bbox_reg"):
            step.call()
    out = {}
    for feature, tag in (("pool5", "_pool5"), ("fc6_noft", "_fc6_noft"), ("fc7_noft", "_fc7_noft"), ("fc7", "")):
        stage_svm(run, feature, tag)
        m = stage_test(run, cfg.data.test_split, svm_tag=tag, tag=f"_ablation_{feature}", draw=0, progress=False,
                       combine=False)
        r = m["results"]
        if feature == "fc7":
            out["ftfc7"] = r["without_bbox_reg"]["map07"]
            out["ftfc7_bb"] = r["with_bbox_reg"]["map07"]
        else:
            out[feature] = r["without_bbox_reg"]["map07"]
        log(f"{run.dir.name} {feature}: {out}")
    if cfg.test.combine:  # the config's model combination (the paper's section 4.4, here of feature layers)
        stage_svms(run)
        m = stage_test(run, cfg.data.test_split, tag="_ablation_combined", draw=0, progress=False)
        out["combined_bb"] = m["results"]["with_bbox_reg"]["map07"]
    out["seconds"] = time.time() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--scales", action="append", help="comma-separated scale set (repeatable)")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)

    def body() -> int:
        base = Run(load_config(args.config))
        cfg = base.cfg  # features.scales: auto resolved
        sets = [[int(v) for v in x.split(",")] for x in (args.scales or ["688", ",".join(map(str, cfg.features.scales))])]
        res = {}
        for scales in dict.fromkeys(tuple(x) for x in sets):
            label = f"{len(scales)} scale{'s' if len(scales) > 1 else ''}"
            if list(scales) == list(cfg.features.scales):
                res[label] = ablate(base, print)
                continue
            d = Path(f"{base.dir}_s{'-'.join(map(str, scales))}")
            run = Run(load_config(args.config, [f"features.scales={list(scales)}", f"run_dir={d}"]))
            # Same trunk and proposals: copied, never re-trained or re-proposed for the ablation.
            for sub in ["pretrain"] + [f"proposals/{s}" for s in
                                       {cfg.data.train_split, cfg.data.val_split, cfg.data.test_split}]:
                if (base.dir / sub).is_dir() and not (run.dir / sub).is_dir():
                    shutil.copytree(base.dir / sub, run.dir / sub)
            res[label] = ablate(run, print)
        rows = [("SVM on pool5", "pool5"), ("SVM on fc6, no fine-tuning", "fc6_noft"),
                ("SVM on fc7, no fine-tuning", "fc7_noft"),
                ("SVM on fine-tuned fc7", "ftfc7"), ("fine-tuned fc7 + box regression", "ftfc7_bb")]
        if cfg.test.combine:
            rows.append((f"+ {'+'.join(cfg.test.combine)} SVMs ({cfg.test.combine_by})", "combined_bb"))
        cols = list(res)
        print(f"\nablation, VOC07 11-point mAP on the synthetic test split ({cfg.name} config)")
        head = "".join(f"{c:>11}" for c in cols)
        print(f"{'':34}{head}   paper VOC07 (1 sc / 5 sc)")
        for label, key in rows:
            p = PAPER[key]
            ref = "not in the paper's table" if p[1] is None else f"{p[0] or '-'} / {p[1]}"
            if key == "combined_bb":  # this row combines two layers of one network
                ref = f"- / {p[1]} for two networks (compare: test_net.py --combine-with)"
            print(f"{label:34}" + "".join(f"{res[c][key]:11.3f}" for c in cols) + f"   {ref}")
        for c in cols:
            r = res[c]
            ok = r["ftfc7"] > r["fc7_noft"] > r["pool5"] and r["ftfc7_bb"] > r["ftfc7"]
            print(f"{c}: the issue's ordering (ft fc7 > fc7 > pool5, box regression helps) "
                  f"{'reproduced' if ok else 'NOT reproduced'}; fc6 without fine-tuning "
                  f"{r['fc6_noft'] - r['pool5']:+.3f} over pool5 (paper: -0.5 / -0.1 points); {r['seconds']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
