"""Calibrated probabilities for classification probes, fitted by scikit-learn, applied with NumPy.

Why calibrate
-------------
A logistic probe fitted on a thousand wide embeddings ranks volumes well
(its AUC) but its probabilities need not mean what they say: strong
regularization shrinks them towards the base rate, class weighting moves
them, and "p = 0.31" is only useful to a clinician if about 31 of 100 such
volumes are positive.  Calibration maps the probe's decision value (the
logit) to a probability that matches observed frequencies.

How
---
Exactly as scikit-learn's :class:`~sklearn.calibration.CalibratedClassifierCV`
with ``ensemble=False`` does, and by calling it: the probe is refitted on
each cross-validation fold of the rows the final model is fitted on, the
out-of-fold decision values are collected (every row scored by a model that
never saw it), and one calibrator per output is fitted on them: Platt's
sigmoid (``sigmoid``: two numbers) or isotonic regression (``isotonic``: a
monotone step-wise linear map, which needs more rows).  For several classes
each class's logit is calibrated one-vs-rest and the results are normalized
to sum to one, as scikit-learn does.

The probe's own fitting (standardization, the kernel form for wide
embeddings) is handed to scikit-learn as an estimator whose "features" are
row numbers, so the large feature matrix is never copied per fold.

The fitted calibrators are stored in the ``.raptorprobe`` file as plain
arrays (sigmoid: ``calibration_a``, ``calibration_b``; isotonic:
``calibration_x_<i>``, ``calibration_y_<i>`` per output) and applied with
NumPy, so Slicer needs no scikit-learn to use a calibrated probe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

CALIBRATION_METHODS = ("sigmoid", "isotonic")

DecisionFn = Callable[[np.ndarray], np.ndarray]
"""``decide(rows) -> (len(rows), outputs)`` decision values of a fitted model."""
FitRowsFn = Callable[[np.ndarray, np.ndarray], DecisionFn]
"""``fit(rows, y) -> decide``: fit the probe on these rows (indices into the fit rows) with these labels."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass
class Calibration:
    """One calibrator per calibrated output (the positive class, each class, or each label)."""

    method: str
    a: np.ndarray | None = None
    """Sigmoid slopes, (outputs,): ``p = 1 / (1 + exp(a * logit + b))``."""
    b: np.ndarray | None = None
    knots_x: list[np.ndarray] = field(default_factory=list)
    """Isotonic: per output, the increasing decision values of the knots ..."""
    knots_y: list[np.ndarray] = field(default_factory=list)
    """... and the non-decreasing probabilities there (linear between knots, constant beyond them)."""

    @property
    def outputs(self) -> int:
        return int(self.a.size) if self.method == "sigmoid" else len(self.knots_x)

    def apply(self, output: int, decision: np.ndarray) -> np.ndarray:
        """Calibrated probability of one output from its decision values."""
        decision = np.asarray(decision, dtype=np.float64)
        if self.method == "sigmoid":
            return _sigmoid(-(self.a[output] * decision + self.b[output]))
        return np.interp(decision, self.knots_x[output], self.knots_y[output])

    def probabilities(self, task: str, decision: np.ndarray) -> np.ndarray:
        """(n, outputs) decision values to probabilities: binary (n, 2), multi-class (n, classes), multi-label (n, labels)."""
        if task == "binary":
            p = self.apply(0, decision[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        proba = np.stack([self.apply(c, decision[:, c]) for c in range(decision.shape[1])], axis=1)
        if task == "multiclass":  # normalized as scikit-learn's _CalibratedClassifier does
            total = proba.sum(axis=1, keepdims=True)
            proba = np.divide(proba, total, out=np.full_like(proba, 1.0 / proba.shape[1]), where=total != 0)
        proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
        return proba

    # -- the probe file ------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        if self.method == "sigmoid":
            return {"calibration_a": self.a, "calibration_b": self.b}
        arrays = {}
        for i, (x, y) in enumerate(zip(self.knots_x, self.knots_y)):
            arrays[f"calibration_x_{i}"], arrays[f"calibration_y_{i}"] = x, y
        return arrays

    @classmethod
    def from_arrays(cls, method: str, arrays: dict[str, np.ndarray], outputs: int) -> Calibration:
        """Rebuild from a probe file's arrays; ``ValueError`` with the reason when they do not fit."""
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        if method == "sigmoid":
            a, b = arrays.get("calibration_a"), arrays.get("calibration_b")
            if a is None or b is None or a.shape != (outputs,) or b.shape != (outputs,):
                raise ValueError(f"sigmoid calibration needs calibration_a and calibration_b of shape ({outputs},)")
            return cls(method=method, a=a, b=b)
        xs, ys = [], []
        for i in range(outputs):
            x, y = arrays.get(f"calibration_x_{i}"), arrays.get(f"calibration_y_{i}")
            if x is None or y is None or x.ndim != 1 or x.shape != y.shape or x.size == 0:
                raise ValueError(f"isotonic calibration {i} needs calibration_x_{i} and calibration_y_{i} of one length")
            if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0) or y.min() < 0.0 or y.max() > 1.0:
                raise ValueError(f"isotonic calibration {i} must increase, with probabilities in [0, 1]")
            xs.append(x)
            ys.append(y)
        return cls(method=method, knots_x=xs, knots_y=ys)


def _row_estimator(fit: FitRowsFn):
    """A scikit-learn classifier whose input is a column of row numbers; fitting calls the probe's own fit."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class RowProbe(ClassifierMixin, BaseEstimator):
        def __init__(self, fit_rows=None):
            self.fit_rows = fit_rows  # a plain function: clone() deep-copies parameters, and copies functions by reference

        def fit(self, X, y):
            rows = np.asarray(X)[:, 0].astype(np.int64)
            y = np.asarray(y)
            self.classes_ = np.unique(y)
            self.decide_ = self.fit_rows(rows, y)
            return self

        def decision_function(self, X):
            d = self.decide_(np.asarray(X)[:, 0].astype(np.int64))
            return d[:, 0] if d.shape[1] == 1 else d

        def predict(self, X):
            d = self.decision_function(X)
            return self.classes_[(d > 0).astype(int) if d.ndim == 1 else np.argmax(d, axis=1)]

    return RowProbe(fit_rows=fit)


def fit_calibration(method: str, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], fit: FitRowsFn
                    ) -> Calibration:
    """Calibrators for one probe (binary or multi-class ``y``) by ``CalibratedClassifierCV(ensemble=False)``.

    ``folds`` are the (train, held-out) row splits the out-of-fold decision
    values are taken from (the probe's own CV folds).  scikit-learn also refits
    the probe on all rows, as it must; only the calibrators are kept (the
    probe's final model is the same fit).
    """
    from sklearn.calibration import CalibratedClassifierCV

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)} (got {method!r})")
    rows = np.arange(len(y)).reshape(-1, 1)
    calibrated = CalibratedClassifierCV(_row_estimator(fit), method=method, cv=list(folds), ensemble=False)
    calibrated.fit(rows, y)
    calibrators = calibrated.calibrated_classifiers_[0].calibrators
    if method == "sigmoid":
        out = Calibration(method=method, a=np.array([float(c.a_) for c in calibrators]),
                          b=np.array([float(c.b_) for c in calibrators]))
    else:
        out = Calibration(method=method,
                          knots_x=[np.asarray(c.X_thresholds_, dtype=np.float64) for c in calibrators],
                          knots_y=[np.clip(np.asarray(c.y_thresholds_, dtype=np.float64), 0.0, 1.0) for c in calibrators])
    return out


__all__ = ["CALIBRATION_METHODS", "Calibration", "fit_calibration"]
