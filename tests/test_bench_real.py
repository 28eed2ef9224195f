"""benchmarks/bench_real.py: sppdet's training time summed from a run's stage folders, linked folders included and
a one-pass SVM mining counted once."""

import json


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
