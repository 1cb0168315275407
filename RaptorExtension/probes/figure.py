"""A one-page picture of an explanation: three orthogonal slices under the heatmap, and the slice curves.

Drawn in the cube the encoder saw (isotropic, axial with anterior up and the
patient's right on the image's left; coronal and sagittal with superior up),
so the picture shows exactly what the model looked at.  The heatmap uses a
diverging, perceptually uniform map centred on zero (red adds to the
explained class, blue takes away), because contributions are signed.
Matplotlib's Agg backend: works headless.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .explanation import Explanation

PLANE_TITLES = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"}


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


SLICE_CHOICES = ("top", "mid")
"""Which slice of each plane the figure shows; the first is the default (README, ``raptor explain --help``)."""


def render_explanation(explanation: Explanation, path: str | Path, *, slices: str = SLICE_CHOICES[0],
                       title: str | None = None) -> Path:
    """Write the PNG; ``slices`` is ``top`` (each plane's highest-contributing non-constant slice) or ``mid``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ex = explanation
    if ex.cube_heatmap is None:
        raise ValueError("the explanation was made without a heatmap")
    heat = ex.cube_heatmap
    limit = float(np.abs(heat).max()) or 1.0
    n = len(ex.planes)
    fig = plt.figure(figsize=(4.0 * n, 7.0))
    grid = fig.add_gridspec(2, n, height_ratios=[1.3, 1.0], hspace=0.28, wspace=0.25)
    chosen = []
    image = None
    for i, (plane, axis) in enumerate(zip(ex.planes, ex.plane_axes)):
        index = ex.top_slice(i) if slices == "top" else ex.cube.shape[axis] // 2
        chosen.append(index)
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(_slice(ex.cube, axis, index), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        image = ax.imshow(_slice(heat, axis, index), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.5,
                          interpolation="nearest")
        ax.set_title(f"{PLANE_TITLES.get(plane, plane)} slice {index}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=fig.axes[:n], shrink=0.8, pad=0.02)
        bar.set_label("contribution per voxel", fontsize=8)
    for i, plane in enumerate(ex.planes):
        ax = fig.add_subplot(grid[1, i])
        curve = ex.slice_curves[i]
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.plot(np.arange(len(curve)), curve, lw=1.4, color="C3")
        ax.axvline(chosen[i], color="k", lw=0.8, ls="--")
        ax.set_title(f"{plane}: sum {curve.sum():+.3f}", fontsize=9)
        ax.set_xlabel("slice", fontsize=8)
        if i == 0:
            ax.set_ylabel("contribution to the decision", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or figure_title(ex), fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def figure_title(ex: Explanation) -> str:
    """What is explained (volume id, label column, class), the score and its sum, the probe and the baseline."""
    kind = "logit" if ex.task in ("binary", "multiclass", "multilabel") else "value"
    score = f"p={ex.score:.3f}" if kind == "logit" else f"predicted {ex.score:.4g}"
    reference = "an empty slice" if ex.baseline == "background" else "the training mean"
    return (f"{ex.title}  ({score}; {kind} {ex.decision:+.3f} = bias {ex.bias:+.3f} + slices {ex.total:+.3f})\n"
            f"probe {ex.probe_name}; contributions against {reference}")


def curves_csv(explanation: Explanation) -> str:
    """The slice curves as CSV: plane, slice, the slice centre in RAS, contribution."""
    lines = ["plane,slice,r,a,s,contribution"]
    for i, plane in enumerate(explanation.planes):
        for index, value in enumerate(explanation.slice_curves[i]):
            r, a, s = explanation.slice_ras(i, index)
            lines.append(f"{plane},{index},{r:.4f},{a:.4f},{s:.4f},{value:.9g}")
    return "\n".join(lines) + "\n"


__all__ = ["SLICE_CHOICES", "render_explanation", "figure_title", "curves_csv"]
