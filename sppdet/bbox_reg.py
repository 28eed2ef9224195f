"""Per-class ridge bounding-box regressors (``spp_train_bbox_regressor.m``, R-CNN's method).

Inputs: pooled features (scaled to mean norm 20) plus a bias feature; samples: windows
(ground truth included) with IoU > ``min_overlap`` (0.5) to an object of the class;
targets ``(dx, dy, dw, dh)`` to that object. Targets are centred and whitened
(``T = V diag(1/sqrt(D + 0.001)) V'``, as the authors) or plainly standardised; the ridge
solve ``(X'X + lam I) w = X'y`` is done in its dual form ``(XX' + lam I) a = y, w = X'a``
when there are fewer samples than dimensions (same solution, far cheaper at 12,800-d).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .boxes import decode, encode

__all__ = ["fit_ridge", "BoxRegressor", "fit_class_regressor"]


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Ridge regression with the last column of ``x`` a (regularised) bias, as the authors."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, d = x.shape
    if n < d:
        a = scipy.linalg.cho_solve(scipy.linalg.cho_factor(x @ x.T + lam * np.eye(n)), y)
        return x.T @ a
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(x.T @ x + lam * np.eye(d)), x.T @ y)


def fit_class_regressor(feats: np.ndarray, proposals: np.ndarray, targets_boxes: np.ndarray, lam: float,
                        whiten: bool = True, bias: float = 1.0) -> dict:
    """Fit one class. ``feats`` (N, D) scaled features, ``proposals``/``targets_boxes`` (N, 4)."""
    t = encode(proposals, targets_boxes)
    mu = t.mean(0)
    if whiten:
        cov = np.cov((t - mu).T) if len(t) > 1 else np.eye(4)
        evals, evecs = np.linalg.eigh(cov)
        T = evecs @ np.diag(1.0 / np.sqrt(np.maximum(evals, 0) + 0.001)) @ evecs.T
        T_inv = np.linalg.inv(T)
    else:
        sd = t.std(0) + 1e-6
        T, T_inv = np.diag(1.0 / sd), np.diag(sd)
    y = (t - mu) @ T
    x = np.concatenate([feats, np.full((len(feats), 1), bias)], 1)
    w = fit_ridge(x, y, lam)
    return {"W": w[:-1].astype(np.float32), "b": (w[-1] * bias).astype(np.float32), "mu": mu, "T_inv": T_inv,
            "train_mse": float(np.mean((x @ w - y) ** 2)), "samples": int(len(t))}


class BoxRegressor:
    """K per-class regressors; ``W`` (K, D, 4), ``b`` (K, 4), ``mu`` (K, 4), ``T_inv`` (K, 4, 4)."""

    def __init__(self, W, b, mu, T_inv, feature_scale: float, trained: np.ndarray):
        self.W, self.b = np.asarray(W, np.float32), np.asarray(b, np.float32)
        self.mu, self.T_inv = np.asarray(mu, np.float64), np.asarray(T_inv, np.float64)
        self.feature_scale = float(feature_scale)
        self.trained = np.asarray(trained, bool)

    def predict(self, k: int, feats: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Refined ``(N, 4)`` boxes of class ``k`` from raw pooled ``feats`` (N, D)."""
        if not self.trained[k] or len(boxes) == 0:
            return np.asarray(boxes, np.float32)
        y = (np.asarray(feats, np.float32) * self.feature_scale) @ self.W[k] + self.b[k]
        deltas = y.astype(np.float64) @ self.T_inv[k] + self.mu[k]
        return decode(boxes, deltas)

    def save(self, path, classes) -> None:
        from .store import atomic_save_npz

        atomic_save_npz(path, W=self.W, b=self.b, mu=self.mu, T_inv=self.T_inv,
                        feature_scale=np.float64(self.feature_scale), trained=self.trained, classes=np.array(classes))

    @classmethod
    def load(cls, path) -> "BoxRegressor":
        from .store import load_npz

        d = load_npz(path, ("W", "b", "mu", "T_inv", "feature_scale", "trained"))
        return cls(d["W"], d["b"], d["mu"], d["T_inv"], float(d["feature_scale"]), d["trained"])
