"""The files a fitted probe comes with, named from the probe's path, and how it decides in words.

One place for the command line (``raptor probe fit``), the Raptor server's fit
job and the Slicer panel, so the three write the same files: the probe, its
metrics JSON (with the operating threshold and its rates), the ROC curves (or
predicted-versus-true plot) and, for classification, a reliability diagram.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from .metrics import CLASSIFICATION_TASKS, plot_pred_vs_true, plot_reliability, plot_roc
from .probe import FitResult, Probe


@dataclass
class FitOutputs:
    probe: Path
    metrics: Path
    plot: Path
    reliability: Path | None = None
    """The reliability diagram (classification probes only)."""

    def all(self) -> list[Path]:
        return [p for p in (self.probe, self.metrics, self.plot, self.reliability) if p is not None]


def output_stem(path: Path) -> Path:
    name = path.name
    for suffix in (".raptorprobe", ".npz", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def default_paths(output: str | Path) -> dict[str, Path]:
    """Every file a fit may write beside ``output`` by default (which plot depends on the task, known later)."""
    stem = output_stem(Path(output))
    return {"metrics": Path(f"{stem}_metrics.json"), "roc": Path(f"{stem}_roc.png"), "pred": Path(f"{stem}_pred.png"),
            "reliability": Path(f"{stem}_reliability.png")}


def fit_summary(result: FitResult) -> dict:
    """The metrics JSON: task, selection, per-split metrics, warnings, and how the probe decides."""
    probe = result.probe
    summary = {"task": probe.task, "model": probe.model, "classes": probe.classes,
               "selection": probe.training.get("selection"), "metrics": probe.metrics, "warnings": result.warnings}
    if probe.thresholds is not None:
        summary["threshold"] = {**probe.threshold_info, "values": probe.thresholds, "names": probe.threshold_names}
        summary["operating_points"] = probe.operating_points()
    if probe.task in CLASSIFICATION_TASKS:
        summary["class_weight"] = probe.training.get("class_weight")
        summary["calibration"] = probe.training.get("calibration")
    return summary


def write_fit_outputs(result: FitResult, output: str | Path, *, metrics: str | Path | None = None,
                      plot: str | Path | None = None, reliability_plot: str | Path | None = None) -> FitOutputs:
    """Save the probe (named after its file), ``<stem>_metrics.json``, ``<stem>_roc.png`` (or ``_pred.png``)
    and, for classification, ``<stem>_reliability.png``."""
    output = Path(output)
    defaults = default_paths(output)
    probe = result.probe
    probe.name = output.name.removesuffix(".raptorprobe")
    probe.save(output)
    report = Path(metrics) if metrics else defaults["metrics"]
    atomic_write_text(report, json.dumps(fit_summary(result), indent=2, sort_keys=True) + "\n")
    reliability = None
    if probe.task in CLASSIFICATION_TASKS:
        in_sample = probe.training.get("fitted_on", ())
        picture = Path(plot) if plot else defaults["roc"]
        plot_roc(picture, probe.task, result.predictions, probe.classes, probe.thresholds, in_sample)
        reliability = Path(reliability_plot) if reliability_plot else defaults["reliability"]
        plot_reliability(reliability, probe.task, result.predictions, probe.classes, in_sample=in_sample)
    else:
        picture = Path(plot) if plot else defaults["pred"]
        plot_pred_vs_true(picture, result.predictions, probe.classes)
    return FitOutputs(probe=output, metrics=report, plot=picture, reliability=reliability)


def rate_text(point: dict, key: str) -> str:
    """A rate with its 95% interval, e.g. ``0.812 (0.710-0.900)``."""
    if point[key] is None:
        return "-"
    ci = point[f"{key}_ci95"]
    return f"{point[key]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def decision_lines(probe: Probe) -> list[str]:
    """How the probe decides: its threshold(s) and how they were set, its class weighting and calibration."""
    lines = []
    if probe.thresholds is not None:
        info = probe.threshold_info
        criterion = info.get("criterion", "none")
        how = {"youden": "Youden's J (sensitivity + specificity - 1) maximized",
               "sensitivity": f"sensitivity at least {info.get('target')}",
               "specificity": f"specificity at least {info.get('target')}",
               "fixed": "fixed", "none": "0.5, not chosen on data"}.get(criterion, str(criterion))
        where = f", chosen on {info['chosen_on']} ({info.get('rows')} rows)" if info.get("chosen_on") else ""
        values = ", ".join(f"p({name}) >= {t:.4g}" for name, t in zip(probe.threshold_names, probe.thresholds))
        lines.append(f"decides {values}: {how}{where}")
    weighting = probe.training.get("class_weight")
    calibration = probe.training.get("calibration") or ({"method": probe.calibration.method}
                                                         if probe.calibration is not None else None)
    if weighting or calibration:
        parts = ([f"class weight {weighting}"] if weighting else []) + (
            [f"{calibration['method']} calibration" + (f" on {calibration['fitted_on']}" if calibration.get("fitted_on")
                                                        else "")] if calibration else [])
        lines.append("; ".join(parts))
    return lines


__all__ = ["FitOutputs", "output_stem", "default_paths", "fit_summary", "write_fit_outputs", "rate_text",
           "decision_lines"]
