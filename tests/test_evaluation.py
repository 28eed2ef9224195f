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
