"""The compiled selective-search steps (sppdet.regions, sppdet.grouping) against the pure-Python code they replaced
(tests/reference_selective_search.py): the same arrays and the same boxes in the same order, bit for bit, on
generated images and on real VOC photos; and the grouping against a naive greedy merge on tiny images."""

import numpy as np
import pytest

import reference_selective_search as ref
from sppdet import grouping
from sppdet import regions as sr
from sppdet.selective_search import _downscale, convert_colour
from sppdet.segmentation import felzenszwalb_multi
from sppdet.synthetic import make_toy_voc

SETS = ("ctsf", "tsf", "f", "s")


def _steps_agree(rgb: np.ndarray, ks=(50, 100)) -> int:
    """Every step of the fast backend, compiled and reference, on one image; returns the groupings compared."""
    n_checked = 0
    for space in ("hsv", "lab", "rgi"):
        img = convert_colour(rgb, space)
        tex = sr.texture_codes(img)
        assert np.array_equal(tex, ref.texture_codes(img))
        colour = ((img.astype(np.int32) * 25) >> 8).astype(np.uint8)
        for labels in felzenszwalb_multi(img, ks, 0.8):
            regions = sr.region_stats(labels)
            for mine, theirs in zip(regions, ref.regions(labels)):
                assert np.array_equal(mine, theirs)
            n = len(regions[0])
            hc, ht = sr.region_histograms(labels, n, colour, 25), sr.region_histograms(labels, n, tex, 10)
            assert np.array_equal(hc, ref.region_histograms(labels, n, colour.astype(np.int32), 25))
            assert np.array_equal(ht, ref.region_histograms(labels, n, tex.astype(np.int32), 10))
            for s in SETS:
                mine = grouping.hierarchical_grouping(regions, hc, ht, s)
                theirs = ref.hierarchical_grouping(regions, hc, ht, s)
                assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (space, s)
                n_checked += 1
    return n_checked


@pytest.mark.slow
def test_identical_to_the_python_implementation_on_generated_images(tmp_path):
    from sppdet.voc import load_image

    root = make_toy_voc(tmp_path, 3, seed=11)
    for p in sorted((root / "JPEGImages").glob("*.jpg")):
        rgb, _ = _downscale(load_image(p), 160)
        assert _steps_agree(rgb) == 24


@pytest.mark.slow
def test_identical_to_the_python_implementation_on_real_photos(voc_sample):
    from sppdet.voc import VOCDataset

    ds = VOCDataset(voc_sample, "test")
    for i in ds.ids[:3]:
        rgb, _ = _downscale(ds.image(i), 200)
        assert _steps_agree(rgb) == 24


def _tiny(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((24, 30, 3), np.uint8)
    for y in range(0, 24, 6):
        for x in range(0, 30, 6):
            img[y:y + 6, x:x + 6] = rng.integers(0, 256, 3)
    return img


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_gives_the_naive_greedy_merges_box_set(seed):
    img = _tiny(seed)
    labels = felzenszwalb_multi(img, (1,), 0.0, min_sizes=(1,))[0]
    regions = sr.region_stats(labels)
    n = len(regions[0])
    assert n > 10
    tex = sr.texture_codes(img)
    hc = sr.region_histograms(labels, n, ((img.astype(np.int32) * 25) >> 8).astype(np.uint8), 25)
    ht = sr.region_histograms(labels, n, tex, 10)
    for s in SETS:
        mine = grouping.hierarchical_grouping(regions, hc, ht, s)
        naive = ref.naive_grouping(regions, hc, ht, s)
        assert len(mine) == len(naive) == 2 * n - 1
        assert sorted(map(tuple, mine.tolist())) == sorted(map(tuple, naive.tolist())), s


def test_grouping_edge_cases():
    one = sr.region_stats(np.zeros((5, 7), np.int64))
    assert one[0].tolist() == [35.0] and one[1].tolist() == [[0, 0, 7, 5]] and len(one[2]) == 0
    out = grouping.hierarchical_grouping(one, np.ones((1, 75), np.float32), np.ones((1, 240), np.float32))
    assert out.tolist() == [[0, 0, 7, 5]]
    with pytest.raises(ValueError, match="similarity set"):
        grouping.hierarchical_grouping(one, np.ones((1, 75), np.float32), np.ones((1, 240), np.float32), "cx")


@pytest.mark.parametrize("width", [3, 75, 128, 129, 240, 600, 2049])
def test_histogram_intersection_sums_in_numpys_order(width):
    rng = np.random.default_rng(width)
    h = rng.random((4, width)).astype(np.float32)
    h /= h.sum(1, keepdims=True)
    assert grouping._intersection(h, 1, 3) == np.minimum(h[1], h[3]).sum()


@pytest.mark.slow
def test_compiled_code_loaded_from_numbas_cache_runs():
    """A fresh process loads the compiled grouping from numba's on-disk cache (a recursive helper once crashed
    there, only then)."""
    import subprocess
    import sys

    code = ("import numpy as np; from sppdet.proposals import propose; "
            "img = np.random.default_rng(0).integers(0, 255, (60, 80, 3)).astype(np.uint8); "
            "print(len(propose(img, max_side=80)))")
    for _ in range(2):  # the first may compile and write the cache, the second loads it
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and int(r.stdout.split()[-1]) > 0, r.stderr[-2000:]
