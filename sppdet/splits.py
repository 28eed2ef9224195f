"""Train / val / test splits for labelled photos that have none (what labelling tools write).

A VOC folder from a labelling tool holds ``JPEGImages/`` and ``Annotations/`` but no ``ImageSets/Main/*.txt``; a
COCO export is often one instances JSON for every image. :func:`split_voc` and :func:`split_coco` divide the
annotated images into the three splits sppdet trains, validates and tests on, and write them in the layouts
:mod:`sppdet.voc` and :mod:`sppdet.coco` read:

- VOC: ``ROOT/ImageSets/Main/{train,val,test,trainval}.txt``;
- COCO: ``ROOT/annotations/instances_{train,val,test}.json`` beside the source JSON's images (ROOT is the folder
  above an ``annotations/`` folder holding the source, else the source's own folder).

The split is stratified by class (:func:`stratified_split`): images holding the rarest classes are placed first, each
where its rarest class is most wanted, so a class of few images still reaches the train split and, where it has
enough, val and test. It depends only on the images' ids, their classes and ``seed``. Every annotation is read
with the project's reader before anything is written, so a file the pipeline would refuse is named now; existing
split files are kept unless ``overwrite``, and the source JSON is never replaced.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .images import IMAGE_SUFFIXES, VOCError
from .store import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["SPLITS", "SplitReport", "stratified_split", "split_voc", "split_coco"]

SPLITS = ("train", "val", "test")


@dataclass
class SplitReport:
    """What a split wrote: the ids of each split, its objects per class, the files written, what was left out."""

    ids: dict[str, list[str]]
    objects: dict[str, dict[str, int]]  # split -> class -> objects
    classes: list[str]
    root: Path  # the data.root to train with
    written: list[Path]
    left_out: list[str] = field(default_factory=list)  # one line per kind of file left out

    def table(self) -> str:
        """The splits' image and object counts per class, as a text table."""
        width = max([5] + [len(c) for c in self.classes])
        lines = [f"{'split':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS),
                 f"{'images':<{width}}  " + "  ".join(f"{len(self.ids[s]):>6}" for s in SPLITS)]
        for c in self.classes:
            lines.append(f"{c:<{width}}  " + "  ".join(f"{self.objects[s].get(c, 0):>6}" for s in SPLITS))
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """Classes that a split holds no object of (no SVM is trained for one missing from train)."""
        out = []
        for c in self.classes:
            missing = [s for s in SPLITS if not self.objects[s].get(c)]
            if missing:
                out.append(f"class {c!r} has no object in {', '.join(missing)}"
                           + (" (it cannot be learnt)" if "train" in missing else ""))
        return out


def _fractions(val: float, test: float) -> dict[str, float]:
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"the val and test fractions must be in (0, 1) with a sum below 1, got {val} and {test}")
    return {"train": 1.0 - val - test, "val": val, "test": test}


def stratified_split(labels: Mapping[str, Sequence[str]], fractions: Mapping[str, float],
                     seed: int = 0) -> dict[str, list[str]]:
    """Divide image ids among splits in the given fractions, each class spread as evenly as the images allow.

    ``labels``: ``{image id: the class names of its objects}`` (an image without objects: an empty list).
    The splits' sizes are the fractions of the images rounded, at least one image each (the first split takes what
    rounding leaves; fewer images than splits is an error). Images are placed
    rarest class first; each goes to the split that most lacks its rarest class, among those not yet full (ties:
    the split furthest from its size, then the order of ``fractions``). Returns ``{split: sorted ids}``.
    """
    names = list(fractions)
    ids = sorted(labels)
    n = len(ids)
    if n < len(names):
        raise ValueError(f"{n} image(s) cannot fill {len(names)} splits ({', '.join(names)})")
    size = {s: max(1, int(round(fractions[s] * n))) for s in names[1:]}
    size = {names[0]: n - sum(size.values()), **size}
    if size[names[0]] < 1:
        raise ValueError(f"fractions {dict(fractions)} leave no images for {names[0]} of {n}")
    count: dict[str, int] = {}
    for i in ids:
        for c in set(labels[i]):
            count[c] = count.get(c, 0) + 1
    wanted = {s: {c: fractions[s] * k for c, k in count.items()} for s in names}
    order = np.random.default_rng(seed).permutation(n)
    rank = {ids[j]: r for r, j in enumerate(order)}
    rarest = {i: min((count[c], c) for c in set(labels[i])) if labels[i] else (n + 1, "") for i in ids}
    left = dict(size)
    out: dict[str, list[str]] = {s: [] for s in names}
    for i in sorted(ids, key=lambda i: (rarest[i], rank[i])):
        c = rarest[i][1]
        open_ = [s for s in names if left[s] > 0]
        best = max(open_, key=lambda s: (wanted[s][c] if c else 0.0, left[s] / max(size[s], 1), -names.index(s)))
        out[best].append(i)
        left[best] -= 1
        for k in set(labels[i]):
            wanted[best][k] -= 1
    return {s: sorted(v) for s, v in out.items()}


def _refuse_existing(paths: Sequence[Path], overwrite: bool, what: str) -> None:
    there = [str(p) for p in paths if p.exists()]
    if there and not overwrite:
        raise VOCError(f"{', '.join(there)}: {what} already there; kept (pass --overwrite to replace "
                       f"{'it' if len(there) == 1 else 'them'})")


def _object_counts(ids: Mapping[str, list[str]], labels: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s, members in ids.items():
        counts: dict[str, int] = {}
        for i in members:
            for c in labels[i]:
                counts[c] = counts.get(c, 0) + 1
        out[s] = counts
    return out


def split_voc(root: str | Path, val: float = 0.15, test: float = 0.2, seed: int = 0,
              overwrite: bool = False) -> SplitReport:
    """Write ``ROOT/ImageSets/Main/{train,val,test,trainval}.txt`` for a VOC folder's annotated images.

    Every ``Annotations/<id>.xml`` whose image is in ``JPEGImages/`` (any image suffix) is read with
    :func:`sppdet.voc.read_annotation` (errors name the file; nothing is written then); an XML without its image
    and an image without an XML are left out and counted. Classes are the annotations' names, those differing
    only in letter case merged as the pipeline merges them.
    """
    from .voc import class_names_of, read_annotation

    fractions = _fractions(val, test)
    root = Path(root)
    ann_dir, img_dir, main = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    for d in (ann_dir, img_dir):
        if not d.is_dir():
            flat = root.is_dir() and any(root.glob("*.xml"))
            raise VOCError(f"{d}: folder is missing (a VOC folder holds JPEGImages/ and Annotations/)" + (
                f"; {root} holds XML files beside the photos: move the photos into JPEGImages/ and the XML files "
                "into Annotations/" if flat else ""))
    targets = [main / f"{s}.txt" for s in (*SPLITS, "trainval")]
    _refuse_existing(targets, overwrite, "split file(s)")
    images: dict[str, Path] = {}  # <id>.jpg first, then the other suffixes in the reader's order
    for p in sorted((p for p in img_dir.iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: IMAGE_SUFFIXES.index(p.suffix)):
        images.setdefault(p.stem, p)
    xmls = {p.stem: p for p in sorted(ann_dir.glob("*.xml"))}
    left_out = []
    if no_image := sorted(set(xmls) - set(images)):
        left_out.append(f"{len(no_image)} annotation(s) without an image in {img_dir} (e.g. {xmls[no_image[0]]})")
    if no_xml := sorted(set(images) - set(xmls)):
        left_out.append(f"{len(no_xml)} image(s) without an annotation in {ann_dir} (e.g. {images[no_xml[0]]})")
    ids = sorted(set(xmls) & set(images))
    if not ids:
        raise VOCError(f"{root}: no image has an annotation (JPEGImages/<id>.jpg with Annotations/<id>.xml)")
    classes = class_names_of((xmls[i] for i in ids), ann_dir)
    labels = {i: list(read_annotation(xmls[i], classes, strict_classes=False, image_path=images[i]).names)
              for i in ids}
    splits = stratified_split(labels, fractions, seed)
    splits_all = {**splits, "trainval": sorted(splits["train"] + splits["val"])}
    for s, p in zip((*SPLITS, "trainval"), targets):
        atomic_write_text(p, "".join(f"{i}\n" for i in splits_all[s]))
    return SplitReport(splits, _object_counts(splits, labels), classes, root, targets, left_out)


def _coco_root(source: Path) -> Path:
    return source.parent.parent if source.parent.name == "annotations" else source.parent


def split_coco(source: str | Path, val: float = 0.15, test: float = 0.2, seed: int = 0,
               overwrite: bool = False) -> SplitReport:
    """Write ``ROOT/annotations/instances_{train,val,test}.json`` from one COCO instances JSON (see the module).

    Each split's file keeps the source's other keys and all its categories, with its images and their
    annotations. The source is read with :class:`sppdet.coco.CocoDataset` (every annotation, and that
    each image is found) before anything is written: an error names the file and the problem.
    """
    from .coco import CocoDataset

    fractions = _fractions(val, test)
    source = Path(source)
    if not source.is_file():
        raise VOCError(f"{source}: COCO instances file is missing")
    root = _coco_root(source)
    targets = [root / "annotations" / f"instances_{s}.json" for s in SPLITS]
    if any(t.resolve() == source.resolve() for t in targets):
        raise VOCError(f"{source}: the source is named as one of the splits it would write; rename it first")
    _refuse_existing(targets, overwrite, "split file(s)")
    whole = CocoDataset(root, "images", json_path=source)
    classes = list(whole.classes)
    missing = [i for i in whole.ids if not whole.image_path(i).is_file()]
    if missing:
        raise VOCError(f"{source}: {len(missing)} image(s) not found, such as "
                       f"{whole.record(missing[0])[0]['file_name']!r} (looked in {source.parent}, {root / 'images'} "
                       f"and {root})")
    labels = {i: list(whole.annotation(i).names) for i in whole.ids}
    orphans = whole.orphan_annotations
    left_out = [f"{orphans} annotation(s) whose image_id is no image of the file"] if orphans else []
    splits = stratified_split(labels, fractions, seed)
    for s, target in zip(SPLITS, targets):
        ims = [whole.record(i)[0] for i in splits[s]]
        anns = [a for i in splits[s] for a in whole.record(i)[1]]
        atomic_write_text(target, json.dumps({**whole.extra, "images": ims, "annotations": anns}) + "\n")
    return SplitReport(splits, _object_counts(splits, labels), classes, root, targets, left_out)
