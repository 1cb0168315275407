"""Turn what a user names (a file, a DICOM folder, ``file.npz#test_17``) into volumes.

The entry point is :func:`expand_input`, which turns paths into
:class:`~.volume.VolumeRef` objects that know their id and load lazily: a
cohort of thousands of volumes is listed instantly and read one at a time.
Files that Slicer opens are read with Slicer's own reader (:mod:`.slicer_io`),
DICOM series by :mod:`.dicom`, arrays without geometry by :mod:`.arrays`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import InputError
from .arrays import medmnist_refs, read_npy
from .dicom import dicom_folder_uid, is_dicom_file, load_dicom_folder, series_id
from .headers import check_volume_file
from .slicer_io import read_with_storage_node
from .volume import SLICER_VOLUME_SUFFIXES, Volume, VolumeRef, volume_id_from_path


def read_slicer_file(path: Path, id: str | None = None) -> Volume:
    """Read a NRRD, NIfTI or MetaImage file with Slicer's reader."""
    check_volume_file(path)
    array, ijk_to_ras = read_with_storage_node([str(path)], str(path))
    return Volume(array=array, ijk_to_ras=ijk_to_ras, id=id or volume_id_from_path(path), source=str(path))


# ---------------------------------------------------------------------------
# Arrays without geometry


def expand_input(spec: str) -> list[VolumeRef]:
    """Turn one command-line input into volume references.

    ``spec`` is a file, a DICOM series folder, or ``file.npz#selector``.
    """
    selector = None
    if "#" in spec and not os.path.exists(spec):
        spec, selector = spec.split("#", 1)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return [_dicom_folder_ref(path)]
    name = path.name.lower()
    if name.endswith(".npz"):
        return medmnist_refs(path, selector)
    if name.endswith(".npy"):
        return [VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(read_npy, path))]
    if name.endswith(SLICER_VOLUME_SUFFIXES):
        return [VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(read_slicer_file, path))]
    if name.endswith(".dcm") or is_dicom_file(path):
        return [_dicom_folder_ref(path.parent)]
    raise InputError(
        f"{path}: unsupported file type (use NRRD, NIfTI, MetaImage, a DICOM series folder, .npz or .npy)"
    )


def _dicom_folder_ref(folder: Path) -> VolumeRef:
    """A DICOM series folder, named by its SeriesInstanceUID as ``raptor batch`` names it (:func:`.dicom.series_id`)."""
    vid = series_id(dicom_folder_uid(folder), folder)
    return VolumeRef(id=vid, source=str(folder), loader=functools.partial(load_dicom_folder, folder, vid))


def read_volume(spec: str) -> Volume:
    """Read exactly one volume (the first, for a multi-volume .npz with a selector)."""
    refs = expand_input(spec)
    if len(refs) != 1:
        raise InputError(f"{spec}: holds {len(refs)} volumes; pick one with {spec}#test_0")
    return refs[0].load()
