"""Scoring, box regression and per-class NMS for one image (from cached or fresh conv5)."""

from __future__ import annotations

import copy

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .bbox_reg import BoxRegressor
from .boxes import BOX_STDS, clip_boxes, decode, nms, soft_nms
from .config import FeatureConfig, TestConfig
from .features import FeatureCache, ImageFeatures, conv5_maps
from .models import FCHead, fc_features, resolve_precision, truncated_svd_linear
from .store import load_npz

__all__ = ["Detections", "Detector", "HeadBoxRegressor", "WindowRows", "compete_classes", "load_detections", "load_svms",
           "union_nms"]


@dataclass
class Detections:
    """``boxes`` (N, 4) original-image xyxy, ``scores`` (N,), ``labels`` (N,) class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def to_json(self, classes: Sequence[str]) -> list[dict]:
        return [{"class": classes[int(k)], "score": float(s), "box": [float(v) for v in b]}
                for b, s, k in zip(self.boxes, self.scores, self.labels)]


def load_detections(path: str | Path, ids: Sequence[str], num_classes: int) -> dict[str, Detections]:
    """A ``detections.npz`` (``<id>/boxes``, ``<id>/scores``, ``<id>/labels``, as the test stage writes it)
    for the images ``ids`` it has; a corrupt file, a label outside ``[0, num_classes)`` or detections of images
    that are not among ``ids`` (another split's) is an error naming it."""
    d = load_npz(path)
    known = set(ids)
    foreign = sorted({k.rsplit("/", 1)[0] for k in d if "/" in k} - known)
    if foreign:
        raise ValueError(f"{path}: {len(foreign)} image(s) with detections are not in the split being scored "
                         f"(e.g. {', '.join(foreign[:3])}): detections of another split?")
    out = {}
    for i in ids:
        if f"{i}/boxes" not in d:
            continue
        missing = [f"{i}/{f}" for f in ("scores", "labels") if f"{i}/{f}" not in d]
        if missing:
            raise ValueError(f"{path}: {', '.join(missing)} missing beside {i}/boxes")
        det = Detections(d[f"{i}/boxes"].reshape(-1, 4), d[f"{i}/scores"], d[f"{i}/labels"].astype(np.int64))
        bad = det.labels[(det.labels < 0) | (det.labels >= num_classes)]
        if len(bad) or not len(det.boxes) == len(det.scores) == len(det.labels):
            problem = (f"class index {int(bad[0])} is outside the {num_classes} classes" if len(bad)
                       else "boxes, scores and labels have unequal lengths")
            raise ValueError(f"{path}: image {i}: {problem}")
        out[i] = det
    return out


def load_svms(path: str | Path) -> dict:
    d = load_npz(path, ("W", "b", "feature_scale", "layer", "classes", "feature"))
    # ``trained``: False for a class that had no training positives (files from before it was saved: all True).
    trained = d["trained"].astype(bool) if "trained" in d else np.ones(len(d["W"]), bool)
    return {"W": d["W"].astype(np.float32), "b": d["b"].astype(np.float32), "feature_scale": float(d["feature_scale"]),
            "layer": str(d["layer"]), "feature": str(d["feature"]), "classes": [str(c) for c in d["classes"]],
            "trained": trained}


SOFT_NMS_POWER = {"linear": 1.0, "quadratic": 2.0}  # test.nms_method's soft-NMS decays: (1 - IoU) ** power


def select_class(boxes: np.ndarray, scores: np.ndarray, thresh: float, nms_iou: float, method: str = "hard",
                 limit: int = 0, floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, scores)`` of the windows scoring above ``thresh`` that survive NMS at ``nms_iou``, best first:
    ``method`` "hard" (greedy NMS; the scores as they were), "linear" or "quadratic" (soft-NMS with the factor
    ``1 - IoU`` or its square, :func:`sppdet.boxes.soft_nms`: overlapping windows kept with lowered scores while
    above ``thresh``, at most ``limit`` when > 0). Soft-NMS lowers scores towards ``floor`` (None: ``thresh``; the
    evaluation threshold, so that a drawing threshold above it does not change how far a duplicate's score
    falls)."""
    keep = np.nonzero(scores > thresh)[0]
    if len(keep) == 0:
        return keep, scores[keep]
    if method == "hard":
        k = keep[nms(boxes[keep], scores[keep], nms_iou)]
        return k, scores[k]
    if method not in SOFT_NMS_POWER:
        raise ValueError(f"NMS method must be 'hard', {' or '.join(map(repr, SOFT_NMS_POWER))}, got {method!r}")
    k, s = soft_nms(boxes[keep], scores[keep], nms_iou, thresh if floor is None else min(floor, thresh), limit,
                    SOFT_NMS_POWER[method])
    above = s > thresh  # picked best first, so those still above the threshold lead
    return keep[k[above]], s[above]


def compete_classes(scores: np.ndarray, weight: float) -> np.ndarray:
    """SVM margins ``(R, K)`` with each window's margin for a class lowered by ``weight`` times the amount by which
    the best other class's margin for the same window exceeds it: ``s_k - weight * max(0, max_{j != k} s_j - s_k)``.
    The papers' per-class SVMs score every class on its own, so an apple also scoring as an orange ranks among the
    oranges; here it ranks below the oranges that no other class beats. A window's best class is unchanged; 0 (or
    one class): the scores as given. Classes without an SVM (``-inf``) stay at ``-inf`` and lower nothing."""
    if weight <= 0 or scores.ndim != 2 or scores.shape[1] < 2 or len(scores) == 0:
        return scores
    top2 = -np.partition(-scores, 1, axis=1)[:, :2]  # per window its best and second-best margins
    other = np.where(scores >= top2[:, :1], top2[:, 1:], top2[:, :1])  # the best margin among the other classes
    with np.errstate(invalid="ignore"):
        gap = np.where(np.isfinite(scores) & np.isfinite(other), np.maximum(other - scores, 0), 0)
    return (scores - np.asarray(weight, scores.dtype) * gap).astype(scores.dtype, copy=False)


def class_detections(proposals: np.ndarray, scores: np.ndarray, thresh: float, test, regress=None,
                     size: tuple[int, int] | None = None, regress_first: bool | None = None,
                     floor: float | None = None, competition: float = 0.0) -> tuple[list, list]:
    """Per class, ``(plain, refined)`` lists of ``(boxes, scores, k)`` best first: the windows above ``thresh``
    through NMS (``test.nms``, ``test.nms_method``); with ``regress(k, indices) -> boxes`` also the regressed ones
    clipped to ``size`` (H, W): the windows NMS kept regressed and NMS again, or with ``regress_first`` (None:
    ``test.regress_first``) every window above ``thresh`` regressed and NMS once. The per-class and per-image
    caps are :func:`cap_detections`'. ``floor``: soft-NMS's (:func:`select_class`). ``competition``: the SVM
    margins first through :func:`compete_classes` with that weight (``test.class_competition``; softmax scores
    compete already)."""
    scores = compete_classes(scores, competition)
    first = test.regress_first if regress_first is None else regress_first
    limit = max(test.max_per_class, 0)
    plain, refined = [], []
    for k in range(scores.shape[1]):
        keep, s = select_class(proposals, scores[:, k], thresh, test.nms, test.nms_method, limit, floor)
        if len(keep):
            plain.append((proposals[keep], s, k))
        if regress is None:
            continue
        src = np.nonzero(scores[:, k] > thresh)[0] if first else keep
        if len(src) == 0:
            continue
        rb = clip_boxes(regress(k, src), size[1], size[0])
        ok = (rb[:, 2] > rb[:, 0]) & (rb[:, 3] > rb[:, 1])
        rb, sk = rb[ok], scores[src[ok], k]
        k2, s2 = select_class(rb, sk, thresh, test.nms, test.nms_method, limit, floor)
        if len(k2):
            refined.append((rb[k2], s2, k))
    return plain, refined


def cap_detections(dets: list[tuple], max_per_class: int, max_per_image: int) -> Detections:
    """Concatenate per-class ``(boxes, scores, k)`` (each sorted by score, as NMS returns them),
    keeping the top ``max_per_class`` of each class, then the top ``max_per_image`` in all (0: no cap)."""
    if max_per_class > 0:
        dets = [(b[:max_per_class], s[:max_per_class], k) for b, s, k in dets]
    if not dets:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    b = np.concatenate([d[0] for d in dets]).astype(np.float32)
    s = np.concatenate([d[1] for d in dets]).astype(np.float32)
    k = np.concatenate([np.full(len(d[1]), d[2]) for d in dets]).astype(np.int64)
    order = np.argsort(-s, kind="stable")
    if max_per_image > 0:
        order = order[:max_per_image]
    return Detections(b[order], s[order], k[order])


def union_nms(sets: Sequence[Detections], nms_iou: float, max_per_class: int = 0) -> Detections:
    """The paper's model combination (section 4.4) for one image: per class, NMS on the union of
    several models' detections with their scores, so that a more confident box of one model
    suppresses the less confident ones of another; then the per-class cap (0: none)."""
    if not sets:
        return cap_detections([], max_per_class, 0)
    boxes, scores, labels = (np.concatenate([getattr(d, f) for d in sets]) for f in ("boxes", "scores", "labels"))
    per_class = []
    for k in np.unique(labels):
        m = np.nonzero(labels == k)[0]
        keep = m[nms(boxes[m], scores[m], nms_iou)]
        per_class.append((boxes[keep], scores[keep], int(k)))
    return cap_detections(per_class, max_per_class, 0)


class WindowRows:
    """Per-window rows of a matrix that holds one row per group of identical windows:
    ``rows[idx]`` is ``distinct[group[idx]]`` (what box regression reads for the windows it keeps).
    ``deltas``: the fine-tuned head's box deltas of the same windows (:class:`HeadBoxRegressor`), or None."""

    def __init__(self, distinct: np.ndarray | torch.Tensor, group: np.ndarray, deltas: "WindowRows | None" = None):
        # NumPy (a view, no copy) where the windows were pooled on the CPU; the tensor where on a GPU
        if isinstance(distinct, torch.Tensor) and distinct.device.type == "cpu":
            distinct = distinct.numpy()
        self.distinct, self.group, self.deltas = distinct, group, deltas

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(self.distinct, torch.Tensor):  # only the rows asked for leave the GPU
            rows = torch.as_tensor(np.asarray(self.group[idx]), device=self.distinct.device)
            return self.distinct[rows].cpu().numpy()
        return self.distinct[self.group[idx]]


class HeadBoxRegressor:
    """Box regression by the fine-tuned head's own box layer (``bbox_reg.source: finetune``; the head fine-tuned
    with ``finetune.bbox_loss``). A :class:`Detector` given one computes every window's deltas from the fc7 rows it
    computes anyway (``4K`` outputs per row, no second fc pass) and decodes those of the windows it regresses."""

    def __init__(self, head: FCHead):
        if not getattr(head, "box_classes", 0):
            raise ValueError("bbox_reg.source: finetune needs a head fine-tuned with a box layer "
                             "(finetune.bbox_loss > 0); this one has none")

    @staticmethod
    def deltas(head: FCHead, fc7: torch.Tensor) -> np.ndarray:
        """``(G, K, 4)`` deltas in box units (the layer's outputs times :data:`BOX_STDS`) of fc7 rows."""
        with torch.no_grad():
            d = head.bbox_pred(fc7.float()).view(len(fc7), head.box_classes, 4)
        return d.cpu().numpy() * BOX_STDS


class Detector:
    """SPP-net at test time: pooled features -> fc head -> SVM scores -> NMS -> box regression.

    Args:
        head: the fine-tuned fc head (fc6/fc7 used for features), or None for pool5 SVMs.
        svms: ``{"W": (K, D), "b": (K,), "feature_scale", "layer"}``, or a list of such sets whose
            scores for a window are combined by ``test.combine_by`` (max or mean).
        regressor: per-class box regressors, a :class:`HeadBoxRegressor` (the head's own box layer), or None.
        cache: a :class:`FeatureCache` (gives geometry, levels and scale choice).
        test: thresholds (``TestConfig``).
        device: where fc6/fc7 run (the head is moved there). The windows are pooled where the maps given to
            :meth:`score` are (the test stage and :meth:`image_features` put them on ``device``), and on a GPU
            the SVMs' margins are computed there too.
    """

    def __init__(self, head: FCHead | None, svms: dict | Sequence[dict], regressor: BoxRegressor | HeadBoxRegressor | None,
                 cache: FeatureCache, test: TestConfig, classes: Sequence[str], device: str = "cpu"):
        if head is not None and (test.svd_fc6 or test.svd_fc7):
            head = copy.deepcopy(head)  # compressed below: the caller's head stays as it is
        self.head = head.to(device).eval() if head is not None else None  # fc6/fc7 run on ``device``
        self.svm_sets = [svms] if isinstance(svms, dict) else list(svms)
        if not self.svm_sets:
            raise ValueError("Detector needs at least one SVM set")
        self.regressor, self.cache, self.test, self.classes = regressor, cache, test, list(classes)
        self.head_boxes = isinstance(regressor, HeadBoxRegressor)
        if self.head_boxes and self.head is None:
            raise ValueError("a HeadBoxRegressor needs the detector's fine-tuned head")
        self._pooled: torch.Tensor | None = None
        self._weights_on: dict = {}  # each SVM set's (D, K) weights on a GPU, once uploaded
        if head is not None and test.svd_fc6:
            head.fc6 = truncated_svd_linear(head.fc6, test.svd_fc6)
        if head is not None and test.svd_fc7:
            head.fc7 = truncated_svd_linear(head.fc7, test.svd_fc7)
        self.device = device
        self.fc_precision = resolve_precision(test.fc_precision, device, "test.fc_precision")

    @torch.no_grad()
    def score(self, feats: ImageFeatures, proposals: np.ndarray) -> tuple["WindowRows", np.ndarray, dict]:
        """``(pool5 rows, scores (R, K), timing)`` for an image's proposals.

        Windows on the same conv5 rectangle at the same scale pool to identical features, so each such
        group is pooled and pushed through fc6/fc7 once (exact; 13-15% of 2,000 selective-search windows
        on a VOC image at ZF-5's stride 16) and its scores are given to all its windows. Pooling writes into
        one buffer kept for every image (a fresh ~100 MB output per image cost its page faults every time).
        The rows returned are a view of that buffer, valid until the next call (box regression reads its
        windows' rows right after): a copy of ~190 MB (2000 x 23,600) cost ~30 ms a photo, and its page faults
        0.4-0.8 s on a process's first photo."""
        t0 = time.perf_counter()
        r, d = len(proposals), self.cache.feature_dim(feats.maps[0].shape[0])
        dev = feats.maps[0].device
        if self._pooled is None or self._pooled.shape[0] < r or self._pooled.shape[1] != d or self._pooled.device != dev:
            self._pooled = torch.empty((max(r, 2000), d), dtype=torch.float32, device=dev)
        pooled, _, group = self.cache.pooled_groups(feats, proposals, out=self._pooled)
        t1 = time.perf_counter()
        layers = [s["layer"] if self.head is not None else "pool5" for s in self.svm_sets]
        xs = {layer: pooled if layer == "pool5" else fc_features(self.head, pooled.to(self.device), layer,
                                                                 self.fc_precision)
              for layer in dict.fromkeys(layers + (["fc7"] if self.head_boxes else []))}
        deltas = WindowRows(HeadBoxRegressor.deltas(self.head, xs["fc7"]), group) if self.head_boxes else None
        t2 = time.perf_counter()
        # The feature scale folded into the (K, D) weights, not the (G, D) rows: a scaled copy of 2000 pool5 rows is
        # ~190 MB, and allocating it cost 0.3-0.7 s on some photos in detect.py.
        each = [self._margins(xs[layer], s) for layer, s in zip(layers, self.svm_sets)]
        if len(each) == 1:
            scores = each[0]
        elif self.test.combine_by == "mean":
            scores = np.mean(each, axis=0)
        else:  # the paper's union of the models' windows: NMS keeps each window's best copy
            scores = np.max(each, axis=0)
        trained = self.svm_sets[0].get("trained")
        untrained = ~np.asarray(trained, bool) if trained is not None else np.zeros(scores.shape[1], bool)
        if untrained.any():  # classes without an SVM (no training positives) are never detected
            scores[:, untrained] = -np.inf
        scores = scores[group]
        t3 = time.perf_counter()
        return WindowRows(pooled, group, deltas), scores, {"pool": t1 - t0, "fc": t2 - t1, "svm": t3 - t2}

    def _margins(self, x: torch.Tensor, svms: dict) -> np.ndarray:
        """``(G, K)`` SVM margins of feature rows ``x``: in NumPy where they are on the CPU, on their GPU (the set's
        (D, K) weights kept there) where they were pooled on one."""
        if x.device.type == "cpu":
            return x.numpy() @ (svms["W"].T * np.float32(svms["feature_scale"])) + svms["b"]
        key = (id(svms), x.device)
        if key not in self._weights_on:
            self._weights_on[key] = torch.as_tensor(svms["W"].T * np.float32(svms["feature_scale"]), device=x.device)
        return (x @ self._weights_on[key]).cpu().numpy() + svms["b"]

    def postprocess(self, pooled: np.ndarray | WindowRows, scores: np.ndarray, proposals: np.ndarray, width: int,
                    height: int, score_threshold: float | None = None, max_per_image: int | None = None,
                    ) -> tuple[Detections, Detections | None, float]:
        """Per-class threshold + NMS (without regression), then regression + clip + NMS (with), then the
        caps (``max_per_image``: None = ``test.max_per_image``; evaluation passes 0, see ``TestConfig``)."""
        t0 = time.perf_counter()
        thr = self.test.score_threshold if score_threshold is None else score_threshold
        cap = self.test.max_per_image if max_per_image is None else max_per_image
        reg = self.regressor
        if reg is None:
            regress = None
        elif self.head_boxes:
            if getattr(pooled, "deltas", None) is None:
                raise ValueError("head box regression needs the deltas Detector.score returns with the rows")
            regress = lambda k, i: decode(proposals[i], pooled.deltas[i][:, k])  # noqa: E731
        else:
            regress = lambda k, i: reg.predict(k, pooled[i], proposals[i])  # noqa: E731
        plain, refined = class_detections(proposals, scores, thr, self.test, regress, (height, width),
                                          floor=self.test.score_threshold, competition=self.test.class_competition)
        det_plain = cap_detections(plain, self.test.max_per_class, cap)
        det_reg = cap_detections(refined, self.test.max_per_class, cap) if self.regressor is not None else None
        return det_plain, det_reg, time.perf_counter() - t0

    def detect_cached(self, feats: ImageFeatures, proposals: np.ndarray, score_threshold: float | None = None,
                      max_per_image: int | None = None):
        pooled, scores, timing = self.score(feats, proposals)
        plain, reg, t_post = self.postprocess(pooled, scores, proposals, feats.width, feats.height, score_threshold,
                                              max_per_image)
        timing["post"] = t_post
        return plain, reg, timing

    @staticmethod
    def image_features(backbone, rgb: np.ndarray, features: FeatureConfig,
                       device: str = "cpu") -> tuple[ImageFeatures, float]:
        """conv5 of a new image once per scale, rounded to the cache's dtype (the fc head and SVMs were trained
        on maps read from it), and the seconds it took."""
        t0 = time.perf_counter()
        maps, factors = conv5_maps(backbone, rgb, features.scales, features.max_size, device,
                                   resolve_precision(features.precision, device, "features.precision"))
        maps = [m.to(getattr(torch, features.dtype)) for m in maps]  # left on ``device``: pooled there
        return ImageFeatures(maps, factors, rgb.shape[0], rgb.shape[1]), time.perf_counter() - t0

    def detect_image(self, backbone, rgb: np.ndarray, proposals: np.ndarray, features: FeatureConfig,
                     device: str = "cpu", score_threshold: float | None = None):
        """Full test-time path on a new image: conv5 once per scale, then :meth:`detect_cached`."""
        feats, t_conv = self.image_features(backbone, rgb, features, device)
        plain, reg, timing = self.detect_cached(feats, proposals, score_threshold)
        timing["conv"] = t_conv
        return plain, reg, timing
