import numpy as np
import pytest

from sppdet.evaluation import evaluate_detections, voc_ap_for_class

GT = {"a": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([False, False]))}
DETS = [("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 50, 50, 60, 60), ("a", 0.7, 20, 20, 30, 30)]


def test_golden_ap():
    assert voc_ap_for_class(DETS, GT, use_07_metric=False) == pytest.approx(5 / 6)
    assert voc_ap_for_class(DETS, GT, use_07_metric=True) == pytest.approx(28 / 33)


def test_difficult_match_is_ignored():
    gt = {"a": (GT["a"][0], np.array([False, True]))}
    # detection on the difficult object is neither TP nor FP: only TP 0.9 and FP 0.8 count
    ap = voc_ap_for_class(DETS, gt, use_07_metric=False)
    assert ap == pytest.approx(1.0)


def test_duplicate_is_false_positive():
    dets = [("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 0, 0, 10, 10)]
    gt = {"a": (GT["a"][0][:1], np.array([False]))}
    assert voc_ap_for_class(dets, gt, use_07_metric=False) == pytest.approx(1.0)
    dets = [("a", 0.8, 0, 0, 10, 10), ("a", 0.9, 0, 0, 10, 10), ("a", 0.7, 20, 20, 30, 30)]
    # second detection of object 0 is FP: precision at recall 1 is 2/3
    assert voc_ap_for_class(dets, GT, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_no_detections_and_missing_class():
    assert voc_ap_for_class([], GT) == 0.0
    res = evaluate_detections({0: DETS}, {0: GT, 1: {"a": (np.zeros((0, 4)), np.zeros(0, bool))}}, ["x", "y"])
    assert res["per_class"]["y"]["ap07"] is None
    assert res["map07"] == pytest.approx(28 / 33)


def test_iou_exactly_half_counts():
    gt = {"a": (np.array([[0, 0, 10, 10]], np.float32), np.array([False]))}
    # box [0,0,10,20]: intersection 100, union 200 -> IoU exactly 0.5
    assert voc_ap_for_class([("a", 1.0, 0, 0, 10, 20)], gt) == pytest.approx(1.0)
    assert voc_ap_for_class([("a", 1.0, 0, 0, 10, 20.5)], gt) == 0.0


def test_error_kinds_and_costs_on_a_hand_built_split():
    from sppdet.analysis import classify_detections, error_report

    # image a: class 0 objects at [0,0,10,10] and [20,20,30,30] (difficult); class 1 at [40,0,50,10]
    ann = {"a": (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], np.float32), np.array([0, 0, 1]),
                 np.array([False, True, False])),
           "b": (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))}
    dets0 = [("a", 0.2, 0, 0, 10, 10),    # correct (ranked after the FPs above it)
             ("a", 0.9, 0, 0, 10, 4),     # IoU 0.4 with its class's object: localisation
             ("a", 0.8, 40, 0, 50, 10),   # on the class-1 object: confusion
             ("b", 0.7, 0, 0, 10, 10),    # image without objects: background
             ("a", 0.1, 0, 0, 10, 10),    # second match of the same object: duplicate
             ("a", 0.6, 20, 20, 30, 30)]  # on the difficult object: ignored
    dets, kinds = classify_detections(dets0, 0, ann)
    assert [d[1] for d in dets] == [0.9, 0.8, 0.7, 0.6, 0.2, 0.1]
    assert kinds == ["localisation", "confusion", "background", "ignored", "correct", "duplicate"]
    rep = error_report({0: dets0, 1: [("a", 0.5, 40, 0, 50, 10)]}, ann, ["x", "y"],
                       misses=[(0, "detected"), (1, "detected")])
    x = rep["per_class"]["x"]
    assert x["objects"] == 1 and x["top"] == {"correct": 0, "localisation": 1, "duplicate": 0, "confusion": 0,
                                               "background": 0}
    assert x["ap07"] == pytest.approx(voc_ap_for_class(dets0, {"a": (ann["a"][0][:2], ann["a"][2][:2]),
                                                              "b": (np.zeros((0, 4)), np.zeros(0, bool))}))
    assert x["ap07"] < x["ap07_without"]["localisation"] < x["ap07_without"]["all"] == pytest.approx(1.0)
    assert rep["per_class"]["y"]["ap07"] == pytest.approx(1.0)
    assert rep["summary"]["objects_by_outcome"]["detected"] == 2


def test_miss_reasons_name_the_stage_that_lost_each_object():
    from sppdet.analysis import miss_reasons
    from sppdet.detector import Detections

    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10],
                   [100, 0, 110, 10]], np.float32)
    labels = np.array([0, 0, 0, 0, 0, 1])
    difficult = np.array([False, False, False, False, False, True])
    props = np.array([[0, 0, 10, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10], [200, 0, 210, 10]],
                     np.float32)  # nothing near object 1
    scores = np.array([[1.0, 0], [-2.0, 0], [0.5, 0], [0.8, 0], [0.9, 0]])
    plain = Detections(np.array([[0, 0, 10, 10], [80, 0, 90, 10]], np.float32), np.array([1.0, 0.8]),
                       np.array([0, 0]))
    refined = Detections(np.array([[0, 0, 10, 10], [86, 0, 96, 10]], np.float32), np.array([1.0, 0.8]),
                         np.array([0, 0]))
    got = miss_reasons(gt, labels, difficult, props, scores, plain, refined, score_threshold=-1.5)
    assert got == ["detected", "no proposal", "score below threshold", "suppressed", "lost by box regression"]
    # without box regression the plain detections are the final ones
    assert miss_reasons(gt, labels, difficult, props, scores, plain, None, -1.5)[4] == "detected"


def test_union_nms_lets_the_more_confident_model_suppress_the_other():
    """The paper's combination of two networks: NMS on the union of both models' boxes, per class."""
    from sppdet.detector import Detections, union_nms

    a = Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0.5, 0.4], np.float32),
                   np.array([0, 0]))
    b = Detections(np.array([[1, 1, 11, 11], [0, 0, 10, 10], [100, 0, 110, 10]], np.float32),
                   np.array([0.9, 0.2, 0.3], np.float32), np.array([0, 1, 0]))
    u = union_nms([a, b], nms_iou=0.3)
    kept = sorted((int(k), float(s)) for s, k in zip(u.scores, u.labels))
    # b's 0.9 box suppresses a's 0.5 box of the same class; b's class-1 box over it is another class: kept
    assert kept == [(0, pytest.approx(0.3)), (0, pytest.approx(0.4)), (0, pytest.approx(0.9)), (1, pytest.approx(0.2))]
    assert list(u.scores) == sorted(u.scores, reverse=True)
    # a model combined with itself gives its own detections back
    same = union_nms([a, a], nms_iou=0.3)
    np.testing.assert_array_equal(same.boxes, a.boxes)
    np.testing.assert_array_equal(same.scores, a.scores)
    # the per-class cap, and an image no model detected anything in
    assert len(union_nms([a, b], nms_iou=0.3, max_per_class=1).scores) == 2
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert len(union_nms([empty, empty], nms_iou=0.3).scores) == 0


def test_load_detections_names_the_file_and_the_problem(tmp_path):
    from sppdet.detector import load_detections
    from sppdet.store import ShardError

    p = tmp_path / "detections.npz"
    box = np.array([[0, 0, 10, 10]], np.float32)
    np.savez(p, **{"a/boxes": box, "a/scores": np.array([0.5], np.float32), "a/labels": np.array([1])})
    d = load_detections(p, ["a", "b"], num_classes=2)  # an image without detections is left out
    assert list(d) == ["a"] and d["a"].labels.tolist() == [1]
    with pytest.raises(ValueError, match=r"detections.npz: image a: class index 1 is outside the 1 classes"):
        load_detections(p, ["a"], num_classes=1)
    np.savez(p, **{"a/boxes": box, "a/labels": np.array([0])})
    with pytest.raises(ValueError, match=r"detections.npz: a/scores missing"):
        load_detections(p, ["a"], num_classes=1)
    np.savez(p, **{"a/boxes": box, "a/scores": np.zeros(2, np.float32), "a/labels": np.array([0])})
    with pytest.raises(ValueError, match="unequal lengths"):
        load_detections(p, ["a"], num_classes=1)
    p.write_bytes(b"not a zip")
    with pytest.raises(ShardError, match="detections.npz"):
        load_detections(p, ["a"], num_classes=1)


def test_draw_grid_puts_drawn_images_side_by_side(tmp_path, capsys, load_script):
    """tools/draw_grid.py: images of any size, each fitted into its tile, in rows of --cols; a bad --tile and a
    missing image are one-line errors."""
    import cv2

    from sppdet.images import load_image

    tool = load_script("tools/draw_grid.py")
    paths = []
    for n, (h, w) in enumerate([(60, 200), (300, 100), (50, 50)]):
        im = np.zeros((h, w, 3), np.uint8)
        im[..., n] = 255  # red, green, blue
        paths.append(tmp_path / f"{n}.png")
        cv2.imwrite(str(paths[-1]), im[:, :, ::-1])
    out = tmp_path / "grid.jpg"
    assert tool.main([*map(str, paths), "--out", str(out), "--cols", "2", "--tile", "100x80"]) == 0
    g = load_image(out)
    assert g.shape == (2 * 80 + 4, 2 * 100 + 4, 3)
    assert g[40, 50, 0] > 200 and g[40, 50, 1] < 60       # the red image, fitted in the first tile
    assert g[40, 154, 1] > 200 and g[40, 154, 0] < 60     # the green one in the second
    assert g[84 + 40, 50, 2] > 200 and g[84 + 40, 4].min() > 200  # the blue square, 80 px wide, centred on white
    capsys.readouterr()
    assert tool.main([str(paths[0]), "--out", str(out), "--tile", "100"]) == 2
    assert tool.main([str(tmp_path / "nowhere.png"), "--out", str(out)]) == 2
    assert "nowhere.png" in capsys.readouterr().err
    assert tool.main([str(paths[0]), "--out", str(tmp_path / "grid.gif")]) == 2
    assert tool.main([str(paths[0]), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
