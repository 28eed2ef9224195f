"""PASCAL VOC reading and writing. The only module that knows about 1-based pixels.

Layout: ``<root>/JPEGImages/<id>.jpg``, ``<root>/Annotations/<id>.xml``,
``<root>/ImageSets/Main/<split>.txt`` where ``root`` is a year folder such as
``VOCdevkit/VOC2007``. Or, where a split has no split file, one folder per split holding its photos with their XML
files beside them, ``<root>/<split>/<id>.jpg`` and ``<id>.xml`` (Roboflow's VOC export; ``val`` is also found as
``valid`` or ``validation``): :func:`split_folder`.

Coordinates: VOC boxes ``(xmin, ymin, xmax, ymax)`` are 1-based and inclusive. Here they
become ``(xmin - 1, ymin - 1, xmax, ymax)``: 0-based continuous xyxy (pixel i covers
``[i, i+1)``), so plain IoU equals the devkit's ``+1`` IoU. Writers convert back.

Errors and warnings (documented policy):

- **errors** (:class:`VOCError`, naming the file): missing or unreadable JPEG, missing or
  malformed XML, missing size or bndbox fields, non-numeric coordinates, a box with
  ``xmax < xmin`` or ``ymax < ymin``, a box entirely outside the image, an unknown class
  name (when ``strict_classes``; datasets read with it off), an empty or missing split file, duplicate ids in a split,
  an image whose decoded size differs from the XML's ``<size>`` in a way that cannot be made safe.
- **warnings** (logged, data kept): a box that sticks out of the image by a few pixels is
  clipped to the image (VOC has a handful of these); objects of classes outside the list
  when ``strict_classes=False`` are skipped (one warning per class name); a class name that differs from a
  class only in letter case is read as that class; a ``<size>`` with depth other than 3; a ``<size>`` of 0 (the
  image's own is used); a photo whose XML gives its size turned by its EXIF orientation (turned likewise) or
  another size of the same shape (resized to the XML's: :func:`sppdet.images.fit_to_annotation`); an image
  ``<id>.png`` / ``.jpeg`` / ... where ``<id>.jpg`` is missing is read without a warning.
- grayscale, CMYK, palette and alpha images all load as RGB uint8.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .images import (IMAGE_SUFFIXES, VOCError, fit_to_annotation, image_size, load_image,  # noqa: F401 (re-exported)
                     warn_once)
from .store import atomic_write_text

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

__all__ = [
    "VOC_CLASSES",
    "VOCError",
    "Annotation",
    "read_annotation",
    "write_annotation",
    "read_split",
    "load_image",
    "DetectionDataset",
    "VOCDataset",
    "write_comp4",
]


@dataclass
class Annotation:
    """One image's objects. ``boxes`` ``(N, 4)`` float32 0-based continuous xyxy."""

    filename: str
    width: int
    height: int
    names: list[str] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """``(N,)`` int64 class indices in ``classes``."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[n] for n in self.names], dtype=np.int64)


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise VOCError(f"{path}: missing <{tag}> in <{node.tag}>")
    return child.text.strip()


def _num(node: ET.Element, tag: str, path: Path) -> float:
    s = _text(node, tag, path)
    try:
        return float(s)
    except ValueError:
        raise VOCError(f"{path}: <{tag}> is not a number: {s!r}") from None


def _object_box(obj, i: int, name: str, path: Path, width: int, height: int) -> list[float]:
    """Object ``i``'s ``<bndbox>`` as a 0-based continuous box (1-based inclusive pixel k covers [k-1, k)),
    clipped with a warning where it sticks out of the image; an inverted or outside box is an error."""
    bb = obj.find("bndbox")
    if bb is None:
        raise VOCError(f"{path}: object {i} ({name}) has no <bndbox>")
    xmin, ymin, xmax, ymax = (_num(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
    if xmax < xmin or ymax < ymin:
        raise VOCError(f"{path}: object {i} ({name}) has xmax < xmin or ymax < ymin: "
                       f"({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})")
    box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
    if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
        raise VOCError(f"{path}: object {i} ({name}) box {box} lies outside the {width}x{height} image")
    if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
        log.warning("%s: object %d (%s) box sticks out of the %dx%d image; clipped", path, i, name, width, height)
        box = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))]
    return box


def read_annotation(xml_path: str | Path, classes: Sequence[str] | None = None,
                    strict_classes: bool = True, image_path: str | Path | None = None) -> Annotation:
    """Parse a VOC XML file.

    Args:
        xml_path: the ``Annotations/<id>.xml`` file.
        classes: allowed class names (default: the 20 VOC classes).
        strict_classes: an unknown name is an error (True) or the object is skipped with
            a warning (False).
        image_path: the image the XML describes: where the XML gives a size of 0 (some labelling tools do),
            the image's own size is used, with a warning; without it such a size is an error.
    """
    path = Path(xml_path)
    classes = tuple(classes) if classes is not None else VOC_CLASSES
    if not path.is_file():
        raise VOCError(f"{path}: annotation file is missing")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VOCError(f"{path}: malformed XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise VOCError(f"{path}: missing <size>")
    width, height = int(_num(size, "width", path)), int(_num(size, "height", path))
    if (width < 1 or height < 1) and image_path is not None and Path(image_path).is_file():
        warn_once(str(path), "%s: <size> is %dx%d; using the image's own size", path, width, height)
        width, height = image_size(image_path)
    if width < 1 or height < 1:
        raise VOCError(f"{path}: image size {width}x{height} is not positive")
    depth = _text(size, "depth", path, default="3")
    if depth != "3":
        warn_once(f"{path}:depth", "%s: <depth> is %s; images are always loaded as RGB", path, depth)
    names, boxes, diff, trunc = [], [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = match_class(_text(obj, "name", path).strip(), classes, path)
        if name not in classes:
            if strict_classes:
                raise VOCError(f"{path}: object {i} has unknown class {name!r} (known: {', '.join(classes)})")
            warn_once(f"skip class {name!r}", "%s: objects of class %r are skipped (not among the classes: %s); "
                      "the first of them here", path, name, ", ".join(classes))
            continue
        names.append(name)
        boxes.append(_object_box(obj, i, name, path, width, height))
        diff.append(_text(obj, "difficult", path, default="0") == "1")
        trunc.append(_text(obj, "truncated", path, default="0") == "1")
    return Annotation(
        filename=_text(root, "filename", path, default=path.stem + ".jpg"),
        width=width,
        height=height,
        names=names,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        difficult=np.asarray(diff, bool),
        truncated=np.asarray(trunc, bool),
    )


def match_class(name: str, classes: Sequence[str], where: str | Path = "") -> str:
    """``name`` as one of ``classes``: itself, or the one class it equals but for letter case (labelling tools
    take free text: "Person" for "person"), with one warning per spelling; unknown names come back unchanged."""
    if name in classes:
        return name
    same = [c for c in classes if c.casefold() == name.casefold()]
    if len(same) == 1:
        warn_once(f"class spelling {name!r}", "%s: class %r read as %r (letter case differs)", where, name, same[0])
        return same[0]
    return name


def merge_spellings(counts: dict[str, int], where: str | Path) -> list[str]:
    """Class names from annotations (``{name: objects}``), those that differ only in letter case merged into
    their most frequent spelling (one warning), sorted."""
    groups: dict[str, list[str]] = {}
    for n in counts:
        groups.setdefault(n.casefold(), []).append(n)
    out = []
    for spellings in groups.values():
        best = max(sorted(spellings), key=lambda n: counts[n])
        if len(spellings) > 1:
            log.warning("%s: class names %s differ only in letter case; read as one class %r", where,
                        ", ".join(map(repr, sorted(spellings))), best)
        out.append(best)
    return sorted(out)


def write_annotation(path: str | Path, ann: Annotation, folder: str = "VOC2007") -> None:
    """Write an :class:`Annotation` as VOC XML (boxes back to 1-based inclusive integers)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = ann.filename
    size = ET.SubElement(root, "size")
    for tag, v in (("width", ann.width), ("height", ann.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "0"
    trunc = ann.truncated if len(ann.truncated) == len(ann.names) else np.zeros(len(ann.names), bool)
    for name, box, d, t in zip(ann.names, ann.boxes, ann.difficult, trunc):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(bool(t)))
        ET.SubElement(obj, "difficult").text = str(int(bool(d)))
        bb = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = (float(v) for v in box)
        # 0-based continuous -> 1-based inclusive.
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(int(round(v)))
    ET.indent(root)
    atomic_write_text(path, ET.tostring(root, encoding="unicode") + "\n")


def read_split(path: str | Path) -> list[str]:
    """Image ids of a split file; an empty file or duplicate ids are errors."""
    path = Path(path)
    if not path.is_file():
        hint = (f" (nor is there a folder {path.parent.parent.parent / path.stem}/ of photos with their XML files); "
                f"`python tools/split_data.py {path.parent.parent.parent}` makes train/val/test splits of its "
                "annotated photos" if path.parent.name == "Main" and path.parent.parent.name == "ImageSets" else "")
        raise VOCError(f"{path}: split file is missing{hint}")
    ids = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    if not ids:
        raise VOCError(f"{path}: split file is empty")
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise VOCError(f"{path}: duplicate image id(s) {', '.join(dups[:5])}")
    return ids


SPLIT_FOLDER_ALIASES = {"val": ("valid", "validation")}


def split_folder(root: str | Path, split: str) -> Path | None:
    """The folder of a split laid out as photos with their XML files side by side (``<root>/<split>/``; ``val``
    also as ``valid`` or ``validation``), where ``<root>/ImageSets/Main/<split>.txt`` does not exist; else None."""
    root = Path(root)
    if (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return None
    for name in (split, *SPLIT_FOLDER_ALIASES.get(split, ())):
        folder = root / name
        if folder.is_dir() and any(folder.glob("*.xml")):
            return folder
    return None


def has_split(root: str | Path, split: str) -> bool:
    """Whether ``root`` holds ``split`` as a split file or a split folder."""
    return (Path(root) / "ImageSets" / "Main" / f"{split}.txt").is_file() or split_folder(root, split) is not None


def class_names_of(xml_paths: Iterable[str | Path], where: str | Path) -> list[str]:
    """The object class names the XML files use, sorted, spellings that differ only in letter case merged
    (:func:`merge_spellings`, which names ``where`` in its warning); an unreadable file is a :class:`VOCError`
    naming it."""
    counts: dict[str, int] = {}
    for path in xml_paths:
        try:
            for o in ET.parse(path).getroot().findall("object"):
                n = (o.findtext("name") or "").strip()
                counts[n] = counts.get(n, 0) + 1
        except (OSError, ET.ParseError) as e:
            raise VOCError(f"{path}: cannot read the annotation ({e})") from None
    counts.pop("", None)
    return merge_spellings(counts, where)


def class_names_in(root: str | Path, split: str) -> list[str]:
    """The object class names the XML files of a split use, sorted (VOC 2007's trainval gives its 20 classes in
    their usual order); spellings that differ only in letter case are one class (:func:`merge_spellings`)."""
    ds = VOCDataset(root, split, classes=())
    names = class_names_of((ds.annotation_path(i) for i in ds.ids), ds.annotation_path(ds.ids[0]).parent)
    if not names:
        raise VOCError(f"{root}: split {split!r} has no annotated object to read the classes from; set data.classes")
    return names


class DetectionDataset:
    """What every dataset format shares: ``ids``, ``classes``, ``annotation(i)`` and ``image_path(i)`` /
    ``annotation_path(i)`` come from the format; labels, ground truth, images checked against their size and the
    contents' fingerprints are the same for all."""

    ids: list[str]
    classes: tuple[str, ...]
    annotation_kind = "XML"

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, image_id: str) -> np.ndarray:
        path = self.image_path(image_id)
        ann = self.annotation(image_id)
        return fit_to_annotation(load_image(path), path, ann.width, ann.height, f"its {self.annotation_kind}",
                                 self.annotation_path(image_id))

    def content_fingerprint(self, what: str, hashes: dict[str, str] | None = None) -> str:
        """Fingerprint of the split's ``"images"`` or ``"annotations"`` (their contents, in split order; ``hashes``:
        their ``file_hashes``, when already computed): what a cache made from them records, so that a regenerated or
        edited dataset with the same ids is a stale cache, named, not silently reused."""
        from .store import hashes_fingerprint

        return hashes_fingerprint(list((hashes or self.file_hashes(what)).values()))

    def labels(self, image_id: str) -> np.ndarray:
        return self.annotation(image_id).labels(self.classes)

    def ground_truth(self, class_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{image_id: (boxes (N, 4), difficult (N,))}`` for one class, every image of the split."""
        out = {}
        for i in self.ids:
            a = self.annotation(i)
            m = a.labels(self.classes) == class_index
            out[i] = (a.boxes[m], a.difficult[m])
        return out


class VOCDataset(DetectionDataset):
    """A split of a VOC-format dataset: ids, annotations (cached), images on demand.

    Args:
        root: the year folder (``.../VOCdevkit/VOC2007``).
        split: ``train``, ``val``, ``trainval``, ``test`` or any ``ImageSets/Main`` file, or a split folder
            (:func:`split_folder`).
        classes: class names in label order (default: VOC's 20).
        check_images: compare every JPEG's size with its XML on construction.
    """

    def __init__(self, root: str | Path, split: str, classes: Sequence[str] | None = None,
                 check_images: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise VOCError(f"{self.root}: VOC folder is missing (see data/README.md)")
        self.split = split
        self.classes = tuple(classes) if classes is not None else VOC_CLASSES
        self._folder = split_folder(self.root, split)
        if self._folder is None:
            self.ids = read_split(self.root / "ImageSets" / "Main" / f"{split}.txt")
        else:
            self.ids = sorted(p.stem for p in self._folder.glob("*.xml"))
            if self._folder.name != split:
                warn_once(f"{self._folder}:alias", "%s: split %r read from the folder %s/", self.root, split,
                          self._folder.name)
            have = set(self.ids)
            bare = [p.name for p in sorted(self._folder.iterdir()) if p.suffix in IMAGE_SUFFIXES and p.stem not in have]
            if bare:
                warn_once(f"{self._folder}:bare", "%s: %d photo(s) without an XML file are left out (%s%s)",
                          self._folder, len(bare), ", ".join(bare[:3]), ", ..." if len(bare) > 3 else "")
        self._ann: dict[str, Annotation] = {}
        self._paths: dict[str, Path] = {}
        if check_images:
            for i in self.ids:
                self.image(i)

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<id>.jpg`` (in a split folder: ``<id>.jpg`` there), or where that is missing ``<id>`` with
        another image suffix (``.png``, ``.jpeg``, ``.JPG``, ...: labelling tools keep the photo's own name); the
        ``.jpg`` path when none exists."""
        p = self._paths.get(image_id)
        if p is None:
            folder = self._folder or self.root / "JPEGImages"
            p = next((q for q in (folder / f"{image_id}{x}" for x in IMAGE_SUFFIXES) if q.is_file()),
                     folder / f"{image_id}.jpg")
            self._paths[image_id] = p
        return p

    def annotation_path(self, image_id: str) -> Path:
        return (self._folder or self.root / "Annotations") / f"{image_id}.xml"

    def annotation(self, image_id: str) -> Annotation:
        if image_id not in self._ann:
            # objects of other classes (a class only val or test has; a subset of classes chosen in
            # data.classes) are skipped with one warning per class name, not an error
            self._ann[image_id] = read_annotation(self.annotation_path(image_id), self.classes, strict_classes=False,
                                                  image_path=self.image_path(image_id))
        return self._ann[image_id]

    def file_hashes(self, what: str) -> dict[str, str]:
        """``{id: sha256 of its file}`` of the split's ``"images"`` or ``"annotations"``, in split order. A missing
        file is a :class:`VOCError` naming it."""
        from .store import file_hashes

        if what not in ("images", "annotations"):
            raise ValueError(f"file_hashes: 'images' or 'annotations', not {what!r}")
        paths = [self.image_path(i) if what == "images" else self.annotation_path(i) for i in self.ids]
        try:
            return dict(zip(self.ids, file_hashes(paths, "image file" if what == "images" else "annotation file")))
        except FileNotFoundError as e:
            raise VOCError(str(e)) from None


def write_comp4(out_dir: str | Path, split: str, classes: Sequence[str],
                detections: Iterable[tuple[str, int, float, np.ndarray]], prefix: str = "comp4") -> list[Path]:
    """Write VOC results files ``<prefix>_det_<split>_<class>.txt``.

    ``detections``: ``(image_id, class_index, score, box)`` with ``box`` 0-based continuous
    xyxy; written 1-based as the devkit expects (``x1 + 1, y1 + 1, x2, y2``).
    """
    lines: dict[int, list[str]] = {k: [] for k in range(len(classes))}
    for image_id, k, score, box in detections:
        x1, y1, x2, y2 = (float(v) for v in box)
        lines[int(k)].append(f"{image_id} {score:.6f} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}")
    paths = []
    for k, name in enumerate(classes):
        p = Path(out_dir) / f"{prefix}_det_{split}_{name}.txt"
        atomic_write_text(p, "\n".join(lines[k]) + ("\n" if lines[k] else ""))
        paths.append(p)
    return paths
