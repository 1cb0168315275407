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


SELECTOR_RE = re.compile(r"(train|val|test)(?:_(\d+)|\[(\d*):(\d*)\])?")
SELECTOR_HELP = "test, test_17 or test[0:100]"


def select_medmnist(path: Path, selector: str | None, counts: dict[str, int]) -> list[tuple[str, list[int]]]:
    """The (split, indices) a selector picks from splits of ``counts`` volumes.

    ``test`` is a split, ``test_17`` one volume, ``test[0:100]`` a range (Python's
    slice rules: the end is excluded, either side may be left out, a range past
    the end stops at it).  None: every split.
    """
    if not selector:
        return [(split, list(range(n))) for split, n in counts.items()]
    m = SELECTOR_RE.fullmatch(selector)
    if not m or m.group(1) not in counts:
        raise InputError(f"{path}: no volume '{selector}' (use e.g. {SELECTOR_HELP}; splits: {', '.join(counts)})")
    split, count = m.group(1), counts[m.group(1)]
    if m.group(2) is not None:
        index = int(m.group(2))
        if index >= count:
            raise InputError(f"{path}: split {split} has {count} volumes, no index {index}")
        return [(split, [index])]
    if m.group(3) is not None:
        start = int(m.group(3)) if m.group(3) else 0
        stop = int(m.group(4)) if m.group(4) else count
        indices = list(range(count))[start:stop]
        if not indices:
            raise InputError(f"{path}: {selector} selects no volume (split {split} has {count})")
        return [(split, indices)]
    return [(split, list(range(count)))]


def _split_counts(path: Path, splits: list[str], suffix: str = "images") -> dict[str, int]:
    """How many volumes (or labels) each split holds, from the arrays' headers: nothing is loaded."""
    if suffix != "images":
        with np.load(path, allow_pickle=False) as data:
            return {split: int(data[f"{split}_{suffix}"].shape[0]) for split in splits}
    counts = {}
    for split in splits:
        shape = _npz_shape(path, f"{split}_images")
        if len(shape) < 4:
            raise InputError(f"{path}: {split}_images has shape {list(shape)}; MedMNIST-style volumes are (n, depth, height, width)")
        check_voxel_count(math.prod(shape[1:]), f"{path}#{split}", tuple(shape[1:]))
        counts[split] = int(shape[0])
    return counts


def medmnist_refs(path: Path, selector: str | None = None) -> list[VolumeRef]:
    """Volumes of a MedMNIST-style .npz, with ids like ``test_17``.

    ``selector`` picks a split (``test``), one volume (``test_17``) or a range (``test[0:100]``).
    """
    keys = _npz_keys(path)
    if "embedding" in keys and "metadata" in keys:
        raise InputError(f"{path}: is a Raptor embedding, not a volume")
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys]
    if not splits:
        if len(keys) == 1:
            return [_plain_npz_ref(path, keys[0])]
        raise InputError(f"{path}: .npz has no {{train,val,test}}_images arrays (keys: {', '.join(keys)})")
    mtime = path.stat().st_mtime
    refs: list[VolumeRef] = []
    for split, indices in select_medmnist(path, selector, _split_counts(path, splits)):
        for i in indices:
            vid = f"{split}_{i}"
            load = functools.partial(_load_medmnist_volume, str(path), split, i, mtime)
            refs.append(VolumeRef(id=vid, source=f"{path}#{vid}", loader=load))
    return refs


def medmnist_labels(path: Path, selector: str | None = None, column: str = "label") -> tuple[list[str], list[list[str]]]:
    """The labels of a MedMNIST-style .npz as the rows of a labels CSV: ``id, split, <column>`` (or
    ``<column>_0 ... <column>_N`` for several labels per volume), with the ids ``raptor embed`` gives the volumes.
    """
    keys = _npz_keys(path)
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_labels" in keys]
    if not splits:
        raise InputError(f"{path}: .npz has no {{train,val,test}}_labels arrays (keys: {', '.join(keys)})")
    counts = _split_counts(path, splits, "labels")
    rows: list[list[str]] = []
    width = None
    with np.load(path, allow_pickle=False) as data:
        for split, indices in select_medmnist(path, selector, counts):
            labels = np.asarray(data[f"{split}_labels"])
            if labels.dtype.kind not in "biuf":
                raise InputError(f"{path}: {split}_labels holds {labels.dtype} values, not numbers")
            labels = labels.reshape(len(labels), -1)
            if width is None:
                width = labels.shape[1]
            elif labels.shape[1] != width:
                raise InputError(f"{path}: {split}_labels has {labels.shape[1]} labels per volume, another split {width}")
            if labels.shape[0] != counts[split]:  # pragma: no cover - counts were read from the same array
                raise InputError(f"{path}: {split}_labels changed while reading")
            for i in indices:
                rows.append([f"{split}_{i}", split, *(_label_text(v) for v in labels[i])])
    names = [column] if width == 1 else [f"{column}_{j}" for j in range(width or 0)]
    return ["id", "split", *names], rows


def _label_text(value) -> str:
    value = value.item()
    return str(int(value)) if float(value).is_integer() else repr(float(value))


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
