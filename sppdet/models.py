"""SPP-net classifier, the fixed-size baseline, and the fc head shared with detection."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from .backbones import Backbone
from .config import DEVICE_PATTERN, PRECISIONS
from .spp import SpatialPyramidPooling, spp_output_dim

__all__ = ["FCHead", "SPPNetClassifier", "FixedSizeClassifier", "truncated_svd_linear", "resolve_precision", "autocast",
           "fc_features", "resolve_device", "module_device"]


class Dropout(nn.Module):
    """Dropout (inverted: kept units scaled by ``1 / (1 - p)``) whose mask on the CPU comes from random bytes:
    ``torch.nn.Dropout``'s Bernoulli draw costs ~3.3 ms for fine-tuning's 256 x 1024 fc6/fc7 activations on 2
    cores, the bytes ~0.5 ms (two per step: ~5 ms of a ~60 ms step). ``p`` acts rounded to a multiple of 1/256
    (0.5 exactly). Seeded by torch's generator like any other draw; elsewhere (CUDA) ``torch.nn.functional.dropout``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = int(round(self.p * 256))
        if not self.training or drop == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        keep = torch.empty(x.shape, dtype=torch.uint8).random_() >= drop  # each byte uniform on 0..255
        return x * (keep.to(x.dtype) * (256.0 / (256 - drop)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8.

    ``features(x, layer)`` returns the post-ReLU fc6 or fc7 activations without dropout
    (what the SVMs see, as ``spp_poolX_to_fcX.m``). ``input_scale`` multiplies the pooled features
    before fc6 (1: as they are; fine-tuning's ``input_norm`` sets it, and checkpoints keep it).
    ``box_classes`` K > 0 adds ``bbox_pred``, fc7 -> K x 4 box deltas beside fc8 (Fast R-CNN's second output;
    ``finetune.bbox_loss`` trains it with the fc layers, ``bbox_reg.source: finetune`` regresses with it).
    """

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.5, input_scale: float = 1.0,
                 fc6_rank: int = 0, box_classes: int = 0):
        super().__init__()
        self.box_classes = int(box_classes)
        self.input_scale = float(input_scale)
        # fc6_rank r in (0, min(in_dim, hidden)): fc6 learnt as two layers, in_dim -> r (no bias, no activation) ->
        # hidden, a rank-r weight (in_dim + hidden) * r floats instead of in_dim * hidden (finetune.fc6_rank)
        self.fc6_rank = int(fc6_rank) if 0 < fc6_rank < min(in_dim, hidden) else 0
        if self.fc6_rank:
            self.fc6 = nn.Sequential(nn.Linear(in_dim, self.fc6_rank, bias=False), nn.Linear(self.fc6_rank, hidden))
            # the product's variance as He init's: the first layer keeps the input's, the second is He's
            nn.init.normal_(self.fc6[0].weight, std=in_dim ** -0.5)
            out6 = self.fc6[1]
        else:
            self.fc6 = out6 = nn.Linear(in_dim, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_outputs)
        self.drop = Dropout(dropout)
        for m in (out6, self.fc7):  # He init: trains from scratch (Caffe's std 0.005/0.01 stalls without ImageNet)
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        if self.box_classes:
            self.bbox_pred = nn.Linear(hidden, 4 * self.box_classes)
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.bbox_pred.bias)

    def features(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        if layer == "pool5":
            return x
        h = torch.relu(self.fc6_scaled(x))
        if layer == "fc6":
            return h
        if layer != "fc7":
            raise ValueError(f"unknown layer {layer!r} (pool5, fc6, fc7)")
        return torch.relu(self.fc7(h))

    def fc6_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """fc6 of the pooled features times ``input_scale``. A factored fc6's first layer is linear without a
        bias, so the scale is applied to its r outputs instead of the pooled rows (256 x 23,600 in a fine-tuning
        step: a 24 MB product, ~2 ms)."""
        if self.input_scale == 1.0:
            return self.fc6(x)
        if self.fc6_rank:
            return self.fc6[1](self.fc6[0](x) * self.input_scale)
        return self.fc6(x * self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self._fc7_dropped(x))

    def _fc7_dropped(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.fc6_scaled(x)))
        return self.drop(torch.relu(self.fc7(h)))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(class logits (R, K+1), box deltas (R, box_classes, 4) or None)`` from one fc6/fc7 pass (with dropout
        in training mode)."""
        h = self._fc7_dropped(x)
        deltas = self.bbox_pred(h).view(-1, self.box_classes, 4) if self.box_classes else None
        return self.fc8(h), deltas


class SPPNetClassifier(nn.Module):
    """Backbone conv layers + SPP + fc6/fc7 (dropout) + fc8: accepts any input size."""

    def __init__(self, backbone: Backbone, num_classes: int, levels: Sequence[int] = (6, 3, 2, 1),
                 hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.spp = SpatialPyramidPooling(levels, "max")
        self.head = FCHead(spp_output_dim(backbone.out_channels, levels), hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.spp(self.backbone(x)))


class FixedSizeClassifier(nn.Module):
    """The no-SPP baseline: conv5 -> pool5 (3x3/2, ceil) -> flatten -> fc6.

    fc6's input length is fixed by ``input_size`` (9216 for ZF-5 at 224); any other input
    size fails with a clear error: the problem SPP removes.
    """

    def __init__(self, backbone: Backbone, num_classes: int, input_size: int = 224, hidden: int = 4096,
                 dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.input_size = int(input_size)
        self.pool5 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        h, w = backbone.feature_size(input_size, input_size)
        with torch.no_grad():
            ph = self.pool5(torch.zeros(1, 1, h, w)).shape[-1]
        self.pool5_size = int(ph)
        self.head = FCHead(backbone.out_channels * ph * ph, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            f = self.pool5(self.backbone(x))
            raise ValueError(
                f"FixedSizeClassifier needs {self.input_size}x{self.input_size} input (pool5 "
                f"{self.pool5_size}x{self.pool5_size}, fc6 input {self.head.fc6.in_features}); got "
                f"{x.shape[-2]}x{x.shape[-1]}, whose pool5 is {f.shape[-2]}x{f.shape[-1]} = "
                f"{f.shape[1] * f.shape[-2] * f.shape[-1]} features. Use SPPNetClassifier for any size."
            )
        return self.head(torch.flatten(self.pool5(self.backbone(x)), 1))


def truncated_svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Fast R-CNN's truncated SVD: ``W ~ U_t S_t V_t^T`` as two linear layers (rank ``t``)."""
    w = layer.weight.data.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank = int(min(rank, s.numel()))
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=True)
    first.weight.data = (s[:rank, None] * vh[:rank]).float()
    second.weight.data = u[:, :rank].float().contiguous()
    second.bias.data = layer.bias.data.clone()
    return nn.Sequential(first, second)


def resolve_device(device: str, name: str = "device") -> str:
    """The torch device for a config's ``device``: ``"cpu"``, ``"cuda"`` / ``"cuda:N"``, or ``"auto"`` (the first
    CUDA device when torch finds one, else the CPU). A CUDA device this machine lacks is refused naming ``name``."""
    if not isinstance(device, str) or not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= found:
            raise ValueError(f"{name} is {device!r} but torch finds {found} CUDA device(s) on this machine; "
                             f"set {name}: cpu (or auto)")
    return device


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (the CPU for one without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_precision(precision: str, device: str | torch.device = "cpu", name: str = "precision") -> str:
    """``"fp32"`` or ``"bf16"`` for a requested ``"auto" | "fp32" | "bf16"`` (config key ``name``) on ``device``.

    ``"auto"`` picks bf16 only where it is native: a CPU with bfloat16 instructions (oneDNN's
    check; elsewhere bf16 is emulated and slower than fp32) or a CUDA device that supports it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


FC_CHUNK = 256


def fc_features(head: "FCHead", x: torch.Tensor, layer: str, precision: str = "fp32") -> torch.Tensor:
    """``head.features(x, layer)`` as float32 without gradients; with ``precision`` ``"bf16"`` under bfloat16
    autocast, in row chunks of :data:`FC_CHUNK` (the last one zero-padded). oneDNN builds and keeps a bf16
    matmul primitive per input shape (~10 MB each, up to 1,024 of them), so one call per image with its own
    number of windows grew a process by ~1.3 GB over 150 images; fixed-size chunks use one shape."""
    with torch.no_grad():
        if precision != "bf16":
            return head.features(x, layer)
        out = []
        with autocast(x.device, precision):
            for s in range(0, len(x), FC_CHUNK):
                c = x[s:s + FC_CHUNK]
                if len(c) < FC_CHUNK:
                    c = torch.nn.functional.pad(c, (0, 0, 0, FC_CHUNK - len(c)))
                out.append(head.features(c, layer).float())
        return torch.cat(out)[:len(x)] if out else head.features(x, layer)


def autocast(device: str | torch.device, precision: str):
    """bfloat16 autocast on ``device`` when ``precision == "bf16"`` (a no-op context otherwise)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
