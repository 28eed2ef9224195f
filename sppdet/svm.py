"""Per-class linear SVMs with R-CNN's hard-negative mining (``rcnn_train.m`` / ``spp_train.m``).

Features are scaled so that their mean L2 norm is ``target_norm`` (20). Positives are the
ground-truth boxes; negatives are windows with IoU < ``neg_iou`` (0.3) to every object of
the class. One pass over the images: the first image contributes all its negatives, later
ones only those scoring above ``hard_threshold`` (-1.0001) that are not cached yet; the
SVM is retrained after the first image, whenever more than ``retrain_limit`` (2000) new
negatives have been added, and at the last image; after each retrain negatives scoring
below ``evict_threshold`` (-1.2) are evicted, and a cache over ``max_negatives`` keeps its hardest.
Solver (``svm.solver``): ``dcd``, liblinear's own algorithm for ``-s 3`` (dual coordinate descent with
shrinking, Hsieh et al. 2008) compiled here with numba on the float32 rows where they are held, or ``liblinear``
itself (scikit-learn ``LinearSVC``). Both minimise the same objective, the L2-regularised hinge loss with C = 0.001,
positive weight 2, bias feature 10 and liblinear's default tolerance (``-w1 2 -c 0.001 -s 3 -B 10``, ``-e 0.1``);
they visit the examples in different random orders, so their weights differ within that tolerance. ``dcd`` needs no
float64 copy of a class's examples (liblinear's wrapper makes one and then its own sparse copy) and computes each
coordinate's dot product densely: ~8x faster on 23,600-d pool5 (docs/experiments.md); with ``svm.warm_start`` each
retrain starts from the last one's dual variables (solver time 1.5x less on fruit, 1.7x on raccoon). Memory: the
classes' negative caches share one pool of feature rows (:class:`NegativePool`), plus with ``liblinear`` its float64
copy of one class's examples while it retrains.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numba
import numpy as np

from .config import SVMConfig
from .config_sections import SVM_SOLVERS

log = logging.getLogger(__name__)

__all__ = ["train_linear_svm", "solve_svm", "fit_linear_svm", "dual_cd_svm", "row_scores", "svm_objective",
           "HardNegativeTrainer", "ClassCache", "NegativePool"]


def train_linear_svm(x_pos: np.ndarray, x_neg: np.ndarray, C: float, pos_weight: float, bias_mult: float,
                     max_iter: int = 10000, tol: float = 0.1, solver: str = "dcd") -> tuple[np.ndarray, float]:
    """:func:`solve_svm` with the negatives as one array ``x_neg`` (float32 for ``dcd``; liblinear widens whatever
    it is given to float64)."""
    rows = np.ascontiguousarray(x_neg, np.float32) if solver == "dcd" else x_neg
    return solve_svm(x_pos, rows, np.arange(len(x_neg)), C, pos_weight, bias_mult, max_iter, tol, solver)


def solve_svm(x_pos: np.ndarray, rows: np.ndarray, idx: np.ndarray, C: float, pos_weight: float, bias_mult: float,
              max_iter: int = 10000, tol: float = 0.1, solver: str = "dcd", alpha0: np.ndarray | None = None,
              return_state: bool = False):
    """liblinear ``-s 3`` (L2-reg. hinge, dual) on positives ``x_pos`` and negatives ``rows[idx]``, with the bias as
    a feature of value ``bias_mult``; ``tol`` is liblinear's ``-e`` (0.1, its default for ``-s 3``); ``solver`` one
    of ``dcd`` (:func:`dual_cd_svm`: the rows read in place) or ``liblinear`` (their float64 copy, filled in
    chunks, for scikit-learn's). Returns ``(w float32, b)``; with ``return_state`` also ``(alpha, sweeps)``, the
    dual variables and sweeps of ``dcd`` (``(None, None)`` for liblinear). ``alpha0``: ``dcd``'s starting point
    (hard-negative mining's warm start); liblinear starts from zeros and refuses one."""
    if solver == "dcd":
        return dual_cd_svm(x_pos, rows, idx, C, pos_weight, bias_mult, max_iter, tol, alpha0=alpha0,
                           return_alpha=return_state)
    if solver != "liblinear":
        raise ValueError(f"svm.solver must be one of {', '.join(SVM_SOLVERS)}, got {solver!r}")
    if alpha0 is not None:
        raise ValueError("svm.solver liblinear cannot start from given dual variables (svm.warm_start is dcd's)")
    p = len(x_pos)
    x = np.empty((p + len(idx), rows.shape[1]), np.float64)
    x[:p] = x_pos
    for s in range(0, len(idx), 4096):
        x[p + s:p + s + 4096] = rows[idx[s:s + 4096]]
    w, b = fit_linear_svm(x, np.concatenate([np.ones(p), -np.ones(len(idx))]), C, pos_weight, bias_mult, max_iter, tol)
    return (w, b, None, None) if return_state else (w, b)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dual_cd(xp, xn, idx, c_pos, c_neg, bias, eps, max_iter, seed, alpha0):
    """liblinear's ``solve_l2r_l1l2_svc`` for the hinge loss: examples ``xp`` (labels +1, bound ``c_pos``) then
    ``xn[idx]`` (-1, ``c_neg``), float32 rows read in place; the bias is a feature of value ``bias``. ``alpha0``:
    the dual variables to start from (length n, clipped to their bounds), or empty for liblinear's zeros. Returns
    ``(w float64, the bias feature's weight, outer iterations, alpha)``."""
    p, d = xp.shape
    n = p + len(idx)
    np.random.seed(seed)
    w = np.zeros(d)
    wb = 0.0
    alpha = np.zeros(n)
    qd = np.empty(n)
    for i in range(n):
        xi = xp[i] if i < p else xn[idx[i - p]]
        s = 0.0
        for k in range(d):
            s += np.float64(xi[k]) * xi[k]
        qd[i] = s + bias * bias
        if len(alpha0) == n and alpha0[i] > 0.0:  # w = sum_i alpha_i y_i x_i of the starting point
            y, u = (1.0, c_pos) if i < p else (-1.0, c_neg)
            a = min(alpha0[i], u)
            alpha[i] = a
            for k in range(d):
                w[k] += a * y * xi[k]
            wb += a * y * bias
    order = np.arange(n)
    active = n
    pg_max_old, pg_min_old = np.inf, -np.inf
    it = 0
    while it < max_iter:
        pg_max, pg_min = -np.inf, np.inf
        for i in range(active):  # a random order of the active examples, every outer iteration
            j = i + np.random.randint(0, active - i)
            order[i], order[j] = order[j], order[i]
        s = 0
        while s < active:
            i = order[s]
            y, u = (1.0, c_pos) if i < p else (-1.0, c_neg)
            xi = xp[i] if i < p else xn[idx[i - p]]
            z = wb * bias
            for k in range(d):
                z += w[k] * xi[k]
            g = y * z - 1.0
            pg = 0.0
            if alpha[i] == 0.0:
                if g > pg_max_old:  # shrunk: at its bound and likely to stay there
                    active -= 1
                    order[s], order[active] = order[active], order[s]
                    continue
                if g < 0.0:
                    pg = g
            elif alpha[i] == u:
                if g < pg_min_old:
                    active -= 1
                    order[s], order[active] = order[active], order[s]
                    continue
                if g > 0.0:
                    pg = g
            else:
                pg = g
            pg_max, pg_min = max(pg_max, pg), min(pg_min, pg)
            if abs(pg) > 1e-12:
                a = min(max(alpha[i] - g / qd[i], 0.0), u)
                step = (a - alpha[i]) * y
                alpha[i] = a
                for k in range(d):
                    w[k] += step * xi[k]
                wb += step * bias
            s += 1
        it += 1
        if pg_max - pg_min <= eps:
            if active == n:
                break
            active, pg_max_old, pg_min_old = n, np.inf, -np.inf  # converged on the active set: check them all
            continue
        pg_max_old = pg_max if pg_max > 0.0 else np.inf
        pg_min_old = pg_min if pg_min < 0.0 else -np.inf
    return w, wb, it, alpha


def dual_cd_svm(x_pos: np.ndarray, x_neg: np.ndarray, idx: np.ndarray, C: float, pos_weight: float, bias_mult: float,
                max_iter: int = 10000, tol: float = 0.1, seed: int = 0, alpha0: np.ndarray | None = None,
                return_alpha: bool = False):
    """The ``dcd`` solver: positives ``x_pos`` and negatives ``x_neg[idx]`` (rows of a float32 array, not copied);
    the visiting order is seeded, so retraining repeats. Returns ``(w float32, b)`` as :func:`fit_linear_svm`, and
    with ``return_alpha`` the dual variables (positives first) and the sweeps (outer iterations) too. ``alpha0``:
    dual variables to start from (hard-negative mining passes the last retrain's: the same optimum within ``tol``,
    reached in fewer sweeps)."""
    xp = np.ascontiguousarray(x_pos, np.float32)
    if x_neg.dtype != np.float32 or not x_neg.flags.c_contiguous:
        raise ValueError("dual_cd_svm: x_neg must be C-contiguous float32 (its rows are read in place)")
    if xp.shape[1] != x_neg.shape[1]:
        raise ValueError(f"dual_cd_svm: positives have {xp.shape[1]} features, negatives {x_neg.shape[1]}")
    idx = np.asarray(idx, np.int64)
    a0 = np.zeros(0) if alpha0 is None else np.asarray(alpha0, np.float64)
    if len(a0) not in (0, len(xp) + len(idx)):
        raise ValueError(f"dual_cd_svm: alpha0 has {len(a0)} values for {len(xp) + len(idx)} examples")
    w, wb, sweeps, alpha = _dual_cd(xp, x_neg, idx, float(C * pos_weight), float(C), float(bias_mult), float(tol),
                                    int(max_iter), int(seed), a0)
    out = (w.astype(np.float32), float(wb * bias_mult))
    return (*out, alpha, int(sweeps)) if return_alpha else out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _row_scores(x, idx, w, b):
    z = np.empty(len(idx), np.float32)
    for r in range(len(idx)):
        xi = x[idx[r]]
        s = 0.0
        for k in range(len(w)):
            s += np.float64(w[k]) * xi[k]
        z[r] = s + b
    return z


def row_scores(x: np.ndarray, idx: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """``x[idx] @ w + b`` as float32, reading the float32 rows in place (a fancy-indexed copy of a class's
    negatives was 0.7 s of each retrain on 23,600-d pool5); accumulated in float64."""
    return _row_scores(np.ascontiguousarray(x, np.float32), np.asarray(idx, np.int64), np.asarray(w, np.float32),
                       float(b))


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

    def __init__(self, dim: int, max_rows: int = 0):
        self.max_rows = int(max_rows)  # the rows it grows to at most (0: no bound), unless more are live
        self.x = np.empty((256 if not self.max_rows else min(256, self.max_rows), dim), np.float32)
        self.refs = np.zeros(len(self.x), np.int64)
        self.n = 0
        self.peak_rows = 0

    def add(self, rows: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Append ``rows`` (m, D) with their reference counts; returns their indices."""
        m = len(rows)
        if self.n + m > len(self.x):
            cap = max(self.n + m, 2 * len(self.x))
            self._grow(max(self.n + m, min(cap, self.max_rows)) if self.max_rows else cap)
        self.x[self.n:self.n + m] = rows
        self.refs[self.n:self.n + m] = refs
        self.n += m
        self.peak_rows = max(self.peak_rows, self.n)
        return np.arange(self.n - m, self.n)

    def _grow(self, cap: int) -> None:
        """Room for ``cap`` rows. In place where numpy may (no other reference to the arrays): glibc then moves a
        mapped block's pages (``mremap``) instead of copying them into fresh ones; fruit's pool5 pool grew to 4 GB
        in copies that took 18 s of its 142 s SVM stage, mostly the new pages' faults."""
        try:
            self.x.resize((cap, self.x.shape[1]), refcheck=True)
            self.refs.resize(cap, refcheck=True)  # new entries are zero
        except ValueError:  # a view of them is alive somewhere: copy
            x, r = np.empty((cap, self.x.shape[1]), np.float32), np.zeros(cap, np.int64)
            x[:self.n], r[:self.n] = self.x[:self.n], self.refs[:self.n]
            self.x, self.refs = x, r

    def compact(self, caches: list["ClassCache"], chunk: int = 256, force: bool = False) -> None:
        """Drop rows no class references (when they are over half the pool, or with ``force`` any), renumbering the
        caches' indices.
        The rows kept move forward in place, ``chunk`` at a time (row ``keep[i] >= i`` goes to ``i``: a chunk's
        sources are gathered before it is written, and later chunks' sources lie beyond it), so no temporary copy
        of the pool is made (one took 18 s of fruit's SVM stage, in 12 compactions of up to 2 GB)."""
        live = self.refs[:self.n] > 0
        kept = int(live.sum())
        if kept == self.n or (kept * 2 > self.n and not force):
            return
        new = np.cumsum(live) - 1
        keep = np.nonzero(live)[0]
        moved = np.nonzero(keep != np.arange(len(keep)))[0]
        for s in range(int(moved[0]) if len(moved) else len(keep), len(keep), chunk):
            e = min(s + chunk, len(keep))
            self.x[s:e] = self.x[keep[s:e]]
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
    alpha: np.ndarray | None = None  # the dcd solver's dual variables: positives, then one per ``idx`` entry

    @property
    def x_neg(self) -> np.ndarray:
        """The cached negatives' features (a copy)."""
        return self.pool.x[self.idx]


class HardNegativeTrainer:
    """One pass of hard-negative mining for K classes at once.

    Call :meth:`add_image` for each training image in order with its (scaled) features
    and, per class, which windows are negatives; then :meth:`finish`. Per image, the windows are scored for every
    trained class by one matrix product; the windows some class keeps are stored once in a shared
    :class:`NegativePool`. Memory: the pool (unique cached negatives x D float32) and, while one class retrains
    with ``svm.solver: liblinear``, its float64 copy of that class's examples (``dcd`` reads the pool in place).
    """

    def __init__(self, x_pos: list[np.ndarray], dim: int, cfg: SVMConfig, log_fn: Callable[[str], None] | None = None,
                 max_negatives: int | None = None, max_rows: int = 0):
        self.cfg = cfg
        # each class's cap (svm.max_negatives, or the lower one svm.max_pool_gb sets: :func:`negatives_cap`)
        self.max_negatives = cfg.max_negatives if max_negatives is None else int(max_negatives)
        self.pool = NegativePool(dim, max_rows)
        self.caches = [ClassCache(p.astype(np.float32), self.pool) for p in x_pos]
        self.first = [True] * len(x_pos)
        self.log = log_fn or (lambda s: None)
        self.last_image = None

    def _retrain(self, k: int) -> None:
        c, cfg = self.caches[k], self.cfg
        if len(c.x_pos) == 0 or len(c.idx) == 0:
            return
        warm = cfg.solver == "dcd" and cfg.warm_start
        c.w, c.b, alpha, sweeps = solve_svm(c.x_pos, self.pool.x, c.idx, cfg.C, cfg.pos_weight, cfg.bias_mult,
                                            cfg.max_iter, cfg.tol, cfg.solver, alpha0=c.alpha if warm else None,
                                            return_state=True)
        c.alpha = alpha if warm else None
        z = row_scores(self.pool.x, c.idx, c.w, c.b)
        obj = svm_objective_from_scores(c.w, c.b, c.x_pos @ c.w + c.b, z, cfg.C, cfg.pos_weight, cfg.bias_mult)
        easy = z < cfg.evict_threshold
        cap = self.max_negatives
        if cap and (~easy).sum() > cap:  # the cap: only the hardest stay
            hard = np.nonzero(~easy)[0]
            easy[hard[np.argsort(-z[hard], kind="stable")[cap:]]] = True
        np.subtract.at(self.pool.refs, c.idx[easy], 1)
        c.idx = c.idx[~easy]
        if c.alpha is not None:
            c.alpha = np.concatenate([c.alpha[:len(c.x_pos)], c.alpha[len(c.x_pos):][~easy]])
        c.num_added = 0
        rec = {**obj, "negatives": int(len(z)), "evicted": int(easy.sum()), "kept": int(len(c.idx))}
        if warm:
            rec["sweeps"] = sweeps
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
        if self.pool.max_rows and self.pool.n + len(rows) > self.pool.max_rows:
            self.pool.compact(self.caches, force=True)  # rows no class holds make room before the pool grows
        if len(rows):
            where[rows] = self.pool.add(feats[rows], count[rows])
        for k, c in enumerate(self.caches):
            if len(cands[k]):
                c.idx = np.concatenate([c.idx, where[cands[k]]])
                c.num_added += len(cands[k])
                if c.alpha is not None:  # new negatives start at zero
                    c.alpha = np.concatenate([c.alpha, np.zeros(len(cands[k]))])
            # R-CNN's schedule: a retrain once retrain_limit new negatives came (the cap is applied there). Retraining
            # whenever a cache passed the cap instead made a capped class retrain on nearly every image.
            if self.first[k] or c.num_added > cfg.retrain_limit or last:
                self._retrain(k)
            self.first[k] = False
        self.pool.compact(self.caches)

    def finish(self) -> list[ClassCache]:
        return self.caches

    def memory(self) -> dict:
        """What the negative caches hold: rows in the pool now and at most, its bytes, and per class references."""
        return {"pool_rows": int(self.pool.n), "pool_live_rows": int((self.pool.refs[:self.pool.n] > 0).sum()),
                "pool_peak_rows": int(self.pool.peak_rows), "pool_max_rows": self.pool.max_rows,
                "negatives_cap": self.max_negatives,
                "pool_bytes": int(self.pool.nbytes), "class_negatives": [int(len(c.idx)) for c in self.caches]}


def svm_arrays(caches: list["ClassCache"], dim: int) -> dict:
    """The solved per-class SVMs as arrays: ``W`` (K, dim) (zeros for a class without a solution), ``b`` (K,) and
    ``trained`` (K,) bool, as ``svm.npz`` and R-CNN mode's model store them."""
    return {"W": np.stack([c.w if c.w is not None else np.zeros(dim, np.float32) for c in caches]),
            "b": np.array([c.b for c in caches], np.float32), "trained": np.array([c.w is not None for c in caches])}


def pool_rows(dim: int, max_pool_gb: float) -> int:
    """The rows of ``dim`` float32 features that ``max_pool_gb`` GB hold (0: no bound)."""
    return int(max_pool_gb * 1e9 // (4 * dim)) if max_pool_gb > 0 else 0


def positives_cap(classes: int, dim: int, max_pool_gb: float) -> int:
    """Each class's cap on the positives (ground-truth boxes) an SVM set holds: its share of the rows of ``dim``-d
    float32 features that ``max_pool_gb`` GB hold (0: no bound), so that the positives never take more than the
    negative pool's bound again however many objects there are. A class with more keeps a uniform sample of them.
    At 20 classes of 23,600-d pool5 and 8 GB: 4,237 each (VOC 2007's train split has at most 2,358 of a class)."""
    rows = pool_rows(dim, max_pool_gb)
    return max(1, rows // max(classes, 1)) if rows else 0


def negatives_cap(max_negatives: int, classes: int, dim: int, max_pool_gb: float, retrain_limit: int) -> int:
    """Each class's cap on its negative cache: ``max_negatives`` (0: none), lowered where needed so that
    ``classes`` caches of ``dim``-d float32 rows, each at the cap plus the ``retrain_limit`` negatives that may come
    before its next retrain, fill at most 90% of ``max_pool_gb`` GB (0: no bound); the rest holds the rows of the
    image being added. At least one row per class (:func:`pool_fits` says whether the bound then holds)."""
    room = _cap_room(classes, dim, max_pool_gb, retrain_limit)
    if room is None:
        return max_negatives
    fit = max(1, room)
    return min(max_negatives, fit) if max_negatives else fit


def pool_fits(classes: int, dim: int, max_pool_gb: float, retrain_limit: int) -> bool:
    """Whether ``classes`` caches of at least one row plus ``retrain_limit`` fit 90% of ``max_pool_gb`` GB."""
    room = _cap_room(classes, dim, max_pool_gb, retrain_limit)
    return room is None or room >= 1


def _cap_room(classes: int, dim: int, max_pool_gb: float, retrain_limit: int) -> int | None:
    """The largest per-class cap for which ``classes`` caches, each at the cap plus ``retrain_limit``, fill at most
    90% of ``max_pool_gb`` GB (below 1 where none fits); None without a bound."""
    rows = pool_rows(dim, max_pool_gb)
    return int(0.9 * rows) // max(classes, 1) - retrain_limit if rows else None


def mean_norm(features: Iterable[np.ndarray]) -> float:
    n = [np.linalg.norm(f, axis=1) for f in features if len(f)]
    if not n:
        raise ValueError("cannot compute the feature norm: no features")
    return float(np.concatenate(n).mean())
