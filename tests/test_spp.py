import math

import numpy as np
import pytest
import torch

from sppdet.spp import SpatialPyramidPooling, bin_edges, paper_window_stride, project_boxes_to_cells, spp_output_dim
from sppdet.window_pool import pool_windows


def reference_spp(x: np.ndarray, levels, mode):
    """Slow float64 loop over the floor/ceil bins."""
    n_, c_, h, w = x.shape
    out = []
    for n in levels:
        lv = np.zeros((n_, c_, n, n))
        for i in range(n):
            y0, y1 = math.floor(i * h / n), math.ceil((i + 1) * h / n)
            for j in range(n):
                x0, x1 = math.floor(j * w / n), math.ceil((j + 1) * w / n)
                patch = x[:, :, y0:y1, x0:x1]
                lv[:, :, i, j] = patch.max(axis=(2, 3)) if mode == "max" else patch.mean(axis=(2, 3))
        out.append(lv.reshape(n_, -1))
    return np.concatenate(out, 1)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_matches_loop_reference_for_all_sizes(mode):
    rng = np.random.default_rng(0)
    levels = (1, 2, 3, 4, 6)
    layer = SpatialPyramidPooling(levels, mode)
    for a in range(1, 41):
        for b in range(1, 41):
            x = rng.standard_normal((1, 2, a, b))
            got = layer(torch.from_numpy(x)).numpy()
            assert got.shape == (1, 2 * sum(n * n for n in levels))
            np.testing.assert_allclose(got, reference_spp(x, levels, mode), rtol=1e-12, atol=1e-12)


def test_golden_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert SpatialPyramidPooling((2, 1))(x).tolist() == [[5, 7, 13, 15, 15]]
    assert SpatialPyramidPooling((2, 1), "avg")(x).tolist() == [[2.5, 4.5, 10.5, 12.5, 7.5]]


def test_output_layout_and_dim():
    x = torch.randn(3, 5, 13, 9)
    y = SpatialPyramidPooling((6, 3, 2, 1))(x)
    assert y.shape == (3, spp_output_dim(5, (6, 3, 2, 1))) == (3, 250)
    # level order and (C, n, n) flattening: the last level is the global max per channel
    assert torch.equal(y[:, -5:], x.amax(dim=(2, 3)))
    assert spp_output_dim(256, (6, 3, 2, 1)) == 12800


def test_gradcheck():
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    for mode in ("max", "avg"):
        assert torch.autograd.gradcheck(SpatialPyramidPooling((3, 2, 1), mode), (x,))


def test_bad_arguments():
    with pytest.raises(ValueError):
        SpatialPyramidPooling((0, 1))
    with pytest.raises(ValueError):
        SpatialPyramidPooling((2,), "median")
    with pytest.raises(ValueError):
        SpatialPyramidPooling()(torch.zeros(2, 3, 4))


def test_bins_cover_and_count():
    for a in range(1, 30):
        for n in (1, 2, 3, 4, 6, 7):
            e = bin_edges(a, n)
            assert len(e) == n and e[0][0] == 0 and e[-1][1] == a
            assert all(lo < hi for lo, hi in e)


def test_paper_window_stride_breaks():
    assert paper_window_stride(13, 4) == (4, 3, 4)
    assert paper_window_stride(13, 6) == (3, 2, 6)
    assert paper_window_stride(7, 4)[2] == 6
    assert paper_window_stride(10, 6)[2] == 9
    assert paper_window_stride(11, 4)[2] == 5
    win, stride, produced = paper_window_stride(3, 4)
    assert stride == 0 and produced == 0


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_windows_equals_spp_on_crops(mode):
    g = torch.Generator().manual_seed(0)
    fmap = torch.rand(4, 17, 23, generator=g)
    cells = torch.tensor([[0, 0, 22, 16], [3, 4, 3, 4], [5, 2, 9, 15], [20, 10, 22, 11], [0, 16, 22, 16]])
    levels = (6, 3, 2, 1)
    got = pool_windows(fmap, cells, levels, mode)
    layer = SpatialPyramidPooling(levels, mode)
    for r, (l, t, rr, b) in enumerate(cells.tolist()):
        ref = layer(fmap[None, :, t:b + 1, l:rr + 1])[0]
        torch.testing.assert_close(got[r], ref, rtol=1e-6, atol=1e-6)
    assert pool_windows(fmap, torch.zeros((0, 4), dtype=torch.int64), levels).shape == (0, 200)


@pytest.mark.parametrize("method", ["sparse_table", "roi_pool"])
def test_deep_channels_pooled_with_their_own_pyramid(method):
    """``deep=(first, levels)`` (a hypercolumn's coarse channels, ``features.deep_levels``): the channels before
    ``first`` with the pyramid, then those from ``first`` with theirs, in the layer, the window pooling (every
    method, several maps, into an ``out``) and the output size alike."""
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(7, h, w, generator=g).half() for h, w in ((11, 13), (19, 25))]
    cells = torch.tensor([[0, 0, 12, 10], [3, 4, 3, 4], [5, 2, 9, 10], [2, 1, 24, 18], [0, 18, 24, 18]])
    sidx = torch.tensor([0, 0, 1, 1, 1])
    levels, deep = (6, 3, 2, 1), (3, (3, 1))
    dim = spp_output_dim(7, levels, deep)
    assert dim == 3 * 50 + 4 * 10
    out = torch.full((5, dim), float("nan"))
    got = pool_windows(maps, cells, levels, method=method, map_index=sidx, out=out, deep=deep)
    assert got is out and not torch.isnan(got).any()
    layer = SpatialPyramidPooling(levels, deep=deep)
    assert layer.output_dim(7) == dim
    for r, (l, t, rr, b) in enumerate(cells.tolist()):
        crop = maps[int(sidx[r])].float()[None, :, t:b + 1, l:rr + 1]
        torch.testing.assert_close(got[r], layer(crop)[0], rtol=0, atol=0)
        ref = torch.cat([SpatialPyramidPooling(levels)(crop[:, :3])[0], SpatialPyramidPooling((3, 1))(crop[:, 3:])[0]])
        assert torch.equal(got[r], ref)
    with pytest.raises(ValueError, match="deep channels must start inside the map"):
        pool_windows(maps, cells, levels, map_index=sidx, deep=(7, (1,)))
    with pytest.raises(ValueError, match="out must be"):
        pool_windows(maps, cells, levels, map_index=sidx, deep=deep, out=torch.empty(5, 7 * 50))


@pytest.mark.parametrize("shape", [(3, 1, 1), (5, 1, 40), (4, 3, 9), (6, 37, 53)])
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 2, 1), (5, 3, 1), (1,), (7,), (6, 4, 3, 2, 1), (1, 8, 2)])
def test_sparse_table_pooling_equals_roi_pool(shape, levels):
    g = torch.Generator().manual_seed(sum(shape) + sum(levels))
    c, h, w = shape
    fmap = torch.randn(c, h, w, generator=g)
    r = 300
    l = torch.randint(0, w, (r,), generator=g)
    t = torch.randint(0, h, (r,), generator=g)
    rr = torch.minimum(l + torch.randint(0, w, (r,), generator=g), torch.tensor(w - 1))
    b = torch.minimum(t + torch.randint(0, h, (r,), generator=g), torch.tensor(h - 1))
    cells = torch.stack([l, t, rr, b], 1)
    fast = pool_windows(fmap, cells, levels)  # sparse table, the default
    ref = pool_windows(fmap, cells, levels, method="roi_pool")
    assert torch.equal(fast, ref)
    # a float16 map (the cache's dtype) is pooled in float16: exact, float32 out
    half = pool_windows(fmap.half(), cells, levels)
    assert half.dtype == torch.float32 and torch.equal(half, pool_windows(fmap.half().float(), cells, levels, "max", "roi_pool"))


def _random_cells(maps, sidx, g, extent=None):
    """Random inclusive cell windows ``(R, 4)`` inside the map ``sidx`` gives each (at most ``extent`` + 1 cells a
    side when given)."""
    cells = torch.zeros((len(sidx), 4), dtype=torch.int64)
    for s, m in enumerate(maps):
        h, w = m.shape[-2:]
        sel = sidx == s
        k = int(sel.sum())
        l, t = torch.randint(0, w, (k,), generator=g), torch.randint(0, h, (k,), generator=g)
        rr = torch.minimum(l + torch.randint(0, extent or w, (k,), generator=g), torch.tensor(w - 1))
        b = torch.minimum(t + torch.randint(0, extent or h, (k,), generator=g), torch.tensor(h - 1))
        cells[sel] = torch.stack([l, t, rr, b], 1)
    return cells


def test_pooling_several_maps_in_one_call_equals_one_map_at_a_time():
    """Scales pooled together (one stacked table, windows in their own order) give each window
    exactly what pooling its own map alone gives; channels-last maps and a reused ``out`` too."""
    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(8, h, w, generator=g).half() for h, w in ((9, 14), (23, 31), (40, 52))]
    maps[1] = maps[1][None].contiguous(memory_format=torch.channels_last)[0]  # a conv output's layout
    r, levels = 500, (6, 3, 2, 1)
    sidx = torch.randint(0, 3, (r,), generator=g)
    cells = _random_cells(maps, sidx, g)
    out = torch.full((r, 8 * 50), float("nan"))
    got = pool_windows(maps, cells, levels, map_index=sidx, out=out)
    assert got is out
    ref = pool_windows(maps, cells, levels, method="roi_pool", map_index=sidx)
    assert torch.equal(got, ref)
    for s, m in enumerate(maps):
        sel = sidx == s
        assert torch.equal(got[sel], pool_windows(m, cells[sel], levels))
    first = got.clone()
    pool_windows(maps[2], cells[sidx == 2], levels)  # reuses the scratch buffers, not the caller's output
    assert torch.equal(got, first)
    with pytest.raises(ValueError, match="map_index"):
        pool_windows(maps, cells, levels)
    with pytest.raises(ValueError, match="out must be"):
        pool_windows(maps, cells, levels, map_index=sidx, out=torch.empty(3, 3))


def test_pool_windows_rejects_windows_outside_the_map():
    fmap = torch.rand(2, 5, 6)
    for bad in ([0, 0, 6, 4], [-1, 0, 2, 2], [3, 0, 2, 2], [0, 0, 1, 5]):
        with pytest.raises(ValueError, match="cell windows must satisfy"):
            pool_windows(fmap, torch.tensor([bad]))
    with pytest.raises(ValueError, match="method"):
        pool_windows(fmap, torch.tensor([[0, 0, 1, 1]]), method="nope")


def test_projection_hand_worked():
    # ZF-5: stride 16, cell j centred at pixel 16j + 20, shrink 6.5 (authors' offset0 21, offset 6.5)
    prj = lambda b, hw=(40, 40): project_boxes_to_cells(torch.tensor([b], dtype=torch.float32), hw, 16, 20, 6.5)[0].tolist()  # noqa: E731
    # x1 = 0: floor((0-20+6.5)/16+0.5) = floor(-0.34) = -1 -> clamped 0; x2 = 224: ceil((223-20-6.5)/16-0.5)= ceil(11.78)=12
    assert prj([0, 0, 224, 224]) == [0, 0, 12, 12]
    # authors' 1-based formula on the same box: l = floor((1-21+6.5)/16+0.5)+1 = 0 -> 1-based 0 clamps to 1
    # box [100, 50, 300, 200]: l = floor((100-13.5)/16+0.5)=floor(5.906)=5; t = floor((50-13.5)/16+0.5)=floor(2.78)=2
    # r = ceil((299-26.5)/16-0.5)=ceil(16.53)=17; b = ceil((199-26.5)/16-0.5)=ceil(10.28)=11
    assert prj([100, 50, 300, 200]) == [5, 2, 17, 11]
    # a tiny box collapses to one cell: l = floor((100-13.5)/16+.5)=5, r = ceil((109-26.5)/16-.5)=ceil(4.66)=5
    assert prj([100, 100, 110, 110]) == [5, 5, 5, 5]
    # collapsed with l > r: [100,100,104,104] -> l=5, r=ceil((103-26.5)/16-.5)=ceil(4.28)=5 ; [90,90,95,95] -> l=5, r=4 -> 4
    assert prj([90, 90, 95, 95]) == [4, 4, 4, 4]
    # beyond the border: clamped to the last cell
    # l = floor((600-13.5)/16+.5) = 37 -> clamped to W-1 = 29; t = 37 fits H = 40; r, b = 55 -> 29, 39
    assert prj([600, 600, 900, 900], (40, 30)) == [29, 37, 29, 39]


def test_projection_matches_authors_one_based_formula():
    rng = np.random.default_rng(1)
    boxes = rng.uniform(0, 600, (500, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(1, 300, (500, 2))], 1)
    boxes = np.floor(boxes)
    got = project_boxes_to_cells(torch.tensor(boxes), (60, 60), 16, 20, 6.5).numpy()
    # authors (1-based pixels, 1-based cells): x1_1b = x1 + 1, x2_1b = x2 (inclusive last pixel)
    x1, x2 = boxes[:, 0] + 1, boxes[:, 2]
    l = np.floor((x1 - 21 + 6.5) / 16 + 0.5) + 1
    r = np.ceil((x2 - 21 - 6.5) / 16 - 0.5) + 1
    m = l > r
    mid = np.floor((l + r) / 2)
    l, r = np.where(m, mid, l), np.where(m, mid, r)
    l, r = np.clip(l, 1, 60), np.clip(r, 1, 60)
    np.testing.assert_array_equal(got[:, 0], l - 1)
    np.testing.assert_array_equal(got[:, 2], r - 1)


def test_floor_ceil_bins_of_one_window_differ_by_at_most_one_cell():
    # what lets the sparse table use one block size per window and axis
    from sppdet.window_pool import _edges

    size = torch.arange(1, 301)
    for n in range(1, 14):
        start, end = _edges(torch.zeros_like(size), size, n)
        widths = end - start
        assert bool((widths.max(1).values - widths.min(1).values <= 1).all()), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_few_windows_read_cell_by_cell_equal_the_sparse_tables_and_roi_pool(dtype):
    """Fine-tuning's few windows per image are pooled by reading their cells (sppdet.bin_max), chosen by their
    total area: exactly the sparse tables' and roi_pool's values, over negative values, -0.0 and every
    bin size, with several maps (one channels-last) and windows in any order."""
    from sppdet import bin_max, window_pool

    g = torch.Generator().manual_seed(11)
    maps = [torch.randn(9, h, w, generator=g).to(dtype) for h, w in ((13, 17), (30, 41))]
    maps[0][:, 2:5, 3:6] = -0.0
    maps[1][:, :4] = -torch.rand(9, 4, 41, generator=g).to(dtype) - 1  # bins of negative values only
    maps[1] = maps[1][None].contiguous(memory_format=torch.channels_last)[0]
    r = 24
    sidx = torch.randint(0, 2, (r,), generator=g)
    cells = _random_cells(maps, sidx, g, extent=14)
    cells[0] = torch.tensor([3, 2, 5, 4])  # a window of -0.0 only
    sidx[0] = 0
    assert bin_max.direct_is_cheaper(maps, cells, sidx)
    levels = (6, 3, 2, 1)
    got = pool_windows(maps, cells, levels, map_index=sidx)
    assert torch.equal(got, pool_windows(maps, cells, levels, method="roi_pool", map_index=sidx))
    assert torch.equal(got[0], torch.zeros(9 * 50))
    ns = (6, 4, 1)  # several levels from one keying of each map
    outs = bin_max.direct_bins_max(maps, cells, sidx, ns, [torch.empty((r, n, n, 9), dtype=dtype) for n in ns])
    for n, direct in zip(ns, outs):
        tables = window_pool._sparse_table_max(maps, cells, sidx, n, "check")
        assert torch.equal(direct.float(), tables.float())  # the same values (-0.0 and +0.0 compare equal)
    # levels of which two divide no finer one (4 and 3) are both read directly
    odd = (4, 3, 2, 1)
    assert torch.equal(pool_windows(maps, cells, odd, map_index=sidx),
                       pool_windows(maps, cells, odd, method="roi_pool", map_index=sidx))
    # many windows (the SVM and test stages' 2000 per image) stay with the tables, float32 and GPU maps too
    many = cells.repeat(400, 1)
    assert not bin_max.direct_is_cheaper(maps, many, sidx.repeat(400))
    assert torch.equal(pool_windows(maps, many, levels, map_index=sidx.repeat(400)), got.repeat(400, 1))
    assert not bin_max.direct_is_cheaper([m.float() for m in maps], cells, sidx)
