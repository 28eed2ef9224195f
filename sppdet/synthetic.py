"""A deterministic VOC-format toy dataset for the demo, the tests and the benchmarks.

Scenes look photo-like rather than flat: a low-frequency colour field with noise, lines
and distractor blobs (clutter that is *not* any class), then 1-6 objects of classes that
differ in shape, colour and texture, over a wide range of scales (~18-260 px) and aspect
ratios (1:2.5 to 2.5:1), drawn in random order so that they occlude each other, some
cut by the image border (``truncated``), and lightly blurred, noised and JPEG-compressed.
Boxes are the visible extent of each object (as VOC annotates). Objects that are mostly
hidden or tiny are marked ``difficult``; objects with nothing visible are dropped.

Everything is drawn from one ``numpy.random.Generator(seed)``: the same seed gives the
same files byte for byte (OpenCV's JPEG encoder is deterministic).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .images import save_image
from .store import atomic_write_text
from .voc import Annotation, write_annotation

log = logging.getLogger(__name__)

TOY_CLASSES = ("disc", "block", "triangle", "ring", "cross")
# The class of annotated distractor blobs (pre-training sets only: clutter shaped like objects,
# which the trunk should learn to tell from them, as ImageNet's non-VOC classes do for VOC).
DISTRACTOR_CLASS = "distractor"
# Shapes of pre-training sets only (``extra_classes``), painted with the colour and texture of a
# random detection class: the toy world's "ImageNet" has classes beyond the detector's, as
# ImageNet has beyond VOC's, and these ones are told from the detection classes by shape alone.
EXTRA_CLASSES = ("star", "hexagon", "crescent", "chevron")
# The colour and texture of each of TOY_CLASSES, in order: the styles of a many-class set (``styled``), whose
# classes are (shape, style) pairs, as VOC's 20 classes are for cost benchmarks (benchmarks/bench_scale.py).
STYLES = ("shaded", "striped", "dotted", "plain", "checkered")

__all__ = ["DISTRACTOR_CLASS", "EXTRA_CLASSES", "STYLES", "TOY_CLASSES", "class_names", "make_toy_voc", "render_scene",
           "styled_classes"]


def styled_classes(n: int) -> tuple[tuple[int, int], ...]:
    """The ``(shape, style)`` of each class of an ``n``-class styled set: first every shape (TOY_CLASSES then
    EXTRA_CLASSES) in its own style, then every shape in the next style, and so on (at most 9 x 5 = 45)."""
    shapes = len(TOY_CLASSES) + len(EXTRA_CLASSES)
    combos = [(s, (s + j) % len(STYLES)) for j in range(len(STYLES)) for s in range(shapes)]
    if not 1 <= n <= len(combos):
        raise ValueError(f"styled must be 1..{len(combos)} classes, got {n}")
    return tuple(combos[:n])


def class_names(extra_classes: int = 0, distractors: int = 0, styled: int = 0) -> tuple[str, ...]:
    """Class names of a generated set, in label order: the detection classes, the first
    ``extra_classes`` of ``EXTRA_CLASSES``, then ``DISTRACTOR_CLASS`` when distractors are annotated;
    with ``styled`` > 0, that many ``<shape>_<style>`` classes (:func:`styled_classes`) instead."""
    if styled:
        if extra_classes or distractors:
            raise ValueError("styled sets have no extra classes or distractors")
        shapes = TOY_CLASSES + EXTRA_CLASSES
        return tuple(f"{shapes[s]}_{STYLES[t]}" for s, t in styled_classes(styled))
    if not 0 <= extra_classes <= len(EXTRA_CLASSES):
        raise ValueError(f"extra_classes must be 0..{len(EXTRA_CLASSES)} ({', '.join(EXTRA_CLASSES)}), "
                         f"got {extra_classes}")
    return TOY_CLASSES + EXTRA_CLASSES[:extra_classes] + ((DISTRACTOR_CLASS,) if distractors > 0 else ())


@dataclass
class _Obj:
    cls: int
    mask: np.ndarray  # (H, W) bool, full extent of the object


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The scene behind the objects and the outlines of its distractor blobs, in drawing order."""
    small = rng.uniform(40, 215, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.normal(0, 18, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.float32), (w, h))
    img += fine + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    for _ in range(rng.integers(4, 14)):  # clutter lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p1, p2, tuple(float(c) for c in rng.uniform(0, 255, 3)), int(rng.integers(1, 4)), cv2.LINE_AA)
    blobs = []
    for _ in range(rng.integers(3, 10)):  # distractor blobs: irregular polygons, no class
        c = rng.uniform([0, 0], [w, h])
        r = rng.uniform(8, 45)
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.5, 1.3, n)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(float(v) for v in rng.uniform(0, 255, 3)), cv2.LINE_AA)
        blobs.append(pts)
    return img, blobs


def _visible_distractors(blobs: list[np.ndarray], owner: np.ndarray, limit: int) -> list[np.ndarray]:
    """Boxes (visible extent) of at most ``limit`` distractor blobs, in drawing order, that are
    at least half visible (not under later blobs or objects) and at least 12 px on each side."""
    h, w = owner.shape
    covered = owner >= 0
    found = []  # (box or None) per blob, last-drawn first
    for pts in reversed(blobs):  # later blobs cover earlier ones
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [pts], 1)
        m = m.astype(bool)
        vis = m & ~covered
        covered |= m
        n_full, n_vis = int(m.sum()), int(vis.sum())
        box = None
        if n_full and n_vis >= 0.5 * n_full:
            ys, xs = np.nonzero(vis)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            if min(box[2] - box[0], box[3] - box[1]) < 12:
                box = None
        found.append(box)
    return [b for b in reversed(found) if b is not None][:limit]


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int, cx: float, cy: float,
                bw: float, bh: float) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    ang = float(rng.uniform(-25, 25))
    if cls == 0:  # disc: filled ellipse
        cv2.ellipse(m, ((cx, cy), (bw, bh), ang), 1, -1, cv2.LINE_8)
    elif cls == 1:  # block: rotated rectangle
        pts = cv2.boxPoints(((cx, cy), (bw * 0.9, bh * 0.9), ang)).astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
    elif cls == 2:  # triangle, apex up or down
        s = 1 if rng.random() < 0.7 else -1
        pts = np.array([[cx, cy - s * bh / 2], [cx - bw / 2, cy + s * bh / 2], [cx + bw / 2, cy + s * bh / 2]])
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    elif cls == 3:  # ring: annulus
        cv2.ellipse(m, ((cx, cy), (bw, bh), ang), 1, -1)
        t = rng.uniform(0.45, 0.65)
        cv2.ellipse(m, ((cx, cy), (bw * t, bh * t), ang), 0, -1)
    elif cls == 4:  # cross: plus sign
        tw, th = bw * rng.uniform(0.25, 0.4), bh * rng.uniform(0.25, 0.4)
        cv2.rectangle(m, (int(cx - bw / 2), int(cy - th / 2)), (int(cx + bw / 2), int(cy + th / 2)), 1, -1)
        cv2.rectangle(m, (int(cx - tw / 2), int(cy - bh / 2)), (int(cx + tw / 2), int(cy + bh / 2)), 1, -1)
    else:  # EXTRA_CLASSES, as polygons in a unit frame rotated by ``ang`` and scaled to (bw, bh)
        kind = EXTRA_CLASSES[cls - len(TOY_CLASSES)]
        if kind == "star":  # five points
            t = np.arange(10) * np.pi / 5 - np.pi / 2
            r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * rng.uniform(0.38, 0.5))
            pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        elif kind == "hexagon":
            t = np.arange(6) * np.pi / 3
            pts = 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
        elif kind == "crescent":  # a disc less a shifted disc, traced as one polygon
            t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            outer = 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
            d = rng.uniform(0.2, 0.35)
            inner = outer + [d, 0.0]
            keep_o = np.hypot(outer[:, 0] - d, outer[:, 1]) >= 0.5
            keep_i = np.hypot(inner[:, 0], inner[:, 1]) <= 0.5
            pts = np.concatenate([outer[keep_o], inner[keep_i][::-1]])
        else:  # chevron: an arrow head pointing right
            k = rng.uniform(0.25, 0.4)
            pts = np.array([[-0.5, -0.5], [-0.5 + k, -0.5], [0.5, 0.0], [-0.5 + k, 0.5], [-0.5, 0.5], [0.5 - k, 0.0]])
        a = np.deg2rad(ang)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = (pts * [bw, bh]) @ rot.T + [cx, cy]
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int,
             window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Class-specific colour and texture of an ``h`` x ``w`` canvas (masked later), or of its rows
    ``y0:y1`` and columns ``x0:x1`` only (``window``): the same pixels, since each depends only on its
    coordinates and on draws made for the whole canvas either way (the data stays what it was)."""
    y0, y1, x0, x1 = window or (0, h, 0, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    hue = {0: 0, 1: 110, 2: 60, 3: 25, 4: 150}[cls] + rng.uniform(-12, 12)  # OpenCV hue 0..180
    sat, val = rng.uniform(140, 240), rng.uniform(120, 240)
    hsv = np.empty((y1 - y0, x1 - x0, 3), np.float32)
    hsv[..., 0] = hue % 180
    hsv[..., 1] = sat
    hsv[..., 2] = val
    per = rng.uniform(5, 12)
    if cls == 1:  # stripes
        th = rng.uniform(0, np.pi)
        hsv[..., 2] *= 0.65 + 0.35 * (np.sin((xx * np.cos(th) + yy * np.sin(th)) / per * 2 * np.pi) > 0)
    elif cls == 2:  # dots
        hsv[..., 2] *= 0.6 + 0.4 * ((np.sin(xx / per * 2 * np.pi) * np.sin(yy / per * 2 * np.pi)) > 0.3)
    elif cls == 4:  # checker
        hsv[..., 2] *= 0.6 + 0.4 * (((xx // per) + (yy // per)) % 2)
    elif cls == 0:  # smooth radial shading
        hsv[..., 2] *= 0.75 + 0.25 * np.cos(xx / (w / 3.0)) * np.cos(yy / (h / 3.0))
    hsv += rng.normal(0, 4, size=(h, w, 3))[y0:y1, x0:x1].astype(np.float32)
    canvas = np.zeros((h, w, 3), np.uint8)  # OpenCV's conversion rounds by position in the row: whole rows
    canvas[y0:y1, x0:x1] = np.clip(hsv, 0, [179, 255, 255])
    return cv2.cvtColor(canvas, cv2.COLOR_HSV2RGB)[y0:y1, x0:x1].astype(np.float32)


def _annotate(objs: list, owner: np.ndarray) -> tuple[list, list, list, list]:
    """Labels, visible boxes, difficult (under 35% visible or under 12 px) and truncated (cut by the border)
    flags of the drawn objects that stayed visible (``owner``: which object each pixel shows, -1 none)."""
    h, w = owner.shape
    labels, boxes, difficult, truncated = [], [], [], []
    for i, o in enumerate(objs):
        vis = owner == i
        n_vis, n_full = int(vis.sum()), int(o.mask.sum())
        if n_vis == 0:
            continue
        ys, xs = np.nonzero(vis)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        fy, fx = np.nonzero(o.mask)
        cut = fx.min() == 0 or fy.min() == 0 or fx.max() == w - 1 or fy.max() == h - 1
        bw, bh = box[2] - box[0], box[3] - box[1]
        labels.append(o.cls)
        boxes.append(box)
        difficult.append(n_vis / n_full < 0.35 or min(bw, bh) < 12)
        truncated.append(bool(cut))
    return labels, boxes, difficult, truncated


def render_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 6, distractors: int = 0,
                 extra_classes: int = 0, styled: int = 0):
    """Draw one scene. Returns ``(rgb uint8 (H, W, 3), labels (N,), boxes (N, 4), difficult, truncated)``.

    ``distractors`` > 0 also lists up to that many visible distractor blobs, with label
    ``len(class_names(extra_classes))``, after the objects. The pixels (and the random draws)
    are the same either way: only the annotation differs.

    ``extra_classes`` > 0 draws objects from that many ``EXTRA_CLASSES`` as well (labels after
    the detection classes), each painted as a random detection class; 0 gives the scenes of
    the detection sets.

    ``styled`` > 0 draws objects of that many (shape, style) classes (:func:`styled_classes`).
    """
    n_classes = len(class_names(extra_classes, styled=styled))
    combos = styled_classes(styled) if styled else None
    h, w = height, width
    img, blobs = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)
    objs: list[_Obj] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, n_classes))
        size = float(np.exp(rng.uniform(np.log(18), np.log(min(260, 0.8 * min(h, w))))))
        aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
        bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
        # Mostly inside; some objects are cut by the border (truncation).
        margin = 0.35 if rng.random() < 0.2 else -0.5
        cx = rng.uniform(-margin * bw, w + margin * bw) if margin > 0 else rng.uniform(bw / 2, max(bw / 2 + 1, w - bw / 2))
        cy = rng.uniform(-margin * bh, h + margin * bh) if margin > 0 else rng.uniform(bh / 2, max(bh / 2 + 1, h - bh / 2))
        mask = _shape_mask(rng, combos[cls][0] if combos else cls, h, w, float(cx), float(cy), bw, bh)
        if not mask.any():
            continue
        if combos:
            style = combos[cls][1]
        else:
            style = cls if cls < len(TOY_CLASSES) else int(rng.integers(0, len(TOY_CLASSES)))
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        inside = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][inside] = _texture(rng, style, h, w, (y0, y1, x0, x1))[inside]
        owner[mask] = len(objs)
        objs.append(_Obj(cls, mask))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.0))
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    labels, boxes, difficult, truncated = _annotate(objs, owner)
    if distractors > 0:
        for box in _visible_distractors(blobs, owner, distractors):
            labels.append(n_classes)
            boxes.append([float(v) for v in box])
            difficult.append(False)
            truncated.append(bool(box[0] == 0 or box[1] == 0 or box[2] == w or box[3] == h))
    return (rgb, np.array(labels, np.int64), np.array(boxes, np.float32).reshape(-1, 4),
            np.array(difficult, bool), np.array(truncated, bool))


def make_toy_voc(out: str | Path, num_images: int = 100, seed: int = 0, min_side: int = 300,
                 max_side: int = 500, splits: tuple[float, float] = (0.4, 0.2), year: str = "VOC2007",
                 jpeg_quality: int = 92, progress: bool = False, distractors: int = 0,
                 extra_classes: int = 0, styled: int = 0) -> Path:
    """Write ``<out>/<year>/{JPEGImages,Annotations,ImageSets/Main}`` and return the year folder.

    ``distractors`` > 0 annotates up to that many distractor blobs per image as the extra class
    ``DISTRACTOR_CLASS`` (listed last in ``classes.txt``); the images are the same as without.
    ``extra_classes`` > 0 (pre-training sets) adds that many ``EXTRA_CLASSES`` to the objects drawn.
    ``styled`` > 0 makes a set of that many (shape, style) classes instead (:func:`styled_classes`).

    Split fractions: ``splits = (train, val)``; the rest is ``test``; ``trainval`` is
    train + val. Ids are ``000001``... Existing files with the same ids are replaced.
    """
    if num_images < 3:
        raise ValueError(f"num_images must be >= 3 (one per split), got {num_images}")
    root = Path(out) / year
    rng = np.random.default_rng(seed)
    names = class_names(extra_classes, distractors, styled)
    ids = [f"{i + 1:06d}" for i in range(num_images)]
    it = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc="toy VOC", unit="img")
    for image_id in it:
        w, h = int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))
        rgb, labels, boxes, difficult, truncated = render_scene(rng, w, h, distractors=distractors,
                                                                extra_classes=extra_classes, styled=styled)
        save_image(root / "JPEGImages" / f"{image_id}.jpg", rgb, jpeg_quality)
        ann = Annotation(f"{image_id}.jpg", w, h, [names[k] for k in labels], boxes, difficult, truncated)
        write_annotation(root / "Annotations" / f"{image_id}.xml", ann, folder=year)
    n_train = max(1, int(round(splits[0] * num_images)))
    n_val = max(1, int(round(splits[1] * num_images)))
    n_train = min(n_train, num_images - 2)
    n_val = min(n_val, num_images - n_train - 1)
    parts = {
        "train": ids[:n_train],
        "val": ids[n_train:n_train + n_val],
        "test": ids[n_train + n_val:],
    }
    parts["trainval"] = parts["train"] + parts["val"]
    for name, lst in parts.items():
        atomic_write_text(root / "ImageSets" / "Main" / f"{name}.txt", "\n".join(lst) + "\n")
    atomic_write_text(root / "classes.txt", "\n".join(names) + "\n")
    atomic_write_text(root / "synthetic.json",
                      json.dumps(synthetic_params(num_images, seed, splits, distractors, extra_classes, styled)))
    return root


def synthetic_params(num_images: int, seed: int, splits: tuple[float, float] = (0.4, 0.2),
                     distractors: int = 0, extra_classes: int = 0, styled: int = 0) -> dict:
    """What identifies a generated dataset (written to ``<year>/synthetic.json``)."""
    out = {"num_images": int(num_images), "seed": int(seed), "splits": [float(v) for v in splits]}
    if distractors:  # absent when 0, so that datasets made before the option still match
        out["distractors"] = int(distractors)
    if extra_classes:
        out["extra_classes"] = int(extra_classes)
    if styled:
        out["styled"] = int(styled)
    return out
