"""Fast R-CNN mode (Girshick 2015) on sppdet's trunk and proposals: one network trained end to end in one stage.

What changes against the SPP-net route, each one of SPP-net's three limitations removed:

- the conv layers above a frozen stem are trained, through the pooling (max pooling's backward sends each bin's
  gradient to the cell that won it: ``torchvision.ops.roi_pool``'s backward, on the exact floor/ceil bins);
- one stage: a softmax classifier and a per-class box regressor (smooth L1) trained jointly with the rest, no SVMs
  and no separate regressor fit;
- no feature cache: each mini-batch's conv maps are computed, used and dropped.

Sampling is hierarchical, as the paper's: ``images_per_batch`` images (2), ``rois_per_image`` windows of each
(64), a ``fg_fraction`` (25%) of them foreground (IoU >= 0.5), the rest background (IoU in [0.1, 0.5)).
The pooling is SPP-net's pyramid (``features.levels``) or Fast R-CNN's single level (``pooling: roi``, 7x7).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .boxes import BOX_STDS, decode, flip_boxes
from .detector import Detections, cap_detections, class_detections
from .features import box_cells, choose_scale, prepare_image, resize_factor
from .finetune import box_loss, box_targets, sample_windows, sgd
from .malloc import large_blocks_reused
from .models import FCHead
from .roidb import Windows
from .spp import check_deep, spp_output_dim
from .window_pool import pool_windows

__all__ = ["FastRCNN", "BOX_STDS", "train_fast_rcnn", "set_trainable"]



def set_trainable(backbone: nn.Module, train_conv: bool, frozen_convs: int) -> list[str]:
    """Make the trunk's parameters trainable from its ``frozen_convs``-th convolution on (module order; each
    convolution with the layers up to the next one), all frozen when not ``train_conv``; returns the names of the
    trainable ones."""
    convs = 0
    names = []
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            convs += 1
        for pname, p in m.named_parameters(recurse=False):
            p.requires_grad_(bool(train_conv and convs > frozen_convs))
            if p.requires_grad:
                names.append(f"{name}.{pname}" if name else pname)
    return names


class FastRCNN(nn.Module):
    """Trunk -> pooling of each window on the conv map (SPP pyramid or one RoI level) -> fc6 -> fc7 ->
    softmax over K classes + background, and per-class box deltas.

    Args:
        backbone: the trunk (its own copy: it is trained).
        num_classes: K object classes (the softmax has K + 1 outputs, background last).
        levels: pyramid levels of the pooling ((7,): Fast R-CNN's RoI pooling).
        deep: a hypercolumn's coarse channels' own pyramid, ``(first channel, levels)`` (``features.deep_levels``).
        hidden, dropout: fc6/fc7's width and dropout.
        shrink: the window projection's inward shrink in pixels (``features.shrink``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, levels: Sequence[int], hidden: int, dropout: float,
                 shrink: float, deep: tuple[int, Sequence[int]] | None = None, fc6_rank: int = 0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.levels = tuple(int(n) for n in levels)
        self.deep = check_deep(deep, backbone.out_channels)
        self.shrink = float(shrink)
        self.head = FCHead(spp_output_dim(backbone.out_channels, self.levels, self.deep), hidden, num_classes + 1,
                           dropout, fc6_rank=fc6_rank, box_classes=num_classes)

    def train(self, mode: bool = True) -> "FastRCNN":
        super().train(mode)
        self.backbone.eval()  # batch-norm statistics stay the pre-trained ones (2 images per batch are too few)
        return self

    def conv_map(self, rgb: np.ndarray, scale: int, max_size: int) -> tuple[torch.Tensor, float]:
        """The trunk's ``(C, h, w)`` map of an RGB image resized to ``scale`` (with gradient when training)."""
        f = resize_factor(rgb.shape[0], rgb.shape[1], scale, max_size)
        im = prepare_image(rgb, f, self.backbone.min_input_size)
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        return self.backbone(self.backbone.normalize(x))[0], f

    def pool(self, maps: Sequence[torch.Tensor], factors: Sequence[float], boxes: np.ndarray,
             scale_idx: np.ndarray) -> torch.Tensor:
        """Pooled windows, ``(R, C * sum(n*n))``: differentiable (``roi_pool`` per level) when gradients are on,
        else the faster sparse-table pooling (the same values, tested)."""
        g = self.backbone.geometry
        sidx, cells = box_cells([m.shape[-2:] for m in maps], factors, boxes, scale_idx, g.stride, g.center0,
                                self.shrink)
        method = "roi_pool" if torch.is_grad_enabled() else "sparse_table"
        return pool_windows(list(maps), cells, self.levels, method=method, map_index=torch.as_tensor(sidx),
                            deep=self.deep)

    def heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class logits (R, K+1), box deltas (R, K, 4))``."""
        return self.head.outputs(pooled)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; a checkpoint from before the box layer moved into the head (``bbox_pred.*``) loads too."""
        state_dict = {("head." + k if k.startswith("bbox_pred.") else k): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict, assign)

    @torch.no_grad()
    def detect(self, rgb: np.ndarray, proposals: np.ndarray, scales: Sequence[int], max_size: int,
               target_size: float, test, score_threshold: float, max_per_image: int = 0,
               floor: float | None = None) -> tuple[Detections, Detections, np.ndarray, dict]:
        """Detections of one image: conv once per scale, each window pooled from the scale whose size suits it,
        softmax scores, per-class NMS (``test``: its ``nms``, ``nms_method``, ``max_per_class``); without and with
        the net's own box regression (every window above the threshold regressed before NMS, as Fast R-CNN does).
        ``floor``: where soft-NMS lowers scores towards (None: ``score_threshold``; the evaluation threshold when
        drawing above it).
        Returns ``(plain, regressed, scores (R, K), seconds {"conv", "pool", "fc", "post"})``."""
        t0 = time.perf_counter()
        maps, factors = zip(*(self.conv_map(rgb, s, max_size) for s in scales))
        t1 = time.perf_counter()
        pooled = self.pool(maps, factors, proposals, choose_scale(proposals, factors, target_size))
        t2 = time.perf_counter()
        logits, deltas = self.heads(pooled)
        scores = torch.softmax(logits, 1)[:, :self.num_classes].numpy()
        deltas = deltas.numpy() * BOX_STDS
        t3 = time.perf_counter()
        plain, refined = class_detections(proposals, scores, score_threshold, test,
                                          lambda k, idx: decode(proposals[idx], deltas[idx, k]), rgb.shape[:2],
                                          regress_first=True, floor=floor)
        mc = test.max_per_class
        out = (cap_detections(plain, mc, max_per_image), cap_detections(refined, mc, max_per_image))
        return (*out, scores, {"conv": t1 - t0, "pool": t2 - t1, "fc": t3 - t2, "post": time.perf_counter() - t3})


def _image_loss(model: FastRCNN, rgb: np.ndarray, w: Windows, cfg, scale: int, max_size: int, flip: bool,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """One image's summed classification and box losses over its sampled windows, and their number."""
    idx, labels = sample_windows(w, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_threshold, cfg.bg_low, cfg.bg_high,
                                 model.num_classes, rng)
    if len(idx) == 0:
        return None
    boxes = w.boxes[idx]
    if flip:
        rgb = np.ascontiguousarray(rgb[:, ::-1])
        boxes = flip_boxes(boxes, rgb.shape[1])
    fmap, f = model.conv_map(rgb, scale, max_size)
    logits, deltas = model.heads(model.pool([fmap], [f], boxes, np.zeros(len(boxes), np.int64)))
    y = torch.from_numpy(labels)
    loss_cls = F.cross_entropy(logits, y, reduction="sum")
    targets = torch.from_numpy(box_targets(w, idx, labels < model.num_classes, flip))
    loss_box = box_loss(deltas, y, targets, model.num_classes)  # summed: the step divides by all windows
    return loss_cls, loss_box, len(idx)


def train_fast_rcnn(model: FastRCNN, images: Callable[[str], np.ndarray], windows: dict[str, Windows], cfg,
                    scales: Sequence[int], max_size: int, seed: int = 0, progress: bool = True,
                    log_fn: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place with SGD on hierarchically sampled mini-batches (``cfg``: a ``FastRCNNConfig``);
    ``images(id)`` gives an RGB image. Each image is seen at a random one of ``scales`` (Fast R-CNN's multi-scale
    training when there are several) and, with ``cfg.flip``, mirrored half of the time. Returns the history."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ids = [i for i, w in windows.items() if len(w.boxes)]
    if not ids:
        raise ValueError("Fast R-CNN training: no training image has windows")
    opt, sched = sgd(model.named_parameters(), cfg)  # Caffe-style, as the paper
    model.train()
    history, running, t0 = [], [], time.time()
    bar = tqdm(range(1, cfg.iterations + 1), desc="fast r-cnn", unit="it", disable=not progress)
    with large_blocks_reused():  # activations and gradients: the same large blocks every step
        for it in bar:
            cls = box = 0.0
            n = 0
            for i in rng.choice(ids, min(cfg.images_per_batch, len(ids)), replace=False):
                out = _image_loss(model, images(i), windows[i], cfg, int(rng.choice(scales)), max_size,
                                  bool(cfg.flip and rng.random() < 0.5), rng)
                if out is not None:
                    cls, box, n = cls + out[0], box + out[1], n + out[2]
            if not n:
                continue
            loss = (cls + cfg.bbox_loss_weight * box) / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append((float(cls.detach()) / n, float(box.detach()) / n))
            if it % cfg.log_every == 0 or it == cfg.iterations:
                c, b = np.mean(running, axis=0)
                history.append({"iteration": it, "loss_cls": float(c), "loss_box": float(b),
                                "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0})
                bar.set_postfix(cls=f"{c:.3f}", box=f"{b:.3f}")
                running = []
    bar.close()
    model.eval()
    log_fn(f"fast r-cnn: {cfg.iterations} iterations in {time.time() - t0:.1f} s; final losses: classification "
           f"{history[-1]['loss_cls']:.3f}, box {history[-1]['loss_box']:.3f}")
    return {"history": history, "seconds": time.time() - t0}
