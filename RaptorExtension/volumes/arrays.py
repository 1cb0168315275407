"""Arrays without geometry: plain ``.npy`` files and MedMNIST-style ``.npz`` archives.

They carry no physical geometry and get an identity matrix.  The loaders are
module-level functions bound with ``functools.partial``, never closures, so a
:class:`~.volume.VolumeRef` pickles and volumes can be read in loader processes
(see :mod:`.prefetch`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from .volume import Volume, VolumeRef, volume_id_from_path

MEDMNIST_SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=4)
def _npz_split(path: str, key: str, mtime: float) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data[key]


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None


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
        with np.load(path, allow_pickle=False) as data:
            count = int(data[f"{split}_images"].shape[0])
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
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:
        raise InputError(f"{path}: .npy holds Python objects, which Raptor never unpickles") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({type(exc).__name__})") from None
    return Volume(array=array, ijk_to_ras=np.eye(4), id=volume_id_from_path(path), source=str(path), has_geometry=False)
