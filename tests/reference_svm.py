"""The hard-negative trainer as sppdet had it before the shared negative pool (sppdet.svm.HardNegativeTrainer):
one float32 cache per class, each class scoring the image's windows on its own, (image, window) keys. The tests
check that the pooled trainer gives the same SVMs, caches and retrain records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sppdet.config import SVMConfig
from sppdet.svm import row_scores, svm_objective_from_scores, train_linear_svm


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
        c.w, c.b = train_linear_svm(c.x_pos, c.x_neg, cfg.C, cfg.pos_weight, cfg.bias_mult, cfg.max_iter, cfg.tol,
                                      cfg.solver)
        z = row_scores(c.x_neg, np.arange(len(c.x_neg)), c.w, c.b)  # the negatives scored as the pooled trainer does
        obj = svm_objective_from_scores(c.w, c.b, c.x_pos @ c.w + c.b, z, cfg.C, cfg.pos_weight, cfg.bias_mult)
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
