"""The files a fitted probe comes with: the probe, its metrics JSON and its plot, named from the probe's path.

One place for the command line (``raptor probe fit``), the Raptor server's fit
job and the Slicer panel, so the three write the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from .metrics import CLASSIFICATION_TASKS, plot_pred_vs_true, plot_roc
from .probe import FitResult


@dataclass
class FitOutputs:
    probe: Path
    metrics: Path
    plot: Path


def output_stem(path: Path) -> Path:
    name = path.name
    for suffix in (".raptorprobe", ".npz", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def write_fit_outputs(result: FitResult, output: str | Path, *, metrics: str | Path | None = None,
                      plot: str | Path | None = None) -> FitOutputs:
    """Save the probe (named after its file), ``<stem>_metrics.json`` and ``<stem>_roc.png`` (or ``_pred.png``)."""
    output = Path(output)
    probe = result.probe
    probe.name = output.name.removesuffix(".raptorprobe")
    probe.save(output)
    report = Path(metrics) if metrics else Path(f"{output_stem(output)}_metrics.json")
    atomic_write_text(report, json.dumps({"task": probe.task, "model": probe.model, "classes": probe.classes,
                                          "selection": probe.training.get("selection"), "metrics": probe.metrics,
                                          "warnings": result.warnings},
                                         indent=2, sort_keys=True) + "\n")
    if probe.task in CLASSIFICATION_TASKS:
        picture = Path(plot) if plot else Path(f"{output_stem(output)}_roc.png")
        plot_roc(picture, probe.task, result.predictions, probe.classes)
    else:
        picture = Path(plot) if plot else Path(f"{output_stem(output)}_pred.png")
        plot_pred_vs_true(picture, result.predictions, probe.classes)
    return FitOutputs(probe=output, metrics=report, plot=picture)


__all__ = ["FitOutputs", "output_stem", "write_fit_outputs"]
