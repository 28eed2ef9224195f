"""benchmarks/make_mosaic_set.py: each photo of a split in a mosaic with others of the same split, its boxes moved
with its pixels, read back by sppdet's reader, its source photos recorded; an existing output is refused unless
--overwrite."""

import json

import numpy as np
import pytest


def test_a_mosaic_holds_each_photo_of_its_split_with_its_boxes_moved_with_its_pixels(toy_voc, tmp_path, load_script):
    from sppdet.voc import VOCDataset

    tool = load_script("benchmarks/make_mosaic_set.py")
    out = tmp_path / "mosaic" / "VOC2007"
    assert tool.main(["--src", str(toy_voc), "--out", str(out), "--grid", "2", "--cell", "64",
                      "--splits", "train,val"]) == 0
    classes = (out.parent / "classes.txt").read_text().split()
    assert classes == (toy_voc / "classes.txt").read_text().split()
    src = {s: VOCDataset(str(toy_voc), s, classes) for s in ("train", "val")}
    for split, ds in src.items():
        new = VOCDataset(str(out), split, classes)
        assert len(new.ids) == len(ds.ids)
        for n, i in enumerate(ds.ids):
            m, a = new.annotation(new.ids[n]), ds.annotation(i)
            assert (m.width, m.height) == (128, 128)
            # the first cell is the split's n-th photo: its objects first, scaled by 64 / its longer side
            f = 64 / max(a.width, a.height)
            np.testing.assert_allclose(m.boxes[:len(a.boxes)], a.boxes * f, atol=1.0)
            assert m.names[:len(a.names)] == a.names and list(m.difficult[:len(a.names)]) == list(a.difficult)
            assert len(m.names) >= len(a.names) and (m.boxes >= 0).all() and (m.boxes <= 128).all()
        # each mosaic of this split from this split's photos only, the n-th photo first, as mosaics.json records
        sources = json.loads((out / "mosaics.json").read_text())["sources"][split]
        assert list(sources) == list(new.ids)
        for n, (j, tiles) in enumerate(sources.items()):
            assert tiles[0] == ds.ids[n] and len(tiles) == 4 and set(tiles) <= set(ds.ids)
            assert len(new.annotation(j).names) == sum(len(ds.annotation(t).names) for t in tiles)
    img, a = VOCDataset(str(out), "train", classes).image("train_00000"), src["train"].annotation(src["train"].ids[0])
    photo = src["train"].image(src["train"].ids[0])
    small = __import__("cv2").resize(photo, (round(a.width * 64 / max(a.width, a.height)),
                                              round(a.height * 64 / max(a.width, a.height))))
    h, w = small.shape[:2]
    assert np.abs(img[:h, :w].astype(int) - small.astype(int)).mean() < 12  # the pixels moved with the boxes
    with pytest.raises(SystemExit):
        tool.main(["--src", str(toy_voc), "--out", str(out), "--splits", "train"])
    assert tool.main(["--src", str(toy_voc), "--out", str(out), "--grid", "1", "--cell", "32", "--splits", "train",
                      "--overwrite"]) == 0
    assert not (out / "ImageSets" / "Main" / "val.txt").exists()
