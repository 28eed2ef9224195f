#!/usr/bin/env python
"""sppdet against the detector a user would otherwise train: torchvision's Faster R-CNN on the same ImageNet trunk
(the config's backbone.name: EfficientNet-Lite2 for configs/custom.yaml), per real set, at about the same training
wall time; both scored with the same VOC07 11-point AP on the same test split.

    python benchmarks/bench_real.py [--sets raccoon,pennfudan,fruit] [--data ../shared/data/real]
        [--config configs/custom.yaml] [--work runs/real] [--out runs/real/bench_real.json] [--set KEY=VALUE ...]
        [--frcnn-seconds N] [--min-size 480]

(a) sppdet: ``tools/demo.py --config C --run <work>/<set> --set data.root=<set>/VOC2007`` (the README's two
commands); its training wall time is the sum of its stages' recorded seconds (proposals and conv5 of every split,
fine-tuning, SVMs, box regressors), so a run folder that already holds them is not trained again.
(b) Faster R-CNN (``torchvision.models.detection.FasterRCNN``): the trunk up to its stride-16 stage (Lite0: 112 channels,
sppdet's "conv5") as the single feature map, one anchor level of sizes 32-512 and ratios 0.5/1/2, RoIAlign 7x7 and
torchvision's default two-fc box head; the stem frozen and batch-norm statistics kept (as in sppdet's Fast R-CNN
mode); SGD (lr 0.0025: torchvision's
reference 0.02 for 16 images scaled to 2; momentum 0.9, weight decay 1e-4, gradients clipped at norm 10, 50 warm-up
steps, lr / 10 after 75% of the budget), two images per step, random
horizontal flips, shorter side ``--min-size``; trained on the train split for sppdet's training wall time (or
``--frcnn-seconds``), on the config's device as sppdet (``--set device=cuda``: both on the GPU). Test: score
threshold 0.01, 100 detections per image.

Writes ``--out`` (one row per set and detector: AP, training seconds, test seconds per image, disk MB) and prints the
table. Run it alone: two processes on two cores slow each other far more than twofold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sppdet.malloc import large_blocks_reused  # noqa: E402
from sppdet.store import atomic_write_text  # noqa: E402


def _files(run: Path):
    """Every file of a run folder, through linked folders too (a run may link another's caches)."""
    for folder, _, names in os.walk(run, followlinks=True):
        yield from (Path(folder) / n for n in names)


def _manifests(run: Path) -> dict[str, float]:
    """Seconds recorded by each finished stage folder of a run (``<stage folder>: seconds``).

    SVM sets mined in one pass (``mined_with``: e.g. fc7 and pool5) each record that pass's seconds: the pass is
    counted once, under the first set it lists, and the others as 0."""
    out = {}
    for m in (f for f in _files(run) if f.name == "manifest.json"):
        d = json.loads(m.read_text())
        together = d.get("mined_with") or []
        shared = len(together) > 1 and d.get("config", {}).get("feature") != together[0]
        out[str(m.parent.relative_to(run))] = 0.0 if shared else float(d.get("seconds", 0.0))
    return out


def run_sppdet(name: str, root: Path, args) -> dict:
    run = Path(args.work) / name
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--config", args.config, "--run", str(run),
           "--rebuild-stale", "--set", f"data.root={root}"] + [a for s in args.overrides for a in ("--set", s)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"sppdet on {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    m = re.search(r"mAP \(VOC07 11-point\): ([0-9.]+)", p.stdout)
    from sppdet.config import load_config

    cfg = load_config(args.config, [f"data.root={root}", *args.overrides])
    secs = _manifests(run)
    te = cfg.data.test_split
    test_folders = {f"proposals/{te}", f"features/{te}"} - {f"{k}/{s}" for k in ("proposals", "features")
                                                             for s in (cfg.data.train_split, cfg.data.val_split)}
    train = sum(s for k, s in secs.items() if k not in test_folders)
    n_test = len((root / "ImageSets" / "Main" / f"{te}.txt").read_text().split())
    metrics = json.loads((run / "detections" / te / "metrics.json").read_text())
    test = (sum(secs.get(k, 0.0) for k in test_folders) + metrics["seconds"]) / n_test
    return {"set": name, "detector": f"sppdet ({Path(args.config).name}{_on(cfg.device)})",
            "ap": float(m.group(1)) if m else None,
            "train_seconds": round(train, 1), "test_seconds_per_image": round(test, 3),
            "disk_mb": round(sum(f.stat().st_size for f in _files(run) if not f.name.endswith(".tmp")) / 2 ** 20, 1),
            "call_wall_seconds": round(wall, 1)}


def _on(device) -> str:
    """The detector label's device suffix: none on the CPU."""
    return "" if str(device) == "cpu" else f", {device}"


def _faster_rcnn(num_classes: int, min_size: int, trunk_name: str = "efficientnet_lite0"):
    import torch
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from sppdet.backbones import build_backbone
    from sppdet.fast_rcnn import set_trainable

    trunk = build_backbone(trunk_name, "imagenet")  # sppdet's config's ImageNet trunk
    set_trainable(trunk, True, 1)  # the stem frozen, as sppdet's Fast R-CNN mode

    class Body(torch.nn.Module):  # the trunk, fed by FasterRCNN's transform (which normalises), with frozen BN stats
        def __init__(self):
            super().__init__()
            self.trunk, self.out_channels = trunk, trunk.out_channels

        def train(self, mode: bool = True):
            super().train(mode)
            self.trunk.eval()  # batch-norm statistics stay the ImageNet ones (as torchvision's FrozenBatchNorm2d)
            return self

        def forward(self, x):
            return self.trunk(x)

    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    return FasterRCNN(Body(), num_classes=num_classes + 1, rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), min_size=min_size, max_size=int(min_size * 5 / 3),
                      image_mean=list(trunk.pixel_mean), image_std=list(trunk.pixel_std), box_score_thresh=0.01,
                      box_detections_per_img=100)


def run_faster_rcnn(name: str, root: Path, seconds: float, args) -> dict:
    import torch
    from tqdm import tqdm

    from sppdet.config import load_config
    from sppdet.evaluation import detections_by_class, evaluate_detections
    from sppdet.run import Run

    torch.manual_seed(0)
    cfg = load_config(args.config, [f"data.root={root}", *args.overrides])
    run = Run(cfg, Path(args.work) / f"{name}_frcnn", save_config=None)
    classes = run.classes
    tr, te = run.dataset(cfg.data.train_split), run.dataset(cfg.data.test_split)
    dev = run.device  # the config's device (--set device=cuda: Faster R-CNN on the GPU too)
    model = _faster_rcnn(len(classes), args.min_size, cfg.backbone.name).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = 0.02 * 2 / 16  # torchvision's detection reference: 0.02 for 16 images per step, scaled to 2
    opt = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)

    def sample(i):
        img, a = tr.image(i), tr.annotation(i)
        boxes, labels = np.asarray(a.boxes, np.float32).reshape(-1, 4), a.labels(classes) + 1
        if rng.random() < 0.5:
            img = img[:, ::-1]
            boxes = np.stack([img.shape[1] - boxes[:, 2], boxes[:, 1], img.shape[1] - boxes[:, 0], boxes[:, 3]], 1)
        x = torch.from_numpy(np.ascontiguousarray(img)).to(dev).permute(2, 0, 1).float() / 255.0
        return x, {"boxes": torch.from_numpy(boxes).to(dev), "labels": torch.from_numpy(labels.astype(np.int64)).to(dev)}

    ids = [i for i in tr.ids if len(tr.annotation(i).boxes)]
    model.train()
    t0, step, losses = time.perf_counter(), 0, []
    bar = tqdm(desc=f"faster r-cnn {name} ({seconds:.0f} s)", unit="it")
    with large_blocks_reused():  # as sppdet's own training loops
        while (el := time.perf_counter() - t0) < seconds:
            lr = base_lr * (min(1.0, (step + 1) / 50)) * (0.1 if el > 0.75 * seconds else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = [sample(ids[j]) for j in rng.choice(len(ids), 2, replace=False)]
            loss = sum(model([b[0] for b in batch], [b[1] for b in batch]).values())
            if not torch.isfinite(loss):
                raise SystemExit(f"Faster R-CNN on {name}: the loss diverged at step {step} (lr {lr:g})")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    train = time.perf_counter() - t0
    model.eval()

    class D:  # what detections_by_class reads
        def __init__(self, o):
            o = {k: v.cpu().numpy() for k, v in o.items()}
            self.boxes, self.scores, self.labels = o["boxes"], o["scores"], o["labels"] - 1

    dets, t1 = {}, time.perf_counter()
    with torch.no_grad():
        with large_blocks_reused():  # as sppdet's test stage
            for i in tqdm(te.ids, desc=f"faster r-cnn {name} test", unit="img"):
                x = torch.from_numpy(np.ascontiguousarray(te.image(i))).to(dev).permute(2, 0, 1).float() / 255.0
                dets[i] = D(model([x])[0])
    per_image = (time.perf_counter() - t1) / len(te.ids)
    gt = {k: te.ground_truth(k) for k in range(len(classes))}
    res = evaluate_detections(detections_by_class(dets, len(classes)), gt, classes)
    ckpt = Path(args.work) / f"{name}_frcnn" / "model.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt)
    return {"set": name, "detector": f"Faster R-CNN (torchvision, {cfg.backbone.name}, {args.min_size} px{_on(dev)})",
            "ap": round(res["map07"], 3), "train_seconds": round(train, 1), "steps": step,
            "test_seconds_per_image": round(per_image, 3), "disk_mb": round(ckpt.stat().st_size / 2 ** 20, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="raccoon,pennfudan,fruit")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--config", default="configs/custom.yaml")
    ap.add_argument("--work", default="runs/real")
    ap.add_argument("--out", default="runs/real/bench_real.json")
    ap.add_argument("--frcnn-seconds", type=float, default=0, help="Faster R-CNN's budget (default: sppdet's time)")
    ap.add_argument("--min-size", type=int, default=480, help="Faster R-CNN's shorter image side")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = []
    for name in args.sets.split(","):
        root = Path(args.data) / name / "VOC2007"
        if not root.is_dir():
            raise SystemExit(f"{root}: missing (the shared real sets: --data)")
        a = run_sppdet(name, root, args)
        b = run_faster_rcnn(name, root, args.frcnn_seconds or a["train_seconds"], args)
        rows += [a, b]
        for r in (a, b):
            print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rows, indent=1))
    print(f"\n{'set':10s} {'detector':42s} {'AP07':>6s} {'train s':>8s} {'test s/img':>10s} {'disk MB':>8s}")
    for r in rows:
        ap_ = "  n/a" if r["ap"] is None else f"{r['ap']:6.3f}"
        print(f"{r['set']:10s} {r['detector']:42s} {ap_} {r['train_seconds']:8.0f} {r['test_seconds_per_image']:10.2f} "
              f"{r['disk_mb']:8.1f}")
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
