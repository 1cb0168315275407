"""The in-memory volume that flows through the engine.

The voxel array keeps Slicer's ``arrayFromVolume`` order (K, J, I): slice,
row, column.  ``ijk_to_ras`` maps a voxel index (i, j, k, 1) to patient RAS
millimetres exactly as ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` does, so a
volume read here and the same file loaded in Slicer have identical geometry.
"""

from __future__ import annotations

import os
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


MAX_VOXELS_ENV = "RAPTOR_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1 << 30
"""1024^3 voxels (4 GiB as float32): a 512 x 512 x 4096 CT fits; set ``RAPTOR_MAX_VOXELS`` for more."""
FLOAT32_MAX = float(np.finfo(np.float32).max)


def max_voxels() -> int:
    """The largest volume Raptor reads: ``$RAPTOR_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        raise InputError(f"${MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
    if value < 8:
        raise InputError(f"${MAX_VOXELS_ENV}={text!r} must be at least 8")
    return value


def check_voxel_count(count: int, where: str, shape: tuple[int, ...] | None = None) -> None:
    """Refuse a volume that declares more voxels than :func:`max_voxels`, before it is read."""
    limit = max_voxels()
    if count > limit:
        shown = f" ({' x '.join(str(s) for s in shape)})" if shape else ""
        raise InputError(f"{where}: declares {count:,} voxels{shown}, more than the {limit:,} Raptor reads "
                         f"(set {MAX_VOXELS_ENV} to allow more)")


def torch_ready(array: np.ndarray) -> np.ndarray:
    """The voxels in a dtype PyTorch takes, in native byte order, values unchanged.

    Big-endian arrays are swapped, unsigned integers wider than a byte widened,
    and extended precision floats brought to float64 (after
    :func:`validate_volume` checked their range).
    """
    a = np.asarray(array)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:
        a = a.astype(np.int64 if a.dtype.itemsize < 8 else np.float64)
    elif a.dtype.kind == "f" and a.dtype.itemsize > 8:
        a = a.astype(np.float64)
    return a



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
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"{name}: has non-real voxel type {a.dtype}")
    check_voxel_count(int(a.size), name, tuple(a.shape))
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.count_nonzero(np.isnan(a)))
            inf = int(a.size - np.count_nonzero(finite)) - nan
            if nan == a.size:
                raise InputError(f"{name}: every voxel is NaN (no value at all), nothing to embed")
            parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
            raise InputError(f"{name}: contains {' and '.join(p for p in parts if p)} voxels (NaN or infinite values)")
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise InputError(f"{name}: is constant (every voxel is {lo}), nothing to embed")
    if max(abs(float(lo)), abs(float(hi))) > FLOAT32_MAX:
        raise InputError(f"{name}: holds values up to {max(abs(float(lo)), abs(float(hi))):.3g}, beyond float32's range "
                         f"(±{FLOAT32_MAX:.3g}) in which Raptor computes; rescale the volume")
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
