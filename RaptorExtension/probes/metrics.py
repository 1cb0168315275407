"""Probe metrics and their plots.

The numbers are those of the Raptor paper and MedMNIST: AUC (one-vs-rest
macro average for more than two classes, macro over labels for multi-label),
accuracy, area under the precision-recall curve (average precision), and for
regression Pearson r^2 (plus MAE and RMSE, which carry the units).  A metric
that is undefined on a split (one class only, a constant target) is ``None``
rather than a misleading number.

What a clinician reads besides them: the Brier score (how good the
probabilities are, not only their ranking) and, for a binary decision at an
operating threshold, sensitivity, specificity, PPV, NPV and balanced
accuracy, each with a 95% percentile bootstrap interval (1000 resamples,
seeded, so the same inputs give the same interval).  The threshold itself is
chosen by :func:`choose_threshold` (Youden's J, a sensitivity or specificity
target, or a fixed number) on rows the final model was not fitted on.

Plots are drawn with Matplotlib's Agg backend, so they work on a headless
server and inside Slicer without touching its Qt event loop.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import RaptorError

CLASSIFICATION_TASKS = ("binary", "multiclass", "multilabel")


def _finite(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def classification_metrics(task: str, y: np.ndarray, scores: np.ndarray, thresholds: Sequence[float] | None = None, *,
                           names: Sequence[str] | None = None, resamples: int = 0, seed: int = 0) -> dict:
    """AUC, accuracy, AUPR and Brier score for one split; for binary and multi-label, the rates at the threshold(s).

    ``y``: binary/multiclass: class indices (n,); multilabel: 0/1 (n, labels).
    ``scores``: probabilities, (n, classes) or (n, labels).
    ``thresholds``: the operating threshold of the positive class (binary, one
    value) or of each label (multi-label); default 0.5.  Accuracy is that of
    the decisions at these thresholds (``accuracy_at_0.5`` is kept beside it
    when they differ).  ``resamples`` > 0 adds bootstrap intervals (see
    :func:`operating_metrics`); ``names`` names the labels of a multi-label task.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = int(len(y))
    out: dict = {"n": n, "auc": None, "accuracy": None, "aupr": None}
    if n == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "binary":
            t = float(thresholds[0]) if thresholds is not None else 0.5
            out["accuracy"] = _finite(np.mean((scores[:, 1] >= t).astype(int) == y))
            if t != 0.5:
                out["accuracy_at_0.5"] = _finite(np.mean((scores[:, 1] >= 0.5).astype(int) == y))
            if len(np.unique(y)) == 2:
                out["auc"] = _finite(roc_auc_score(y, scores[:, 1]))
                out["aupr"] = _finite(average_precision_score(y, scores[:, 1]))
            out["brier"] = brier_score(task, y, scores)
            out.update(operating_metrics(y, scores[:, 1], t, resamples=resamples, seed=seed))
        elif task == "multiclass":
            classes = scores.shape[1]
            out["accuracy"] = _finite(np.mean(np.argmax(scores, axis=1) == y))
            onehot = np.eye(classes, dtype=int)[y]
            present = [c for c in range(classes) if 0 < onehot[:, c].sum() < n]
            if len(present) >= 2:
                out["auc"] = _finite(np.mean([roc_auc_score(onehot[:, c], scores[:, c]) for c in present]))
                out["aupr"] = _finite(np.mean([average_precision_score(onehot[:, c], scores[:, c]) for c in present]))
            out["classes_in_auc"] = len(present)
            out["brier"] = brier_score(task, y, scores)
        elif task == "multilabel":
            labels = y.shape[1]
            t = np.asarray(thresholds if thresholds is not None else [0.5] * labels, dtype=np.float64)
            decided = (scores >= t).astype(int)
            out["accuracy"] = _finite(np.mean(decided == y))
            out["exact_match"] = _finite(np.mean(np.all(decided == y, axis=1)))
            if np.any(t != 0.5):
                out["accuracy_at_0.5"] = _finite(np.mean((scores >= 0.5).astype(int) == y))
            present = [c for c in range(labels) if 0 < y[:, c].sum() < n]
            if present:
                out["auc"] = _finite(np.mean([roc_auc_score(y[:, c], scores[:, c]) for c in present]))
                out["aupr"] = _finite(np.mean([average_precision_score(y[:, c], scores[:, c]) for c in present]))
            out["labels_in_auc"] = len(present)
            out["brier"] = brier_score(task, y, scores)
            per_label = {}
            for c in range(labels):
                name = names[c] if names is not None else str(c)
                one = {"n": n, "positives": int(y[:, c].sum()),
                       "auc": _finite(roc_auc_score(y[:, c], scores[:, c])) if c in present else None}
                one.update(operating_metrics(y[:, c], scores[:, c], float(t[c]), resamples=resamples, seed=seed))
                per_label[name] = one
            out["per_label"] = per_label
        else:
            raise ValueError(f"not a classification task: {task}")
    return out


def pearson_r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    """Squared Pearson correlation, or None when either side is constant."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if len(y) < 2 or np.std(y) == 0 or np.std(pred) == 0:
        return None
    r = np.corrcoef(y, pred)[0, 1]
    return _finite(r * r)


def regression_metrics(y: np.ndarray, pred: np.ndarray, targets: Sequence[str]) -> dict:
    """Pearson r^2 (mean over targets and per target), MAE and RMSE for one split."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    out: dict = {"n": int(len(y)), "r2": None, "mae": None, "rmse": None}
    if len(y) == 0:
        return out
    per = {}
    for c, name in enumerate(targets):
        per[name] = {
            "r2": pearson_r2(y[:, c], pred[:, c]),
            "mae": _finite(np.mean(np.abs(y[:, c] - pred[:, c]))),
            "rmse": _finite(np.sqrt(np.mean((y[:, c] - pred[:, c]) ** 2))),
        }
    r2s = [v["r2"] for v in per.values() if v["r2"] is not None]
    out["r2"] = _finite(np.mean(r2s)) if r2s else None
    out["mae"] = _finite(np.mean([v["mae"] for v in per.values()]))
    out["rmse"] = _finite(np.mean([v["rmse"] for v in per.values()]))
    if len(targets) > 1:
        out["per_target"] = per
    return out


def _cell(value, width: int = 9, digits: int = 4) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def _split_label(split: str, values: dict) -> str:
    return split + ("*" if values.get("in_sample") else "")


def metrics_table(metrics: dict[str, dict], task: str, in_sample: Sequence[str] = ()) -> str:
    """A plain-text table of per-split metrics, for the terminal.

    Splits the final model was fitted on are marked ``*`` (in-sample: their
    numbers are optimistic): those flagged ``in_sample`` in the metrics, and
    those named in ``in_sample`` (older probe files record only ``fitted_on``).
    Binary and multi-label probes get a second table: the rates at the
    operating threshold with 95% bootstrap intervals.
    """
    order = {"train": 0, "val": 1, "test": 2, "oof": 3}
    metrics = {split: dict(values, in_sample=True) if split in in_sample else values
               for split, values in sorted(metrics.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))}
    keys = ("auc", "accuracy", "aupr", "brier") if task in CLASSIFICATION_TASKS else ("r2", "mae", "rmse")
    lines = [f"{'split':10s} {'n':>6s} " + " ".join(f"{k:>9s}" for k in keys)]
    for split, values in metrics.items():
        cells = " ".join(_cell(values.get(k)) for k in keys)
        lines.append(f"{_split_label(split, values):10s} {values.get('n', 0):6d} {cells}")
    notes = []
    if any(v.get("in_sample") for v in metrics.values()):
        notes.append("* in-sample: the final model was fitted on these rows")
    if "oof" in metrics:
        notes.append("oof: out-of-fold predictions on train+val (each row scored by a model fitted without it)")
    if task == "binary":
        blocks = [(None, {s: v for s, v in metrics.items() if "sensitivity" in v})]
    elif task == "multilabel":
        names = list(next((v["per_label"] for v in metrics.values() if "per_label" in v), {}))
        blocks = [(name, {s: dict(v["per_label"][name], in_sample=v.get("in_sample"))
                          for s, v in metrics.items() if name in v.get("per_label", {})}) for name in names]
    else:
        blocks = []
    for name, rows in blocks:
        if not rows:
            continue
        first = next(iter(rows.values()))
        bootstrap = first.get("bootstrap")
        about = (f"95% bootstrap CI, {bootstrap['resamples']} resamples, seed {bootstrap['seed']}" if bootstrap
                 else "no bootstrap")
        lines.append("")
        lines.append(f"{'label ' + name + ': ' if name else ''}at threshold p >= {first['threshold']:.4g} ({about})")
        columns = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "auc")
        heads = ("sensitivity", "specificity", "PPV", "NPV", "bal. accuracy", "AUC")
        lines.append(f"{'split':10s} " + " ".join(f"{h:>21s}" for h in heads))
        for split, values in rows.items():
            cells = []
            for key in columns:
                value, ci = values.get(key), (values.get("ci95") or {}).get(key)
                text = "-" if value is None else f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                cells.append(f"{text:>21s}")
            lines.append(f"{_split_label(split, values):10s} " + " ".join(cells))
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------------------
# Operating thresholds


THRESHOLD_CRITERIA = ("youden", "sensitivity", "specificity", "fixed", "none")


@dataclass(frozen=True)
class ThresholdRule:
    """How a binary decision's threshold on the probability is set.

    ``youden``: maximize sensitivity + specificity - 1 (Youden's J);
    ``sensitivity`` / ``specificity``: the threshold that keeps that rate at
    least ``target`` and, within that, maximizes the other one;
    ``fixed``: ``target`` itself; ``none``: 0.5, not chosen on data.
    """

    criterion: str
    target: float | None = None

    @property
    def chosen_on_data(self) -> bool:
        return self.criterion in ("youden", "sensitivity", "specificity")

    def describe(self) -> str:
        if self.criterion in ("sensitivity", "specificity"):
            return f"{self.criterion}:{self.target:g}"
        if self.criterion == "fixed":
            return f"fixed {self.target:g}"
        return self.criterion


def parse_threshold(text: str) -> ThresholdRule:
    """``youden``, ``sensitivity:0.95``, ``specificity:0.90``, a number in (0, 1), or ``none`` (0.5)."""
    value = str(text).strip().lower()
    usage = "use youden, sensitivity:0.95, specificity:0.90, a probability such as 0.3, or none"
    if value in ("youden", "none"):
        return ThresholdRule(value)
    if ":" in value:
        name, _, number = value.partition(":")
        name = {"sens": "sensitivity", "spec": "specificity"}.get(name.strip(), name.strip())
        try:
            target = float(number)
        except ValueError:
            target = float("nan")
        if name not in ("sensitivity", "specificity") or not 0.0 < target <= 1.0:
            raise RaptorError(f"threshold {text!r}: {usage} (the rate must lie in (0, 1])")
        return ThresholdRule(name, target)
    try:
        target = float(value)
    except ValueError:
        raise RaptorError(f"threshold {text!r}: {usage}") from None
    if not 0.0 < target < 1.0:
        raise RaptorError(f"threshold {text!r}: {usage} (a fixed threshold lies strictly between 0 and 1)")
    return ThresholdRule("fixed", target)


def _rates(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of ``p >= t`` for every ``t`` (vectorized through sorting)."""
    positives, negatives = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = positives.size - np.searchsorted(positives, thresholds, side="left")
    tn = np.searchsorted(negatives, thresholds, side="left")
    return tp / max(positives.size, 1), tn / max(negatives.size, 1)


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: ThresholdRule) -> float:
    """The threshold on ``p`` (decide positive when ``p >= t``) that ``rule`` picks on these rows.

    Candidates lie halfway between consecutive distinct probabilities (and
    halfway to 0 and 1 at the ends), so a threshold never sits on a score
    it was chosen from.  Ties in Youden's J go to the candidate closest to
    0.5.  Needs both classes in ``y`` unless the rule is fixed.
    """
    if rule.criterion == "none":
        return 0.5
    if rule.criterion == "fixed":
        return float(rule.target)
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.size == 0 or y.min() == y.max():
        raise ValueError("both classes are needed to choose a threshold")
    values = np.unique(np.concatenate([[0.0], np.clip(p, 0.0, 1.0), [1.0]]))
    candidates = (values[:-1] + values[1:]) / 2.0 if values.size > 1 else values
    sensitivity, specificity = _rates(y, p, candidates)
    if rule.criterion == "youden":
        j = sensitivity + specificity - 1.0
        best = np.flatnonzero(j >= j.max() - 1e-12)
        return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    if rule.criterion == "sensitivity":
        ok = np.flatnonzero(sensitivity >= rule.target - 1e-12)
        return float(candidates[ok].max())  # the strictest threshold that still finds enough positives
    ok = np.flatnonzero(specificity >= rule.target - 1e-12)
    return float(candidates[ok].min()) if ok.size else float(candidates.max())


# ---------------------------------------------------------------------------
# Metrics at an operating threshold, with bootstrap confidence intervals

OPERATING_KEYS = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "accuracy")
BOOTSTRAP_KEYS = ("auc",) + OPERATING_KEYS
BOOTSTRAP_RESAMPLES = 1000


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _operating_values(y: np.ndarray, decided: np.ndarray) -> dict[str, np.ndarray]:
    """Rates from labels and decisions, along the last axis (one row per bootstrap resample)."""
    tp = np.sum(decided & (y == 1), axis=-1)
    fp = np.sum(decided & (y == 0), axis=-1)
    fn = np.sum(~decided & (y == 1), axis=-1)
    tn = np.sum(~decided & (y == 0), axis=-1)
    sensitivity, specificity = _safe_ratio(tp, tp + fn), _safe_ratio(tn, tn + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _safe_ratio(tp, tp + fp),
        "npv": _safe_ratio(tn, tn + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "accuracy": _safe_ratio(tp + tn, tp + tn + fp + fn),
        "counts": np.stack([tp, fp, fn, tn], axis=-1),
    }


def _auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC of every row of (resamples, n) labels and scores (Mann-Whitney with mid-ranks for ties)."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=-1)
    n1 = y.sum(axis=-1).astype(np.float64)
    n0 = y.shape[-1] - n1
    u = np.sum(ranks * (y == 1), axis=-1) - n1 * (n1 + 1) / 2.0
    return _safe_ratio(u, n1 * n0)


def operating_metrics(y: np.ndarray, p: np.ndarray, threshold: float, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """Sensitivity, specificity, PPV, NPV, balanced accuracy and accuracy of ``p >= threshold``.

    With ``resamples`` > 0, 95% percentile bootstrap intervals (rows drawn with
    replacement, ``numpy.random.default_rng(seed)``) and bootstrap standard
    errors for those and for the AUC; a resample where a rate is undefined
    (no positive drawn, no positive decision) is left out of that rate only.
    """
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    point = _operating_values(y, p >= threshold)
    tp, fp, fn, tn = (int(v) for v in point.pop("counts"))
    out: dict = {"threshold": _finite(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    out.update({k: _finite(v) for k, v in point.items()})
    if resamples <= 0 or y.size < 2:
        return out
    index = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    yb, pb = y[index], p[index]
    draws = _operating_values(yb, pb >= threshold)
    draws.pop("counts")
    draws["auc"] = _auc_rows(yb, pb)
    ci, se = {}, {}
    for key in BOOTSTRAP_KEYS:
        values = draws[key][np.isfinite(draws[key])]
        if values.size >= max(10, resamples // 10):
            low, high = np.percentile(values, [2.5, 97.5])
            ci[key], se[key] = [_finite(low), _finite(high)], _finite(np.std(values, ddof=1))
        else:
            ci[key], se[key] = None, None
    out["ci95"], out["se"] = ci, se
    out["bootstrap"] = {"resamples": int(resamples), "seed": int(seed), "method": "percentile"}
    return out


def brier_score(task: str, y: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean squared error of the probabilities: positive class (binary), all classes (multi-class), per label averaged."""
    if len(y) == 0:
        return None
    if task == "binary":
        return _finite(np.mean((scores[:, 1] - y) ** 2))
    if task == "multiclass":
        onehot = np.eye(scores.shape[1])[y]
        return _finite(np.mean(np.sum((scores - onehot) ** 2, axis=1)))
    return _finite(np.mean((scores - y) ** 2))


# ---------------------------------------------------------------------------
# Plots


def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _save_png(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    data = _figure_bytes(fig)
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(data)
    return Path(path)


def _curves(task: str, y: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """(output index, name, 0/1 truth, probability) per curve: the positive class, each class, or each label."""
    if task == "binary":
        return [(0, class_names[1], (y == 1).astype(int), scores[:, 1])]
    if task == "multiclass":
        return [(c, name, (y == c).astype(int), scores[:, c]) for c, name in enumerate(class_names)]
    return [(c, name, y[:, c], scores[:, c]) for c, name in enumerate(class_names)]


def _title(split: str, n: int, in_sample: Sequence[str], extra: str = "") -> str:
    return f"{split} ({'in-sample, ' if split in in_sample else ''}n={n}{extra})"


def plot_roc(path: str | Path, task: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str],
             thresholds: Sequence[float] | None = None, in_sample: Sequence[str] = ()) -> Path:
    """ROC curves per split (one-vs-rest per class, or per label) as a PNG; the operating point(s) marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.2), squeeze=False)
    for ax, (split, (y, scores)) in zip(axes[0], splits.items()):
        for output, name, truth, score in _curves(task, y, scores, class_names):
            if 0 < truth.sum() < len(truth):
                fpr, tpr, _ = roc_curve(truth, score)
                line, = ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
                if thresholds is not None and task != "multiclass":
                    t = float(thresholds[output])
                    decided = score >= t
                    ax.plot([np.mean(decided[truth == 0])], [np.mean(decided[truth == 1])], "o", ms=6,
                            color=line.get_color(), markeredgecolor="k", label=f"{name}: p >= {t:.3g}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=_title(split, len(y), in_sample), xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("ROC", fontsize=10)
    return _save_png(fig, path)


def plot_reliability(path: str | Path, task: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                     class_names: Sequence[str], bins: int = 10, in_sample: Sequence[str] = ()) -> Path:
    """Reliability diagrams per split (observed frequency against mean predicted probability), Brier score in the title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.2), squeeze=False)
    for ax, (split, (y, scores)) in zip(axes[0], splits.items()):
        for _, name, truth, score in _curves(task, y, scores, class_names):
            if 0 < truth.sum() < len(truth):
                observed, predicted = calibration_curve(truth, score, n_bins=bins, strategy="uniform")
                ax.plot(predicted, observed, "o-", lw=1.2, ms=3, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        brier = brier_score(task, y, scores)
        ax.set(title=_title(split, len(y), in_sample, f", Brier {brier if brier is not None else float('nan'):.4f}"),
               xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Reliability ({bins} equal-width bins)", fontsize=10)
    return _save_png(fig, path)


def plot_pred_vs_true(path: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], targets: Sequence[str]) -> Path:
    """Predicted-versus-true scatter per split and target as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(targets), len(splits), figsize=(4.0 * len(splits), 3.8 * len(targets)), squeeze=False)
    for row, name in enumerate(targets):
        for col, (split, (y, pred)) in enumerate(splits.items()):
            ax = axes[row][col]
            y2 = np.asarray(y, dtype=float).reshape(len(y), -1)[:, row]
            p2 = np.asarray(pred, dtype=float).reshape(len(pred), -1)[:, row]
            ax.scatter(y2, p2, s=8, alpha=0.7)
            if len(y2):
                lo, hi = float(min(y2.min(), p2.min())), float(max(y2.max(), p2.max()))
                ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            r2 = pearson_r2(y2, p2)
            ax.set(title=f"{name} - {split} (r2 {r2 if r2 is not None else float('nan'):.3f})", xlabel="true", ylabel="predicted")
    return _save_png(fig, path)


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "ThresholdRule",
    "brier_score",
    "choose_threshold",
    "classification_metrics",
    "operating_metrics",
    "parse_threshold",
    "plot_reliability",
    "regression_metrics",
    "pearson_r2",
    "metrics_table",
    "plot_roc",
    "plot_pred_vs_true",
]
