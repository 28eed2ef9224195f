"""Classifier pre-training of a trunk (where no ImageNet weights can be downloaded).

Sources: an image folder (one sub-folder per class) or the ground-truth crops of a
VOC-format split (plus "background" crops that overlap no object, so the trunk also
learns what is not an object). Single-size (224) or multi-size training: the size
alternates per epoch over ``sizes`` (paper: 224 and 180), the 180 input being the 224
crop resized, as in the paper. Held-out accuracy is printed per epoch; the checkpoint
records its config, classes and history.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .backbones import ZF5, build_backbone
from .boxes import iou_matrix
from .config import BackboneConfig, PretrainConfig
from .models import SPPNetClassifier, autocast, resolve_precision
from .store import atomic_write_bytes
from .voc import VOCDataset, load_image

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

__all__ = ["CropDataset", "folder_items", "voc_items", "train_classifier", "save_checkpoint", "load_checkpoint"]


def folder_items(root: str | Path) -> tuple[list[tuple[str, None, int]], list[str]]:
    """``(items, classes)`` of an image folder with one sub-folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder is missing")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    items = []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{root / c}: class folder has no images")
        items += [(str(p), None, k) for p in files]
    return items, classes


def _jitter(box: np.ndarray, rng: np.random.Generator, width: int, height: int, min_iou: float = 0.6) -> np.ndarray:
    """A random shift/scale of ``box`` that keeps IoU >= ``min_iou`` with it (inside the image)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    for _ in range(20):
        d = rng.uniform(-0.15, 0.15, 4) * np.array([w, h, w, h])
        j = np.array([max(0, x1 + d[0]), max(0, y1 + d[1]), min(width, x2 + d[2]), min(height, y2 + d[3])], np.float32)
        if j[2] - j[0] >= 2 and j[3] - j[1] >= 2 and iou_matrix(j[None], box[None])[0, 0] >= min_iou:
            return j
    return box.astype(np.float32)


def voc_items(ds: VOCDataset, background_per_image: int, rng: np.random.Generator, jitters: int = 0):
    """Ground-truth crops (non-difficult), ``jitters`` shifted copies of each (IoU >= 0.6), and
    random background crops (IoU < 0.3 with all objects)."""
    items = []
    bg = len(ds.classes)
    for i in ds.ids:
        a = ds.annotation(i)
        path = str(ds.image_path(i))
        for box, k, d in zip(a.boxes, a.labels(ds.classes), a.difficult):
            if not d:
                items.append((path, box.astype(np.float32), int(k)))
                items += [(path, _jitter(box, rng, a.width, a.height), int(k)) for _ in range(jitters)]
        for _ in range(background_per_image):
            for _try in range(20):
                s = rng.uniform(0.1, 0.5) * min(a.width, a.height)
                ar = np.exp(rng.uniform(-0.7, 0.7))
                w, h = min(a.width, s * ar), min(a.height, s / ar)
                x, y = rng.uniform(0, a.width - w), rng.uniform(0, a.height - h)
                box = np.array([x, y, x + w, y + h], np.float32)
                if len(a.boxes) == 0 or iou_matrix(box[None], a.boxes).max() < 0.3:
                    items.append((path, box, bg))
                    break
    return items, list(ds.classes) + ["background"]


class CropDataset(Dataset):
    """``size x size`` RGB crops: a box with ``context`` (VOC) or the centre/random crop of
    the image resized so its shorter side is ``size * 256/224`` (folder). Horizontal flips
    when ``train``. Returns ``(uint8 tensor (3, size, size), label)``."""

    def __init__(self, items: Sequence, size: int = 224, context: float = 0.15, train: bool = True, seed: int = 0,
                 context_max: float = 0.0):
        self.items, self.size, self.context, self.train = list(items), int(size), float(context), train
        self.context_max = max(float(context_max), self.context)
        self.seed = seed
        self.epoch = 0
        self._images: dict[str, np.ndarray] = {}  # decoded images (small datasets are read once)
        self.max_cached = 1024

    def _image(self, path: str) -> np.ndarray:
        img = self._images.get(path)
        if img is None:
            img = load_image(path)
            if len(self._images) < self.max_cached:
                self._images[path] = img
        return img

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        path, box, label = self.items[idx]
        rng = np.random.default_rng((self.seed, self.epoch, idx))
        img = self._image(path)
        s = self.size
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            jit = rng.uniform(-0.05, 0.05, 4) if self.train else np.zeros(4)
            ctx = rng.uniform(self.context, self.context_max) if self.train else self.context
            w, h = x2 - x1, y2 - y1
            x1 -= (ctx + jit[0]) * w
            x2 += (ctx + jit[1]) * w
            y1 -= (ctx + jit[2]) * h
            y2 += (ctx + jit[3]) * h
            H, W = img.shape[:2]
            x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
            x2, y2 = min(W, max(x1 + 1, int(np.ceil(x2)))), min(H, max(y1 + 1, int(np.ceil(y2))))
            crop = cv2.resize(img[y1:y2, x1:x2], (s, s), interpolation=cv2.INTER_LINEAR)
        else:
            H, W = img.shape[:2]
            f = (s * 256 / 224) / min(H, W)
            img = cv2.resize(img, (max(s, round(W * f)), max(s, round(H * f))), interpolation=cv2.INTER_AREA)
            H, W = img.shape[:2]
            oy = int(rng.integers(0, H - s + 1)) if self.train else (H - s) // 2
            ox = int(rng.integers(0, W - s + 1)) if self.train else (W - s) // 2
            crop = img[oy:oy + s, ox:ox + s]
        if self.train and rng.random() < 0.5:
            crop = crop[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1), int(label)


def save_checkpoint(path: str | Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e


def _evaluate(model, loader, size: int, device, precision: str = "fp32") -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), autocast(device, precision):
        for x, y in loader:
            x = _batch(model, x, size, device)
            correct += int((model(x).argmax(1).cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _batch(model, x: torch.Tensor, size: int, device) -> torch.Tensor:
    x = x.to(device).float()
    if x.shape[-1] != size:  # the smaller input is the crop resized, as in the paper
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # Channels-last: oneDNN's convolutions are 1.5x (fp32) to 3x (with bf16) faster per step on CPU.
    return model.backbone.normalize(x).contiguous(memory_format=torch.channels_last)


def _split_items(items: Sequence, val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """``(train, held-out)`` crops: whole images held out, so that jittered copies of one object never straddle
    the split (items held out instead where there is a single image)."""
    paths = sorted({it[0] for it in items})
    held = set(rng.permutation(paths)[: max(1, int(round(val_fraction * len(paths))))].tolist())
    if len(paths) < 2:
        held = set()
    val_items = [it for it in items if it[0] in held]
    train_items = [it for it in items if it[0] not in held]
    if not val_items:
        perm = rng.permutation(len(items))
        n_val = max(1, int(round(val_fraction * len(items))))
        val_items = [items[i] for i in perm[:n_val]]
        train_items = [items[i] for i in perm[n_val:]]
    return train_items, val_items


def _classifier(backbone_cfg: BackboneConfig, cfg: PretrainConfig, num_classes: int, device: str) -> SPPNetClassifier:
    """The trunk (``pretrain.batchnorm``: ZF-5 with batch norm, folded away after training) under an SPP head."""
    weights = backbone_cfg.weights if backbone_cfg.weights not in (None, "pretrain") else None
    if cfg.batchnorm:
        if backbone_cfg.name != "zf5" or weights is not None:
            raise ValueError(f"pretrain.batchnorm is for ZF-5 trained from scratch, not {backbone_cfg.name!r} "
                             f"with weights {weights!r}")
        backbone = ZF5(backbone_cfg.width, batchnorm=True)
    else:
        backbone = build_backbone(backbone_cfg.name, weights, backbone_cfg.width, backbone_cfg.stride,
                              backbone_cfg.hypercolumn)
    model = SPPNetClassifier(backbone, num_classes, cfg.levels, cfg.hidden, cfg.dropout).to(device)
    return model.to(memory_format=torch.channels_last)


def _train_epoch(model, batches, size: int, device: str, precision: str, opt, sched) -> list[float]:
    """One epoch of SGD steps at input ``size``; returns the losses."""
    model.train()
    losses = []
    for x, y in batches:
        x = _batch(model, x, size, device)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        batches.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def train_classifier(items: Sequence, classes: Sequence[str], backbone_cfg: BackboneConfig, cfg: PretrainConfig,
                     out_dir: str | Path, seed: int = 0, device: str = "cpu", progress: bool = True,
                     log_fn=print, record: dict | None = None) -> dict:
    """Train an :class:`SPPNetClassifier`; writes ``out_dir/checkpoint.pt`` (with ``record``'s entries,
    e.g. what data it was trained on); returns its dict."""
    from tqdm import tqdm

    if len(items) < 4:
        raise ValueError(f"pre-training needs at least 4 labelled crops, got {len(items)}")
    train_items, val_items = _split_items(items, cfg.val_fraction, np.random.default_rng(seed))
    torch.manual_seed(seed)
    model = _classifier(backbone_cfg, cfg, len(classes), device)
    precision = resolve_precision(cfg.precision, device, "pretrain.precision")
    log_fn(f"pretrain: {precision} steps (pretrain.precision={cfg.precision!r}), channels-last convolutions")
    big = max(cfg.sizes)
    train_ds = CropDataset(train_items, big, cfg.context, train=True, seed=seed, context_max=cfg.context_max)
    val_ds = CropDataset(val_items, big, cfg.context, train=False, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g, num_workers=cfg.workers,
                          drop_last=len(train_ds) > cfg.batch_size)
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * len(train_dl))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    history = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        size = int(cfg.sizes[epoch % len(cfg.sizes)])
        train_ds.epoch = epoch
        bar = tqdm(train_dl, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs} @{size}", unit="batch", disable=not progress,
                   leave=False)
        losses = _train_epoch(model, bar, size, device, precision, opt, sched)
        rec = {"epoch": epoch + 1, "size": size, "loss": float(np.mean(losses)) if losses else float("nan")}
        msg = f"epoch {epoch + 1}/{cfg.epochs} size {size}: train loss {rec['loss']:.3f}"
        if (epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs:
            acc = _evaluate(model, val_dl, big, device, precision)
            acc_small = _evaluate(model, val_dl, min(cfg.sizes), device, precision) if len(cfg.sizes) > 1 else acc
            rec.update(val_acc=acc, val_acc_small=acc_small)
            msg += f", held-out accuracy {acc:.3f} @{big}" + (f", {acc_small:.3f} @{min(cfg.sizes)}"
                                                             if len(cfg.sizes) > 1 else "")
        history.append(rec)
        log_fn(msg)
    trunk = model.backbone.folded() if cfg.batchnorm else model.backbone
    ckpt = {
        "backbone_name": backbone_cfg.name,
        "backbone_cfg": asdict(backbone_cfg),
        "pretrain_cfg": asdict(cfg),
        "classes": list(classes),
        "levels": list(cfg.levels),
        "backbone": {k: v.cpu().contiguous() for k, v in trunk.state_dict().items()},
        "head": {k: v.cpu().contiguous() for k, v in model.head.state_dict().items()},
        "precision": precision,
        "history": history,
        "seconds": time.time() - t0,
        "num_train": len(train_items),
        "num_val": len(val_items),
        **(record or {}),
    }
    out = Path(out_dir)
    save_checkpoint(out / "checkpoint.pt", ckpt)
    return ckpt
