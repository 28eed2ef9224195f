"""sppdet: SPP-net object detection (He, Zhang, Ren, Sun 2014) in PyTorch."""

__version__ = "0.1.0"
