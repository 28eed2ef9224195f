"""Images as the pipeline reads them: any JPEG/PNG/... decoded by its content as RGB uint8, with one warning per
file for what was made safe (an extension that lies, a truncated JPEG), and an image's size from its header."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["VOCError", "load_image", "image_size", "warn_once"]


class VOCError(ValueError):
    """Bad input data (an image, an annotation, a split file); the message names the file and the problem."""


def warn_once(key: str, message: str, *args) -> None:
    """Log a warning once per process for ``key`` (a file is read by several stages)."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


_WARNED: set[str] = set()


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (by content, whatever its extension)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise VOCError(f"{path}: cannot read the image's size ({e})") from None


def load_image(path: str | Path) -> np.ndarray:
    """Read any JPEG/PNG/... as RGB uint8 ``(H, W, 3)``.

    Grayscale, CMYK (libjpeg converts it), 16-bit and alpha images all come back as
    3-channel RGB. A missing or undecodable file is a :class:`VOCError` naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise VOCError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise VOCError(f"{path}: image file is missing")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None and data[:3].tobytes() == b"\xff\xd8\xff" and len(data) > 1024:
        # A JPEG whose last bytes are missing: OpenCV's decoder from memory gives up, from the file it reads the
        # rows that are there ("Premature end of JPEG file"); _check_format warns.
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise VOCError(f"{path}: cannot decode image (corrupt or not an image)")
    _check_format(path, data)
    if img.dtype != np.uint8:
        img = (img / (65535.0 if img.dtype == np.uint16 else max(float(img.max()), 1.0)) * 255).astype(np.uint8)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.shape[2] == 4:
        # Composite on white so transparent pixels do not become arbitrary colours.
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])


_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP"}
_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WebP"}


def _check_format(path: Path, data: np.ndarray) -> None:
    """One warning per file (data kept) for what decoding by content made safe: an extension that lies about the
    format, a JPEG whose last bytes are missing (no end marker: the rows that are there were decoded)."""
    head = data[:4].tobytes()
    kind = next((v for k, v in _MAGIC.items() if head.startswith(k)), None)
    named = _EXTENSION.get(path.suffix.lower())
    if kind and named and kind != named:
        warn_once(str(path), "%s: holds %s data, not %s; decoded by its content", path, kind, named)
    elif kind == "JPEG" and data[-2:].tobytes() != b"\xff\xd9" and b"\xff\xd9" not in data[-64:].tobytes():
        warn_once(str(path), "%s: JPEG is truncated (no end marker); its decodable rows are used", path)
