"""The in-memory volume that flows through the engine.

The voxel array keeps Slicer's ``arrayFromVolume`` order (K, J, I): slice,
row, column.  ``ijk_to_ras`` maps a voxel index (i, j, k, 1) to patient RAS
millimetres exactly as ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` does, so a
volume read here and the same file loaded in Slicer have identical geometry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass
class Volume:
    """A 3D scalar volume with its geometry and provenance."""

    array: np.ndarray
    """Voxel values in (K, J, I) order, any real dtype."""
    ijk_to_ras: np.ndarray
    """4x4 float64 matrix from (i, j, k, 1) to RAS millimetres."""
    id: str
    """Identifier used for output file names and CSV rows."""
    source: str
    """Where the volume came from (path, path#key[index], or a Slicer node)."""
    modality: str | None = None
    """DICOM Modality (CT, MR, ...) when known; picks the default intensity preset."""
    has_geometry: bool = True
    """False for arrays without physical geometry (.npy, MedMNIST .npz)."""
    info: dict = field(default_factory=dict)
    """Extra provenance such as DICOM UIDs; copied into the embedding metadata."""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along I, J, K in millimetres."""
        m = np.asarray(self.ijk_to_ras, dtype=np.float64)[:3, :3]
        return tuple(float(v) for v in np.linalg.norm(m, axis=0))


def validate_volume(volume: Volume) -> None:
    """Refuse volumes that cannot give a meaningful 3D embedding.

    Why here and not deep in the encoder: each reason gets its own sentence
    that names the input, instead of a shape error from inside PyTorch.
    """
    a = volume.array
    name = volume.source
    if a.ndim == 2:
        raise InputError(f"{name}: is a 2D image ({a.shape[0]}x{a.shape[1]}); Raptor needs a 3D volume")
    if a.ndim == 4:
        raise InputError(f"{name}: is a 4D series {tuple(a.shape)}; Raptor embeds one 3D volume at a time")
    if a.ndim != 3:
        raise InputError(f"{name}: has {a.ndim} dimensions; Raptor needs a 3D volume")
    if a.size == 0:
        raise InputError(f"{name}: is empty (shape {tuple(a.shape)})")
    if min(a.shape) < 2:
        raise InputError(
            f"{name}: is only 1 voxel thick (shape {tuple(a.shape)}), a 2D image; Raptor needs a 3D volume"
        )
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"{name}: has non-real voxel type {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(a.size - np.count_nonzero(finite))
            raise InputError(f"{name}: contains {bad} NaN or infinite voxels")
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise InputError(f"{name}: is constant (every voxel is {lo}), nothing to embed")
    m = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all() or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError(f"{name}: has an invalid IJK-to-RAS matrix")


SLICER_VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


@dataclass
class VolumeRef:
    """A volume that can be loaded later: its id, where it comes from, and how."""

    id: str
    source: str
    loader: Callable[[], Volume] = field(repr=False)

    def load(self) -> Volume:
        volume = self.loader()
        validate_volume(volume)
        return volume


def volume_id_from_path(path: Path) -> str:
    """A file-name-safe id: the file name without volume suffixes."""
    name = path.name
    for suffix in (".nii.gz",) + SLICER_VOLUME_SUFFIXES + (".npy", ".npz", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "volume"
