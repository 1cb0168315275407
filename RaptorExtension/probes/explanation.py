"""One explained output as data, and its file: what a Raptor server sends back and Slicer reads.

Free of PyTorch (the Slicer modules read explanations made by a server).  The
file is an ``.npz`` read with ``allow_pickle=False``: the heatmap (float32, in
the input volume's voxel grid), each plane's slice curve (float64, exactly as
computed), the geometry, and a JSON header; so an explanation made by a server
equals one made in process, bit for bit.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import InputError

FORMAT = "raptor-explanation"
FORMAT_VERSION = 1
BASELINES = ("background", "mean")
"""What contributions are measured against (see the module docstring); the first is the default."""


@dataclass
class Explanation:
    """One output explained: decision = bias + sum(slice_curves), and heatmaps that add up the same."""

    output: str
    decision: float
    score: float
    bias: float
    planes: list[str]
    plane_axes: list[int]
    slice_curves: list[np.ndarray]
    cube_heatmap: np.ndarray | None
    heatmap: np.ndarray | None
    """Float32 (K, J, I) in the input volume's voxel grid (its IJK-to-RAS)."""
    cube: np.ndarray | None
    """The prepared cube the encoder saw (None when read back from a file: only its shape is kept)."""
    cube_ijk_to_ras: np.ndarray | None
    input_ijk_to_ras: np.ndarray
    task: str
    probe_name: str
    baseline: str = BASELINES[0]
    volume_id: str = ""
    label_column: str = ""
    """The label column whose class is explained (binary and multi-class probes; else the output is the column)."""
    constant_slices: list[np.ndarray] | None = None
    """Per plane, which slices are one constant value (air, padding): never chosen as a top slice."""
    extra: dict = field(default_factory=dict)
    cube_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.cube_shape is None and self.cube is not None:
            self.cube_shape = tuple(int(s) for s in self.cube.shape)

    @property
    def total(self) -> float:
        return float(sum(c.sum() for c in self.slice_curves))

    @property
    def residual(self) -> float:
        """decision - (bias + contributions): float rounding only (the embedding is stored as float32)."""
        return self.decision - (self.bias + self.total)

    @property
    def title(self) -> str:
        """What is explained, in words: ``scan_01: adrenal = 1`` (or ``scan_01: volume_ml`` for a regression target)."""
        what = f"{self.label_column} = {self.output}" if self.label_column else self.output
        return f"{self.volume_id}: {what}" if self.volume_id else what

    def top_slice(self, plane: int) -> int:
        """The slice of a plane that adds most to the decision, among the slices that are not one constant value."""
        curve = np.asarray(self.slice_curves[plane])
        varying = None if self.constant_slices is None else ~np.asarray(self.constant_slices[plane], dtype=bool)
        if varying is None or not varying.any():
            return int(np.argmax(curve))
        return int(np.flatnonzero(varying)[np.argmax(curve[varying])])

    def slice_ras(self, plane: int, index: int) -> np.ndarray:
        """RAS millimetres of the centre of a slice, for jumping Slicer's slice views to it."""
        centre = [(n - 1) / 2 for n in self.cube_shape]
        centre[self.plane_axes[plane]] = float(index)
        a0, a1, a2 = centre
        matrix = self.cube_ijk_to_ras if self.cube_ijk_to_ras is not None else self.input_ijk_to_ras
        return (np.asarray(matrix) @ np.array([a2, a1, a0, 1.0]))[:3]


def save_explanation(explanation: Explanation, path: str | Path) -> Path:
    """Write the explanation (without the cube's voxels) atomically as ``.npz``."""
    ex = explanation
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "output": ex.output, "decision": float(ex.decision),
        "score": float(ex.score), "bias": float(ex.bias), "planes": list(ex.planes),
        "plane_axes": [int(a) for a in ex.plane_axes], "task": ex.task, "probe_name": ex.probe_name,
        "cube_shape": [int(s) for s in ex.cube_shape], "extra": ex.extra, "baseline": ex.baseline,
        "volume_id": ex.volume_id, "label_column": ex.label_column,
    }
    arrays = {
        "header": np.array(json.dumps(header, sort_keys=True)),
        "input_ijk_to_ras": np.asarray(ex.input_ijk_to_ras, dtype="<f8"),
        "cube_ijk_to_ras": np.asarray(ex.cube_ijk_to_ras if ex.cube_ijk_to_ras is not None else np.zeros((0, 0)), dtype="<f8"),
        "heatmap": np.asarray(ex.heatmap if ex.heatmap is not None else np.zeros((0, 0, 0)), dtype="<f4"),
    }
    for i, curve in enumerate(ex.slice_curves):
        arrays[f"curve_{i}"] = np.asarray(curve, dtype="<f8")
        if ex.constant_slices is not None:
            arrays[f"constant_{i}"] = np.asarray(ex.constant_slices[i], dtype=bool)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def load_explanation(path: str | Path) -> Explanation:
    """Read :func:`save_explanation`'s file, checking every field."""
    path = Path(path)

    def bad(reason: str) -> InputError:
        return InputError(f"{path}: not a readable Raptor explanation ({reason})")

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        header = json.loads(str(arrays["header"]))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except KeyError:
        raise bad("no header") from None
    except Exception as exc:
        raise bad(type(exc).__name__) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise bad("wrong format")
    if header.get("format_version") != FORMAT_VERSION:
        raise bad(f"format version {header.get('format_version')!r}")
    planes = header.get("planes")
    axes = header.get("plane_axes")
    shape = header.get("cube_shape")
    if not (isinstance(planes, list) and all(isinstance(p, str) for p in planes)):
        raise bad("planes")
    if not (isinstance(axes, list) and len(axes) == len(planes) and all(a in (0, 1, 2) for a in axes)):
        raise bad("plane_axes")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise bad("cube_shape")
    for key in ("decision", "score", "bias"):
        if not isinstance(header.get(key), (int, float)) or isinstance(header.get(key), bool):
            raise bad(key)
    for key in ("output", "task", "probe_name"):
        if not isinstance(header.get(key), str):
            raise bad(key)
    for key in ("volume_id", "label_column"):
        if not isinstance(header.get(key, ""), str):
            raise bad(key)
    if header.get("baseline", BASELINES[0]) not in BASELINES:
        raise bad("baseline")
    curves, constant = [], []
    for i, axis in enumerate(axes):
        curve = arrays.get(f"curve_{i}")
        if curve is None or curve.dtype != np.float64 or curve.shape != (shape[axis],):
            raise bad(f"slice curve {i}")
        curves.append(curve)
        flags = arrays.get(f"constant_{i}")
        if flags is not None and (flags.dtype != bool or flags.shape != curve.shape):
            raise bad(f"constant slices {i}")
        constant.append(flags)
    heatmap = arrays.get("heatmap")
    if heatmap is None or heatmap.dtype != np.float32 or heatmap.ndim != 3:
        raise bad("heatmap")
    input_m, cube_m = arrays.get("input_ijk_to_ras"), arrays.get("cube_ijk_to_ras")
    if input_m is None or input_m.shape != (4, 4) or cube_m is None or cube_m.shape not in ((4, 4), (0, 0)):
        raise bad("geometry")
    return Explanation(
        output=header["output"], decision=float(header["decision"]), score=float(header["score"]),
        bias=float(header["bias"]), planes=planes, plane_axes=axes, slice_curves=curves, cube_heatmap=None,
        heatmap=heatmap if heatmap.size else None, cube=None,
        cube_ijk_to_ras=cube_m if cube_m.size else None, input_ijk_to_ras=input_m, task=header["task"],
        probe_name=header["probe_name"], extra=header.get("extra") if isinstance(header.get("extra"), dict) else {},
        cube_shape=tuple(shape), baseline=header.get("baseline", BASELINES[0]), volume_id=header.get("volume_id", ""),
        label_column=header.get("label_column", ""),
        constant_slices=constant if all(c is not None for c in constant) else None,
    )


__all__ = ["BASELINES", "Explanation", "save_explanation", "load_explanation"]
