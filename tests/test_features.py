import time

import numpy as np
import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.features import (FeatureCache, ImageFeatures, auto_scale, choose_scale, conv5_maps, median_extent,
                             object_extents, pool_boxes, resize_factor)
from sppdet.spp import SpatialPyramidPooling, project_boxes_to_cells
from sppdet.store import ShardError, StaleCacheError


@pytest.fixture(scope="module")
def zf():
    torch.manual_seed(0)
    return build_backbone("zf5", width=0.125).eval()


def test_resize_and_scale_choice():
    assert resize_factor(375, 500, 688, 2000) == pytest.approx(688 / 375)
    assert resize_factor(100, 1000, 688, 2000) == pytest.approx(2.0)  # long side capped
    boxes = np.array([[0, 0, 100, 100], [0, 0, 400, 400], [0, 0, 20, 20]], np.float32)
    f = [480 / 375, 688 / 375, 1200 / 375]
    # window side * factor closest to 208
    np.testing.assert_array_equal(choose_scale(boxes, f, 208), [1, 0, 2])
    np.testing.assert_array_equal(choose_scale(boxes, f[:1], 208), [0, 0, 0])


def test_auto_scale_puts_the_median_object_nearest_the_target_size():
    c = [480, 576, 688]
    assert auto_scale(np.array([0.3, 0.4, 0.9]), 224, c) == 576  # the median 0.4: 230 px at 576 (192 / 275)
    assert auto_scale(np.array([0.8]), 224, c) == 480  # large objects: the smallest scale
    assert auto_scale(np.array([0.1, 0.2]), 224, c) == 688  # small ones: the largest
    assert auto_scale(np.array([0.5]), 300, [688, 480, 576]) == 576  # nearest as a ratio (288 px), in any order
    assert auto_scale(np.zeros(0), 224, c) == 688  # no objects: the largest
    assert auto_scale(np.array([0.0, 0.0, 0.8]), 224, c) == 480  # boxes without area are left out of the median
    assert median_extent(np.array([0.0, 0.4, 0.8])) == pytest.approx(0.6) and np.isnan(median_extent(np.zeros(0)))


def test_object_extents_and_auto_scales_resolved_once_into_the_runs_config(toy_voc, tmp_path):
    import yaml

    from sppdet.config import ConfigError, load_config
    from sppdet.run import Run
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    ds = VOCDataset(toy_voc, "train", TOY_CLASSES)
    e = object_extents(ds)
    a = ds.annotation(ds.ids[0])
    b = a.boxes[~a.difficult][0]
    assert e[0] == pytest.approx(np.sqrt((b[2] - b[0]) * (b[3] - b[1])) / min(a.width, a.height), rel=1e-5)
    assert len(e) == sum(int((~ds.annotation(i).difficult).sum()) for i in ds.ids)
    want = auto_scale(e, 300, [400, 600, 900])
    logs = []
    cfg = load_config("configs/tiny.yaml", [f"data.root={toy_voc}", "data.synthetic_images=0", "data.train_split=train",
                                            "features.scales=auto",
                                            "features.auto_object_px=300", "features.auto_scales=[400,600,900]"])
    run = Run(cfg, tmp_path / "run", log_fn=logs.append)
    assert run.cfg.features.scales == [want] and any("features.scales auto" in m for m in logs)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["features"]["scales"] == [want]  # later tools and detect.py need no data for it
    # what stages record is the scale chosen, not how: another target that picks the same scale keeps the caches
    from dataclasses import replace

    from sppdet.config import recorded, section_defaults
    f = run.cfg.features
    assert recorded(replace(f, auto_object_px=500.0, auto_scales=[want])) == recorded(f)
    assert "auto_object_px" not in recorded(f) and "auto_scales" not in section_defaults(f)
    with pytest.raises(ConfigError, match="features.scales"):
        load_config("configs/tiny.yaml", ["features.scales=big"])
    with pytest.raises(ConfigError, match="auto_scales"):
        load_config("configs/tiny.yaml", ["features.auto_scales=[]"])


def test_pooled_features_equal_spp_on_the_crop(zf):
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    maps, factors = conv5_maps(zf, rgb, [200, 300], 1000)
    boxes = np.array([[0, 0, 160, 120], [10, 20, 60, 90], [100, 50, 104, 55], [150, 100, 160, 120]], np.float32)
    sidx = np.array([0, 1, 0, 1])
    got = pool_boxes(maps, factors, boxes, sidx, zf.stride, zf.center0, (6, 3, 2, 1), 6.5)
    layer = SpatialPyramidPooling((6, 3, 2, 1))
    for r in range(len(boxes)):
        m = maps[sidx[r]]
        l, t, rr, b = project_boxes_to_cells(torch.tensor(boxes[r:r + 1]) * factors[sidx[r]], m.shape[-2:], zf.stride,
                                             zf.center0, 6.5)[0].tolist()
        torch.testing.assert_close(got[r], layer(m[None, :, t:b + 1, l:rr + 1])[0])


def test_conv5_in_bf16_is_float32_maps_close_to_fp32(zf):
    rgb = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    ref, f_ref = conv5_maps(zf, rgb, [200, 300], 1000)
    got, f_got = conv5_maps(zf, rgb, [200, 300], 1000, precision="bf16")
    assert f_got == f_ref
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        err = (a - b).abs().max() / b.abs().max()
        assert 0 < err < 0.05  # bfloat16 arithmetic: close, and not silently fp32


def _write_split(cache_dir, zf, n=3):
    rng = np.random.default_rng(1)
    imgs = {f"{i:03d}": rng.integers(0, 255, (90 + 10 * i, 120, 3), dtype=np.uint8) for i in range(n)}
    for k, im in imgs.items():
        maps, factors = conv5_maps(zf, im, [150], 1000)
        FeatureCache.write(cache_dir / f"{k}.npz", maps, factors, im.shape[:2])
    return imgs


def test_cache_round_trip_float16(zf, tmp_path):
    imgs = _write_split(tmp_path, zf)
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    boxes = np.array([[0, 0, 50, 40], [20, 10, 119, 89]], np.float32)
    for k, im in imgs.items():
        maps, factors = conv5_maps(zf, im, [150], 1000)
        ref = pool_boxes(maps, factors, boxes, np.zeros(2, np.int64), zf.stride, zf.center0, (6, 3, 2, 1), 6.5)
        got = cache.pooled(k, boxes)
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
        f = cache.load(k)
        assert (f.height, f.width) == im.shape[:2] and f.maps[0].dtype == torch.float16  # stored dtype
        # loaded channels-last (the pooling's table layout: no copy per pooling call), the values as stored
        m = f.maps[0]
        assert m.stride()[0] == 1 and m.stride()[2] == m.shape[0] and not m.is_contiguous()
        assert torch.equal(m, maps[0].half())
        assert torch.equal(pool_boxes([m.contiguous()], f.factors, boxes, np.zeros(2, np.int64), zf.stride,
                                      zf.center0, (6, 3, 2, 1), 6.5), got)
        # pooling the float16 map directly is exact: equal to pooling its float32 upcast
        up = pool_boxes([m.float() for m in f.maps], f.factors, boxes, np.zeros(2, np.int64), zf.stride, zf.center0,
                        (6, 3, 2, 1), 6.5)
        assert got.dtype == torch.float32 and torch.equal(got, up)


def _pooling_requests(zf, tmp_path, device="cpu"):
    """A two-scale cache of three images and one request per image: plain, mirrored (maps mirrored on load),
    random scales; the cache's levels with a pyramid of their own for the last channels (a hypercolumn's)."""
    rng = np.random.default_rng(5)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        im = rng.integers(0, 255, (80 + 20 * k, 130, 3), dtype=np.uint8)
        maps, factors = conv5_maps(zf, im, [150, 110], 1000)
        FeatureCache.write(tmp_path / f"{k}.npz", maps, factors, im.shape[:2])
    c = zf.out_channels
    cache = FeatureCache(tmp_path, zf.stride, zf.center0, (6, 3, 2, 1), deep=(c - 8, (3, 1)))
    feats = [cache.load(str(k), device=device, flipped=True, mirror_maps=True) for k in range(3)]
    boxes = [np.array([[0, 0, 60, 50], [10, 5, 120, 70 + 10 * k], [30, 20, 90, 75]], np.float32) for k in range(3)]
    requests = [(feats[0], boxes[0], False, None), (feats[1], boxes[1], True, None),
                (feats[2], boxes[2], False, np.array([1, 0, 1]))]
    return cache, requests


def test_pooled_many_equals_each_images_own_pooling(zf, tmp_path):
    """Fine-tuning pools a batch's images in one call: the rows are each image's own pooling, in request order."""
    cache, requests = _pooling_requests(zf, tmp_path)
    got = cache.pooled_many(requests)
    want = torch.cat([cache.pooled(f, b, flipped=fl, scale_idx=s) for f, b, fl, s in requests])
    assert got.shape == (9, cache.feature_dim(zf.out_channels)) and torch.equal(got, want)
    assert not torch.equal(got[3:6], cache.pooled(requests[1][0], requests[1][1]))  # the mirror was pooled
    with pytest.raises(ValueError, match="pooled_many: no request"):
        cache.pooled_many([])


def test_truncated_and_missing_shard_errors(zf, tmp_path):
    _write_split(tmp_path, zf, 1)
    p = tmp_path / "000.npz"
    p.write_bytes(p.read_bytes()[:200])
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    with pytest.raises(ShardError, match="000.npz.*truncated or corrupt"):
        cache.load("000")
    with pytest.raises(ShardError, match="001.npz.*missing"):
        cache.load("001")


def test_resume_after_crash_mid_split_gives_identical_files(toy_voc, tmp_path, monkeypatch):
    import shutil

    import yaml

    import sppdet.stages as pl
    from sppdet.run import Run
    import sppdet.stages.features as fs
    from sppdet.config import load_config
    from sppdet.synthetic import TOY_CLASSES

    torch.manual_seed(0)
    weights = tmp_path / "zf5.pt"
    torch.save(build_backbone("zf5", width=0.125).state_dict(), weights)
    conf = {"data": {"root": str(toy_voc), "classes": list(TOY_CLASSES), "train_split": "train"},
            "proposals": {"backend": "fast", "max_boxes": 150, "params": {"ks": [100]}},
            "backbone": {"name": "zf5", "width": 0.125, "weights": str(weights)},
            "features": {"scales": [200, 260]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    cfg = load_config(tmp_path / "c.yaml")
    clean = Run(cfg, tmp_path / "clean", log_fn=lambda s: None)
    pl.stage_proposals(clean, "train")
    pl.stage_features(clean, "train")
    ids = clean.dataset("train").ids
    assert len(ids) >= 4

    crashed = Run(cfg, tmp_path / "crashed", log_fn=lambda s: None)
    shutil.copytree(clean.proposals_dir("train"), crashed.proposals_dir("train"))
    real, calls = fs.extract_image, []

    def dies_on_third_image(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-split
        return real(*a, **k)

    monkeypatch.setattr(fs, "extract_image", dies_on_third_image)
    with pytest.raises(KeyboardInterrupt):
        pl.stage_features(crashed, "train")
    done = sorted(p.name for p in crashed.features_dir("train").glob("*.npz"))
    assert len(done) == 2
    # A write killed half-way leaves only a hidden temporary file, never a truncated shard.
    (crashed.features_dir("train") / f".{ids[2]}.npz.x.tmp").write_bytes(b"partial")
    monkeypatch.setattr(fs, "extract_image", real)
    # Resumed on a machine where the precision resolves to bf16 ("auto"): refused, not mixed in.
    monkeypatch.setattr(fs, "resolve_precision", lambda *a: "bf16")
    with pytest.raises(StaleCacheError, match="conv_precision: 'fp32' -> 'bf16'"):
        pl.stage_features(crashed, "train")
    monkeypatch.undo()
    m = pl.stage_features(crashed, "train")
    assert m["complete"] and m["new_images"] == len(ids) - 2
    for i in ids:
        a = (clean.features_dir("train") / f"{i}.npz").read_bytes()
        b = (crashed.features_dir("train") / f"{i}.npz").read_bytes()
        assert a == b, f"{i}.npz differs after resume"
    assert pl.stage_features(clean, "train")["new_images"] == 0

    # Shards are written in a thread while the next image's conv5 runs: a failed write (a full disk) still stops
    # the stage with the error naming the file, the shards before it whole, nothing after it written.
    from sppdet.store import WriteError

    failing = Run(cfg, tmp_path / "failing", log_fn=lambda s: None)
    shutil.copytree(clean.proposals_dir("train"), failing.proposals_dir("train"))
    real_write, writes = FeatureCache.write, []

    def full_disk_on_second(path, *a, **k):
        writes.append(path)
        if len(writes) == 2:
            raise WriteError(28, f"no space left on device while writing {path}")
        return real_write(path, *a, **k)

    monkeypatch.setattr(FeatureCache, "write", staticmethod(full_disk_on_second))
    with pytest.raises(WriteError, match=f"while writing .*{ids[1]}.npz"):
        pl.stage_features(failing, "train")
    assert sorted(p.name for p in failing.features_dir("train").glob("*.npz")) == [f"{ids[0]}.npz"]
    assert len(writes) == 2  # the image after the failed one was computed, never written
    monkeypatch.undo()
    assert pl.stage_features(failing, "train")["new_images"] == len(ids) - 1


def test_shards_keep_their_own_progress_and_only_the_last_completes_the_stage(toy_voc, tmp_path):
    import json

    import yaml

    import sppdet.stages as pl
    from sppdet.config import load_config
    from sppdet.manifest import Stage
    from sppdet.run import Run
    from sppdet.synthetic import TOY_CLASSES

    torch.manual_seed(0)
    weights = tmp_path / "zf5.pt"
    torch.save(build_backbone("zf5", width=0.125).state_dict(), weights)
    conf = {"data": {"root": str(toy_voc), "classes": list(TOY_CLASSES), "train_split": "train"},
            "proposals": {"backend": "fast", "max_boxes": 50, "params": {"ks": [100], "max_side": 120}},
            "backbone": {"name": "zf5", "width": 0.125, "weights": str(weights)}, "features": {"scales": [160]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    run = Run(load_config(tmp_path / "c.yaml"), tmp_path / "run", log_fn=lambda s: None)
    pl.stage_proposals(run, "train")
    first = pl.stage_features(run, "train", shard=(1, 2))
    assert not Stage.read_manifest(run.features_dir("train"))["complete"] and first["new_images"] > 0
    last = pl.stage_features(run, "train", shard=(0, 2))
    m = Stage.read_manifest(run.features_dir("train"))
    assert m["complete"] and last["complete"] and set(m["shards"]) == {"progress-0-of-2", "progress-1-of-2"}
    assert sum(v["new_images"] for v in m["shards"].values()) == len(run.dataset("train").ids)
    # a shard run again after the stage completed: nothing to do, and the complete manifest stays complete
    again = pl.stage_features(run, "train", shard=(1, 2))
    assert again["new_images"] == 0 and Stage.read_manifest(run.features_dir("train"))["complete"]
    assert json.loads((run.features_dir("train") / "progress-1-of-2.json").read_text())["new_images"] == 0


def test_peak_rss_sees_a_temporary_allocation_and_npz_bytes_are_deterministic(tmp_path):
    from sppdet.store import PeakRSS, atomic_save_npz, load_npz

    import mmap

    size = 64 * 2**20
    with PeakRSS(interval=0.01) as mem:
        start = PeakRSS.current()
        # An anonymous mapping, one byte written per page: new resident pages whatever the
        # allocator holds in reserve (a freed heap can serve np.ones without growing RSS).
        buf = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            buf[offset] = 1
        time.sleep(0.1)  # a sampling meter sees what lives for a few intervals (10 ms each)
        buf.close()
    assert mem.peak >= start + 48 * 2**20
    assert PeakRSS.current() < mem.peak  # the mapping is gone; the meter kept its peak
    arrays = {"x": np.arange(5, dtype=np.float16), "y": np.eye(3)}
    atomic_save_npz(tmp_path / "a.npz", **arrays)
    atomic_save_npz(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = load_npz(tmp_path / "a.npz")
    assert back["x"].dtype == np.float16 and np.array_equal(back["y"], np.eye(3))


def test_stage_manifest_keeps_recorded_results_on_reuse_and_rejects_changed_config(tmp_path):
    from sppdet.store import StaleCacheError
    from sppdet.manifest import Stage

    Stage(tmp_path / "s", "finetune", {"lr": 0.1}, {"features": "abc"}).finish(1, conv_fingerprint="f00d")
    again = Stage(tmp_path / "s", "finetune", {"lr": 0.1}, {"features": "abc"}).finish(1)  # a rerun reusing it
    assert again["conv_fingerprint"] == "f00d" and again["complete"]
    with pytest.raises(StaleCacheError, match="config.lr"):
        Stage(tmp_path / "s", "finetune", {"lr": 0.2}, {"features": "abc"})


def test_stage_made_before_an_option_existed_stays_valid_at_its_default(tmp_path):
    """An upgrade that adds an option (default: the old behaviour) keeps the caches and their fingerprint;
    the option set to anything else is a change, named."""
    from sppdet.store import StaleCacheError
    from sppdet.manifest import Stage

    old = Stage(tmp_path / "s", "svm", {"svm": {"C": 0.01}, "feature": "fc7"}, {"features": "abc"}).finish(1)
    new_cfg = {"svm": {"C": 0.01, "new_option": 0}, "feature": "fc7"}
    defaults = {"svm": {"C": 0.001, "new_option": 0}}
    again = Stage(tmp_path / "s", "svm", new_cfg, {"features": "abc"}, defaults=defaults).finish(1)
    assert again["fingerprint"] == old["fingerprint"] and again["config"] == old["config"]
    with pytest.raises(StaleCacheError, match=r"config\.svm\.new_option: 0 -> 2"):
        Stage(tmp_path / "s", "svm", {"svm": {"C": 0.01, "new_option": 2}, "feature": "fc7"}, {"features": "abc"},
              defaults=defaults)
    with pytest.raises(StaleCacheError, match=r"config\.svm\.new_option"):  # without defaults: strict
        Stage(tmp_path / "s", "svm", new_cfg, {"features": "abc"})
    with pytest.raises(StaleCacheError, match=r"config\.svm\.C"):  # a saved value is never replaced by a default
        Stage(tmp_path / "s", "svm", {"svm": {"C": 0.001, "new_option": 0}, "feature": "fc7"}, {"features": "abc"},
              defaults=defaults)


def test_window_groups_keep_one_window_per_conv5_rectangle(zf, tmp_path):
    rgb = np.random.default_rng(4).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    maps, factors = conv5_maps(zf, rgb, [200, 300], 1000)
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    feats = ImageFeatures(maps, factors, 150, 200)
    base = np.array([[10, 10, 110, 90], [60, 40, 190, 140], [0, 0, 200, 150], [30, 50, 70, 80]], np.float32)
    boxes = np.concatenate([base, base + 1, base[:2] - 1])  # one pixel rarely moves a conv5 cell edge
    keep = cache.window_groups(feats, boxes)[0]
    assert list(keep[:4]) == [0, 1, 2, 3] and np.all(np.diff(keep) > 0) and len(keep) < len(boxes)
    pooled = cache.pooled(feats, boxes).numpy()
    kept = pooled[keep]
    assert len(np.unique(kept, axis=0)) == len(keep)  # the kept windows all pool differently
    for r in range(len(boxes)):  # every dropped window pools exactly like a kept one
        assert (np.abs(kept - pooled[r]).max(axis=1) == 0).any()
    assert [len(a) for a in cache.window_groups(feats, np.zeros((0, 4), np.float32))] == [0, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_detector_scores_each_conv5_rectangle_once_and_exactly(zf, tmp_path, device):
    """Scoring pools and runs fc6/fc7 once per group of windows on the same conv5 rectangle; every
    window still gets exactly the scores and pool5 row it would get on its own. With the maps on a GPU the
    windows are pooled and scored there (the same pool5 rows, bit for bit)."""
    from sppdet.config import TestConfig
    from sppdet.detector import Detector
    from sppdet.models import FCHead

    rgb = np.random.default_rng(6).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    maps, factors = conv5_maps(zf, rgb, [200, 300], 1000)
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    feats = ImageFeatures([m.half() for m in maps], factors, 150, 200)
    base = np.array([[10, 10, 110, 90], [60, 40, 190, 140], [0, 0, 200, 150], [30, 50, 70, 80]], np.float32)
    boxes = np.concatenate([base + 1, base, base[:2] - 1, base[2:] + 2])
    first, group = cache.window_groups(feats, boxes)
    assert len(first) < len(boxes) and np.all(np.diff(first) > 0) and np.array_equal(group[first], np.arange(len(first)))
    torch.manual_seed(0)
    full = cache.pooled(feats, boxes)
    head = FCHead(full.shape[1], 32, 4).eval()
    rng = np.random.default_rng(0)
    svm = {"W": rng.normal(size=(3, 32)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
           "feature_scale": 0.5, "layer": "fc7"}
    with torch.no_grad():
        expected = (head.features(full, "fc7").numpy() * 0.5) @ svm["W"].T + svm["b"]
    det = Detector(head, svm, None, cache, TestConfig(fc_precision="fp32"), ["a", "b", "c"], device=device)
    feats = ImageFeatures([m.to(device) for m in feats.maps], factors, 150, 200)
    rows, scores, _ = det.score(feats, boxes)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows[np.arange(len(boxes))], full.numpy())
    assert len(rows) == len(boxes) and len(rows.distinct) == len(first)
    empty = det.score(feats, np.zeros((0, 4), np.float32))
    assert empty[1].shape == (0, 3) and len(empty[0]) == 0
    pool5 = {"W": rng.normal(size=(3, full.shape[1])).astype(np.float32), "b": svm["b"], "feature_scale": 0.25,
             "layer": "pool5"}  # SVMs on the pooled rows themselves
    _, scores, _ = Detector(None, pool5, None, cache, TestConfig(), ["a", "b", "c"], device=device).score(feats, boxes)
    np.testing.assert_allclose(scores, (full.numpy() * 0.25) @ pool5["W"].T + pool5["b"], rtol=1e-4, atol=1e-3)


def test_detector_regresses_with_the_heads_box_layer_from_the_fc7_rows_it_scores(zf, tmp_path):
    """bbox_reg.source: finetune: the regressed boxes are the windows moved by the head's own deltas for their
    class (computed once per group of windows from fc7), and a head without a box layer is refused."""
    from sppdet.boxes import BOX_STDS, clip_boxes, decode
    from sppdet.config import TestConfig
    from sppdet.detector import Detector, HeadBoxRegressor
    from sppdet.models import FCHead

    rgb = np.random.default_rng(7).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    maps, factors = conv5_maps(zf, rgb, [200], 1000)
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    feats = ImageFeatures([m.half() for m in maps], factors, 150, 200)
    boxes = np.array([[10, 10, 110, 90], [60, 40, 190, 140], [11, 10, 110, 90], [30, 50, 70, 80]], np.float32)
    full = cache.pooled(feats, boxes)
    torch.manual_seed(0)
    head = FCHead(full.shape[1], 32, 3, box_classes=2).eval()
    torch.nn.init.normal_(head.bbox_pred.weight, std=0.3)  # deltas large enough to move the boxes
    with pytest.raises(ValueError, match="finetune.bbox_loss"):
        HeadBoxRegressor(FCHead(full.shape[1], 32, 3))
    svm = {"W": np.zeros((2, full.shape[1]), np.float32), "b": np.array([5.0, 4.0], np.float32), "feature_scale": 1.0,
           "layer": "pool5"}  # pool5 SVMs (fc7 is computed for the deltas all the same); every window scores 5 and 4
    test = TestConfig(fc_precision="fp32", regress_first=True, nms=1.0, score_threshold=-1e9)
    det = Detector(head, svm, HeadBoxRegressor(head), cache, test, ["a", "b"])
    rows, scores, _ = det.score(feats, boxes)
    with torch.no_grad():
        want = head.bbox_pred(head.features(full, "fc7")).view(-1, 2, 4).numpy() * BOX_STDS
    np.testing.assert_allclose(rows.deltas[np.arange(4)], want, rtol=1e-4, atol=1e-6)
    _, reg, _ = det.postprocess(rows, scores, boxes, 200, 150, max_per_image=0)
    for k in range(2):
        got = reg.boxes[reg.labels == k]
        expect = clip_boxes(decode(boxes, want[:, k]), 200, 150)
        assert len(got) == 4 and np.allclose(np.sort(got, 0), np.sort(expect, 0), atol=1e-3)
    with pytest.raises(ValueError, match="fine-tuned head"):
        Detector(None, svm, HeadBoxRegressor(head), cache, test, ["a", "b"])


def test_flipped_maps_are_read_only_when_asked(zf, tmp_path):
    rgb = np.random.default_rng(5).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    maps, factors = conv5_maps(zf, rgb, [150], 1000)
    flipped = conv5_maps(zf, np.ascontiguousarray(rgb[:, ::-1]), [150], 1000)[0]
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    cache.write(cache.path("a"), maps, factors, rgb.shape[:2], flipped)
    assert cache.load("a").flipped_maps is None  # SVMs, box regression, test: the maps alone
    f = cache.load("a", flipped=True)
    assert torch.equal(f.flipped_maps[0], flipped[0].half()) and torch.equal(f.maps[0], cache.load("a").maps[0])
    box = np.array([[10, 5, 60, 80]], np.float32)
    mirrored = np.array([[120 - 60, 5, 120 - 10, 80]], np.float32)
    torch.testing.assert_close(cache.pooled("a", box, flipped=True), cache.pooled(f, box, flipped=True))
    want = pool_boxes([flipped[0].half()], factors, mirrored, np.zeros(1, np.int64), zf.stride, zf.center0,
                      (6, 3, 2, 1), 6.5)
    assert torch.equal(cache.pooled("a", box, flipped=True), want)  # the mirrored box on the flipped maps
    # finetune.flip_from: maps: the maps mirrored stand for the mirror image's, from a shard with or without them
    cache.write(cache.path("b"), maps, factors, rgb.shape[:2])
    for i in "ab":
        m = cache.load(i, flipped=True, mirror_maps=True)
        assert torch.equal(m.flipped_maps[0], maps[0].half().flip(-1)) and torch.equal(m.maps[0], f.maps[0])
        assert m.flipped_maps[0].permute(1, 2, 0).is_contiguous()  # channels-last, as the pooling reads them
    assert cache.load("b", flipped=True).flipped_maps is None
