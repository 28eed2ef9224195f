#!/usr/bin/env python
"""Would more labelled photos pay? sppdet trained on nested, class-stratified fractions of a VOC folder's train
split, each scored on the same val and test splits: AP against the number of training photos.

    python benchmarks/bench_learning_curve.py --src /path/to/VOC2007 --work runs/lc_mine \
        [--fractions 0.25,0.5,1] [--config configs/custom.yaml] [--seed 0] [--set KEY=VALUE ...]

Your folder is only read: WORK/data/VOC2007 links each photo and XML file of its train, val and test splits (split
files or split folders) and holds their split files plus one ``<train>_fNN.txt`` per fraction below 1. The subsets are nested (the quarter lies inside the half)
and stratified by class (:func:`sppdet.splits.stratified_split`), and the class list is the whole train split's
for every run, so a class a small subset lacks scores 0 rather than leaving the mean. Each fraction is a whole run
of ``tools/demo.py`` (WORK/fNN) and ``tools/test_net.py --split val``; a rerun reuses finished runs. Writes
WORK/learning_curve.json (one row per fraction: train photos, val and test mAP, the run's wall seconds) and
WORK/learning_curve.png. Where the curve still climbs at 1, more photos of the same kind should still help.
Run it alone: two processes on two cores slow each other far more than twofold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet.store import atomic_write_text  # noqa: E402


def nested_subsets(labels: dict[str, list[str]], fractions: list[float], seed: int = 0) -> dict[float, list[str]]:
    """``{fraction: ids}`` for each fraction in (0, 1]: 1 is every id; each smaller one a class-stratified subset
    of the next larger (sizes rounded from the whole split, at least one photo)."""
    from sppdet.splits import stratified_split

    out: dict[float, list[str]] = {}
    current = sorted(labels)
    for f in sorted(set(fractions), reverse=True):
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
        want = max(1, round(f * len(labels)))
        if want < len(current):
            keep = want / len(current)
            current = stratified_split({i: labels[i] for i in current}, {"keep": keep, "rest": 1 - keep},
                                       seed)["keep"]
        out[f] = sorted(current)
    return out


def _tag(f: float) -> str:
    return f"f{round(f * 100):02d}"


def make_data(src: Path, work: Path, splits: dict[str, str], fractions: list[float], seed: int = 0
              ) -> tuple[Path, list[str], dict[float, tuple[str, int]]]:
    """WORK/data/VOC2007: links to each photo and XML file of ``src``'s ``splits`` (``{"train": name, "val": name,
    "test": name}``; split files or split folders, :class:`sppdet.voc.VOCDataset`), their split files and the
    train subsets'. Returns the folder, the whole train split's classes and ``{fraction: (split name, photos)}``."""
    from sppdet.voc import VOCDataset, VOCError, class_names_in

    train_split = splits["train"]
    classes = class_names_in(src, train_split)
    data = work / "data" / "VOC2007"
    main = data / "ImageSets" / "Main"
    for d in (data / "JPEGImages", data / "Annotations", main):
        d.mkdir(parents=True, exist_ok=True)
    owner: dict[str, str] = {}
    for role, name in splits.items():
        ds = VOCDataset(src, name, classes)
        for i in ds.ids:
            if owner.setdefault(i, name) != name:
                raise VOCError(f"{src}: photo id {i!r} is in both {owner[i]!r} and {name!r}")
            for path, link in ((ds.image_path(i), data / "JPEGImages" / f"{i}{ds.image_path(i).suffix}"),
                               (ds.annotation_path(i), data / "Annotations" / f"{i}.xml")):
                if not link.is_symlink():
                    os.symlink(path.resolve(), link)
        atomic_write_text(main / f"{name}.txt", "".join(f"{i}\n" for i in ds.ids))
        if role == "train":
            labels = {i: list(ds.annotation(i).names) for i in ds.ids}
    out = {}
    for f, ids in nested_subsets(labels, fractions, seed).items():
        name = train_split if f == 1 else f"{train_split}_{_tag(f)}"
        if f != 1:
            atomic_write_text(main / f"{name}.txt", "".join(f"{i}\n" for i in ids))
        out[f] = (name, len(ids))
    return data, classes, out


def _map(run: Path, split: str) -> float:
    return float(json.loads((run / "detections" / split / "metrics.json").read_text())["map07"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, type=Path, help="a VOC year folder with train, val and test splits")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--fractions", default="0.25,0.5,1")
    ap.add_argument("--config", default="configs/custom.yaml")
    ap.add_argument("--seed", type=int, default=0, help="the subsets' draw")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from sppdet.config import load_config
    from sppdet.visualize import plot_learning_curve

    fractions = [float(v) for v in args.fractions.split(",")]
    cfg = load_config(args.config, [f"data.root={args.src}", *args.overrides])
    if cfg.data.format != "voc":
        raise SystemExit("the learning curve reads VOC folders (data.format voc)")
    d = cfg.data
    data, classes, splits = make_data(args.src, args.work, {"train": d.train_split, "val": d.val_split,
                                                            "test": d.test_split}, fractions, args.seed)
    rows = []
    for f in sorted(splits):
        name, n = splits[f]
        run = args.work / _tag(f)
        common = ["--run", str(run), "--set", f"data.root={data}", *(a for s in args.overrides for a in ("--set", s)),
                  "--set", f"data.train_split={name}", "--set", f"data.classes={json.dumps(classes)}"]
        t0 = time.perf_counter()
        val = ["tools/test_net.py", *common, "--split", cfg.data.val_split]
        for cmd in (["tools/demo.py", "--config", args.config, *common], val):
            p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{cmd[0]} for {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        row = {"fraction": f, "train_split": name, "train_images": n,
               "val_map07": round(_map(run, cfg.data.val_split), 4),
               "test_map07": round(_map(run, cfg.data.test_split), 4),
               "wall_seconds": round(time.perf_counter() - t0, 1), "run": str(run)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    atomic_write_text(args.work / "learning_curve.json", json.dumps(rows, indent=1) + "\n")
    plot_learning_curve(rows, args.work / "learning_curve.png", f"{args.src} ({len(classes)} class{'' if len(classes) == 1 else 'es'})")
    print(f"\n{'train photos':>12s} {'val mAP':>8s} {'test mAP':>8s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['train_images']:12d} {r['val_map07']:8.3f} {r['test_map07']:8.3f} {r['wall_seconds']:7.0f}")
    print(f"rows: {args.work / 'learning_curve.json'}, picture: {args.work / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
