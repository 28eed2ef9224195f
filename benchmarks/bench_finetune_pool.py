#!/usr/bin/env python
"""Fine-tuning's pooling: a batch's images pooled one call each against one call for the batch, on the CPU and on
a GPU, then (``--iterations``) the whole fine-tuning with its pooling on the CPU against on the GPU; side by side
in one run, the pooled rows checked equal.

    python benchmarks/bench_finetune_pool.py --run runs/real/raccoon [--batches 100] [--device cuda]
        [--iterations 300] [--repeats 2] [--out bench_finetune_pool.json]

The run folder must hold the train and val splits' conv5 caches and proposals (any run of configs/custom.yaml
after its features stage); nothing is written to it. Batches are drawn as fine-tuning draws them (the run's
``finetune`` settings, its seed); every image's maps are loaded before the clock starts, as fine-tuning's LRU
holds them after its first steps. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draw_requests(windows: dict, lru, cfg, num_classes: int, batches: int, seed: int) -> list[list[tuple]]:
    """``batches`` fine-tuning batches as ``pooled_many`` requests (the sampling of sppdet.finetune._make_batch)."""
    from sppdet.finetune import sample_windows

    rng = np.random.default_rng(seed)
    ids = [i for i, w in windows.items() if len(w.boxes)]
    per = max(1, cfg.batch_size // cfg.images_per_batch)
    out = []
    for _ in range(batches):
        reqs = []
        for i in rng.choice(ids, min(cfg.images_per_batch, len(ids)), replace=False):
            w = windows[i]
            idx, _ = sample_windows(w, per, cfg.fg_fraction, cfg.fg_threshold, cfg.bg_low, cfg.bg_high, num_classes,
                                    rng)
            feats = lru.get(i)
            flip = bool(cfg.flip and feats.flipped_maps is not None and rng.random() < 0.5)
            sidx = (rng.integers(0, len(feats.factors), len(idx)) if cfg.random_scale and len(feats.factors) > 1
                    else None)
            if len(idx):
                reqs.append((i, w.boxes[idx], flip, sidx))
        out.append(reqs)
    return out


def pool_batches(cache, lru, requests: list[list[tuple]], one_call: bool, keep: bool = False):
    """Seconds per batch; with ``keep`` also the pooled batches, on the CPU (kept batches cost their page faults
    and copies, so timed runs keep none: a batch is dropped as the next is pooled, as in fine-tuning)."""
    resolved = [[(lru.get(i), b, f, s) for i, b, f, s in reqs] for reqs in requests]
    _sync(lru.device)
    t = time.perf_counter()
    got = []
    for reqs in resolved:
        if one_call:
            x = cache.pooled_many(reqs)
        else:
            x = torch.cat([cache.pooled(f, b, flipped=fl, scale_idx=s) for f, b, fl, s in reqs])
        if keep:
            got.append(x.cpu())
    _sync(lru.device)
    return (time.perf_counter() - t) / len(resolved), got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder after its features stage")
    ap.add_argument("--batches", type=int, default=100, help="fine-tuning batches pooled each way")
    ap.add_argument("--device", default="auto", help="where the GPU rows run (cpu: CPU rows only)")
    ap.add_argument("--iterations", type=int, default=0, help="fine-tuning steps each way (0: pooling only)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the fine-tuning comparison, order alternating")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    from sppdet.config import load_config
    from sppdet.finetune import FeatureLRU, finetune_head
    from sppdet.malloc import large_blocks_reused
    from sppdet.models import resolve_device
    from sppdet.run import Run
    from sppdet.stages.common import feature_cache, sample_norm, split_windows
    from sppdet.stages.finetune import _new_head
    from sppdet.store import atomic_write_text

    src = Path(args.run)
    run = Run(load_config(src / "config.yaml"), src, log_fn=lambda msg: None, save_config=False)
    cfg, k = run.cfg.finetune, len(run.classes)
    tr, va = run.cfg.data.train_split, run.cfg.data.val_split
    cache = feature_cache(run, tr)
    windows = split_windows(run, tr)
    device = torch.device(resolve_device(args.device))
    places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    lrus = {d: FeatureLRU(cache, mirror_maps=cfg.flip and cfg.mirror_maps, device=d) for d in places}
    requests = draw_requests(windows, lrus[places[0]], cfg, k, args.batches, run.cfg.seed)
    res: dict = {"run": str(src), "batches": args.batches, "device": str(device),
                 "windows_per_batch": float(np.mean([sum(len(b) for _, b, _, _ in r) for r in requests])),
                 "pooling_ms_per_batch": {}}
    ref = None
    with large_blocks_reused():  # as fine-tuning pools: the batch's large block reused from step to step
        for d in places:
            for one_call in (False, True):
                name = f"{d.type}, {'one call per batch' if one_call else 'one call per image'}"
                _, got = pool_batches(cache, lrus[d], requests[:5], one_call, keep=True)  # also the warm-up
                if ref is None:
                    ref = got
                elif not all(torch.equal(a, b) for a, b in zip(ref, got)):
                    raise SystemExit(f"pooling on {name} differs from the CPU's per-image pooling")
                s, _ = pool_batches(cache, lrus[d], requests, one_call)
                res["pooling_ms_per_batch"][name] = round(1000 * s, 2)
                print(f"pooling on {name}: {1000 * s:.2f} ms per batch", flush=True)
    if args.iterations and device.type != "cpu":
        import dataclasses

        short = dataclasses.replace(cfg, iterations=args.iterations,
                                    lr_steps=[int(args.iterations * 0.7)], val_every=max(args.iterations // 5, 1))
        cache_v, windows_v = feature_cache(run, va), split_windows(run, va)
        scale = None  # the stage's input scaling (finetune.input_norm), without which fc6 may learn nothing
        if cfg.input_norm:
            svm = run.cfg.svm
            scale = cfg.input_norm / sample_norm(cache, windows, np.random.default_rng(run.cfg.seed), svm.norm_images,
                                                 svm.norm_boxes)
        rounds = []
        for rep in range(args.repeats):
            row = {}
            for pool in (["cpu", str(device)] if rep % 2 == 0 else [str(device), "cpu"]):
                torch.manual_seed(run.cfg.seed)
                head, _ = _new_head(run, cache.feature_dim(run.backbone().out_channels), cfg.init_from_pretrain)
                if scale is not None:
                    head.input_scale = scale
                r = finetune_head(head, windows, windows_v, cache, cache_v, k, short, run.cfg.seed, progress=False,
                                  log_fn=lambda msg: None, device=str(device), pool_device=pool)
                row[pool] = {"seconds": round(r["seconds"], 2), "best_val_error": r["best_val_error"],
                             "steps_per_s": round(args.iterations / r["seconds"], 1)}
                print(f"round {rep}: fine-tuning {args.iterations} steps on {device}, pooling on {pool}: "
                      f"{r['seconds']:.1f} s ({args.iterations / r['seconds']:.1f} steps/s), best val error "
                      f"{r['best_val_error']:.4f}", flush=True)
            rounds.append(row)
        res["finetune"] = rounds
        res["finetune_speedup"] = [round(r["cpu"]["seconds"] / r[str(device)]["seconds"], 2) for r in rounds]
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
