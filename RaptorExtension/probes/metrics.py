"""Probe metrics and their plots.

The numbers are those of the Raptor paper and MedMNIST: AUC (one-vs-rest
macro average for more than two classes, macro over labels for multi-label),
accuracy, area under the precision-recall curve (average precision), and for
regression Pearson r^2 (plus MAE and RMSE, which carry the units).  A metric
that is undefined on a split (one class only, a constant target) is ``None``
rather than a misleading number.

Plots are drawn with Matplotlib's Agg backend, so they work on a headless
server and inside Slicer without touching its Qt event loop.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write

CLASSIFICATION_TASKS = ("binary", "multiclass", "multilabel")


def _finite(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def classification_metrics(task: str, y: np.ndarray, scores: np.ndarray) -> dict:
    """AUC, accuracy and AUPR for one split.

    ``y``: binary/multiclass: class indices (n,); multilabel: 0/1 (n, labels).
    ``scores``: probabilities, (n, classes) or (n, labels).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = int(len(y))
    out: dict = {"n": n, "auc": None, "accuracy": None, "aupr": None}
    if n == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "binary":
            out["accuracy"] = _finite(np.mean((scores[:, 1] >= 0.5).astype(int) == y))
            if len(np.unique(y)) == 2:
                out["auc"] = _finite(roc_auc_score(y, scores[:, 1]))
                out["aupr"] = _finite(average_precision_score(y, scores[:, 1]))
        elif task == "multiclass":
            classes = scores.shape[1]
            out["accuracy"] = _finite(np.mean(np.argmax(scores, axis=1) == y))
            onehot = np.eye(classes, dtype=int)[y]
            present = [c for c in range(classes) if 0 < onehot[:, c].sum() < n]
            if len(present) >= 2:
                out["auc"] = _finite(np.mean([roc_auc_score(onehot[:, c], scores[:, c]) for c in present]))
                out["aupr"] = _finite(np.mean([average_precision_score(onehot[:, c], scores[:, c]) for c in present]))
            out["classes_in_auc"] = len(present)
        elif task == "multilabel":
            out["accuracy"] = _finite(np.mean((scores >= 0.5).astype(int) == y))
            out["exact_match"] = _finite(np.mean(np.all((scores >= 0.5).astype(int) == y, axis=1)))
            present = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < n]
            if present:
                out["auc"] = _finite(np.mean([roc_auc_score(y[:, c], scores[:, c]) for c in present]))
                out["aupr"] = _finite(np.mean([average_precision_score(y[:, c], scores[:, c]) for c in present]))
            out["labels_in_auc"] = len(present)
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


def metrics_table(metrics: dict[str, dict], task: str, in_sample: Sequence[str] = ()) -> str:
    """A plain-text table of per-split metrics, for the terminal.

    ``in_sample``: the splits the probe was fitted on (train; train and val with
    ``--select cv``), marked ``*`` and footnoted, since their numbers are not held out.
    """
    keys = ("auc", "accuracy", "aupr") if task in CLASSIFICATION_TASKS else ("r2", "mae", "rmse")
    lines = [f"{'split':8s} {'n':>6s} " + " ".join(f"{k:>9s}" for k in keys)]
    order = {"train": 0, "val": 1, "test": 2}  # a probe file stores them sorted by name
    for split, values in sorted(metrics.items(), key=lambda item: order.get(item[0], 3)):
        cells = " ".join(f"{values.get(k):9.4f}" if values.get(k) is not None else f"{'-':>9s}" for k in keys)
        name = f"{split}*" if split in in_sample else split
        lines.append(f"{name:8s} {values.get('n', 0):6d} {cells}")
    marked = [s for s in metrics if s in in_sample]
    if marked:
        lines.append(f"* in-sample: the probe was fitted on the {' and '.join(marked)} rows, so these are not held-out numbers")
    return "\n".join(lines)


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


def plot_roc(path: str | Path, task: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> Path:
    """ROC curves per split (one-vs-rest per class, or per label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.2), squeeze=False)
    for ax, (split, (y, scores)) in zip(axes[0], splits.items()):
        if task == "binary":
            curves = [(class_names[1], (y == 1).astype(int), scores[:, 1])]
        elif task == "multiclass":
            curves = [(name, (y == c).astype(int), scores[:, c]) for c, name in enumerate(class_names)]
        else:
            curves = [(name, y[:, c], scores[:, c]) for c, name in enumerate(class_names)]
        for name, truth, score in curves:
            if 0 < truth.sum() < len(truth):
                fpr, tpr, _ = roc_curve(truth, score)
                ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=f"{split} (n={len(y)})", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("ROC", fontsize=10)
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
    "classification_metrics",
    "regression_metrics",
    "pearson_r2",
    "metrics_table",
    "plot_roc",
    "plot_pred_vs_true",
]
