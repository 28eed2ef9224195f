"""fc fine-tuning on pooled features read from the conv5 cache; conv layers frozen.

The conv layers are never touched here, not even loaded: SPP-net's limitation (Fast
R-CNN's critique), reproduced. Mini-batches of ``batch_size`` windows from
``images_per_batch`` images, ``fg_fraction`` foreground (max IoU >= ``fg_threshold``,
labelled with that object's class) and background in ``[bg_low, bg_high)`` (label K).
Multi-scale caches: each training window pooled at a random scale (authors'
``random_scale=1``); flipped images when the cache holds flipped maps. The checkpoint
kept is the one with the lowest error on a *validation* split, never on test. With
``bbox_loss`` > 0 a box layer beside fc8 learns each foreground window's deltas to its object
too (Fast R-CNN's multi-task loss, here with the conv layers still frozen).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import FinetuneConfig
from .features import FeatureCache, ImageFeatures
from .malloc import large_blocks_reused
from .models import FCHead, autocast, resolve_precision
from .boxes import BOX_STDS, encode
from .roidb import Windows

log = logging.getLogger(__name__)

__all__ = ["sample_windows", "FeatureLRU", "finetune_head", "learnt_nothing", "box_targets", "box_loss"]


class FeatureLRU:
    """Keeps the most recently used images' conv5 maps in memory, up to ``max_bytes`` of maps (at least one
    image). Fine-tuning draws its images at random, so a cache smaller than the split misses often: with
    the demo's 96 training images (3.4 MB each with their mirror images' maps) and a cap of 64 images, a
    third of the reads went to disk, ~20% of fine-tuning's time; 2 GiB holds all of them, and ~200 images
    of full-width ZF-5 at five scales on VOC."""

    def __init__(self, cache: FeatureCache, max_bytes: int = 2 << 30, mirror_maps: bool = False,
                 device: str | torch.device = "cpu"):
        self.cache, self.max_bytes, self.mirror_maps = cache, int(max_bytes), mirror_maps
        self.device = torch.device(device)  # the maps are kept (and pooled) there
        self._d: OrderedDict[str, tuple[ImageFeatures, int]] = OrderedDict()
        self.bytes = 0

    def get(self, image_id: str) -> ImageFeatures:
        if image_id in self._d:
            self._d.move_to_end(image_id)
            return self._d[image_id][0]
        f = self.cache.load(image_id, device=self.device, flipped=True, mirror_maps=self.mirror_maps)
        size = sum(m.nbytes for m in f.maps + (f.flipped_maps or []))
        self._d[image_id] = (f, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._d) > 1:
            self.bytes -= self._d.popitem(last=False)[1][1]
        return f


# A head whose best validation loss stays above this share of the loss of predicting the validation labels'
# frequencies (their entropy) has learnt (almost) nothing about the windows. Measured (best loss / entropy):
# EfficientNet-Lite0's unscaled features at one scale 0.935 / 0.962 (0.97; error 0.241 against 0.25 for calling
# every window background); the tests' tiny config, which learns a little, 0.731 / 0.925 (0.79; error 0.223).
# Not caught: the same Lite0 failure at three scales, whose loss touched 0.726 once (0.75; error 0.225): a bound
# that caught it would flag the tiny config too.
LEARNT_NOTHING = 0.85


def learnt_nothing(result: dict) -> bool:
    """Whether a fine-tuning result (or its manifest) has a best validation loss within 15% of the labels'
    entropy (False where it records neither, e.g. without a validation split or from before they were kept)."""
    loss, prior = result.get("best_val_loss"), result.get("prior_loss")
    return loss is not None and prior is not None and bool(loss >= LEARNT_NOTHING * prior)


def sample_windows(w: Windows, num: int, fg_fraction: float, fg_threshold: float, bg_low: float, bg_high: float,
                   num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num`` window indices of one image: up to ``round(fg_fraction*num)`` foreground
    (IoU >= fg_threshold, label = class) and the rest background (IoU in [bg_low, bg_high),
    label = ``num_classes``). Returns ``(indices, labels)``."""
    fg = np.nonzero(w.max_iou >= fg_threshold)[0]
    bg = np.nonzero((w.max_iou >= bg_low) & (w.max_iou < bg_high))[0]
    n_fg = min(len(fg), int(round(fg_fraction * num)))
    n_bg = min(len(bg), num - n_fg)
    fi = rng.choice(fg, n_fg, replace=False) if n_fg else np.zeros(0, np.int64)
    bi = rng.choice(bg, n_bg, replace=False) if n_bg else np.zeros(0, np.int64)
    idx = np.concatenate([fi, bi]).astype(np.int64)
    labels = np.concatenate([w.label[fi], np.full(n_bg, num_classes)]).astype(np.int64)
    return idx, labels


def _make_batch(ids: Sequence[str], windows: dict, lru: FeatureLRU, cfg: FinetuneConfig, num_classes: int,
                rng: np.random.Generator, train: bool):
    """One mini-batch ``(pooled windows, labels, box targets)`` of ``ids``' windows, pooled in one call, on the
    LRU's device. The targets ``(N, 4)`` take each foreground window to its object (:func:`box_targets`; in the
    mirror image's frame where the window is drawn mirrored), zeros for background; None without
    ``cfg.bbox_loss``."""
    per = max(1, cfg.batch_size // len(ids))
    requests, ys, ts = [], [], []
    for i in ids:
        w = windows[i]
        idx, lab = sample_windows(w, per, cfg.fg_fraction, cfg.fg_threshold, cfg.bg_low, cfg.bg_high, num_classes, rng)
        if len(idx) == 0:
            continue
        feats = lru.get(i)
        flip = bool(train and cfg.flip and feats.flipped_maps is not None and rng.random() < 0.5)
        scale_idx = None
        if train and cfg.random_scale and len(feats.factors) > 1:
            scale_idx = rng.integers(0, len(feats.factors), len(idx))
        requests.append((feats, w.boxes[idx], flip, scale_idx))
        ys.append(torch.from_numpy(lab))
        if cfg.bbox_loss:
            ts.append(box_targets(w, idx, lab < num_classes, flip))
    if not requests:
        return None, None, None
    y = torch.cat(ys)
    t = torch.from_numpy(np.concatenate(ts)).to(lru.device) if ts else None
    return lru.cache.pooled_many(requests), y.to(lru.device), t


def box_targets(w: Windows, idx: np.ndarray, fg: np.ndarray, flipped: bool = False) -> np.ndarray:
    """``(len(idx), 4)`` float32 regression targets of windows ``idx`` of ``w``: where ``fg``, the deltas taking
    the window to the object it overlaps most (``gt_index``; the ground-truth boxes are ``w``'s first rows)
    divided by :data:`BOX_STDS`, else zeros. ``flipped``: the window and its object mirrored, which negates dx."""
    t = np.zeros((len(idx), 4), np.float32)
    f = np.nonzero(fg)[0]
    if len(f):
        d = encode(w.boxes[idx[f]], w.boxes[w.gt_index[idx[f]]])
        if flipped:
            d[:, 0] = -d[:, 0]
        t[f] = d / BOX_STDS
    return t


def box_loss(deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Smooth-L1 (beta 1, Fast R-CNN's) of the foreground windows' deltas for their own class against their
    targets, summed over them; the callers divide by the number of windows, background ones included, as Fast
    R-CNN does."""
    fg = torch.nonzero(labels < num_classes).flatten()
    if len(fg) == 0:
        return deltas.new_zeros(())
    pred = deltas[fg, labels[fg]]
    return F.smooth_l1_loss(pred.float(), targets[fg], beta=1.0, reduction="sum")


def _validation_batches(val_windows: dict, lru: FeatureLRU, cfg: FinetuneConfig, num_classes: int,
                        rng: np.random.Generator) -> list:
    """A fixed set of ``cfg.val_batches`` mini-batches of the validation split (the same at every check)."""
    val_ids = list(val_windows)
    out = []
    for _ in range(cfg.val_batches if val_ids else 0):
        pick = list(rng.choice(val_ids, min(cfg.images_per_batch, len(val_ids)), replace=False))
        x, y, t = _make_batch(pick, val_windows, lru, cfg, num_classes, rng, train=False)
        if x is not None:
            out.append((x, y, t))
    return out


def sgd(named_parameters, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum, Caffe-style (biases at twice the rate, not decayed), and its step schedule (``cfg``:
    ``lr``, ``momentum``, ``weight_decay``, ``lr_steps``, ``lr_gamma``)."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0, "lr": cfg.lr * 2},
    ]
    # fused: one kernel per step, no per-step copy of each weight matrix for the decay term (4096-wide fc6/fc7:
    # the unfused step was a third of a 0.5 s iteration); the same updates up to float rounding.
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)


def _baselines(val_batches: list, num_classes: int, history: list) -> dict:
    """The error of calling every validation window background, the loss of predicting the labels' frequencies
    (their entropy) and the best validation loss reached."""
    labels = np.concatenate([b[1].cpu().numpy() for b in val_batches]) if val_batches else np.zeros(0, np.int64)
    freq = np.bincount(labels, minlength=num_classes + 1) / max(len(labels), 1)
    return {"background_error": float(np.mean(labels != num_classes)) if len(labels) else float("nan"),
            "prior_loss": float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum()) if len(labels) else None,
            "best_val_loss": min((h["val_loss"] for h in history), default=None) if val_batches else None}


def finetune_head(head: FCHead, train_windows: dict[str, Windows], val_windows: dict[str, Windows], cache_train: FeatureCache,
                  cache_val: FeatureCache, num_classes: int, cfg: FinetuneConfig, seed: int = 0, progress: bool = True,
                  log_fn: Callable[[str], None] = print, device: str = "cpu",
                  pool_device: str | None = None) -> dict:
    """Train ``head`` (fc6, fc7, fc8 with K+1 outputs) in place on ``device``, leaving it on the CPU with the best
    checkpoint's weights; return the history. The conv5 maps are kept and the windows pooled on ``device`` too
    (``pool_device``, when given, overrides that: a benchmark's CPU pooling beside a GPU's fc layers)."""
    from tqdm import tqdm

    if cfg.bbox_loss and not head.box_classes:
        raise ValueError("finetune.bbox_loss > 0 needs a head with a box layer (FCHead(..., box_classes=K))")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_ids = [i for i, w in train_windows.items() if len(w.boxes)]
    if not train_ids:
        raise ValueError("fine-tuning: no training image has windows")
    pool_device = device if pool_device is None else pool_device
    lru_t = FeatureLRU(cache_train, mirror_maps=cfg.flip and cfg.mirror_maps, device=pool_device)
    lru_v = FeatureLRU(cache_val, device=pool_device)
    val_batches = [(x.to(device), y.to(device), None if t is None else t.to(device)) for x, y, t in
                   _validation_batches(val_windows, lru_v, cfg, num_classes, np.random.default_rng(seed + 1))]
    head.to(device)
    opt, sched = sgd(head.named_parameters(), cfg)
    precision = resolve_precision(cfg.precision, device, "finetune.precision")

    def validate() -> tuple[float, float, float]:
        """Validation error, loss and box loss (nan without a box loss) per window."""
        if not val_batches:
            return float("nan"), float("nan"), float("nan")
        head.eval()
        err = loss = boxl = n = 0.0
        with torch.no_grad():
            for x, y, t in val_batches:
                with autocast(device, precision):
                    out, deltas = head.outputs(x)
                loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
                err += float((out.argmax(1) != y).sum())
                if t is not None:
                    boxl += float(box_loss(deltas, y, t, num_classes))
                n += len(y)
        head.train()
        return err / n, loss / n, (boxl / n if cfg.bbox_loss else float("nan"))

    best = {"val_error": float("inf"), "iteration": 0, "state": {k: v.clone() for k, v in head.state_dict().items()}}
    history = []
    t0 = time.time()
    head.train()
    bar = tqdm(range(1, cfg.iterations + 1), desc="finetune fc", unit="it", disable=not progress)
    running = []
    with large_blocks_reused():  # fc6's gradient and the pooled batch: the same large blocks every step
        for it in bar:
            pick = list(rng.choice(train_ids, min(cfg.images_per_batch, len(train_ids)), replace=False))
            x, y, t = _make_batch(pick, train_windows, lru_t, cfg, num_classes, rng, train=True)
            if x is None:
                continue
            y = y.to(device)
            with autocast(device, precision):
                out, deltas = head.outputs(x.to(device))
            loss = F.cross_entropy(out.float(), y)
            if cfg.bbox_loss:
                loss = loss + cfg.bbox_loss * box_loss(deltas, y, t.to(device), num_classes) / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.item())
            if it % cfg.val_every == 0 or it == cfg.iterations:
                verr, vloss, vbox = validate()
                rec = {"iteration": it, "train_loss": float(np.mean(running)), "val_error": verr, "val_loss": vloss,
                       "lr": opt.param_groups[0]["lr"]}
                if cfg.bbox_loss:
                    rec["val_box_loss"] = vbox
                history.append(rec)
                running = []
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val_err=f"{verr:.3f}")
                if np.isnan(verr) or verr < best["val_error"]:  # no validation split: keep the latest
                    best = {"val_error": verr, "iteration": it, "state": {k: v.clone() for k, v in head.state_dict().items()}}
    bar.close()
    head.load_state_dict(best["state"])
    head.cpu()
    log_fn(f"fine-tuning: best validation error {best['val_error']:.4f} at iteration {best['iteration']} "
           f"({time.time() - t0:.1f} s, fc arithmetic {precision})")
    # Baselines that use no window at all: calling every window background (its error) and predicting the labels'
    # frequencies (its loss, their entropy). A head that does not beat them has learnt nothing (e.g. fc6's units
    # killed by too large inputs for the learning rate), which would otherwise only show as useless fc6/fc7
    # features three stages later.
    base = _baselines(val_batches, num_classes, history)
    if learnt_nothing(base):
        log_fn(f"warning: fine-tuning learnt (almost) nothing: its best validation loss {base['best_val_loss']:.4f} is "
               f"within {1 - LEARNT_NOTHING:.0%} of that of predicting the labels' frequencies "
               f"({base['prior_loss']:.4f}; validation error {best['val_error']:.4f}, calling every window background "
               f"{base['background_error']:.4f}). Lower finetune.lr, or set finetune.input_norm (e.g. 40) when the "
               f"pooled features are large (fc6/fc7 from random init)")
    return {"best_iteration": best["iteration"], "best_val_error": best["val_error"], **base, "history": history,
            "seconds": time.time() - t0, "config": asdict(cfg)}
