"""Splits for labelled photos that come without them (sppdet.splits, tools/split_data.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sppdet.coco import CocoDataset
from sppdet.splits import split_coco, split_voc, stratified_split
from sppdet.voc import VOCDataset, VOCError, read_split

FRACTIONS = {"train": 0.65, "val": 0.15, "test": 0.2}


def test_stratified_split_sizes_every_id_once_and_seeded():
    rng = np.random.default_rng(0)
    labels = {f"{n:03d}": list(rng.choice(["a", "b", "c"], size=rng.integers(0, 4))) for n in range(40)}
    out = stratified_split(labels, FRACTIONS, seed=1)
    assert [len(out[s]) for s in FRACTIONS] == [26, 6, 8]
    assert sorted(sum(out.values(), [])) == sorted(labels)
    assert out == stratified_split(labels, FRACTIONS, seed=1)
    assert out != stratified_split(labels, FRACTIONS, seed=2)


def test_a_rare_class_reaches_train_first_then_the_other_splits():
    labels = {f"{n:03d}": ["common"] for n in range(60)}
    rare = {f"r{n}": ["rare"] + ["common"] * (n % 2) for n in range(7)}
    out = stratified_split({**labels, **rare}, FRACTIONS, seed=0)
    per_split = {s: sum(i in out[s] for i in rare) for s in FRACTIONS}
    assert per_split == {"train": 5, "val": 1, "test": 1}  # 7 x (0.65, 0.15, 0.2), each split at least one
    one = stratified_split({**{f"{n:03d}": ["common"] for n in range(30)}, "only": ["rare"]}, FRACTIONS, seed=0)
    assert "only" in one["train"]


def test_too_few_images_or_bad_fractions_are_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot fill 3 splits"):
        stratified_split({"a": ["x"], "b": ["x"]}, FRACTIONS)
    with pytest.raises(ValueError, match="fractions"):
        split_voc(tmp_path, val=0.5, test=0.5)


def _toy_without_splits(toy_voc: Path, tmp_path: Path) -> Path:
    root = tmp_path / "VOC2007"
    shutil.copytree(toy_voc, root)
    shutil.rmtree(root / "ImageSets")
    return root


def test_split_voc_writes_splits_the_reader_takes(toy_voc, tmp_path):
    root = _toy_without_splits(toy_voc, tmp_path)
    with pytest.raises(VOCError, match="tools/split_data.py"):
        read_split(root / "ImageSets" / "Main" / "train.txt")
    (root / "JPEGImages" / "extra.jpg").write_bytes((root / "JPEGImages" / "000001.jpg").read_bytes())
    report = split_voc(root, seed=0)
    ids = {s: read_split(root / "ImageSets" / "Main" / f"{s}.txt") for s in ("train", "val", "test", "trainval")}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(p.stem for p in (root / "Annotations").iterdir())
    assert ids["trainval"] == sorted(ids["train"] + ids["val"]) and ids == {**report.ids, "trainval": ids["trainval"]}
    assert any("without an annotation" in line for line in report.left_out)
    classes = report.classes
    objects = {s: sum(len(VOCDataset(root, s, classes).annotation(i).names) for i in ids[s]) for s in report.ids}
    assert objects == {s: sum(report.objects[s].values()) for s in report.ids}
    assert "images" in report.table() and all(c in report.table() for c in classes)
    # kept unless asked; the same seed gives the same files
    with pytest.raises(VOCError, match="already there"):
        split_voc(root, seed=0)
    assert split_voc(root, seed=0, overwrite=True).ids == report.ids


def test_a_flat_folder_of_photos_and_xml_files_is_told_how_to_lay_them_out(toy_voc, tmp_path):
    for p in [*(toy_voc / "JPEGImages").glob("00000[12].jpg"), *(toy_voc / "Annotations").glob("00000[12].xml")]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(VOCError, match="move the photos into JPEGImages/ and the XML files into Annotations/"):
        split_voc(tmp_path)


def test_split_voc_names_a_bad_annotation_and_writes_nothing(toy_voc, tmp_path):
    root = _toy_without_splits(toy_voc, tmp_path)
    bad = root / "Annotations" / "000003.xml"
    bad.write_text(bad.read_text().replace("<xmax>", "<xmax>x", 1))
    with pytest.raises(VOCError, match="000003.xml"):
        split_voc(root)
    assert not (root / "ImageSets").exists()


def _toy_as_one_coco_file(toy_voc: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    classes = (toy_voc / "classes.txt").read_text().split()
    src = VOCDataset(toy_voc, "trainval", classes)
    ids = src.ids + VOCDataset(toy_voc, "test", classes).ids
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for n, i in enumerate(sorted(ids)):
        a = src.annotation(i) if i in src.ids else VOCDataset(toy_voc, "test", classes).annotation(i)
        shutil.copy(toy_voc / "JPEGImages" / f"{i}.jpg", tmp_path / "images" / f"{i}.jpg")
        images.append({"id": n + 7, "file_name": f"{i}.jpg", "width": a.width, "height": a.height})
        for name, b in zip(a.names, a.boxes.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": n + 7, "category_id": classes.index(name) + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0})
    (tmp_path / "annotations").mkdir()
    source = tmp_path / "annotations" / "instances_default.json"
    source.write_text(json.dumps({"info": {"description": "toy"}, "images": images, "annotations": anns,
                                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))
    return source, classes


def test_split_coco_writes_per_split_files_with_the_same_records(toy_voc, tmp_path):
    source, classes = _toy_as_one_coco_file(toy_voc, tmp_path)
    d = json.loads(source.read_text())
    d["annotations"].append({**d["annotations"][0], "id": 999, "image_id": 12345})  # an image the file lacks
    source.write_text(json.dumps(d))
    with pytest.raises(VOCError, match="split_data.py --format coco"):
        CocoDataset(tmp_path, "train")
    report = split_coco(source, seed=0)
    assert report.left_out == ["1 annotation(s) whose image_id is no image of the file"]
    whole = CocoDataset(tmp_path, "all", json_path=source)
    seen = []
    for s in ("train", "val", "test"):
        ds = CocoDataset(tmp_path, s)
        assert ds.ids == report.ids[s] and json.loads(ds.json_path.read_text())["info"] == {"description": "toy"}
        for i in ds.ids:
            a, b = ds.annotation(i), whole.annotation(i)
            assert a.names == b.names and np.array_equal(a.boxes, b.boxes) and ds.image_path(i).is_file()
        seen += ds.ids
    assert sorted(seen) == sorted(whole.ids) and json.loads(source.read_text())["images"]  # the source kept
    assert sum(len(json.loads(CocoDataset(tmp_path, s).json_path.read_text())["annotations"])
               for s in ("train", "val", "test")) == len(d["annotations"]) - 1
    with pytest.raises(VOCError, match="already there"):
        split_coco(source)


def test_split_coco_refuses_a_missing_image_and_its_own_name(toy_voc, tmp_path):
    source, _ = _toy_as_one_coco_file(toy_voc, tmp_path)
    (tmp_path / "images" / "000002.jpg").unlink()
    with pytest.raises(VOCError, match="000002.jpg"):
        split_coco(source)
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["instances_default.json"]
    named = source.rename(tmp_path / "annotations" / "instances_train.json")
    with pytest.raises(VOCError, match="rename it first"):
        split_coco(named, overwrite=True)


def test_split_data_tool_prints_the_table(toy_voc, tmp_path, load_script, capsys):
    root = _toy_without_splits(toy_voc, tmp_path)
    tool = load_script("tools/split_data.py")
    assert tool.main([str(root), "--val", "0.2", "--test", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "images" in out and "trainval.txt" in out and f"--set data.root={root}\n" in out
    assert tool.main([str(root)]) == 2 and "--overwrite" in capsys.readouterr().err


def test_split_data_tool_on_one_coco_file_names_the_next_command(toy_voc, tmp_path, load_script, capsys):
    source, _ = _toy_as_one_coco_file(toy_voc, tmp_path)
    assert load_script("tools/split_data.py").main(["--format", "coco", str(source)]) == 0
    out = capsys.readouterr().out
    assert f"--set data.root={tmp_path} --set data.format=coco\n" in out
    assert (tmp_path / "annotations" / "instances_val.json").is_file()
