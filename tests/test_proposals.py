import warnings

import numpy as np
import pytest

from sppdet.boxes import iou_matrix
from sppdet.proposals import (ProposalStore, finalize_boxes, compute_proposals, load_demo_boxes, load_precomputed_mat, propose)
from sppdet.store import StaleCacheError


def rect_image():
    rng = np.random.default_rng(0)
    img = np.full((200, 260, 3), 30, np.uint8)
    gt = np.array([[10, 20, 90, 120], [120, 40, 250, 100], [60, 140, 200, 190]], np.float32)
    cols = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
    for (x1, y1, x2, y2), c in zip(gt.astype(int), cols):
        img[y1:y2, x1:x2] = c
    img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    return img, gt


def test_fast_recovers_flat_rectangles():
    img, gt = rect_image()
    boxes = propose(img, backend="fast")
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert (iou_matrix(gt, boxes).max(1) >= 0.7).all()


def test_fast_in_threads_gives_the_same_boxes_and_is_left_out_of_the_record():
    """``workers``: the colour spaces in threads (Predictor's default on machines with spare cores); the boxes are
    the same, so the proposal store's recorded parameters do not change with it."""
    from sppdet.proposals import resolved_params
    from sppdet.selective_search import selective_search_timed

    img, _ = rect_image()
    rng = np.random.default_rng(1)
    img = np.clip(img.astype(int) + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)  # more regions
    one = propose(img, backend="fast", max_boxes=0)
    assert np.array_equal(propose(img, backend="fast", max_boxes=0, workers=3), one)
    timing = {}
    assert np.array_equal(selective_search_timed(img, timing=timing, workers=2), selective_search_timed(img))
    assert set(timing) == {"conversions", "segmentation", "regions", "grouping", "ranking"}
    assert all(v >= 0 for v in timing.values()) and timing["grouping"] > 0
    assert resolved_params("fast", {"workers": 3}) == resolved_params("fast", {})


def test_similarity_sets_are_letters_of_ctsf():
    img, gt = rect_image()
    for sets in (("f",), ("s",), ("ctsf", "tsf", "f", "s")):
        boxes = propose(img, backend="fast", similarity_sets=sets)
        assert (iou_matrix(gt, boxes).max(1) >= 0.7).all(), sets
    # More hierarchies add boxes (before the cap): the default's four sets give at least fast mode's two.
    n_fast = len(propose(img, backend="fast", max_boxes=0, similarity_sets=("ctsf", "tsf")))
    assert len(propose(img, backend="fast", max_boxes=0)) >= n_fast
    with pytest.raises(ValueError, match="similarity set 'cx'"):
        propose(img, backend="fast", similarity_sets=("cx",))


def test_backends_agree_on_format():
    img, gt = rect_image()
    small = img[::2, ::2].copy()
    for backend in ("fast", "selectivesearch"):
        b = propose(small, backend=backend, max_boxes=50, min_size=5, ks=(50,))
        assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4 and 1 <= len(b) <= 50
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= small.shape[1]).all() and (b[:, 3] <= small.shape[0]).all()
        assert (b[:, 2] - b[:, 0] >= 5).all()
        assert len(np.unique(b, axis=0)) == len(b)
    with pytest.raises(ValueError, match="unknown proposal backend"):
        propose(small, backend="magic")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_selectivesearch_repairs_are_scoped_and_correct():
    import selectivesearch.selectivesearch as ss

    from sppdet.selective_search import _repaired_selectivesearch

    before = (ss._calc_colour_hist, ss._calc_texture_hist, ss._extract_neighbours)
    img, gt = rect_image()
    lab = np.zeros((4, 6), np.int64)
    lab[:, 3:] = 1
    lab[3, :2] = 2  # 2 touches 0 only; 1 and 2 share no edge, though their boxes overlap
    with _repaired_selectivesearch():
        hsv = np.random.default_rng(0).uniform(0, 1, (100, 3))
        assert np.count_nonzero(ss._calc_colour_hist(hsv)) > 30  # the package's own put all in bin 0
        ss._extract_regions(np.dstack([np.zeros((4, 6, 3)), lab]).astype(np.float64))
        regions = {k: {} for k in range(3)}
        pairs = {(a[0], b[0]) for a, b in ss._extract_neighbours(regions)}
        assert pairs == {(0, 1), (0, 2)}
        b = propose(img[::2, ::2].copy(), backend="selectivesearch", ks=(50,), min_size=5)
    assert (ss._calc_colour_hist, ss._calc_texture_hist, ss._extract_neighbours) == before
    assert (iou_matrix(gt / 2, b).max(1) >= 0.7).all()


def test_degenerate_images_never_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for img in (np.zeros((1, 300, 3), np.uint8), np.full((64, 64), 128, np.uint8), np.zeros((5, 5, 4), np.uint8)):
            b = propose(img)
            assert b.shape[1] == 4 and len(b) >= 1
    b = propose(np.zeros((1, 300, 3), np.uint8))
    assert (b[:, 3] == 1).all() and (b[:, 1] == 0).all()
    with pytest.warns(UserWarning, match="whole image"):
        b = finalize_boxes(np.zeros((0, 4)), 300, 1, 20, 2000)
    np.testing.assert_array_equal(b, [[0, 0, 300, 1]])


def test_large_image_is_processed_downscaled():
    img = np.random.default_rng(0).integers(0, 255, (60, 2000, 3), dtype=np.uint8)
    b = propose(img, max_boxes=100)
    assert (b[:, 2] <= 2000).all() and b[:, 2].max() > 1000


def test_demo_mat_conversion(voc_sample):
    from sppdet.voc import read_annotation

    ss = voc_sample.parents[1] / "selective_search"
    for image_id, n in (("000004", 2888), ("001551", 2057)):
        b = load_demo_boxes(ss / f"{image_id}_boxes.mat")
        a = read_annotation(voc_sample / "Annotations" / f"{image_id}.xml")
        assert len(b) == n
        assert b[:, 0].min() >= 0 and b[:, 1].min() >= 0
        assert b[:, 2].max() <= a.width and b[:, 3].max() <= a.height
        assert b[:, 2].max() == a.width or b[:, 3].max() == a.height  # some box reaches the border
        assert iou_matrix(a.boxes, b).max(1).mean() > 0.6


def test_precomputed_cell_mat(tmp_path):
    from scipy.io import savemat

    boxes = np.empty((2,), dtype=object)
    boxes[0] = np.array([[1, 1, 10, 20], [5, 6, 7, 8]], np.float64)  # y1 x1 y2 x2, 1-based inclusive
    boxes[1] = np.array([[2, 3, 4, 5]], np.float64)
    images = np.empty((2,), dtype=object)
    images[0], images[1] = "000001", "000002"
    savemat(tmp_path / "voc_2007_test.mat", {"boxes": boxes, "images": images})
    d = load_precomputed_mat(tmp_path / "voc_2007_test.mat")
    np.testing.assert_array_equal(d["000001"], [[0, 0, 20, 10], [5, 4, 8, 7]])
    np.testing.assert_array_equal(d["000002"], [[2, 1, 5, 4]])


def test_store_resume_and_invalidation(toy_voc, tmp_path):
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    ds = VOCDataset(toy_voc, "val", TOY_CLASSES)
    out = tmp_path / "props"
    kw = dict(backend="fast", max_boxes=300, min_size=10, params={"ks": [100]}, workers=1, progress=False)
    m = compute_proposals(ds.ids, ds.image_path, out, **kw)
    assert m["complete"] and m["items"] == len(ds.ids)
    first = ProposalStore(out).load(ds.ids[0])
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    # simulate an interrupted run: one shard missing; resume recomputes only that one
    (out / f"{ds.ids[0]}.npz").unlink()
    m = compute_proposals(ds.ids, ds.image_path, out, **kw)
    assert m["new_images"] == 1
    np.testing.assert_array_equal(ProposalStore(out).load(ds.ids[0]), first)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.stem != ds.ids[0])
    with pytest.raises(StaleCacheError, match="max_boxes"):
        compute_proposals(ds.ids, ds.image_path, out, **{**kw, "max_boxes": 100})
    m = compute_proposals(ds.ids, ds.image_path, out, overwrite=True, **{**kw, "max_boxes": 100})
    assert len(ProposalStore(out).load(ds.ids[0])) <= 100


def test_store_records_the_backend_defaults(toy_voc, tmp_path, monkeypatch):
    """A default of the backend that changes between versions is a changed parameter, not a silent reuse."""
    import sppdet.proposals as P
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    ds = VOCDataset(toy_voc, "val", TOY_CLASSES)
    ids = ds.ids[:2]
    kw = dict(backend="fast", max_boxes=300, params={"ks": [100]}, workers=1, progress=False)
    m = compute_proposals(ids, ds.image_path, tmp_path / "p", **kw)
    params = m["config"]["params"]
    assert params["ks"] == [100] and params["colour_spaces"] == list(P.fast_selective_search.__defaults__[0])
    assert "workers" not in P.resolved_params("selectivesearch", {"workers": 2})
    defaults = P.fast_selective_search.__defaults__
    monkeypatch.setattr(P.fast_selective_search, "__defaults__", (("hsv",),) + defaults[1:])
    with pytest.raises(StaleCacheError, match="colour_spaces"):
        compute_proposals(ids, ds.image_path, tmp_path / "p", **kw)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) colour_space for .*known: colour_spaces"):
        compute_proposals(ids, ds.image_path, tmp_path / "q", **{**kw, "params": {"colour_space": ["hsv"]}})


def _greedy_reference(b: np.ndarray, t: float) -> list[int]:
    taken: list[int] = []
    for i in range(len(b)):
        if not taken or iou_matrix(b[i:i + 1], b[taken]).max() <= t:
            taken.append(i)
    return taken


def test_the_cap_takes_a_spread_of_boxes_first_then_fills_in_rank_order():
    from sppdet.boxes import diverse_first

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (400, 2))
    b = np.concatenate([xy, xy + rng.uniform(20, 120, (400, 2))], 1).astype(np.float32)
    b[100:200] = b[:100] + rng.uniform(-2, 2, (100, 4)).astype(np.float32)  # near-copies of better-ranked boxes
    spread = _greedy_reference(b, 0.7)
    assert 0 < len(spread) < 350
    order = diverse_first(b, 350, 0.7)  # more room than the spread: it comes first, the rest after in rank order
    assert order.tolist() == spread + [i for i in range(400) if i not in set(spread)][:350 - len(spread)]
    assert diverse_first(b, 50, 0.7).tolist() == spread[:50]  # less room: the greedy pass stops when it is full
    assert diverse_first(b, 0, 0.7).shape == (0,) and diverse_first(b[:0], 10, 0.7).shape == (0,)
    # finalize_boxes: only a photo over the cap changes; the best-ranked box is always kept first
    assert np.array_equal(finalize_boxes(b, 400, 400, 0, 500, cap_nms=0.7), finalize_boxes(b, 400, 400, 0, 500))
    capped = finalize_boxes(b, 400, 400, 0, 50, cap_nms=0.7)
    iou = iou_matrix(capped, capped)
    np.fill_diagonal(iou, 0)
    assert len(capped) == 50 and np.array_equal(capped[0], b[0]) and iou.max() <= 0.7
    assert np.array_equal(finalize_boxes(b, 400, 400, 0, 50), b[:50])


def test_cap_nms_is_recorded_and_a_folder_from_before_counts_as_rank_order(toy_voc, tmp_path):
    import json

    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    ds = VOCDataset(toy_voc, "val", TOY_CLASSES)
    ids = ds.ids[:2]
    kw = dict(backend="fast", max_boxes=20, params={"ks": [100]}, workers=1, progress=False)
    m = compute_proposals(ids, ds.image_path, tmp_path / "p", **kw)
    assert m["config"]["cap_nms"] == 0.0
    manifest = tmp_path / "p" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["config"]["cap_nms"]  # as written before the key existed
    manifest.write_text(json.dumps(old))
    assert compute_proposals(ids, ds.image_path, tmp_path / "p", **kw)["new_images"] == 0
    with pytest.raises(StaleCacheError, match="cap_nms"):
        compute_proposals(ids, ds.image_path, tmp_path / "p", cap_nms=0.7, **kw)
    m = compute_proposals(ids, ds.image_path, tmp_path / "p", cap_nms=0.7, overwrite=True, **kw)
    boxes = ProposalStore(tmp_path / "p").load(ids[0])
    assert m["config"]["cap_nms"] == 0.7 and len(boxes) == 20


def test_warm_up_loads_selective_search_without_torch():
    """detect.py starts the warm-up before torch is imported, so the two overlap: importing selective search must
    not import torch, and the warm-up thread is started once and runs the compiled code to the end."""
    import subprocess
    import sys

    code = ("import sys; import sppdet.selective_search as ss; assert 'torch' not in sys.modules, 'torch imported'; "
            "t = ss.start_warm_up(); assert ss.start_warm_up() is t; t.join(); assert 'torch' not in sys.modules; "
            "assert ss.warm_up() > 0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


def test_default_workers_follow_the_cores_this_process_may_use(toy_voc, tmp_path, monkeypatch):
    """``proposals.workers: 0`` starts one process per core of the process's CPU affinity (a container or taskset
    may allow fewer than ``os.cpu_count()``): on one allowed core no pool is started at all."""
    import os

    import sppdet.proposals as P
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    if hasattr(os, "sched_getaffinity"):
        assert P.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(P.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(P, "usable_cores", lambda: 1)

    def no_pool(*a, **k):
        raise AssertionError("a process pool was started on one usable core")

    monkeypatch.setattr(P, "ProcessPoolExecutor", no_pool)
    ds = VOCDataset(toy_voc, "val", TOY_CLASSES)
    m = P.compute_proposals(ds.ids[:2], ds.image_path, tmp_path / "p", backend="fast", max_boxes=50,
                            params={"ks": [100]}, workers=0, progress=False)
    assert m["complete"] and m["items"] == 2
