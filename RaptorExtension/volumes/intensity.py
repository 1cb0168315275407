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

from dataclasses import dataclass

import torch

from ..errors import RaptorError
from ..names import PRESETS

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
        if not window[0] < window[1]:
            raise RaptorError(f"CT window {window} must have low < high")
        return IntensityPreset("ct", window)  # type: ignore[arg-type]
    return IntensityPreset(name)


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
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return ((volume - lo) * scale).clamp_(0.0, 1.0)
