#!/usr/bin/env python
"""The whole multi-stage SPP-net pipeline on the built-in default (synthetic VOC-format data):

    generate data -> pre-train ZF-5 (multi-size 224/180) -> proposals -> conv5 cache -> fc fine-tuning
    (conv frozen) -> SVMs with hard-negative mining -> box regressors -> test (VOC mAP) -> cost report
    (with `route: fast_rcnn` in the config: proposals -> Fast R-CNN mode in one stage -> test -> cost report)

    python tools/demo.py [--config configs/demo.yaml] [--rebuild-stale]
Reruns reuse every artefact and finish in seconds (`make demo` passes --rebuild-stale).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from sppdet.cli import make_run, parser, run_main
from sppdet.finetune import learnt_nothing
from sppdet.stages import plan
from sppdet.stages.fast_rcnn import model_dir as fast_rcnn_model_dir
from sppdet.store import PeakRSS, StaleCacheError, atomic_write_text, dir_bytes


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--rebuild-stale", action="store_true",
                    help="a stage of the run folder made with other settings (e.g. after an upgrade that changed a "
                         "default) is deleted and rebuilt, with the stages after it, instead of stopping the run")
    args = ap.parse_args(argv)

    def body() -> int:
        rebuilt: set[Path] = set()
        while True:
            try:
                return once()
            except StaleCacheError as e:
                run_dir = make_run(args).dir.resolve()
                folder = e.folder.resolve() if e.folder is not None else None
                inside = folder is not None and folder != run_dir and run_dir in folder.parents
                if not (args.rebuild_stale and inside) or folder in rebuilt:
                    hint = (" (tools/demo.py --rebuild-stale rebuilds the stale stages of its run folder)"
                            if inside and not args.rebuild_stale else "")
                    raise StaleCacheError(f"{e}{hint}", e.folder) from None
                print(f"rebuilding a stale stage: {e}")
                shutil.rmtree(folder)
                rebuilt.add(folder)

    def once() -> int:
        run = make_run(args)
        cfg = run.cfg
        splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]))
        costs = []

        def timed(name: str, folder: Path | list[Path], fn, limitation: str = ""):
            folders = folder if isinstance(folder, list) else [folder]
            before = sum(dir_bytes(f) for f in folders)
            t0 = time.time()
            with PeakRSS() as mem:
                out = fn()
            costs.append({"stage": name, "limitation": limitation, "seconds": time.time() - t0,
                          "bytes": sum(dir_bytes(f) for f in folders) - before,
                          "total_bytes": sum(dir_bytes(f) for f in folders), "peak_rss_bytes": mem.peak})
            return out

        t_all = time.time()
        data_root = run.path(cfg.data.root)
        timed("data (read; augmented copies made)" if cfg.data.augment else "data (read; generated if synthetic)",
              [data_root, run.dir / "augmented"], lambda: [run.dataset(s) for s in splits])
        if cfg.backbone.weights != "pretrain":
            print(f"pretrain: skipped, the trunk uses backbone.weights = {cfg.backbone.weights!r}")
        metrics = None
        for step in plan(run):
            metrics = timed(step.label, list(step.folders), step.call, step.spec.limitation)
        total = time.time() - t_all
        lines = ["", f"cost of the multi-stage pipeline (this run; reused artefacts cost ~0; networks on {run.device}):",
                 f"{'stage':<40} {'wall s':>8} {'written MB':>11} {'on disk MB':>11} {'peak RSS MB':>12}  SPP-net limitation"]
        for c in costs:
            lines.append(f"{c['stage']:<40} {c['seconds']:8.1f} {c['bytes'] / 1e6:11.1f} {c['total_bytes'] / 1e6:11.1f} "
                         f"{c['peak_rss_bytes'] / 2**20:12.0f}  {c.get('limitation', '')}")
        lines.append(f"{'total':<40} {total:8.1f} {sum(c['bytes'] for c in costs) / 1e6:11.1f}")
        if cfg.route == "fast_rcnn":
            fr = json.loads((fast_rcnn_model_dir(run) / "manifest.json").read_text())
            lines.append(f"Fast R-CNN mode: {fr.get('trained_conv_tensors', '?')} conv parameter tensors above the "
                         f"stem trained with the head in one stage (conv weights changed: {fr.get('conv_changed')}); "
                         "no conv5 cache, no SVMs, no separate box regressors.")
        else:
            ft = json.loads((run.finetune_path.parent / "manifest.json").read_text())
            lines.append("fine-tuning updated fc6, fc7 and fc8 only: the conv layers are not in its trainer (their "
                         f"weights' fingerprint {ft.get('conv_fingerprint', '?')}, checked equal after training); "
                         "Fast R-CNN removes this limitation.")
            if ft.get("best_val_error") is not None:
                err, bg = ft["best_val_error"], ft.get("background_error")
                lines.append(f"fine-tuning: best validation error {err:.3f} at iteration {ft.get('best_iteration')}" + (
                    "" if bg is None else f" (calling every window background: {bg:.3f})"
                    + ("; IT LEARNT (ALMOST) NOTHING: see its warning above" if learnt_nothing(ft) else "")))
            lines.append("features were written to disk as conv5 maps (float16) and pooled on read.")
        lines.append("what each limitation costs in mAP and time, against R-CNN and a Fast R-CNN mode on the same trunk: "
                     "python benchmarks/bench_family.py --config CONFIG")
        lines.append("peak RSS: of this process while the stage ran (proposal workers, if any, are separate processes).")
        report = "\n".join(lines)
        print(report)
        atomic_write_text(run.dir / "cost_report.json", json.dumps({"stages": costs, "total_seconds": total,
                                                                    "device": run.device}, indent=2))
        atomic_write_text(run.dir / "cost_report.txt", report + "\n")
        print(f"\nmAP (VOC07 11-point): {metrics['map07']:.3f}")
        print(f"drawn detections: {', '.join(metrics['drawn'])}")
        print(f"run folder: {run.dir}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
