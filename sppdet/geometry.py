"""The base of every trunk: its receptive-field geometry computed from its layers (stride, centre of cell 0,
receptive field), input normalisation and checks, and loading weights from a local file. The trunks themselves:
:mod:`sppdet.backbones` (ZF-5, torchvision's) and :mod:`sppdet.efficientnet`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["SpatialOp", "Geometry", "compute_geometry", "Backbone", "load_weights_file"]


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
    # A hypercolumn's first coarse channel (its stride-32 stages' map after the stride-16 one's), else None:
    # where features.deep_levels' pyramid starts.
    deep_from: int | None = None
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


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _ops_from_modules(modules: Iterable[nn.Module]) -> list[SpatialOp]:
    ops = []
    for m in modules:
        if hasattr(m, "spatial_op"):  # a layer that knows its own geometry (e.g. TensorFlow-SAME padding)
            ops.append(m.spatial_op())
        elif isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            ceil = bool(getattr(m, "ceil_mode", False))
            ops.append(SpatialOp(_pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding), ceil))
    return ops


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
