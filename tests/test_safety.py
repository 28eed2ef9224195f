"""Nothing lost, nothing silently wrong: full disks, leftovers, file modes, output names, settings, splits."""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sppdet import manifest, store
from sppdet.config import ConfigError, load_config, resolve_path

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_survives(tmp_path, monkeypatch):
    target = tmp_path / "a" / "metrics.json"
    store.atomic_write_text(target, "old")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(store.WriteError) as e:
        store.atomic_write_text(target, "new")
    assert str(e.value) == f"no space left on device while writing {target}"
    assert target.read_text() == "old" and not list(target.parent.glob(".*.tmp"))


def test_a_result_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    out = tmp_path / "detections" / "test"
    with store.swap_in_folder(out) as tmp:
        (tmp / "metrics.json").write_text("1")
        (tmp / "a.png").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "metrics.json"]
    with pytest.raises(OSError):
        with store.swap_in_folder(out) as tmp:
            (tmp / "metrics.json").write_text("2")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "metrics.json").read_text() == "1" and (out / "a.png").is_file()  # the old results, unmixed
    with store.swap_in_folder(out) as tmp:
        (tmp / "metrics.json").write_text("3")
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_files_follow_the_umask(tmp_path):
    p = tmp_path / "x.npz"
    store.atomic_save_npz(p, a=np.zeros(2))
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_stale_temp_files_are_cleaned_and_a_reuse_keeps_the_manifest(tmp_path):
    d = tmp_path / "stage"
    s = manifest.Stage(d, "x", {"a": 1})
    store.atomic_save_npz(s.path("i0"), v=np.zeros(3))
    s.finish(1)
    dead = d / ".i1.npz.999999999.abcd.tmp"  # a writer killed mid-write (its process is gone)
    dead.write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    running = d / f".i2.npz.{os.getpid()}.abcd.tmp"  # another process still writing: left alone
    running.write_bytes(b"y")
    before = (d / "manifest.json").read_text()
    s2 = manifest.Stage(d, "x", {"a": 1})
    assert not dead.exists() and running.exists()
    m = s2.finish(1)
    assert (d / "manifest.json").read_text() == before and m["bytes"] == s.path("i0").stat().st_size
    assert store.dir_bytes(d) == sum(p.stat().st_size for p in d.iterdir() if not p.name.endswith(".tmp"))


@pytest.mark.parametrize("override, message", [
    ("features.scales=[0]", "features.scales: must be >= 1"),
    ("features.scales=[]", "features.scales: must not be empty"),
    ("features.scales=[a,b]", "features.scales: every item must be an int"),
    ("features.dtype=float8", "features.dtype: must be one of 'float16', 'float32'"),
    ("proposals.max_boxes=-5", "proposals.max_boxes: must be >= 0"),
    ("proposals.params={ks: [abc]}", "parameter 'ks' of proposal backend 'fast' must be a non-empty list of numbers"),
    ("proposals.backend=fastest", "proposals.backend: must be one of"),
    ("svm.feature=fc8", "svm.feature: must be one of"),
    ("backbone.stride=8", "backbone.stride: must be one of 16, 32, got 8"),
    ("backbone.hypercolumn=true", "backbone.hypercolumn is for the EfficientNet-Lite trunks, not zf5"),
    ("features.deep_levels=[3,1]", "features.deep_levels is the pyramid of a hypercolumn's stride-32 channels"),
    ("featurs.scales=[1]", "unknown key(s) featurs"),
])
def test_settings_are_validated_where_the_config_loads_naming_the_set(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    assert str(e.value).startswith(f"--set {override}: ") and message in str(e.value)


def test_relative_paths_resolve_against_the_project_root_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert Path(cfg.base_dir) == ROOT
    assert resolve_path(cfg, cfg.data.root) == ROOT / "data" / "tiny" / "VOC2007"
    assert resolve_path(cfg, "/abs/x") == Path("/abs/x")
    # a run folder's saved config keeps the base it was made with
    from sppdet.run import Run

    run = Run(cfg, tmp_path / "run")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.base_dir == cfg.base_dir and run.path(again.data.root) == ROOT / "data" / "tiny" / "VOC2007"


def test_detect_output_names_never_overwrite_an_input_or_each_other(tmp_path, load_script):
    detect = load_script("tools/detect.py")
    a, b, c = tmp_path / "same.jpg", tmp_path / "same.png", tmp_path / "photo.png"
    names = detect.output_names([a, b, c], tmp_path)
    assert names == ["same_jpg", "same_png", "photo_det"]
    assert len(set(names)) == 3
    for n in names:
        assert not {(tmp_path / f"{n}{e}") for e in (".json", ".png")} & {a, b, c}
    assert detect.output_names([a, c], tmp_path / "out") == ["same", "photo"]


def test_detect_refuses_an_out_that_is_a_file_and_names_a_folder_given_as_image(tmp_path):
    from sppdet.voc import VOCError, load_image

    with pytest.raises(VOCError, match="is a folder, not an image file"):
        load_image(tmp_path)
    import subprocess
    import sys

    f = tmp_path / "out.txt"
    f.write_text("mine")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "detect.py"), "--run", str(tmp_path / "norun"), "--out",
                        str(f), str(tmp_path / "x.jpg")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f.read_text() == "mine"


def test_detections_of_another_split_are_an_error(tmp_path):
    from sppdet.detector import load_detections

    p = tmp_path / "detections.npz"
    store.atomic_save_npz(p, **{"a/boxes": np.zeros((1, 4), np.float32), "a/scores": np.ones(1, np.float32),
                                "a/labels": np.zeros(1, np.int64)})
    assert list(load_detections(p, ["a", "b"], 2)) == ["a"]
    with pytest.raises(ValueError, match="1 image\\(s\\) with detections are not in the split"):
        load_detections(p, ["b", "c"], 2)


def test_a_class_without_training_positives_is_never_scored():
    import torch

    from sppdet.config import TestConfig
    from sppdet.detector import Detector
    from sppdet.features import FeatureCache, ImageFeatures

    cache = FeatureCache("unused", 16, 8.0, (2, 1), 0.0)
    svm = {"W": np.zeros((2, 8 * 5), np.float32), "b": np.zeros(2, np.float32), "feature_scale": 1.0,
           "layer": "pool5", "feature": "pool5", "trained": np.array([True, False])}
    det = Detector(None, svm, None, cache, TestConfig(score_threshold=-1.0), ["a", "b"])
    feats = ImageFeatures([torch.rand(8, 6, 6)], [1.0], 96, 96)
    boxes = np.array([[0, 0, 40, 40], [30, 30, 90, 90]], np.float32)
    _, scores, _ = det.score(feats, boxes)
    assert np.all(scores[:, 0] == 0) and np.all(np.isneginf(scores[:, 1]))
    plain, _, _ = det.detect_cached(feats, boxes)
    assert set(plain.labels.tolist()) == {0}


@pytest.mark.slow
def test_a_changed_image_rebuilds_only_its_own_shards(tmp_path, caplog):
    import shutil

    import cv2

    from sppdet.run import Run
    from sppdet.stages import stage_features, stage_proposals
    from sppdet.synthetic import make_toy_voc

    voc = make_toy_voc(tmp_path / "d", 6, seed=4)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.root={voc}", "data.synthetic_images=0",
                                                      "backbone.weights=null", "proposals.max_boxes=50",
                                                      "proposals.params={max_side: 120, ks: [100]}",
                                                      "proposals.workers=1", "features.scales=[200]"])
    shutil.copy(voc / "ImageSets" / "Main" / "trainval.txt", voc / "ImageSets" / "Main" / "all.txt")
    import torch

    run = Run(cfg, tmp_path / "run", log_fn=lambda s: None)
    stage_proposals(run, "all")
    torch.manual_seed(0)  # a random trunk, the same both times
    stage_features(run, "all")
    ids = run.dataset("all").ids
    mtimes = {d: {i: (run.dir / d / "all" / f"{i}.npz").stat().st_mtime_ns for i in ids}
              for d in ("proposals", "features")}
    img = voc / "JPEGImages" / f"{ids[1]}.jpg"
    cv2.imwrite(str(img), 255 - cv2.imread(str(img)))  # the user fixes (changes) one image
    run = Run(cfg, tmp_path / "run", log_fn=lambda s: None)
    with caplog.at_level("WARNING"):
        m = stage_proposals(run, "all")
        torch.manual_seed(0)
        f = stage_features(run, "all")
    assert m["complete"] and f["complete"] and m["new_images"] == 1 and f["new_images"] == 1
    assert f"1 item(s) changed since their shards were made ({ids[1]})" in caplog.text
    for d in ("proposals", "features"):
        now = {i: (run.dir / d / "all" / f"{i}.npz").stat().st_mtime_ns for i in ids}
        assert [i for i in ids if now[i] != mtimes[d][i]] == [ids[1]], d


def test_a_tool_given_only_a_run_folder_keeps_that_runs_settings(tmp_path):
    """``tools/test_net.py --run R --split val`` (no --config) once loaded configs/demo.yaml and rewrote R's
    config.yaml with it: the run's own settings are the default, and they are kept."""
    from sppdet.cli import DEFAULT_CONFIG, config_path, make_run, parser

    run_dir = tmp_path / "run"
    ap = parser("t")
    ap.add_argument("--overwrite", action="store_true")
    first = make_run(ap.parse_args(["--config", "configs/tiny.yaml", "--run", str(run_dir)]))
    saved = (run_dir / "config.yaml").read_text()
    args = ap.parse_args(["--run", str(run_dir)])
    assert config_path(args) == str(run_dir / "config.yaml")
    again = make_run(args)
    assert again.cfg == first.cfg and (run_dir / "config.yaml").read_text() == saved
    assert config_path(ap.parse_args(["--run", str(tmp_path / "new")])) == DEFAULT_CONFIG
    assert config_path(ap.parse_args([])) == DEFAULT_CONFIG


def test_a_later_recorded_setting_checks_old_folders_at_its_before_value_also_nested(tmp_path):
    """``extra_defaults`` (what a setting recorded later was before it existed) is read the same way by a stage's
    own check and by the later stages' ``require_settings``, nested values too (Fast R-CNN's features.deep_levels):
    an old folder matches at that value and is refused, by name, at another."""
    from sppdet.stages.common import require_settings, stage_folder

    run = type("R", (), {})()
    old = {"features": {"levels": [6, 3, 2, 1]}, "size": 224}
    stage_folder(tmp_path, "x", {}, old, {}, False).finish(1)
    before = {"features": {"deep_levels": None}, "deep_levels": None}
    now = {"features": {"levels": [6, 3, 2, 1], "deep_levels": None}, "size": 224, "deep_levels": None}
    require_settings(run, tmp_path, "tools/x.py", {}, now, extra_defaults=before)
    stage_folder(tmp_path, "x", {}, now, {}, False, extra_defaults=before).finish(1)
    for changed in ({**now, "features": {**now["features"], "deep_levels": [3, 1]}}, {**now, "deep_levels": [1]}):
        with pytest.raises(store.StaleCacheError, match=r"deep_levels: None -> \[.*\]\); rerun tools/x.py"):
            require_settings(run, tmp_path, "tools/x.py", {}, changed, extra_defaults=before)


def test_the_conv5_cache_does_not_record_its_pooling_keys_and_its_old_records_of_them_are_not_compared(tmp_path):
    """features.levels / deep_levels / shrink / target_size say how windows are pooled, not what the maps are: the
    cache leaves them out of its record (a change reuses it), a cache that recorded them (made before) stays valid
    with its fingerprint at any values of them, and a change of any other features key is still refused."""
    from dataclasses import replace

    from sppdet.config import recorded
    from sppdet.config_sections import FeatureConfig
    from sppdet.features import POOLING_KEYS
    from sppdet.stages.common import FEATURES_OMIT, require_settings, stage_folder

    run = type("R", (), {})()
    f = FeatureConfig()
    new = stage_folder(tmp_path / "new", "features", {"features": f}, {}, {}, False, omit=FEATURES_OMIT)
    new.finish(1)
    assert not set(POOLING_KEYS) & set(json.loads((tmp_path / "new" / "manifest.json").read_text())
                                       ["config"]["features"])
    old = stage_folder(tmp_path / "old", "features", {}, {"features": recorded(f)}, {}, False)  # as made before
    old.finish(1)
    other = replace(f, levels=[2, 1], shrink=1.0, target_size=100.0, deep_levels=[1])
    for d, fp in ((tmp_path / "new", new.fingerprint), (tmp_path / "old", old.fingerprint)):
        again = stage_folder(d, "features", {"features": other}, {}, {}, False, omit=FEATURES_OMIT)
        assert again.fingerprint == fp  # the stages after it, which recorded that fingerprint, stay valid
        require_settings(run, d, "tools/x.py", {"features": other}, omit=FEATURES_OMIT)
        with pytest.raises(store.StaleCacheError, match=r"features.scales: \[688\] -> \[300\]"):
            require_settings(run, d, "tools/x.py", {"features": replace(other, scales=[300])}, omit=FEATURES_OMIT)
        with pytest.raises(store.StaleCacheError, match="features.max_size"):
            stage_folder(d, "features", {"features": replace(f, max_size=10)}, {}, {}, False, omit=FEATURES_OMIT)


def test_a_pooling_stage_from_before_it_recorded_pooling_counts_as_made_with_its_caches_recorded_values(tmp_path):
    """pooling_before: the pooling keys an old fine-tuning / SVM / box-regression folder was made with are those
    its train split's conv5 cache recorded then (defaults where it predates a key), so such a folder stays valid at
    those values and is refused by name at others."""
    from types import SimpleNamespace

    from sppdet.config import load_config
    from sppdet.stages.common import pooling_before, pooling_record, require_settings, stage_folder

    cfg = load_config("configs/tiny.yaml", ["features.levels=[3,1]"])
    run = SimpleNamespace(cfg=cfg, features_dir=lambda split: tmp_path / "features" / split)
    assert pooling_before(run)["pooling"]["levels"] == [6, 3, 2, 1]  # no cache: the defaults
    stage_folder(run.features_dir("train"), "features", {}, {"features": {"levels": [3, 1], "shrink": 2.0}}, {},
                 False).finish(1)
    assert pooling_before(run) == {"pooling": {"levels": [3, 1], "deep_levels": None, "shrink": 2.0,
                                               "target_size": 208.0}}
    stage_folder(tmp_path / "svm", "svm", {}, {"feature": "pool5"}, {}, False).finish(1)  # recorded no pooling
    now = {"feature": "pool5", **pooling_record(run)}
    with pytest.raises(store.StaleCacheError, match=r"pooling.shrink: 2.0 -> 6.5"):
        require_settings(run, tmp_path / "svm", "tools/train_svm.py", {}, now, extra_defaults=pooling_before(run))
    run.cfg = load_config("configs/tiny.yaml", ["features.levels=[3,1]", "features.shrink=2.0"])
    now = {"feature": "pool5", **pooling_record(run)}
    require_settings(run, tmp_path / "svm", "tools/train_svm.py", {}, now, extra_defaults=pooling_before(run))
    stage_folder(tmp_path / "svm", "svm", {}, now, {}, False, extra_defaults=pooling_before(run))
