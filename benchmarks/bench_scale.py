#!/usr/bin/env python
"""Every stage's wall time and peak memory as the data grows, at VOC 2007's 20 classes, and the projection to
VOC 2007 itself (5,011 trainval and 4,952 test images) on this machine.

    python benchmarks/bench_scale.py --sizes 50,200 --out runs/scale.json [--classes 20]
        [--config configs/voc07_efficientnet_lite0.yaml] [--iterations 300] [--set KEY=VALUE ...]

The data: a 20-class variant of the synthetic generator (``sppdet.synthetic``, ``styled``: 9 shapes x 5
colour/texture styles, the first 20 pairs; 300-500 px images, as VOC's ~500 x 375) of N images, split 50 / 25 / 25
into train / val / test (trainval = train + val, as VOC's). The pipeline is the config's (by default the VOC 2007
recipe, one scale, Lite0 trunk) with its splits, each stage run as its own tool in its own process, one after
another, so that its wall time and peak resident memory (``wait4``'s ``ru_maxrss``: the largest of the tool's
processes, proposal workers included) are its own. Fine-tuning runs ``--iterations`` steps, not the recipe's; its
cost is per step and is projected to the recipe's count. Each size starts from an empty run folder (``--keep``
resumes one instead).

Writes ``--out``: a list of rows ``{"stage", "n_images", "classes", "seconds", "peak_rss_mb"}`` (one per stage and
size; also ``images`` per split, ``disk_mb`` its folders hold), and beside it ``<out>.projection.json`` and
``<out>.png`` (time and memory against N). Prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet.store import atomic_write_text, dir_bytes  # noqa: E402

# VOC 2007's image counts, per split of the recipe (val is part of trainval, and has its own folders)
VOC07 = {"trainval": 5011, "val": 2510, "test": 4952}
PAPER_SCALES = (480, 576, 688, 864, 1200)
STAGES = ("proposals", "features", "finetune", "svm", "bbox_reg", "test")
FOLDERS = {"proposals": "proposals", "features": "features", "finetune": "model/finetune",
           "bbox_reg": "model/bbox_reg", "test": "detections"}


def _tool(name: str, args: list[str], log: Path) -> tuple[float, float]:
    """Run ``tools/<name>`` to its end; returns (wall seconds, peak RSS MB of its largest process)."""
    cmd = [sys.executable, str(ROOT / "tools" / name), *args]
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{name} failed (exit {p.returncode}); its output: {log}")
    return seconds, usage.ru_maxrss / 1024.0


def _disk_mb(run: Path, stage: str) -> float:
    """What a stage's folders hold once it has run (the SVM stage's: every ``model/svm*``)."""
    folders = list((run / "model").glob("svm*")) if stage == "svm" else [run / FOLDERS[stage]]
    return sum(dir_bytes(f) for f in folders) / 2 ** 20


def _dataset(root: Path, n: int, classes: int) -> tuple[Path, list[str]]:
    from sppdet.synthetic import class_names, make_toy_voc, synthetic_params

    year = root / "VOC2007"
    want = synthetic_params(n, 0, (0.5, 0.25), styled=classes)
    if not (year / "synthetic.json").is_file() or json.loads((year / "synthetic.json").read_text()) != want:
        shutil.rmtree(root, ignore_errors=True)
        make_toy_voc(root, n, seed=0, splits=(0.5, 0.25), styled=classes, progress=True)
    return year, list(class_names(styled=classes))


def measure(n: int, args) -> list[dict]:
    import yaml

    from sppdet.config import load_config

    data, names = _dataset(Path(args.work) / f"data_{n}", n, args.classes)
    run = Path(args.work) / f"run_{n}"
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    it = args.iterations
    sets = [f"data.root={data}", f"data.classes=[{','.join(names)}]", "data.synthetic_images=0",
            f"finetune.iterations={it}", f"finetune.lr_steps=[{int(it * 0.75)}]", f"finetune.val_every={it}",
            *args.overrides]
    cfg = load_config(args.config, sets)
    common = ["--config", args.config, "--run", str(run)] + [a for s in sets for a in ("--set", s)]
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]))
    count = {s: len((data / "ImageSets" / "Main" / f"{s}.txt").read_text().split()) for s in splits}
    log = run.parent / f"run_{n}.log"
    run.mkdir(parents=True, exist_ok=True)
    calls = {"proposals": [("propose.py", ["--split", s], s) for s in splits],
             "features": [("extract_features.py", ["--split", s], s) for s in splits],
             "finetune": [("finetune_fc.py", [], None)], "svm": [("train_svm.py", [], None)],
             "bbox_reg": [("train_bbox_reg.py", [], None)], "test": [("test_net.py", [], None)]}
    rows = []
    for stage in STAGES:
        seconds, peak, per_split = 0.0, 0.0, {}
        for tool, extra, split in calls[stage]:
            s, m = _tool(tool, common + extra, log)
            seconds, peak = seconds + s, max(peak, m)
            if split:
                per_split[split] = {"images": count[split], "seconds": round(s, 2)}
        row = {"stage": stage, "n_images": n, "classes": args.classes, "seconds": round(seconds, 2),
               "peak_rss_mb": round(peak, 1),
               "images": per_split or {cfg.data.train_split: count[cfg.data.train_split]},
               "disk_mb": round(_disk_mb(run, stage), 1)}
        if stage == "finetune":
            row["iterations"] = it
        if stage == "features":  # as the run resolved them (features.scales: auto picks one from the objects)
            row["scales"] = yaml.safe_load((run / "config.yaml").read_text())["features"]["scales"]
        print(f"N={n} {stage:10s} {seconds:8.1f} s  peak {peak:8.0f} MB", flush=True)
        rows.append(row)
    rows[-1]["test_images"] = count[cfg.data.test_split]
    ft = json.loads((run / "model" / "finetune" / "manifest.json").read_text())
    next(r for r in rows if r["stage"] == "finetune")["train_seconds"] = ft.get("seconds")
    metrics = sorted((run / "detections").glob("*/metrics.json"))
    if metrics:
        rows[-1]["mAP"] = json.loads(metrics[0].read_text()).get("map07")
    return rows


def _rate(rs: list[dict], images) -> float:
    """Seconds per image: the marginal rate between the two largest sizes (a tool's start-up, loading torch and
    the models, is then left out), or the one size's average."""
    rs = sorted(rs, key=lambda r: r["n_images"])
    if len(rs) > 1 and images(rs[-1]) > images(rs[-2]):
        return max(0.0, (rs[-1]["seconds"] - rs[-2]["seconds"]) / (images(rs[-1]) - images(rs[-2])))
    return rs[-1]["seconds"] / images(rs[-1])


def projection(rows: list[dict], cfg_path: str, overrides: list[str], finetune_seconds: float) -> dict:
    """Hours per stage for VOC 2007 from the per-image (fine-tuning: per-step) rates, peak memory, disk."""
    from sppdet.config import load_config

    cfg = load_config(cfg_path, overrides)
    sizes = sorted({r["n_images"] for r in rows})
    by = {st: [r for r in rows if r["stage"] == st] for st in STAGES}
    tr, va, te = cfg.data.train_split, cfg.data.val_split, cfg.data.test_split
    voc = {tr: VOC07.get(tr, VOC07["trainval"]), va: VOC07.get(va, VOC07["val"]), te: VOC07.get(te, VOC07["test"])}
    out = {}
    for stage, rs in by.items():
        if stage in ("proposals", "features"):  # per split: its own rate (the train split's features include flips)
            sec = sum(_rate([{**r, "seconds": r["images"][s]["seconds"]} for r in rs],
                            lambda r, s=s: r["images"][s]["images"]) * voc[s] for s in rs[-1]["images"])
        elif stage == "finetune":  # the training loop's own seconds (its manifest), per step
            sec = finetune_seconds / rs[-1]["iterations"] * cfg.finetune.iterations
        elif stage == "test":
            sec = _rate(rs, lambda r: r["test_images"]) * voc[te]
        else:
            sec = _rate(rs, lambda r: r["images"][tr]) * voc[tr]
        last, first = rs[-1], rs[0]
        out[stage] = {"hours": round(sec / 3600, 2), "peak_rss_mb_at_largest_n": last["peak_rss_mb"],
                      "peak_rss_ratio_largest_to_smallest_n": round(last["peak_rss_mb"] / max(first["peak_rss_mb"], 1),
                                                                    2)}
    f = by["features"][-1]
    per_img = f["disk_mb"] / sum(v["images"] for v in f["images"].values())
    scales = f.get("scales", cfg.features.scales)
    area = sum(s * s for s in PAPER_SCALES) / sum(s * s for s in scales)
    out["total_hours"] = round(sum(v["hours"] for v in out.values() if isinstance(v, dict)), 2)
    out["conv5_cache_gb"] = {"these_scales": round(per_img * sum(voc.values()) / 1024, 1),
                             "paper_five_scales": round(per_img * area * sum(voc.values()) / 1024, 1)}
    out["basis"] = (f"marginal per-image rates between N={sizes[-2] if len(sizes) > 1 else sizes[-1]} and "
                    f"N={sizes[-1]}; VOC07 {voc}; fine-tuning {cfg.finetune.iterations} steps at the measured s/step; "
                    f"the paper's five scales {PAPER_SCALES} by conv5 area against {list(scales)}")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n_images"])
        a.plot([r["n_images"] for r in rs], [r["seconds"] for r in rs], "o-", label=stage)
        b.plot([r["n_images"] for r in rs], [r["peak_rss_mb"] / 1024 for r in rs], "o-", label=stage)
    a.set(xlabel="images", ylabel="wall s", title="time per stage")
    b.set(xlabel="images", ylabel="peak RSS GB", title="peak memory per stage")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,200", help="dataset sizes N (images, all splits), comma-separated")
    ap.add_argument("--out", required=True, help="JSON file of the rows")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--config", default="configs/voc07_efficientnet_lite0.yaml")
    ap.add_argument("--iterations", type=int, default=300, help="fine-tuning steps run (projected per step)")
    ap.add_argument("--work", default="runs/scale", help="folder of the generated data and run folders")
    ap.add_argument("--keep", action="store_true", help="resume existing run folders instead of starting afresh")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        rows += measure(n, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rows, indent=1))
    ft = max((r for r in rows if r["stage"] == "finetune"), key=lambda r: r["n_images"])
    proj = projection(rows, args.config, args.overrides, ft.get("train_seconds") or ft["seconds"])
    atomic_write_text(Path(f"{out}.projection.json"), json.dumps(proj, indent=1))
    _plot(rows, Path(f"{out}.png"))
    print(f"\n{'stage':10s} {'N':>5s} {'seconds':>9s} {'peak MB':>9s} {'disk MB':>9s}")
    for r in rows:
        print(f"{r['stage']:10s} {r['n_images']:5d} {r['seconds']:9.1f} {r['peak_rss_mb']:9.0f} {r['disk_mb']:9.1f}")
    print(f"\nVOC 2007 projection on this machine ({proj['basis']}):")
    for stage in STAGES:
        p = proj[stage]
        print(f"  {stage:10s} {p['hours']:6.2f} h  peak {p['peak_rss_mb_at_largest_n']:7.0f} MB "
              f"(x{p['peak_rss_ratio_largest_to_smallest_n']} from the smallest N)")
    print(f"  total {proj['total_hours']:.2f} h; conv5 cache {proj['conv5_cache_gb']['these_scales']} GB at these "
          f"scales, {proj['conv5_cache_gb']['paper_five_scales']} GB at the paper's five")
    print(f"rows: {out}; projection: {out}.projection.json; plot: {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
