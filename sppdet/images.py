"""Images as the pipeline reads them: any JPEG/PNG/... decoded by its content as RGB uint8, with one warning per
file for what was made safe (an extension that lies, a truncated JPEG, a photo whose annotation was drawn on it
rotated by its EXIF orientation or at another size), and an image's size from its header."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .store import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["VOCError", "load_image", "image_size", "warn_once", "exif_orientation", "apply_orientation",
           "fit_to_annotation", "IMAGE_SUFFIXES", "save_image"]


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


def load_image(path: str | Path, orient: bool = False) -> np.ndarray:
    """Read any JPEG/PNG/... as RGB uint8 ``(H, W, 3)``, its pixels as stored (``orient``: as a viewer shows
    them, the EXIF orientation applied, with one warning per file where that turns or mirrors it).

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
    img = img[:, :, 2::-1]
    if orient:
        o = exif_orientation(path)
        if o != 1:
            warn_once(f"{path}:orient", "%s: EXIF orientation %d applied (the photo as a viewer shows it)", path, o)
            img = apply_orientation(img, o)
    return np.ascontiguousarray(img)


def save_image(path: str | Path, rgb: np.ndarray, quality: int = 92) -> None:
    """Write an RGB uint8 image as a JPEG (``.jpg``/``.jpeg``, at ``quality``) or a PNG (``.png``), by the path's
    suffix, atomically (:func:`sppdet.store.atomic_write_bytes`: a file that exists is whole)."""
    ext = Path(path).suffix.lower()
    if ext not in (".jpg", ".jpeg", ".png"):
        raise ValueError(f"{path}: images are written as .jpg, .jpeg or .png")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext != ".png" else []
    ok, enc = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError(f"{path}: {ext[1:].upper()} encoding failed")
    atomic_write_bytes(path, enc.tobytes())


# Image files a VOC folder's JPEGImages/ may hold besides <id>.jpg (labelling tools keep the photo's own name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".bmp", ".webp", ".tif", ".tiff")


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag (1-8) of an image file; 1 (as stored) where it has none or it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            o = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a photo without readable EXIF is shown as stored
        return 1
    return o if 1 <= o <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """``img`` (H, W, ...) as a viewer shows it under EXIF ``orientation`` (2-8 mirror and/or turn it; 5-8 swap
    its width and height), as PIL's ``ImageOps.exif_transpose``."""
    ops = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, -1)[::-1],
           8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[orientation](img))


def fit_to_annotation(img: np.ndarray, path: str | Path, width: int, height: int, described_by: str = "its annotation",
                      annotation: str | Path | None = None) -> np.ndarray:
    """The image as its annotation (``described_by``, e.g. "its XML", and the file ``annotation``, named in
    messages) describes it, ``width`` x ``height``.

    Made safe with one warning per file: a photo whose EXIF orientation turns it (5-8) and whose annotation gives
    the turned size (the labelling tool showed it turned, and the boxes are on that view) is turned likewise; an
    image of another size (by 10% or more) but the same shape to a pixel (resized after labelling) is resized to
    the annotated size, where the boxes are. Any other mismatch is a :class:`VOCError` naming both files."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    if (h, w) == (width, height):
        o = exif_orientation(path)
        if o in (5, 6, 7, 8):
            warn_once(f"{path}:fit", "%s: stored %dx%d, EXIF orientation %d; %s gives the turned size %dx%d: "
                      "turned as a viewer shows it", path, w, h, o, described_by, width, height)
            return apply_orientation(img, o)
    sx, sy = width / w, height / h
    if abs(sx - sy) <= 2.0 / min(w, h, width, height) and max(sx, sy, 1 / sx, 1 / sy) >= 1.1:
        warn_once(f"{path}:fit", "%s: image is %dx%d but %s says %dx%d (same shape: resized after labelling?); "
                  "resized to the annotated size", path, w, h, described_by, width, height)
        interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(img, (int(width), int(height)), interpolation=interp))
    where = f" ({annotation})" if annotation else ""
    raise VOCError(f"{path}: image is {w}x{h} but {described_by} says {width}x{height}{where}")


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
