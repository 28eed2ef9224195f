"""Augmented copies of the training photos (``data.augment``): each train-split photo's copies, with its boxes, written
once into the run folder and trained on as more photos of the split.

Every stage reads the train split through :class:`AugmentedDataset`, so the copies get their own proposals, conv5
maps and training windows like any photo (the SPP-net stages cache per image; an augmentation drawn anew at each
fine-tuning step would need conv5 again at each step). A copy is the photo with its contrast, brightness and
colour saturation changed and, for half of the copies, shrunk onto a canvas 1.1-1.5 times its size filled with its
mean colour (a zoom-out: smaller objects, as the paper's scale augmentation of pre-training). Mirror images are
not among them: fine-tuning mirrors every training photo already (``finetune.flip``).

Reads: the train split (images and annotations). Writes: ``<run>/augmented/<split>/`` (``JPEGImages/<id>~augK.jpg``,
``Annotations/<id>~augK.xml``, ``manifest.json``: the settings and each source's file hashes). A copy is made again
only when its source photo or annotation changed or it is missing; other settings make them all again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .images import save_image
from .store import atomic_write_text
from .voc import Annotation, DetectionDataset, read_annotation, write_annotation

__all__ = ["AUG_MARK", "augment_photo", "AugmentedDataset"]

AUG_MARK = "~aug"  # a copy's id: <source id>~aug<k>, k = 1..copies
VERSION = 1  # of augment_photo's recipe: a change makes every copy again


def _rng(seed: int, image_id: str, k: int) -> np.random.Generator:
    """The copy's own random draws: the same for a photo wherever and in whatever order it is made."""
    h = hashlib.sha256(f"{seed}/{image_id}/{k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def augment_photo(rgb: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of an ``(H, W, 3)`` uint8 RGB photo and its ``(N, 4)`` xyxy boxes: contrast x0.8-1.2 about
    the mean, brightness +-20, saturation x0.7-1.3; with probability 1/2 the photo placed at a random integer offset
    on a canvas 1.1-1.5 times its size, of its mean colour (the boxes shifted with it)."""
    x = rgb.astype(np.float32)
    c, b, s = rng.uniform(0.8, 1.2), rng.uniform(-20.0, 20.0), rng.uniform(0.7, 1.3)
    m = x.mean()
    x = (x - m) * c + m + b
    grey = x.mean(2, keepdims=True)
    x = np.clip(grey + (x - grey) * s, 0, 255)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if rng.random() < 0.5:
        h, w = x.shape[:2]
        z = rng.uniform(1.1, 1.5)
        H, W = int(round(h * z)), int(round(w * z))
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        canvas = np.empty((H, W, 3), np.float32)
        canvas[:] = x.reshape(-1, 3).mean(0)
        canvas[y0:y0 + h, x0:x0 + w] = x
        x, boxes = canvas, boxes + np.array([x0, y0, x0, y0], np.float32)
    return np.round(x).astype(np.uint8), boxes


class AugmentedDataset(DetectionDataset):
    """A split and ``copies`` augmented copies of each of its photos (ids ``<id>~aug1`` ...), made into ``folder``
    when missing or stale (:func:`augment_photo`, seeded by ``seed`` and the id). ``base`` is any dataset
    (VOC or COCO); the copies are VOC files."""

    def __init__(self, base: DetectionDataset, folder: str | Path, copies: int, seed: int = 0,
                 progress: bool = True):
        if copies < 1:
            raise ValueError(f"AugmentedDataset: copies must be >= 1, got {copies}")
        self.base, self.folder, self.copies, self.seed = base, Path(folder), int(copies), int(seed)
        self.classes = base.classes
        self.split = getattr(base, "split", "")
        self._base_ids = set(base.ids)
        # the sources' hashes, read once: to check the copies here, and for file_hashes (a stage's record)
        self._base_hashes = {w: base.file_hashes(w) for w in ("images", "annotations")}
        self.made = self._make(progress)
        self.ids = list(base.ids) + [f"{i}{AUG_MARK}{k}" for k in range(1, self.copies + 1) for i in base.ids]
        self._ann: dict[str, Annotation] = {}

    def _source(self, image_id: str) -> tuple[str | None, str]:
        """``(source id, copy id)``: the source is None for a photo of the base split."""
        src, mark, k = image_id.rpartition(AUG_MARK)
        if mark and src in self._base_ids and k.isdigit() and 1 <= int(k) <= self.copies:
            return src, image_id
        return None, image_id

    def _make(self, progress: bool) -> int:
        """The copies made or made again (0 when every copy is current)."""
        from tqdm import tqdm

        params = {"version": VERSION, "copies": self.copies, "seed": self.seed}
        images, annotations = self._base_hashes["images"], self._base_hashes["annotations"]
        sources = {i: images[i] + annotations[i] for i in self.base.ids}
        manifest = self.folder / "manifest.json"
        old = json.loads(manifest.read_text()) if manifest.is_file() else {}
        have = old.get("sources", {}) if old.get("params") == params else {}
        todo = [i for i in self.base.ids if have.get(i) != sources[i]
                or not all(self._paths(f"{i}{AUG_MARK}{k}")[0].is_file() for k in range(1, self.copies + 1))]
        if not todo:
            return 0
        (self.folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (self.folder / "Annotations").mkdir(parents=True, exist_ok=True)
        done = {i: h for i, h in have.items() if i in sources and i not in todo}
        for i in tqdm(todo, desc=f"augmented copies ({self.split or 'train'})", unit="img", disable=not progress):
            rgb, a = self.base.image(i), self.base.annotation(i)
            for k in range(1, self.copies + 1):
                img, boxes = augment_photo(rgb, a.boxes, _rng(self.seed, i, k))
                cid = f"{i}{AUG_MARK}{k}"
                jpg, xml = self._paths(cid)
                # the annotation first: a copy whose XML exists but whose JPEG does not is made again
                write_annotation(xml, Annotation(jpg.name, img.shape[1], img.shape[0], list(a.names), boxes,
                                                 np.asarray(a.difficult, bool), np.asarray(a.truncated, bool)))
                save_image(jpg, img, quality=95)
            done[i] = sources[i]
            if len(done) % 32 == 0:  # progress kept for a resumed call
                atomic_write_text(manifest, json.dumps({"params": params, "sources": done}, indent=0))
        atomic_write_text(manifest, json.dumps({"params": params, "sources": done}, indent=0))
        return len(todo)

    def _paths(self, copy_id: str) -> tuple[Path, Path]:
        return self.folder / "JPEGImages" / f"{copy_id}.jpg", self.folder / "Annotations" / f"{copy_id}.xml"

    def image_path(self, image_id: str) -> Path:
        src, cid = self._source(image_id)
        return self.base.image_path(image_id) if src is None else self._paths(cid)[0]

    def annotation_path(self, image_id: str) -> Path:
        src, cid = self._source(image_id)
        return self.base.annotation_path(image_id) if src is None else self._paths(cid)[1]

    def annotation(self, image_id: str) -> Annotation:
        src, cid = self._source(image_id)
        if src is None:
            return self.base.annotation(image_id)
        if cid not in self._ann:
            self._ann[cid] = read_annotation(self._paths(cid)[1], self.classes, strict_classes=False,
                                             image_path=self._paths(cid)[0])
        return self._ann[cid]

    def image(self, image_id: str) -> np.ndarray:
        return self.base.image(image_id) if self._source(image_id)[0] is None else super().image(image_id)

    def file_hashes(self, what: str) -> dict[str, str]:
        from .store import file_hashes

        if what not in self._base_hashes:
            raise ValueError(f"file_hashes: 'images' or 'annotations', not {what!r}")
        out = dict(self._base_hashes[what])
        copies = self.ids[len(self.base.ids):]
        paths = [self.image_path(i) if what == "images" else self.annotation_path(i) for i in copies]
        out.update(zip(copies, file_hashes(paths, "augmented copy")))
        return out
