"""sppdet: SPP-net object detection (He, Zhang, Ren, Sun 2014) in PyTorch.

``from sppdet import Predictor``: detection with a trained run folder (see :mod:`sppdet.predictor`).
"""

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":  # imported on use: `import sppdet` stays light
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'sppdet' has no attribute {name!r}")
