import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppdet.boxes import iou_matrix
from sppdet.synthetic import TOY_CLASSES
from sppdet.voc import VOC_CLASSES, Annotation, VOCDataset, VOCError, load_image, read_annotation, read_split, write_annotation


def devkit_iou(a, b):
    """VOCdevkit's inclusive IoU on 1-based boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / ua


def test_converted_iou_equals_devkit_iou():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = np.sort(rng.integers(1, 60, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        b = np.sort(rng.integers(1, 60, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        conv = lambda v: np.array([[v[0] - 1, v[1] - 1, v[2], v[3]]], np.float64)  # noqa: E731
        assert iou_matrix(conv(a), conv(b))[0, 0] == pytest.approx(devkit_iou(a, b))


def write_xml(path, body, size="<size><width>100</width><height>80</height><depth>3</depth></size>"):
    path.write_text(f"<annotation><filename>x.jpg</filename>{size}{body}</annotation>")
    return path


OBJ = "<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def test_read_annotation_converts_to_zero_based(tmp_path):
    p = write_xml(tmp_path / "a.xml", OBJ.format(n="dog", d=1, x1=1, y1=2, x2=100, y2=80))
    a = read_annotation(p)
    assert (a.width, a.height, a.names) == (100, 80, ["dog"])
    np.testing.assert_array_equal(a.boxes, [[0, 1, 100, 80]])
    assert a.boxes.dtype == np.float32 and a.difficult.tolist() == [True]


@pytest.mark.parametrize("body,msg", [
    ("", None),
    (OBJ.format(n="unicorn", d=0, x1=1, y1=1, x2=5, y2=5), "unknown class 'unicorn'"),
    (OBJ.format(n="dog", d=0, x1=10, y1=1, x2=5, y2=5), "xmax < xmin"),
    (OBJ.format(n="dog", d=0, x1=200, y1=1, x2=300, y2=5), "outside"),
    ("<object><name>dog</name></object>", "no <bndbox>"),
    (OBJ.format(n="dog", d=0, x1="a", y1=1, x2=5, y2=5), "not a number"),
])
def test_bad_annotations(tmp_path, body, msg):
    p = write_xml(tmp_path / "bad.xml", body)
    if msg is None:
        assert read_annotation(p).boxes.shape == (0, 4)
        return
    with pytest.raises(VOCError, match=msg) as e:
        read_annotation(p)
    assert "bad.xml" in str(e.value)


def test_missing_and_malformed(tmp_path):
    with pytest.raises(VOCError, match="missing"):
        read_annotation(tmp_path / "nope.xml")
    (tmp_path / "m.xml").write_text("<annotation><size>")
    with pytest.raises(VOCError, match="malformed XML"):
        read_annotation(tmp_path / "m.xml")
    write_xml(tmp_path / "s.xml", "", size="")
    with pytest.raises(VOCError, match="missing <size>"):
        read_annotation(tmp_path / "s.xml")


def test_unknown_class_can_be_skipped(tmp_path):
    p = write_xml(tmp_path / "a.xml", OBJ.format(n="unicorn", d=0, x1=1, y1=1, x2=5, y2=5))
    assert read_annotation(p, strict_classes=False).names == []


def test_box_slightly_outside_is_clipped(tmp_path):
    p = write_xml(tmp_path / "a.xml", OBJ.format(n="dog", d=0, x1=1, y1=1, x2=103, y2=80))
    assert read_annotation(p).boxes[0, 2] == 100


def test_split_errors(tmp_path):
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(VOCError, match="empty"):
        read_split(tmp_path / "e.txt")
    (tmp_path / "d.txt").write_text("1\n2\n1\n")
    with pytest.raises(VOCError, match="duplicate"):
        read_split(tmp_path / "d.txt")
    with pytest.raises(VOCError, match="missing"):
        read_split(tmp_path / "none.txt")


def test_images_load_as_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    for name in ("g.jpg", "c.jpg", "a.png"):
        im = load_image(tmp_path / name)
        assert im.shape == (20, 30, 3) and im.dtype == np.uint8
    assert abs(int(load_image(tmp_path / "c.jpg")[5, 5, 0]) - 200) < 12
    assert load_image(tmp_path / "a.png")[5, 5].tolist() == [200, 0, 0]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VOCError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(VOCError, match="missing"):
        load_image(tmp_path / "none.jpg")


def test_round_trip_generated_dataset(toy_voc, tmp_path):
    ds = VOCDataset(toy_voc, "trainval", TOY_CLASSES, check_images=True)
    assert len(ds) > 0 and set(VOCDataset(toy_voc, "test", TOY_CLASSES).ids).isdisjoint(ds.ids)
    for i in ds.ids:
        a = ds.annotation(i)
        write_annotation(tmp_path / f"{i}.xml", a)
        b = read_annotation(tmp_path / f"{i}.xml", TOY_CLASSES)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.names == b.names and a.difficult.tolist() == b.difficult.tolist()
        assert (a.boxes[:, 2] <= a.width).all() and (a.boxes[:, 3] <= a.height).all()


def test_size_mismatch_is_an_error(toy_voc, tmp_path):
    import shutil

    root = tmp_path / "VOC2007"
    shutil.copytree(toy_voc, root)
    ds = VOCDataset(root, "train", TOY_CLASSES)
    i = ds.ids[0]
    a = ds.annotation(i)
    write_annotation(root / "Annotations" / f"{i}.xml", Annotation(a.filename, a.width + 1, a.height, a.names, a.boxes, a.difficult))
    with pytest.raises(VOCError, match="XML says"):
        VOCDataset(root, "train", TOY_CLASSES).image(i)


def test_generator_is_deterministic(tmp_path):
    from sppdet.synthetic import make_toy_voc

    a = make_toy_voc(tmp_path / "a", 4, seed=7)
    b = make_toy_voc(tmp_path / "b", 4, seed=7)
    for f in sorted((a / "JPEGImages").iterdir()):
        assert f.read_bytes() == (b / "JPEGImages" / f.name).read_bytes()


def test_real_voc_sample(voc_sample):
    ds = VOCDataset(voc_sample, "test")
    assert len(ds) == 15
    for i in ds.ids:
        im, a = ds.image(i), ds.annotation(i)
        assert im.shape[:2] == (a.height, a.width)
        assert len(a.names) >= 1 and set(a.names) <= set(VOC_CLASSES)
        assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2] <= a.width).all() and (a.boxes[:, 3] <= a.height).all()


def test_generator_annotates_distractors_without_changing_the_images(tmp_path):
    from sppdet.synthetic import DISTRACTOR_CLASS, make_toy_voc

    plain = make_toy_voc(tmp_path / "plain", 6, seed=11)
    extra = make_toy_voc(tmp_path / "extra", 6, seed=11, distractors=2)
    assert (extra / "classes.txt").read_text().split() == list(TOY_CLASSES) + [DISTRACTOR_CLASS]
    classes = list(TOY_CLASSES) + [DISTRACTOR_CLASS]
    n_extra = 0
    for f in sorted((plain / "JPEGImages").iterdir()):
        assert f.read_bytes() == (extra / "JPEGImages" / f.name).read_bytes()
        a = read_annotation(plain / "Annotations" / f"{f.stem}.xml", TOY_CLASSES)
        b = read_annotation(extra / "Annotations" / f"{f.stem}.xml", classes)
        k = len(a.names)
        # The objects are unchanged and listed first; at most 2 distractors follow them.
        assert b.names[:k] == a.names and np.array_equal(b.boxes[:k], a.boxes)
        assert set(b.names[k:]) <= {DISTRACTOR_CLASS} and len(b.names) - k <= 2
        for box in b.boxes[k:]:
            assert min(box[2] - box[0], box[3] - box[1]) >= 12
            assert 0 <= box[0] < box[2] <= b.width and 0 <= box[1] < box[3] <= b.height
        n_extra += len(b.names) - k
    assert n_extra >= 6  # 3-9 blobs are drawn per image: most images have two visible ones
    # Read with the detection classes only, a distractor is an unknown class (named in the error).
    with pytest.raises(VOCError, match="unknown class 'distractor'"):
        for p in sorted((extra / "Annotations").iterdir()):
            read_annotation(p, TOY_CLASSES)


def test_generator_extra_classes(tmp_path):
    from sppdet.synthetic import DISTRACTOR_CLASS, EXTRA_CLASSES, class_names, make_toy_voc, render_scene

    assert class_names(2, 1) == TOY_CLASSES + EXTRA_CLASSES[:2] + (DISTRACTOR_CLASS,)
    with pytest.raises(ValueError, match="extra_classes must be 0..4"):
        class_names(5)
    # 0 extra classes: the detection sets' scenes, draw for draw
    a = render_scene(np.random.default_rng(4), 200, 160)
    b = render_scene(np.random.default_rng(4), 200, 160, extra_classes=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    root = make_toy_voc(tmp_path / "pre", 12, seed=2, distractors=1, extra_classes=4)
    names = class_names(4, 1)
    assert (root / "classes.txt").read_text().split() == list(names)
    seen = [n for p in sorted((root / "Annotations").iterdir()) for n in read_annotation(p, names).names]
    assert set(seen) & set(EXTRA_CLASSES) and set(seen) & set(TOY_CLASSES) and DISTRACTOR_CLASS in seen
    # each extra shape fills a region of about the asked size, with its own share of its box
    from sppdet.synthetic import _shape_mask

    fill = {}
    for k, name in enumerate(EXTRA_CLASSES):
        m = _shape_mask(np.random.default_rng(k), len(TOY_CLASSES) + k, 200, 200, 100.0, 100.0, 80.0, 80.0)
        ys, xs = np.nonzero(m)
        assert 40 <= xs.max() - xs.min() + 1 <= 115 and 40 <= ys.max() - ys.min() + 1 <= 115, name
        fill[name] = m.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    assert fill["hexagon"] > 0.7 and fill["star"] < 0.6 and fill["crescent"] < 0.6 and fill["chevron"] < 0.6, fill


def test_styled_synthetic_set_has_twenty_classes_of_every_shape(tmp_path):
    """The 20-class variant behind benchmarks/bench_scale.py: (shape, style) classes, every shape in at least two
    styles, the labels written as those names; the 5-class sets' draws are untouched (same images as before)."""
    from sppdet.synthetic import EXTRA_CLASSES, STYLES, class_names, make_toy_voc, render_scene, styled_classes

    names = class_names(styled=20)
    assert len(set(names)) == 20 and names[0] == f"disc_{STYLES[0]}"
    shapes = [s for s, _ in styled_classes(20)]
    assert all(shapes.count(s) >= 2 for s in range(len(TOY_CLASSES) + len(EXTRA_CLASSES)))
    with pytest.raises(ValueError):
        styled_classes(46)
    root = make_toy_voc(tmp_path, 6, seed=2, styled=20)
    ds = VOCDataset(root, "trainval", list(names))
    seen = {n for i in ds.ids for n in ds.annotation(i).names}
    assert seen and seen <= set(names)
    a = render_scene(np.random.default_rng(5), 200, 160)
    b = render_scene(np.random.default_rng(5), 200, 160, styled=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_apply_orientation_matches_pil():
    from PIL import ImageOps

    from sppdet.images import apply_orientation

    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    for o in range(1, 9):
        im = Image.fromarray(a)
        ex = im.getexif()
        ex[0x0112] = o
        im.info["exif"] = ex.tobytes()
        want = np.asarray(ImageOps.exif_transpose(im))
        np.testing.assert_array_equal(apply_orientation(a, o), want, err_msg=f"orientation {o}")


def _copy_toy(toy_voc, tmp_path):
    import shutil

    root = tmp_path / "VOC2007"
    shutil.copytree(toy_voc, root)
    return root


def test_photo_labelled_turned_by_exif_is_turned(toy_voc, tmp_path, caplog):
    """A phone photo stored landscape with EXIF orientation 6, whose XML gives the portrait size the labelling
    tool showed: the dataset, the proposals and load_image(orient=True) all see the portrait view, with one
    warning; load_image() alone keeps the pixels as stored."""
    from sppdet.proposals import compute_proposals

    root = _copy_toy(toy_voc, tmp_path)
    ds = VOCDataset(root, "train", TOY_CLASSES)
    i = ds.ids[0]
    path = root / "JPEGImages" / f"{i}.jpg"
    view = load_image(path)  # what the tool showed; store it turned back (90 degrees anticlockwise) with tag 6
    im = Image.fromarray(np.ascontiguousarray(np.rot90(view, 1)))
    ex = im.getexif()
    ex[0x0112] = 6
    im.save(path, quality=95, exif=ex.tobytes())
    assert load_image(path).shape[:2] == view.shape[1::-1]
    ds = VOCDataset(root, "train", TOY_CLASSES)
    with caplog.at_level("WARNING"):
        got = ds.image(i)
    assert got.shape == view.shape and np.abs(got.astype(int) - view).mean() < 4
    assert "EXIF orientation 6" in caplog.text and "turned" in caplog.text
    assert load_image(path, orient=True).shape == view.shape
    m = compute_proposals([i], ds.image_path, tmp_path / "p", workers=1, progress=False,
                          image_size=lambda j: (ds.annotation(j).height, ds.annotation(j).width),
                          annotation_path=ds.annotation_path)
    assert m["complete"]
    assert tuple(np.load(tmp_path / "p" / f"{i}.npz")["size"]) == view.shape[:2]


def test_image_resized_after_labelling_is_fitted_and_other_names_found(toy_voc, tmp_path, caplog):
    """An image saved at twice the annotated size (same shape) is resized to the XML's size with a warning; an
    image stored as <id>.png (no <id>.jpg) is found; a size that matches neither way is still an error."""
    root = _copy_toy(toy_voc, tmp_path)
    ds = VOCDataset(root, "train", TOY_CLASSES)
    i, j = ds.ids[:2]
    a = ds.annotation(i)
    big = np.asarray(Image.fromarray(ds.image(i)).resize((a.width * 2, a.height * 2)))
    Image.fromarray(big).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
    src = root / "JPEGImages" / f"{j}.jpg"
    Image.open(src).save(root / "JPEGImages" / f"{j}.png")
    src.unlink()
    ds = VOCDataset(root, "train", TOY_CLASSES)
    with caplog.at_level("WARNING"):
        assert ds.image(i).shape == (a.height, a.width, 3)
    assert "resized to the annotated size" in caplog.text
    assert ds.image_path(j).name == f"{j}.png" and ds.image(j).shape[2] == 3
    Image.fromarray(big[:, : a.width * 2 - 30]).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
    with pytest.raises(VOCError, match="XML"):
        VOCDataset(root, "train", TOY_CLASSES).image(i)


def test_class_spellings_and_classes_outside_the_list(tmp_path, caplog):
    """Auto classes merge names that differ only in letter case ("Person" / "person", the more frequent spelling
    kept); a dataset skips objects of a class it does not have (a class only the test split has) with one
    warning per name, where read_annotation(strict) still refuses them."""
    from sppdet.voc import class_names_in

    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objs = {"a": ["person", "person", "dog"], "b": ["Person", "dog "], "c": ["person", "zebra"]}
    for i, ns in objs.items():
        write_xml(root / "Annotations" / f"{i}.xml", "".join(OBJ.format(n=n, d=0, x1=1, y1=1, x2=9, y2=9) for n in ns))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("c\n")
    with caplog.at_level("WARNING"):
        classes = class_names_in(root, "train")
    assert classes == ["dog", "person"] and "differ only in letter case" in caplog.text
    ds = VOCDataset(root, "train", classes)
    assert ds.annotation("b").names == ["person", "dog"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert VOCDataset(root, "test", classes).annotation("c").names == ["person"]
    assert "'zebra' are skipped" in caplog.text
    with pytest.raises(VOCError, match="unknown class 'zebra'"):
        read_annotation(root / "Annotations" / "c.xml", classes)


def _as_split_folders(toy_voc: Path, root: Path, val_name: str = "valid") -> dict[str, list[str]]:
    """The toy set laid out as Roboflow exports VOC: one folder per split, photos and XML files side by side."""
    import shutil

    splits = {s: read_split(toy_voc / "ImageSets" / "Main" / f"{s}.txt") for s in ("train", "val", "test")}
    for s, ids in splits.items():
        folder = root / (val_name if s == "val" else s)
        folder.mkdir(parents=True)
        for i in ids:
            shutil.copy(toy_voc / "JPEGImages" / f"{i}.jpg", folder)
            shutil.copy(toy_voc / "Annotations" / f"{i}.xml", folder)
    return splits


def test_split_folders_read_as_the_split_files_would(toy_voc, tmp_path, caplog):
    from sppdet.voc import class_names_in, has_split, split_folder

    root = tmp_path / "export"
    splits = _as_split_folders(toy_voc, root)
    (root / "train" / "unlabelled.jpg").write_bytes((toy_voc / "JPEGImages" / f"{splits['train'][0]}.jpg").read_bytes())
    classes = class_names_in(toy_voc, "train")
    assert class_names_in(root, "train") == classes
    with caplog.at_level(logging.WARNING):
        for s, ids in splits.items():
            assert has_split(root, s)
            a, b = VOCDataset(toy_voc, s, classes), VOCDataset(root, s, classes)
            assert b.ids == sorted(ids) and b.image_path(ids[0]).parent == split_folder(root, s)
            for i in ids:
                x, y = a.annotation(i), b.annotation(i)
                assert x.names == y.names and np.array_equal(x.boxes, y.boxes)
            assert np.array_equal(a.image(ids[0]), b.image(ids[0]))
    assert "split 'val' read from the folder valid/" in caplog.text
    assert "1 photo(s) without an XML file are left out (unlabelled.jpg)" in caplog.text
    assert not has_split(root, "trainval")
    with pytest.raises(VOCError, match="nor is there a folder .*trainval/ of photos"):
        VOCDataset(root, "trainval", classes)
    # a split file, where there is one, comes first
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{splits['test'][0]}\n")
    assert split_folder(root, "train") is None
    with pytest.raises(VOCError, match="annotation file is missing"):
        VOCDataset(root, "train", classes).annotation(splits["test"][0])
