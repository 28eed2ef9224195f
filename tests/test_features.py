import numpy as np
import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.features import FeatureCache, choose_scale, conv5_maps, pool_boxes, resize_factor
from sppdet.spp import SpatialPyramidPooling, project_boxes_to_cells
from sppdet.store import ShardError


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
        assert (f.height, f.width) == im.shape[:2] and f.maps[0].dtype == torch.float32


def test_truncated_and_missing_shard_errors(zf, tmp_path):
    _write_split(tmp_path, zf, 1)
    p = tmp_path / "000.npz"
    p.write_bytes(p.read_bytes()[:200])
    cache = FeatureCache(tmp_path, zf.stride, zf.center0)
    with pytest.raises(ShardError, match="000.npz.*truncated or corrupt"):
        cache.load("000")
    with pytest.raises(ShardError, match="001.npz.*missing"):
        cache.load("001")
