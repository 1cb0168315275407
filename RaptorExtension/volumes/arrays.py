"""Arrays without geometry: plain ``.npy`` files and MedMNIST-style ``.npz`` archives.

They carry no physical geometry and get an identity matrix.  The loaders are
module-level functions bound with ``functools.partial``, never closures, so a
:class:`~.volume.VolumeRef` pickles and volumes can be read in loader processes
(see :mod:`.prefetch`).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

from ..arrayfiles import ZipArchive, npy_file_header, npz_names, open_npz, read_npy_file
from ..errors import InputError
from .volume import Volume, VolumeRef, check_voxel_count, volume_id_from_path

MEDMNIST_SPLITS = ("train", "val", "test")


VOLUME_KINDS = "iuf"
"""Signed and unsigned integers and floats: what a volume's voxels may be."""
MAX_NPZ_MEMBER_BYTES = 1 << 40  # an archive's arrays are also checked against their data and the voxel limit


def _open_npz(path: str | Path) -> ZipArchive:
    return open_npz(path, max_member_bytes=MAX_NPZ_MEMBER_BYTES, max_total_bytes=MAX_NPZ_MEMBER_BYTES)


@functools.lru_cache(maxsize=4)
def _npz_split(path: str, key: str, mtime: float) -> np.ndarray:
    with _open_npz(path) as archive:
        return archive.read_npy(f"{key}.npy", kinds=VOLUME_KINDS)


def _npz_keys(path: Path) -> list[str]:
    with _open_npz(path) as archive:
        return npz_names(archive)


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    with _open_npz(path) as archive:
        shape, _ = archive.npy_header(f"{key}.npy", kinds=VOLUME_KINDS)
    return shape


def medmnist_refs(path: Path, selector: str | None = None) -> list[VolumeRef]:
    """Volumes of a MedMNIST-style .npz, with ids like ``test_17``.

    ``selector`` picks a split (``test``) or one volume (``test_17``).
    """
    keys = _npz_keys(path)
    if "embedding" in keys and "metadata" in keys:
        raise InputError(f"{path}: is a Raptor embedding, not a volume")
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys]
    if not splits:
        if len(keys) == 1:
            return [_plain_npz_ref(path, keys[0])]
        raise InputError(f"{path}: .npz has no {{train,val,test}}_images arrays (keys: {', '.join(keys)})")
    wanted_split, wanted_index = None, None
    if selector:
        m = re.fullmatch(r"(train|val|test)(?:_(\d+))?", selector)
        if not m or m.group(1) not in splits:
            raise InputError(f"{path}: no volume '{selector}' (use e.g. test or test_17)")
        wanted_split, wanted_index = m.group(1), (int(m.group(2)) if m.group(2) else None)
    mtime = path.stat().st_mtime
    refs: list[VolumeRef] = []
    for split in splits:
        if wanted_split and split != wanted_split:
            continue
        shape = _npz_shape(path, f"{split}_images")
        if len(shape) < 4:
            raise InputError(f"{path}: {split}_images has shape {list(shape)}; MedMNIST-style volumes are (n, depth, height, width)")
        check_voxel_count(math.prod(shape[1:]), f"{path}#{split}", tuple(shape[1:]))
        count = int(shape[0])
        indices = range(count)
        if wanted_index is not None:
            if wanted_index >= count:
                raise InputError(f"{path}: split {split} has {count} volumes, no index {wanted_index}")
            indices = [wanted_index]
        for i in indices:
            vid = f"{split}_{i}"
            load = functools.partial(_load_medmnist_volume, str(path), split, i, mtime)
            refs.append(VolumeRef(id=vid, source=f"{path}#{vid}", loader=load))
    return refs


def _load_medmnist_volume(path: str, split: str, i: int, mtime: float) -> Volume:
    array = np.asarray(_npz_split(path, f"{split}_images", mtime)[i])
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    vid = f"{split}_{i}"
    return Volume(array=array, ijk_to_ras=np.eye(4), id=vid, source=f"{path}#{vid}", has_geometry=False)


def _load_plain_npz(path: Path, key: str) -> Volume:
    shape = _npz_shape(path, key)
    check_voxel_count(math.prod(shape), str(path), shape)
    return Volume(
        array=_npz_split(str(path), key, path.stat().st_mtime),
        ijk_to_ras=np.eye(4),
        id=volume_id_from_path(path),
        source=str(path),
        has_geometry=False,
    )


def _plain_npz_ref(path: Path, key: str) -> VolumeRef:
    return VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(_load_plain_npz, path, key))


def read_npy(path: Path) -> Volume:
    shape, _ = npy_file_header(path, kinds=VOLUME_KINDS)
    check_voxel_count(math.prod(shape), str(path), shape)
    array = read_npy_file(path, kinds=VOLUME_KINDS)
    return Volume(array=array, ijk_to_ras=np.eye(4), id=volume_id_from_path(path), source=str(path), has_geometry=False)
