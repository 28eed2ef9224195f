"""Pictures: detections drawn on images (OpenCV), precision-recall curves (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .store import atomic_write_bytes

__all__ = ["draw_boxes", "plot_learning_curve", "image_grid", "plot_pr_curves", "class_colour"]


def class_colour(k: int) -> tuple[int, int, int]:
    """A stable, distinct RGB colour per class index."""
    hsv = np.uint8([[[(k * 37) % 180, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], classes: Sequence[str],
               scores: Sequence[float] | None = None, thickness: int = 2) -> np.ndarray:
    """Draw ``(N, 4)`` xyxy boxes with class names (and scores) on a copy of an RGB image."""
    out = np.ascontiguousarray(image.copy())
    scale = max(0.4, min(out.shape[:2]) / 800.0)
    for i, (box, k) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        col = class_colour(int(k))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), col, thickness)
        text = classes[int(k)] + (f" {float(scores[i]):.2f}" if scores is not None else "")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + base, y1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), col, -1)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def image_grid(images: Sequence[np.ndarray], cols: int, tile: tuple[int, int] = (320, 240), gap: int = 4
               ) -> np.ndarray:
    """RGB ``images`` in rows of ``cols``, each scaled to fit a ``(width, height)`` tile, centred on white."""
    if not images:
        raise ValueError("image_grid: no images")
    tw, th = tile
    rows = -(-len(images) // cols)
    out = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), 255, np.uint8)
    for n, im in enumerate(images):
        f = min(tw / im.shape[1], th / im.shape[0])
        w, h = max(1, round(im.shape[1] * f)), max(1, round(im.shape[0] * f))
        small = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        y, x = (n // cols) * (th + gap) + (th - h) // 2, (n % cols) * (tw + gap) + (tw - w) // 2
        out[y:y + h, x:x + w] = small
    return out


def plot_pr_curves(curves: dict, aps: dict, path: str | Path, title: str = "precision-recall") -> None:
    """One PNG with every class's PR curve; ``curves[name] = (recall, precision)``."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for k, (name, (rec, prec)) in enumerate(curves.items()):
        ap = aps.get(name)
        if ap is None or len(rec) == 0:
            continue
        col = np.array(class_colour(k)) / 255.0
        ax.plot(np.concatenate([[0], rec]), np.concatenate([[1], prec]), color=col * 0.85, label=f"{name} ({ap:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save_figure(fig, path)


def plot_error_analysis(report: dict, path: str | Path, title: str = "where the AP goes") -> None:
    """One PNG, two panels per class: the kinds of the top-ranked detections (as many as the class
    has objects) and what became of the objects (``sppdet.analysis.error_report``)."""
    plt = _pyplot()

    from .analysis import FP_KINDS, MISS_REASONS

    names = list(report["per_class"])
    rows = report["per_class"]
    panels = [("top-ranked detections", ("correct",) + FP_KINDS, "top"),
              ("objects", ("detected",) + MISS_REASONS, "objects_by_outcome")]
    colours = ["#3a9d3a", "#e8a33d", "#c9c94a", "#8f5fbf", "#d64b4b"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 2.8), dpi=110)
    y = np.arange(len(names))
    for ax, (label, kinds, key) in zip(axes, panels):
        left = np.zeros(len(names))
        for kind, col in zip(kinds, colours):
            v = np.array([rows[n][key].get(kind, 0) for n in names], float)
            ax.barh(y, v, left=left, color=col, label=kind)
            left += v
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("count")
        ax.set_title(label)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    s = report["summary"]
    fig.suptitle(f"{title}: mAP {s['map07']:.3f}, without any false positive {s['map07_without']['all']:.3f}")
    _save_figure(fig, path)


def plot_learning_curve(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """mAP against the number of training photos (``rows``: ``train_images``, ``val_map07``, ``test_map07``), one
    line per split, the photos on a log scale; written as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    n = [r["train_images"] for r in rows]
    for key, label, style in (("val_map07", "val", "o--"), ("test_map07", "test", "s-")):
        ax.plot(n, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("training photos")
    ax.set_ylabel("mAP (VOC07, 11-point)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
