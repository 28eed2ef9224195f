"""data.augment: augmented copies of the train split's photos, made once into the run folder."""

import json

import numpy as np
import pytest

from sppdet.augment import AUG_MARK, AugmentedDataset, augment_photo
from sppdet.synthetic import TOY_CLASSES
from sppdet.voc import VOCDataset


def test_augment_photo_moves_the_boxes_with_the_photo():
    """A zoomed-out copy holds the photo (colour-jittered) at an integer offset, and its boxes moved by that offset;
    the draws are the generator's, so the same seed gives the same copy."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[5, 6, 20, 30], [30, 0, 60, 40]], np.float32)
    zoomed = 0
    for seed in range(12):
        img, b = augment_photo(rgb, boxes, np.random.default_rng(seed))
        img2, b2 = augment_photo(rgb, boxes, np.random.default_rng(seed))
        assert np.array_equal(img, img2) and np.array_equal(b, b2)
        assert img.dtype == np.uint8 and b.shape == boxes.shape
        shift = b - boxes
        assert np.all(shift[:, 0] == shift[:, 2]) and np.all(shift[:, 1] == shift[:, 3])
        x0, y0 = int(shift[0, 0]), int(shift[0, 1])
        if img.shape[:2] != rgb.shape[:2]:
            zoomed += 1
            assert 1.05 < img.shape[0] / rgb.shape[0] < 1.55
        assert img.shape[0] >= y0 + 40 and img.shape[1] >= x0 + 60
        # the photo's pixels are at the offset: jitter is monotone per channel, so its pixel order is kept
        inner = img[y0:y0 + 40, x0:x0 + 60, 0].astype(float).ravel()
        src = rgb[:, :, 0].astype(float).ravel()
        assert np.corrcoef(inner, src)[0, 1] > 0.9
    assert 0 < zoomed < 12  # about half the copies are zoomed out


def test_augmented_dataset_made_once_and_remade_where_its_source_changed(toy_voc, tmp_path):
    import shutil

    voc = tmp_path / "VOC2007"
    shutil.copytree(toy_voc, voc)
    base = VOCDataset(voc, "train", TOY_CLASSES)
    ds = AugmentedDataset(base, tmp_path / "aug", 2, seed=0, progress=False)
    n = len(base.ids)
    assert ds.made == n and len(ds.ids) == 3 * n and ds.ids[:n] == base.ids
    i = base.ids[0]
    for k in (1, 2):
        a, c = base.annotation(i), ds.annotation(f"{i}{AUG_MARK}{k}")
        assert c.names == a.names and np.allclose((c.boxes - a.boxes)[:, :2], (c.boxes - a.boxes)[:, 2:])
        img = ds.image(f"{i}{AUG_MARK}{k}")
        assert img.shape[:2] == (c.height, c.width) and img.shape[0] >= base.image(i).shape[0]
    assert np.array_equal(ds.image(i), base.image(i)) and ds.annotation(i) is base.annotation(i)
    hashes = ds.file_hashes("images")
    assert list(hashes) == ds.ids and len(set(hashes.values())) == len(ds.ids)
    # current: nothing made again; the same copies, bit for bit
    again = AugmentedDataset(VOCDataset(voc, "train", TOY_CLASSES), tmp_path / "aug", 2, seed=0, progress=False)
    assert again.made == 0 and again.file_hashes("images") == hashes
    # one source's annotation edited: only its copies are made again
    xml = voc / "Annotations" / f"{i}.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    edited = AugmentedDataset(VOCDataset(voc, "train", TOY_CLASSES), tmp_path / "aug", 2, seed=0, progress=False)
    assert edited.made == 1 and edited.annotation(f"{i}{AUG_MARK}1").difficult[0]
    # another seed: every copy made again, and they differ
    other = AugmentedDataset(VOCDataset(voc, "train", TOY_CLASSES), tmp_path / "aug", 2, seed=1, progress=False)
    assert other.made == n and other.file_hashes("images")[f"{i}{AUG_MARK}1"] != hashes[f"{i}{AUG_MARK}1"]
    assert json.loads((tmp_path / "aug" / "manifest.json").read_text())["params"]["seed"] == 1
    with pytest.raises(ValueError, match="copies"):
        AugmentedDataset(base, tmp_path / "aug0", 0)


def test_run_augments_the_train_split_only(toy_voc, tmp_path):
    from sppdet.config import load_config
    from sppdet.run import Run

    cfg = load_config("configs/tiny.yaml", [f"data.root={toy_voc}", "data.synthetic_images=0", "data.augment=1"])
    run = Run(cfg, tmp_path / "run", save_config=False)
    train, val = run.dataset(cfg.data.train_split), run.dataset(cfg.data.val_split)
    plain = run.dataset(cfg.data.train_split, augmented=False)
    assert len(train.ids) == 2 * len(plain.ids) and val.ids == VOCDataset(toy_voc, "val", run.classes).ids
    assert (tmp_path / "run" / "augmented" / cfg.data.train_split / "manifest.json").is_file()
    assert run.dataset(cfg.data.train_split) is train  # checked once per process
    # a stage records the copies among its split's contents: with and without them are different inputs
    bare = Run(load_config("configs/tiny.yaml", [f"data.root={toy_voc}", "data.synthetic_images=0"]), tmp_path / "run2", save_config=False)
    assert run.content(cfg.data.train_split, "images") != bare.content(cfg.data.train_split, "images")
    assert run.content(cfg.data.val_split, "images") == bare.content(cfg.data.val_split, "images")
