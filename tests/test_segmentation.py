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


def _edges_reference(img: np.ndarray, sigma: float = 0.8):
    """Every 8-connected edge of the smoothed image with NumPy: (a, b, weight, a * 4 + direction)."""
    from scipy import ndimage

    x = img.astype(np.float64) / 255.0
    x = ndimage.gaussian_filter(x, sigma=[sigma, sigma, 0]) if sigma > 0 else x
    h, w = x.shape[:2]
    idx = np.arange(h * w).reshape(h, w)
    out = []
    for d, (dy, dx) in enumerate(((0, 1), (1, 0), (1, 1), (-1, 1))):
        ys = slice(max(0, -dy), h - max(0, dy))
        a = idx[ys, : w - dx]
        b = idx[max(0, dy): h + min(0, dy), dx:]
        diff = x.reshape(h * w, -1)[b.ravel()] - x.reshape(h * w, -1)[a.ravel()]
        wt = np.sqrt(np.sum(diff * diff, axis=1)) if diff.shape[1] > 1 else np.sqrt(diff[:, 0] * diff[:, 0])
        out.append((a.ravel(), b.ravel(), wt, a.ravel() * 4 + d))
    return [np.concatenate(c) for c in zip(*out)]


@pytest.mark.parametrize("kind", ["noise", "few levels", "flat patches", "near ties"])
def test_the_graph_is_in_weight_order_equal_weights_by_pixel_then_direction(kind):
    """The packed-key sort gives exactly NumPy's stable order of (weight, code): many equal weights (few grey
    levels, flat patches) and weights equal in their leading bits only (near ties) included."""
    rng = np.random.default_rng(3)
    if kind == "noise":
        img = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    elif kind == "few levels":
        img = (rng.integers(0, 3, (40, 50, 3)) * 100).astype(np.uint8)
    elif kind == "flat patches":
        img = _scene(4, 60, 70)
        img[10:40, 5:50] = 90
    else:
        img = np.repeat(np.repeat(rng.integers(0, 256, (9, 11, 3)), 5, 0), 5, 1).astype(np.uint8)
    for sigma in (0.8, 0.0):
        a, b, w = pixel_graph(img, sigma)
        ra, rb, rw, code = _edges_reference(img, sigma)
        order = np.lexsort((code, rw))
        assert np.array_equal(w, rw[order]) and np.array_equal(a, ra[order]) and np.array_equal(b, rb[order])


def test_equal_leading_bits_are_ordered_by_the_full_weight():
    from sppdet.segmentation import _sorted_weights

    rng = np.random.default_rng(0)
    shift = 20
    base = rng.random(5)
    w = np.concatenate([base + rng.integers(0, 2 ** 18, 5) * 2.0 ** -60 for _ in range(40)])  # ties in 44 bits
    w[::7] = w[3]  # and exact ties
    codes = rng.permutation(2 ** shift)[: len(w)].astype(np.uint64)
    keys = (w.view(np.uint64) & ~np.uint64(2 ** shift - 1)) | codes
    by_code = np.zeros(2 ** shift)
    by_code[codes.astype(np.int64)] = w
    keys.sort()
    ws = _sorted_weights(keys, by_code, shift)
    order = np.lexsort((codes, w))
    assert np.array_equal(ws, w[order]) and np.array_equal(keys & np.uint64(2 ** shift - 1), codes[order])
