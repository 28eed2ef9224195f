import numpy as np
import pytest

from sppdet.segmentation import felzenszwalb_multi, pixel_graph, same_partition


def _scene(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 120, np.float32)
    for _ in range(6):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        img[y:y + rng.integers(8, 40), x:x + rng.integers(8, 50)] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_partitions_identical_to_scikit_image(seed):
    from skimage.segmentation import felzenszwalb

    img = _scene(seed)
    ks = (50, 100, 300)
    mine = felzenszwalb_multi(img, ks, sigma=0.8)
    for k, labels in zip(ks, mine):
        ref = felzenszwalb(img, scale=float(k), sigma=0.8, min_size=int(k), channel_axis=-1)
        assert labels.shape == img.shape[:2] and labels.dtype == np.int64
        assert same_partition(ref, labels), f"k={k}: {ref.max() + 1} vs {labels.max() + 1} segments"
        # labels are 0..n-1, numbered in raster order of first appearance
        first = np.unique(labels.ravel(), return_index=True)[1]
        assert np.array_equal(np.argsort(first), np.arange(labels.max() + 1))
    assert mine[0].max() > mine[2].max()  # larger k, fewer segments


def test_min_size_is_enforced_and_graph_is_sorted():
    img = _scene(3)
    a, b, w = pixel_graph(img, sigma=0.8)
    h, wd = img.shape[:2]
    assert len(a) == h * (wd - 1) + (h - 1) * wd + 2 * (h - 1) * (wd - 1)
    assert np.all(np.diff(w) >= 0)
    # every edge joins 8-neighbours
    dy = np.abs(a // wd - b // wd)
    dx = np.abs(a % wd - b % wd)
    assert np.all((dy <= 1) & (dx <= 1) & (dy + dx > 0))
    (labels,) = felzenszwalb_multi(img, [20], min_sizes=[150])
    assert np.bincount(labels.ravel()).min() >= 150


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (3, 3, 3), (7, 5, 1)])
def test_degenerate_shapes(shape):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    for labels in felzenszwalb_multi(img, (50, 100)):
        assert labels.shape == shape[:2]
        assert labels.min() == 0 and np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_same_partition_ignores_numbering_only():
    a = np.array([[0, 0, 1], [2, 2, 1]])
    assert same_partition(a, 5 - a)
    assert not same_partition(a, np.array([[0, 0, 1], [1, 1, 1]]))  # two segments merged
    assert not same_partition(np.array([[0, 0, 1], [1, 1, 1]]), a)  # one split


def test_flat_image_is_one_segment_and_bad_arguments_raise():
    (labels,) = felzenszwalb_multi(np.full((30, 40, 3), 77, np.uint8), [50])
    assert labels.max() == 0
    with pytest.raises(ValueError, match="min_sizes"):
        felzenszwalb_multi(np.zeros((5, 5, 3), np.uint8), [50, 100], min_sizes=[10])
    with pytest.raises(ValueError, match="positive"):
        felzenszwalb_multi(np.zeros((5, 5, 3), np.uint8), [0])
    with pytest.raises(ValueError, match="shape"):
        felzenszwalb_multi(np.zeros((0, 5, 3), np.uint8), [50])
