"""Intensity presets: map raw voxel values to [0, 1] before resampling.

The ViT sees each slice as a greyscale photograph, so what matters is a stable
mapping from scanner units to brightness.  The preset actually used is written
into every embedding, because two embeddings made with different windows are
not comparable.

Presets
  ``ct``      Hounsfield window, default [-1000, 1000] HU: air is black, dense
              bone white, soft tissue mid-grey.  A wide window rather than a
              soft-tissue one keeps lung, fat, organs and bone all visible, which
              suits a general-purpose embedding; pass ``--ct-window`` to narrow it.
  ``mri``     0.5th to 99.5th percentile of the volume's voxels, because MR
              intensities have no absolute scale.
  ``minmax``  the volume's minimum to maximum.
  ``uint8``   divide by 255 (MedMNIST and other 8-bit data).
  ``uint8-256`` divide by 256 and clip, as the authors' reference code does for
              MedMNIST (255 becomes 0.996); for reproducing its embeddings.
``auto`` picks ``ct`` for DICOM Modality CT, ``mri`` for MR, else ``minmax``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RaptorError
from ..names import PRESETS, window_problem

DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
MRI_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityPreset:
    """A resolved preset (never ``auto``)."""

    name: str
    window: tuple[float, float] | None = None

    def describe(self) -> str:
        """The string stored in metadata, e.g. ``ct[-1000,1000]``."""
        if self.name == "ct":
            lo, hi = self.window or DEFAULT_CT_WINDOW
            return f"ct[{lo:g},{hi:g}]"
        if self.name == "mri":
            return f"mri[p{MRI_PERCENTILES[0]:g},p{MRI_PERCENTILES[1]:g}]"
        return self.name


def resolve_preset(name: str, modality: str | None, ct_window: tuple[float, float] | None = None) -> IntensityPreset:
    """Pick the concrete preset for one volume."""
    name = (name or "auto").lower()
    if name not in PRESETS:
        raise RaptorError(f"unknown intensity preset '{name}' (choose from {', '.join(PRESETS)})")
    if name == "auto":
        mod = (modality or "").upper()
        name = "ct" if mod == "CT" else "mri" if mod in ("MR", "MRI") else "minmax"
    if name == "ct":
        window = tuple(float(v) for v in (ct_window or DEFAULT_CT_WINDOW))
        problem = window_problem(window)
        if problem:
            raise RaptorError(problem)
        return IntensityPreset("ct", window)  # type: ignore[arg-type]
    return IntensityPreset(name)


CT_LIKE_MINIMUM = (-3100.0, -900.0)
"""A minimum in this range (air at -1000 to -1024 HU, or the -2048/-3024 some scanners put outside the field of view) ..."""
CT_LIKE_MAXIMUM = 1000.0
"""... with a maximum above this (bone, contrast) is almost surely a CT in Hounsfield units."""


def ct_hint(name: str, modality: str | None, low: float, high: float, source: str) -> str | None:
    """A one-line hint when ``auto`` gives ``minmax`` to a volume whose values look like CT in HU, else None.

    Decision: the preset is never switched from the values.  Embeddings with
    different presets cannot be mixed, and a cohort of NIfTI files would get
    ``ct`` or ``minmax`` file by file (a CT cropped to soft tissue has no air);
    so ``auto`` stays predictable and the user is told what to pass.
    """
    if (name or "auto").lower() != "auto" or (modality or "").strip():
        return None
    if not (CT_LIKE_MINIMUM[0] <= low <= CT_LIKE_MINIMUM[1] and high > CT_LIKE_MAXIMUM):
        return None
    return (f"hint: {source}: its values ({low:g} to {high:g}) look like CT in Hounsfield units, but the file names no "
            "modality, so --preset auto used minmax; pass --preset ct for the CT window (presets do not mix in one table)")


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of any size (``torch.quantile`` caps at 16M elements)."""
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    frac = pos - lo
    a = torch.kthvalue(flat, lo + 1).values
    b = torch.kthvalue(flat, hi + 1).values if hi != lo else a
    return a + (b - a) * frac


def normalize(volume: torch.Tensor, preset: IntensityPreset) -> torch.Tensor:
    """Map a float32 volume to [0, 1] with the preset (returns a new tensor)."""
    if preset.name == "ct":
        lo, hi = preset.window or DEFAULT_CT_WINDOW
    elif preset.name == "mri":
        lo = float(_quantile(volume, MRI_PERCENTILES[0] / 100))
        hi = float(_quantile(volume, MRI_PERCENTILES[1] / 100))
    elif preset.name == "minmax":
        lo, hi = float(volume.min()), float(volume.max())
    elif preset.name == "uint8":
        lo, hi = 0.0, 255.0
    elif preset.name == "uint8-256":
        lo, hi = 0.0, 256.0
    else:  # pragma: no cover - resolve_preset guards this
        raise RaptorError(f"unknown intensity preset '{preset.name}'")
    if hi <= lo:  # e.g. an MR volume whose 0.5-99.5 percentiles coincide
        lo, hi = float(volume.min()), float(volume.max())
    if not (math.isfinite(hi - lo) and math.isfinite(1.0 / (hi - lo) if hi > lo else 1.0)):
        raise RaptorError(f"the intensity range {lo:g} to {hi:g} ({preset.describe()}) cannot be mapped to [0, 1] "
                          "in float32; rescale the volume")
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return ((volume - lo) * scale).clamp_(0.0, 1.0)
