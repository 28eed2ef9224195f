"""Per-class linear SVMs with R-CNN's hard-negative mining (``rcnn_train.m`` / ``spp_train.m``).

Features are scaled so that their mean L2 norm is ``target_norm`` (20). Positives are the
ground-truth boxes; negatives are windows with IoU < ``neg_iou`` (0.3) to every object of
the class. One pass over the images: the first image contributes all its negatives, later
ones only those scoring above ``hard_threshold`` (-1.0001) that are not cached yet; the
SVM is retrained after the first image, whenever more than ``retrain_limit`` (2000) new
negatives have been added, and at the last image; after each retrain negatives scoring
below ``evict_threshold`` (-1.2) are evicted. liblinear (scikit-learn ``LinearSVC``,
L2-regularised hinge loss, dual) with C = 0.001, positive weight 2, bias feature 10
(``-w1 2 -c 0.001 -s 3 -B 10``). Memory is bounded by the negative caches.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .config import SVMConfig

log = logging.getLogger(__name__)

__all__ = ["train_linear_svm", "svm_objective", "HardNegativeTrainer", "ClassCache"]


def train_linear_svm(x_pos: np.ndarray, x_neg: np.ndarray, C: float, pos_weight: float, bias_mult: float,
                     max_iter: int = 10000) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3`` (L2-reg. hinge, dual) with the bias as a feature of value ``bias_mult``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([x_pos, x_neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(x_pos)), -np.ones(len(x_neg))])
    svm = LinearSVC(C=C, loss="hinge", dual=True, fit_intercept=True, intercept_scaling=bias_mult,
                    class_weight={1: pos_weight, -1: 1.0}, max_iter=max_iter, tol=1e-4,
                    random_state=0)  # liblinear visits the examples in a random order: fixed, so retraining repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_.ravel().astype(np.float32), float(svm.intercept_[0])


def svm_objective(w: np.ndarray, b: float, x_pos: np.ndarray, x_neg: np.ndarray, C: float, pos_weight: float,
                  bias_mult: float) -> dict:
    """liblinear's primal objective (the bias feature is regularised too) and its parts."""
    reg = 0.5 * (float(w @ w) + (b / bias_mult) ** 2)
    hp = np.maximum(0.0, 1.0 - (x_pos @ w + b))
    hn = np.maximum(0.0, 1.0 + (x_neg @ w + b))
    pos_loss, neg_loss = C * pos_weight * float(hp.sum()), C * float(hn.sum())
    return {"objective": reg + pos_loss + neg_loss, "reg": reg, "pos_loss": pos_loss, "neg_loss": neg_loss}


@dataclass
class ClassCache:
    x_pos: np.ndarray
    x_neg: np.ndarray
    keys: set = field(default_factory=set)  # (image index, window index) of cached negatives
    neg_keys: list = field(default_factory=list)
    num_added: int = 0
    w: np.ndarray | None = None
    b: float = 0.0
    retrains: list = field(default_factory=list)


class HardNegativeTrainer:
    """One pass of hard-negative mining for K classes at once.

    Call :meth:`add_image` for each training image in order with its (scaled) features
    and, per class, which windows are negatives; then :meth:`finish`.
    """

    def __init__(self, x_pos: list[np.ndarray], dim: int, cfg: SVMConfig, log_fn: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.caches = [ClassCache(p.astype(np.float32), np.zeros((0, dim), np.float32)) for p in x_pos]
        self.first = [True] * len(x_pos)
        self.log = log_fn or (lambda s: None)

    def _retrain(self, k: int) -> None:
        c, cfg = self.caches[k], self.cfg
        if len(c.x_pos) == 0 or len(c.x_neg) == 0:
            return
        c.w, c.b = train_linear_svm(c.x_pos, c.x_neg, cfg.C, cfg.pos_weight, cfg.bias_mult, cfg.max_iter)
        obj = svm_objective(c.w, c.b, c.x_pos, c.x_neg, cfg.C, cfg.pos_weight, cfg.bias_mult)
        z = c.x_neg @ c.w + c.b
        easy = z < cfg.evict_threshold
        c.x_neg = c.x_neg[~easy]
        evicted = [c.neg_keys[i] for i in np.nonzero(easy)[0]]
        c.neg_keys = [c.neg_keys[i] for i in np.nonzero(~easy)[0]]
        c.keys.difference_update(evicted)
        c.num_added = 0
        rec = {**obj, "negatives": int(len(z)), "evicted": int(easy.sum()), "kept": int(len(c.x_neg))}
        c.retrains.append(rec)
        self.log(f"  class {k}: retrain {len(c.retrains)}: objective {obj['objective']:.4f} (reg {obj['reg']:.4f}, "
                 f"pos {obj['pos_loss']:.4f}, neg {obj['neg_loss']:.4f}), {rec['negatives']} negatives, "
                 f"{rec['evicted']} evicted")

    def add_image(self, image_index: int, feats: np.ndarray, negative_mask: np.ndarray, last: bool) -> None:
        """``feats`` (R, D) scaled features of the image's windows; ``negative_mask`` (R, K)."""
        cfg = self.cfg
        for k, c in enumerate(self.caches):
            cand = np.nonzero(negative_mask[:, k])[0]
            if len(cand):
                if not self.first[k] and c.w is not None:
                    z = feats[cand] @ c.w + c.b
                    cand = cand[z > cfg.hard_threshold]
                cand = np.array([j for j in cand if (image_index, int(j)) not in c.keys], np.int64)
                if len(cand):
                    c.x_neg = np.concatenate([c.x_neg, feats[cand]])
                    new_keys = [(image_index, int(j)) for j in cand]
                    c.neg_keys += new_keys
                    c.keys.update(new_keys)
                    c.num_added += len(cand)
            if self.first[k] or c.num_added > cfg.retrain_limit or last:
                self._retrain(k)
            self.first[k] = False

    def finish(self) -> list[ClassCache]:
        return self.caches


def mean_norm(features: Iterable[np.ndarray]) -> float:
    n = [np.linalg.norm(f, axis=1) for f in features if len(f)]
    if not n:
        raise ValueError("cannot compute the feature norm: no features")
    return float(np.concatenate(n).mean())
