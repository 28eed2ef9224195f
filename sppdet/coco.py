"""COCO-format detection data (what most labelling tools export), read into the same records as VOC.

Layout (``data.format: coco``, ``data.root`` = ROOT), one instances JSON per split beside its images::

    ROOT/<split>/_annotations.coco.json     (or the split folder's only *.json file)
    ROOT/<split>/<file_name>                 the images the JSON lists

or the layout of COCO itself: ``ROOT/annotations/instances_<split>.json`` with the images in ``ROOT/<split>/``.

Coordinates: a COCO ``bbox`` is ``[x, y, width, height]`` in continuous pixels with the origin at the image's
top-left corner, which is already sppdet's 0-based continuous xyxy: ``(x, y, x + width, y + height)``.
``iscrowd`` objects are kept as *difficult* ones (ignored by the evaluation, as VOC's difficult objects).
Image ids are the files' stems. Errors name the JSON file and the image or annotation; an image size of 0 or a
missing one is taken from the image file, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .voc import Annotation, DetectionDataset, VOCError, image_size, warn_once

log = logging.getLogger(__name__)

__all__ = ["CocoDataset", "find_instances_json", "coco_classes"]


def find_instances_json(root: str | Path, split: str) -> Path:
    """The instances JSON of ``split`` under ``root`` (see the module's layout); an error lists what was tried."""
    root = Path(root)
    tried = [root / split / "_annotations.coco.json", root / "annotations" / f"instances_{split}.json"]
    for p in tried:
        if p.is_file():
            return p
    found = sorted((root / split).glob("*.json")) if (root / split).is_dir() else []
    if len(found) == 1:
        return found[0]
    raise VOCError(f"{root}: no COCO instances file for split {split!r} (tried {', '.join(map(str, tried))}"
                   + (f"; {root / split} holds {len(found)} .json files" if found else "")
                   + "); one file for all photos: `python tools/split_data.py --format coco FILE` makes the splits")


def _load(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VOCError(f"{path}: not a readable JSON file ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            raise VOCError(f"{path}: not a COCO instances file (no {key!r} list)")
    return d


def coco_classes(root: str | Path, split: str) -> list[str]:
    """The category names of a split's JSON that its annotations use, in the order of their ids. A category no
    annotation uses (a labelling tool's parent category, such as the one Roboflow writes as id 0) is not a
    class: named in one warning."""
    path = find_instances_json(root, split)
    return _used_classes(_load(path), path)


def _used_classes(d: dict, path: Path) -> list[str]:
    used = {a.get("category_id") for a in d["annotations"]}
    cats = sorted(d["categories"], key=lambda c: c["id"])
    unused = [f"{c['name']!r} (id {c['id']})" for c in cats if c["id"] not in used]
    if unused and len(unused) < len(cats):
        warn_once(f"{path}:unused", "%s: categories without annotations are not classes: %s", path, ", ".join(unused))
        cats = [c for c in cats if c["id"] in used]
    return [str(c["name"]) for c in cats]


class CocoDataset(DetectionDataset):
    """A split of a COCO-format dataset with :class:`sppdet.voc.VOCDataset`'s interface (ids, annotations as
    :class:`~sppdet.voc.Annotation`, images on demand, contents' fingerprints)."""

    annotation_kind = "COCO JSON"

    def __init__(self, root: str | Path, split: str, classes: Sequence[str] | None = None,
                 json_path: str | Path | None = None):
        """``json_path``: read this instances file instead of the split's (images are looked for beside it first)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise VOCError(f"{self.root}: COCO data folder is missing")
        self.split = split
        self.json_path = Path(json_path) if json_path is not None else find_instances_json(self.root, split)
        d = _load(self.json_path)
        names = {c["id"]: str(c["name"]) for c in d["categories"]}
        self.classes = tuple(classes) if classes is not None else tuple(_used_classes(d, self.json_path))
        per_image: dict = {}
        for a in d["annotations"]:
            per_image.setdefault(a.get("image_id"), []).append(a)
        self.ids, self._images, self._anns, self._records = [], {}, {}, {}
        for im in d["images"]:
            i = Path(str(im.get("file_name", ""))).stem
            if not i:
                raise VOCError(f"{self.json_path}: image {im.get('id')!r} has no file_name")
            if i in self._images:
                raise VOCError(f"{self.json_path}: two images named {i!r} (ids are file stems)")
            self.ids.append(i)
            self._images[i] = im
            self._records[i] = per_image.get(im.get("id"), [])
        if not self.ids:
            raise VOCError(f"{self.json_path}: no images")
        self._names = names
        known = {im.get("id") for im in self._images.values()}
        #: annotations whose image_id is no image of the file (read past, never an object)
        self.orphan_annotations = sum(len(v) for k, v in per_image.items() if k not in known)
        #: the file's keys other than images and annotations (info, licenses, categories, ...), as given
        self.extra = {k: v for k, v in d.items() if k not in ("images", "annotations")}

    def record(self, image_id: str) -> tuple[dict, list[dict]]:
        """The JSON's entry of an image and its annotations' entries, as the file gives them."""
        return self._images[image_id], self._records[image_id]

    def image_path(self, image_id: str) -> Path:
        name = str(self._images[image_id]["file_name"])
        for base in (self.json_path.parent, self.root / self.split, self.root / "images", self.root):
            if (base / name).is_file():
                return base / name
        return self.json_path.parent / name

    def annotation_path(self, image_id: str) -> Path:
        return self.json_path

    def annotation(self, image_id: str) -> Annotation:
        if image_id in self._anns:
            return self._anns[image_id]
        im = self._images[image_id]
        w, h = int(im.get("width") or 0), int(im.get("height") or 0)
        if w < 1 or h < 1:
            warn_once(f"{self.json_path}:{image_id}", "%s: image %s has size %dx%d; using the image's own size",
                      self.json_path, image_id, w, h)
            w, h = image_size(self.image_path(image_id))
        names, boxes, crowd = [], [], []
        for a in self._records[image_id]:
            where = f"{self.json_path}: annotation {a.get('id')!r} of image {image_id}"
            name = self._names.get(a.get("category_id"))
            if name is None:
                raise VOCError(f"{where}: unknown category {a.get('category_id')!r} (not in the file's categories)")
            if name not in self.classes:  # a category the train split has not, or outside data.classes
                warn_once(f"{self.json_path}:skip {name!r}", "%s: objects of category %r are skipped (not among "
                          "the classes: %s)", self.json_path, name, ", ".join(self.classes))
                continue
            try:
                x, y, bw, bh = (float(v) for v in a["bbox"])
            except (KeyError, TypeError, ValueError):
                raise VOCError(f"{where}: bbox is not [x, y, width, height]") from None
            if bw <= 0 or bh <= 0:
                raise VOCError(f"{where}: bbox {a['bbox']} has no area")
            box = [x, y, x + bw, y + bh]
            if box[2] <= 0 or box[3] <= 0 or box[0] >= w or box[1] >= h:
                raise VOCError(f"{where}: bbox {a['bbox']} lies outside the {w}x{h} image")
            if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
                warn_once(f"{where}", "%s: bbox sticks out of the %dx%d image; clipped", where, w, h)
                box = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(w)), min(box[3], float(h))]
            names.append(name)
            boxes.append(box)
            crowd.append(bool(a.get("iscrowd", 0)))
        ann = Annotation(filename=str(im["file_name"]), width=w, height=h, names=names,
                         boxes=np.asarray(boxes, np.float32).reshape(-1, 4), difficult=np.asarray(crowd, bool),
                         truncated=np.zeros(len(names), bool))
        self._anns[image_id] = ann
        return ann

    def file_hashes(self, what: str) -> dict[str, str]:
        """``{id: sha256}`` of each image file (``"images"``) or of each image's record and annotations in the JSON
        (``"annotations"``), so that an edit of one image's boxes is seen as that image's change."""
        from .store import file_hashes

        if what == "images":
            try:
                return dict(zip(self.ids, file_hashes([self.image_path(i) for i in self.ids], "image file")))
            except FileNotFoundError as e:
                raise VOCError(str(e)) from None
        if what != "annotations":
            raise ValueError(f"file_hashes: 'images' or 'annotations', not {what!r}")
        return {i: hashlib.sha256(json.dumps([self._images[i], self._records[i], [self._names.get(
            a.get("category_id")) for a in self._records[i]]], sort_keys=True, default=str).encode()).hexdigest()
            for i in self.ids}
