#!/usr/bin/env python
"""A many-small-objects variant of a VOC-layout set, to check that settings chosen on sets of a few large objects
hold where photos hold many small ones (the real sets here all have large objects).

    python benchmarks/make_mosaic_set.py --src ../shared/data/real/pennfudan/VOC2007 --out data/mosaic/pennfudan/VOC2007
        [--grid 3] [--cell 256] [--seed 0] [--splits train,val,test]

Each photo of a split becomes one mosaic: a ``grid`` x ``grid`` canvas of ``cell``-px cells holding that photo and
``grid**2 - 1`` others drawn from the same split (so no split sees another's photos), each fitted into its cell with
its aspect kept (grey around it) and its boxes moved with it. With the defaults a ~500-px photo's objects shrink to
about half their size and a mosaic holds nine photos' objects. Writes ``out`` (``JPEGImages``, ``Annotations``,
``ImageSets/Main/<split>.txt``, ``mosaics.json``: each mosaic's source photos) and ``classes.txt`` beside it; an
existing ``out`` is refused unless ``--overwrite``. Difficult and truncated flags are kept; the source is read with
sppdet's reader (its warnings for labelling-tool warts apply).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mosaic(images: list[np.ndarray], boxes: list[np.ndarray], grid: int, cell: int,
           fill: int = 114) -> tuple[np.ndarray, list[np.ndarray]]:
    """``grid * grid`` RGB images (row-major) fitted into ``cell``-px cells of one canvas, aspect kept and placed at
    each cell's top-left; their ``(N, 4)`` xyxy boxes (0-based continuous) scaled and moved to the canvas."""
    import cv2

    if len(images) != grid * grid or len(boxes) != len(images):
        raise ValueError(f"a {grid}x{grid} mosaic takes {grid * grid} images and box arrays, got {len(images)} / "
                         f"{len(boxes)}")
    canvas = np.full((grid * cell, grid * cell, 3), fill, np.uint8)
    moved = []
    for t, (img, b) in enumerate(zip(images, boxes)):
        h, w = img.shape[:2]
        f = cell / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        im = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        oy, ox = (t // grid) * cell, (t % grid) * cell
        canvas[oy:oy + im.shape[0], ox:ox + im.shape[1]] = im
        fx, fy = im.shape[1] / w, im.shape[0] / h
        moved.append(np.asarray(b, np.float64).reshape(-1, 4) * [fx, fy, fx, fy] + [ox, oy, ox, oy])
    return canvas, moved


def make_split(ds, split: str, out: Path, grid: int, cell: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """One mosaic per photo of ``ds`` (a :class:`sppdet.voc.VOCDataset` of ``split``), written into ``out``; returns
    each mosaic's source photos, row-major."""
    from tqdm import tqdm

    from sppdet.images import save_image
    from sppdet.store import atomic_write_text
    from sppdet.voc import Annotation, write_annotation

    ids = list(ds.ids)
    if len(ids) < 2:
        raise ValueError(f"split {split!r} has {len(ids)} photo(s); a mosaic needs at least two")
    made = {}
    for n, i in enumerate(tqdm(ids, desc=f"mosaics {split}", unit="img")):
        others = [j for j in ids if j != i]
        tiles = [i] + [str(j) for j in rng.choice(others, grid * grid - 1, replace=len(others) < grid * grid - 1)]
        anns = [ds.annotation(j) for j in tiles]
        canvas, moved = mosaic([ds.image(j) for j in tiles], [a.boxes for a in anns], grid, cell)
        name = f"{split}_{n:05d}"
        save_image(out / "JPEGImages" / f"{name}.jpg", canvas, 92)
        write_annotation(out / "Annotations" / f"{name}.xml", Annotation(
            f"{name}.jpg", canvas.shape[1], canvas.shape[0], [c for a in anns for c in a.names],
            np.concatenate(moved).astype(np.float32), np.concatenate([a.difficult for a in anns]).astype(bool),
            np.concatenate([a.truncated for a in anns]).astype(bool)))
        made[name] = tiles
    atomic_write_text(out / "ImageSets" / "Main" / f"{split}.txt", "\n".join(made) + "\n")
    return made


def main(argv: list[str] | None = None) -> int:
    from sppdet.store import atomic_write_text
    from sppdet.voc import VOCDataset, class_names_in

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a VOC year folder (JPEGImages, Annotations, ImageSets/Main)")
    p.add_argument("--out", required=True, help="the new year folder")
    p.add_argument("--classes", help="a file of class names, one per line (default: classes.txt beside or inside "
                   "--src, else the names the first split's annotations use)")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--cell", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    src, out = Path(a.src), Path(a.out)
    if a.grid < 1 or a.cell < 16:
        p.error("--grid must be >= 1 and --cell >= 16")
    splits = a.splits.split(",")
    candidates = [Path(a.classes)] if a.classes else [src.parent / "classes.txt", src / "classes.txt"]
    found = [c for c in candidates if c.is_file()]
    if a.classes and not found:
        p.error(f"{a.classes}: no such file")
    classes = ([ln.strip() for ln in found[0].read_text().splitlines() if ln.strip()] if found
               else class_names_in(src, splits[0]))
    if out.exists():
        if not a.overwrite:
            p.error(f"{out} exists (--overwrite replaces it)")
        shutil.rmtree(out)
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.parent / "classes.txt", "\n".join(classes) + "\n")
    rng = np.random.default_rng(a.seed)
    sources = {}
    for split in splits:
        sources[split] = make_split(VOCDataset(str(src), split, classes), split, out, a.grid, a.cell, rng)
        print(f"{split}: {len(sources[split])} mosaics")
    atomic_write_text(out / "mosaics.json", json.dumps({"src": str(src), "grid": a.grid, "cell": a.cell,
                                                          "seed": a.seed, "sources": sources}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
