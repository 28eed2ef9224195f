"""Per-class linear SVMs with R-CNN's hard-negative mining (``rcnn_train.m`` / ``spp_train.m``).

Features are scaled so that their mean L2 norm is ``target_norm`` (20). Positives are the
ground-truth boxes; negatives are windows with IoU < ``neg_iou`` (0.3) to every object of
the class. One pass over the images: the first image contributes all its negatives, later
ones only those scoring above ``hard_threshold`` (-1.0001) that are not cached yet; the
SVM is retrained after the first image, whenever more than ``retrain_limit`` (2000) new
negatives have been added, and at the last image; after each retrain negatives scoring
below ``evict_threshold`` (-1.2) are evicted, and a cache over ``max_negatives`` keeps its hardest.
liblinear (scikit-learn ``LinearSVC``, L2-regularised hinge loss, dual) with C = 0.001, positive weight 2,
bias feature 10 and liblinear's default tolerance (``-w1 2 -c 0.001 -s 3 -B 10``, ``-e 0.1``). Memory: the
classes' negative caches share one pool of feature rows (:class:`NegativePool`), plus liblinear's float64 copy
of one class's examples while it retrains.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .config import SVMConfig

log = logging.getLogger(__name__)

__all__ = ["train_linear_svm", "fit_linear_svm", "svm_objective", "HardNegativeTrainer", "ClassCache", "NegativePool"]


def train_linear_svm(x_pos: np.ndarray, x_neg: np.ndarray, C: float, pos_weight: float, bias_mult: float,
                     max_iter: int = 10000, tol: float = 0.1) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3`` (L2-reg. hinge, dual) with the bias as a feature of value ``bias_mult``; ``tol`` is
    liblinear's ``-e`` (0.1, its default for ``-s 3``)."""
    x = np.concatenate([x_pos, x_neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(x_pos)), -np.ones(len(x_neg))])
    return fit_linear_svm(x, y, C, pos_weight, bias_mult, max_iter, tol)


def fit_linear_svm(x: np.ndarray, y: np.ndarray, C: float, pos_weight: float, bias_mult: float,
                   max_iter: int = 10000, tol: float = 0.1) -> tuple[np.ndarray, float]:
    """:func:`train_linear_svm` on a prepared float64 ``x`` (N, D) and labels ``y`` (+1 / -1)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=C, loss="hinge", dual=True, fit_intercept=True, intercept_scaling=bias_mult,
                    class_weight={1: pos_weight, -1: 1.0}, max_iter=max_iter, tol=tol,
                    random_state=0)  # liblinear visits the examples in a random order: fixed, so retraining repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_.ravel().astype(np.float32), float(svm.intercept_[0])


def svm_objective(w: np.ndarray, b: float, x_pos: np.ndarray, x_neg: np.ndarray, C: float, pos_weight: float,
                  bias_mult: float) -> dict:
    """liblinear's primal objective (the bias feature is regularised too) and its parts."""
    return svm_objective_from_scores(w, b, x_pos @ w + b, x_neg @ w + b, C, pos_weight, bias_mult)


def svm_objective_from_scores(w: np.ndarray, b: float, z_pos: np.ndarray, z_neg: np.ndarray, C: float,
                              pos_weight: float, bias_mult: float) -> dict:
    """:func:`svm_objective` given the positives' and negatives' scores."""
    reg = 0.5 * (float(w @ w) + (b / bias_mult) ** 2)
    hp = np.maximum(0.0, 1.0 - z_pos)
    hn = np.maximum(0.0, 1.0 + z_neg)
    pos_loss, neg_loss = C * pos_weight * float(hp.sum()), C * float(hn.sum())
    return {"objective": reg + pos_loss + neg_loss, "reg": reg, "pos_loss": pos_loss, "neg_loss": neg_loss}


class NegativePool:
    """The feature rows of every class's negative cache, each stored once: a window that is a hard negative for
    several classes is one row with several references (20 VOC classes share many), and a row no class holds
    any more is dropped when the pool is compacted. ``x[:n]`` (rows, D) float32; ``refs[:n]`` references."""

    def __init__(self, dim: int):
        self.x = np.empty((256, dim), np.float32)
        self.refs = np.zeros(256, np.int64)
        self.n = 0
        self.peak_rows = 0

    def add(self, rows: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Append ``rows`` (m, D) with their reference counts; returns their indices."""
        m = len(rows)
        if self.n + m > len(self.x):
            cap = max(self.n + m, 2 * len(self.x))
            x, r = np.empty((cap, self.x.shape[1]), np.float32), np.zeros(cap, np.int64)
            x[:self.n], r[:self.n] = self.x[:self.n], self.refs[:self.n]
            self.x, self.refs = x, r
        self.x[self.n:self.n + m] = rows
        self.refs[self.n:self.n + m] = refs
        self.n += m
        self.peak_rows = max(self.peak_rows, self.n)
        return np.arange(self.n - m, self.n)

    def compact(self, caches: list["ClassCache"]) -> None:
        """Drop rows no class references (when they are over half the pool), renumbering the caches' indices."""
        live = self.refs[:self.n] > 0
        if live.sum() * 2 > self.n:
            return
        new = np.cumsum(live) - 1
        keep = np.nonzero(live)[0]
        self.x[:len(keep)] = self.x[keep]
        self.refs[:len(keep)] = self.refs[keep]
        self.n = len(keep)
        for c in caches:
            c.idx = new[c.idx]

    @property
    def nbytes(self) -> int:
        return self.x.nbytes


@dataclass
class ClassCache:
    """One class's SVM and its negative cache: ``idx`` rows of the shared :class:`NegativePool`."""

    x_pos: np.ndarray
    pool: NegativePool
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    num_added: int = 0
    w: np.ndarray | None = None
    b: float = 0.0
    retrains: list = field(default_factory=list)

    @property
    def x_neg(self) -> np.ndarray:
        """The cached negatives' features (a copy)."""
        return self.pool.x[self.idx]


class HardNegativeTrainer:
    """One pass of hard-negative mining for K classes at once.

    Call :meth:`add_image` for each training image in order with its (scaled) features
    and, per class, which windows are negatives; then :meth:`finish`. Per image, the windows are scored for every
    trained class by one matrix product; the windows some class keeps are stored once in a shared
    :class:`NegativePool`. Memory: the pool (unique cached negatives x D float32) and, while one class retrains,
    liblinear's float64 copy of that class's examples.
    """

    def __init__(self, x_pos: list[np.ndarray], dim: int, cfg: SVMConfig, log_fn: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.pool = NegativePool(dim)
        self.caches = [ClassCache(p.astype(np.float32), self.pool) for p in x_pos]
        self.first = [True] * len(x_pos)
        self.log = log_fn or (lambda s: None)
        self.last_image = None

    def _design(self, c: ClassCache) -> tuple[np.ndarray, np.ndarray]:
        """liblinear's input for a class: ``(x (P + N, D) float64, y)``, filled in chunks (no float32 copy)."""
        p, idx = len(c.x_pos), c.idx
        x = np.empty((p + len(idx), self.pool.x.shape[1]), np.float64)
        x[:p] = c.x_pos
        for s in range(0, len(idx), 4096):
            x[p + s:p + s + 4096] = self.pool.x[idx[s:s + 4096]]
        return x, np.concatenate([np.ones(p), -np.ones(len(idx))])

    def _retrain(self, k: int) -> None:
        c, cfg = self.caches[k], self.cfg
        if len(c.x_pos) == 0 or len(c.idx) == 0:
            return
        x, y = self._design(c)
        c.w, c.b = fit_linear_svm(x, y, cfg.C, cfg.pos_weight, cfg.bias_mult, cfg.max_iter, cfg.tol)
        del x
        # the negatives' scores in float32, as they are scored when mined, a chunk of pool rows at a time
        z = np.concatenate([self.pool.x[c.idx[s:s + 4096]] @ c.w + c.b for s in range(0, len(c.idx), 4096)])
        obj = svm_objective_from_scores(c.w, c.b, c.x_pos @ c.w + c.b, z, cfg.C, cfg.pos_weight, cfg.bias_mult)
        easy = z < cfg.evict_threshold
        if cfg.max_negatives and (~easy).sum() > cfg.max_negatives:  # the cap: only the hardest stay
            hard = np.nonzero(~easy)[0]
            easy[hard[np.argsort(-z[hard], kind="stable")[cfg.max_negatives:]]] = True
        np.subtract.at(self.pool.refs, c.idx[easy], 1)
        c.idx = c.idx[~easy]
        c.num_added = 0
        rec = {**obj, "negatives": int(len(z)), "evicted": int(easy.sum()), "kept": int(len(c.idx))}
        c.retrains.append(rec)
        self.log(f"  class {k}: retrain {len(c.retrains)}: objective {obj['objective']:.4f} (reg {obj['reg']:.4f}, "
                 f"pos {obj['pos_loss']:.4f}, neg {obj['neg_loss']:.4f}), {rec['negatives']} negatives, "
                 f"{rec['evicted']} evicted")

    def add_image(self, image_index: int, feats: np.ndarray, negative_mask: np.ndarray, last: bool) -> None:
        """``feats`` (R, D) scaled features of the image's windows; ``negative_mask`` (R, K). Images come once each,
        in increasing ``image_index`` (a window is never cached twice for a class)."""
        if self.last_image is not None and image_index <= self.last_image:
            raise ValueError(f"add_image: image {image_index} after {self.last_image}: each image once, in order")
        self.last_image = image_index
        cfg = self.cfg
        hard = [k for k, c in enumerate(self.caches) if not self.first[k] and c.w is not None]
        if hard and len(feats):  # every trained class's scores of every window: one matrix product
            W = np.stack([self.caches[k].w for k in hard], 1)
            z = feats @ W + np.array([self.caches[k].b for k in hard], np.float32)
            col = {k: j for j, k in enumerate(hard)}
        cands = []
        for k, c in enumerate(self.caches):
            cand = np.nonzero(negative_mask[:, k])[0]
            if len(cand) and k in hard:
                cand = cand[z[cand, col[k]] > cfg.hard_threshold]
            cands.append(cand)
        count = np.zeros(len(feats), np.int64)
        for cand in cands:
            count[cand] += 1
        rows = np.nonzero(count)[0]
        where = np.full(len(feats), -1, np.int64)
        if len(rows):
            where[rows] = self.pool.add(feats[rows], count[rows])
        for k, c in enumerate(self.caches):
            if len(cands[k]):
                c.idx = np.concatenate([c.idx, where[cands[k]]])
                c.num_added += len(cands[k])
            over = cfg.max_negatives and len(c.idx) > cfg.max_negatives
            if self.first[k] or c.num_added > cfg.retrain_limit or last or over:
                self._retrain(k)
            self.first[k] = False
        self.pool.compact(self.caches)

    def finish(self) -> list[ClassCache]:
        return self.caches

    def memory(self) -> dict:
        """What the negative caches hold: rows in the pool now and at most, its bytes, and per class references."""
        return {"pool_rows": int(self.pool.n), "pool_live_rows": int((self.pool.refs[:self.pool.n] > 0).sum()),
                "pool_peak_rows": int(self.pool.peak_rows),
                "pool_bytes": int(self.pool.nbytes), "class_negatives": [int(len(c.idx)) for c in self.caches]}


def mean_norm(features: Iterable[np.ndarray]) -> float:
    n = [np.linalg.norm(f, axis=1) for f in features if len(f)]
    if not n:
        raise ValueError("cannot compute the feature norm: no features")
    return float(np.concatenate(n).mean())
