"""Read volumes from disk with Slicer's own readers.

Files that Slicer opens (NRRD, NIfTI, MetaImage, DICOM series) are read by the
``slicer-core`` wheel's ``vtkMRMLVolumeArchetypeStorageNode``: the very class
Slicer uses, so the voxel array and the IJK-to-RAS matrix are identical to what
a user sees after loading the same file in Slicer.  MedMNIST ``.npz`` and plain
``.npy`` arrays carry no geometry and get an identity matrix.

The entry point is :func:`expand_inputs`, which turns paths into
:class:`VolumeRef` objects that know their id and load lazily: a cohort of
thousands of volumes is listed instantly and read one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError
from .volume import Volume, validate_volume

SLICER_VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
MEDMNIST_SPLITS = ("train", "val", "test")


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


# ---------------------------------------------------------------------------
# Slicer (MRML) readers


@contextlib.contextmanager
def _quiet_vtk() -> Iterator[None]:
    """Silence VTK's logger while reading: failures become our own one-line errors."""
    import vtk

    cutoff = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    warn = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warn)
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.ConvertToVerbosity(int(cutoff)))


def matrix_to_numpy(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray):
    """A 4x4 array as a ``vtkMatrix4x4``."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def volume_from_node(node, *, id: str, source: str, modality: str | None = None, info: dict | None = None) -> Volume:
    """Copy a ``vtkMRMLScalarVolumeNode``'s voxels and geometry into a :class:`Volume`.

    The copy is deliberate: the encoder may run in a worker thread, and a
    Slicer node must only be touched from the main thread.
    """
    import slicer
    import vtk

    image = node.GetImageData()
    if image is None:
        raise InputError(f"{source}: the volume holds no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"{source}: has {components} values per voxel (a colour image or a 4D series); Raptor needs a scalar 3D volume"
        )
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = matrix_to_numpy(m)
    # A volume under a (linear) transform is embedded where Slicer shows it.
    parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{source}: is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = matrix_to_numpy(to_world) @ ijk_to_ras
    return Volume(array=array, ijk_to_ras=ijk_to_ras, id=id, source=source, modality=modality, info=dict(info or {}))


def _read_with_storage_node(files: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one file, or an ordered list of DICOM slices, through Slicer's archetype reader."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(files[0])
    if len(files) > 1:
        storage.ResetFileNameList()
        for f in files:
            storage.AddFileName(f)
        storage.SetSingleFile(0)
    with _quiet_vtk():
        ok = storage.ReadData(node)
    if not ok or node.GetImageData() is None:
        raise InputError(f"{source}: Slicer could not read it as a volume ({_storage_reason(storage)})")
    vol = volume_from_node(node, id="", source=source)
    return vol.array, vol.ijk_to_ras


def _storage_reason(storage) -> str:
    """The most specific line Slicer's storage node left about a failed read."""
    messages = storage.GetUserMessages()
    texts = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())] if messages else []
    for text in texts:
        m = re.search(r"Details: (.*)", text or "")
        if m:
            return f"corrupt or unsupported file: {m.group(1).strip().rstrip('.')}"
    return "corrupt or unsupported file"


# ---------------------------------------------------------------------------
# Header peeks: name 2D images and 4D series precisely before VTK refuses them


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """The array shape a header declares (fastest axis first), or None if unknown."""
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd_shape(path)
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_shape(path)
        if name.endswith((".mha", ".mhd")):
            return _metaimage_shape(path)
    except (OSError, ValueError, struct.error, EOFError):
        return None
    return None


def _nrrd_shape(path: Path) -> tuple[int, ...] | None:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline().startswith(b"NRRD"):
            return None
        for raw in f:
            line = raw.decode("latin-1").strip()
            if not line:
                break
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.lstrip("=").strip()
    if "sizes" not in fields:
        return None
    return tuple(int(v) for v in fields["sizes"].split())


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    with _open_maybe_gzip(path) as f:
        head = f.read(540)
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            return tuple(int(d) for d in dims[1 : 1 + max(0, min(7, dims[0]))])
        if size == 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            return tuple(int(d) for d in dims[1 : 1 + max(0, min(7, dims[0]))])
    return None


def _metaimage_shape(path: Path) -> tuple[int, ...] | None:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").strip()
            key, sep, value = line.partition("=")
            if not sep:
                break
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
    if "dimsize" not in fields:
        return None
    shape = tuple(int(v) for v in fields["dimsize"].split())
    channels = int(fields.get("elementnumberofchannels", "1"))
    return shape + ((channels,) if channels > 1 else ())


def _check_declared_shape(path: Path) -> None:
    shape = _header_shape(path)
    if shape is None:
        return
    spatial = [s for s in shape if s > 1]
    if len(shape) <= 2 or (len(shape) == 3 and len(spatial) == 2 and 1 in shape):
        raise InputError(f"{path}: is a 2D image {shape}; Raptor needs a 3D volume")
    if len(spatial) >= 4:
        raise InputError(f"{path}: is a 4D series {shape}; Raptor embeds one 3D volume at a time")


def read_slicer_file(path: Path, id: str | None = None) -> Volume:
    """Read a NRRD, NIfTI or MetaImage file with Slicer's reader."""
    _check_declared_shape(path)
    array, ijk_to_ras = _read_with_storage_node([str(path)], str(path))
    return Volume(array=array, ijk_to_ras=ijk_to_ras, id=id or volume_id_from_path(path), source=str(path))


# ---------------------------------------------------------------------------
# DICOM


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class DicomSeries:
    """One DICOM series: its files in slice order and the header fields we keep."""

    files: list[str]
    modality: str | None
    info: dict

    @property
    def uid(self) -> str:
        return self.info.get("SeriesInstanceUID", "")


DICOM_INFO_TAGS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "StudyDate",
    "Manufacturer",
)


def scan_dicom_files(files: Iterable[Path]) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """Group DICOM files into series by SeriesInstanceUID, reading headers only.

    Returns the series (slices sorted along the slice normal) and the files
    that were skipped with the reason.  Non-image objects (reports,
    presentation states) are skipped rather than failing the folder.
    """
    import pydicom

    groups: dict[str, list[tuple[Path, object]]] = {}
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for a bad file
            skipped.append((str(path), f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            skipped.append((str(path), "DICOM object holds no image"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"nouid:{path.parent}"
        groups.setdefault(uid, []).append((path, ds))
    series = []
    for uid, members in groups.items():
        series.append(_make_series(members))
    series.sort(key=lambda s: s.files[0])
    return series, skipped


def _make_series(members: list[tuple[Path, object]]) -> DicomSeries:
    first = members[0][1]
    info = {tag: str(first.get(tag, "")) for tag in DICOM_INFO_TAGS}
    modality = str(first.get("Modality", "")) or None
    orientation = first.get("ImageOrientationPatient")

    def position_along_normal(item) -> float:
        ds = item[1]
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient") or orientation
        if ipp is None or iop is None:
            return float(ds.get("InstanceNumber", 0) or 0)
        row = np.array([float(v) for v in iop[:3]])
        col = np.array([float(v) for v in iop[3:]])
        return float(np.dot(np.cross(row, col), [float(v) for v in ipp]))

    ordered = sorted(members, key=lambda item: (position_along_normal(item), str(item[0])))
    info["mixed_geometry"] = _mixed_geometry_reason(ordered)
    return DicomSeries(files=[str(p) for p, _ in ordered], modality=modality, info=info)


def _mixed_geometry_reason(ordered: list[tuple[Path, object]]) -> str:
    """Why slices cannot form one volume (empty string if they can)."""
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in ordered}
    if len(shapes) > 1:
        return f"slices of different sizes {sorted(shapes)}"
    orientations = {tuple(round(float(v), 4) for v in (ds.get("ImageOrientationPatient") or [])) for _, ds in ordered}
    if len(orientations) > 1:
        return "slices with different orientations"
    return ""


PIXEL_DATA_TAG = 0x7FE00010


def pixel_data_problem(path: str) -> str | None:
    """Why a DICOM file's uncompressed pixel data is incomplete, or None if it is whole.

    Why: Slicer's reader fills a slice whose pixel data is cut short (a copy
    interrupted mid-file, a partial download) without a word, and that slice
    would silently change the embedding.  The check reads the header only: the
    pixel data element's declared length and where its value starts are
    compared with the file size and with Rows x Columns x samples x bytes x
    frames.  Compressed (encapsulated) pixel data is left to the decoder.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception:  # pydicom raises many types; what it cannot parse is left to Slicer's reader to judge
        return None
    try:
        element = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    except TypeError:  # pydicom < 3 has no keep_deferred; it then reads the value
        element = ds.get_item(PIXEL_DATA_TAG)
    if element is None:
        return "holds no pixel data"
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    length = getattr(element, "length", None)
    if (syntax is not None and syntax.is_encapsulated) or length is None or length == 0xFFFFFFFF:
        return None
    tell = getattr(element, "value_tell", None)
    available = os.path.getsize(path) - tell if tell is not None else length
    value = getattr(element, "value", None)
    if value is not None:
        available = min(available, len(value))
    if available < length:
        return f"is truncated: its pixel data has {max(available, 0)} of {length} bytes"
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits >= 8:
        expected = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * (bits // 8) * int(ds.get("NumberOfFrames", 1) or 1))
        if length < expected:
            return f"has {length} bytes of pixel data where {ds.Rows}x{ds.Columns} at {bits} bits needs {expected}"
    return None


def _frame_count(path: str) -> int:
    import pydicom

    try:
        return int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    except Exception:  # unreadable or odd value: treat as one frame; the caller's message still applies
        return 1


def read_dicom_series(series: DicomSeries, source: str, id: str | None = None) -> Volume:
    """Read one DICOM series with Slicer's reader, slices added in order."""
    if series.info.get("mixed_geometry"):
        raise InputError(f"{source}: DICOM series has mixed geometry ({series.info['mixed_geometry']})")
    if len(series.files) < 2:
        frames = _frame_count(series.files[0]) if series.files else 1
        if frames > 1:
            raise InputError(
                f"{source}: DICOM series is one multi-frame file ({frames} frames, e.g. enhanced CT/MR); Raptor reads "
                "series stored one slice per file: convert it to NIfTI (e.g. with dcm2niix) and embed that file"
            )
        raise InputError(f"{source}: DICOM series has a single slice, a 2D image; Raptor needs a 3D volume")
    for file in series.files:
        problem = pixel_data_problem(file)
        if problem:
            raise InputError(f"{source}: DICOM file {Path(file).name} {problem}")
    array, ijk_to_ras = _read_with_storage_node(series.files, source)
    if array.shape[0] != len(series.files):
        raise InputError(
            f"{source}: Slicer read {array.shape[0]} slices from {len(series.files)} DICOM files; the series is inconsistent"
        )
    info = {k: v for k, v in series.info.items() if v and k != "mixed_geometry"}
    return Volume(
        array=array,
        ijk_to_ras=ijk_to_ras,
        id=id or series.uid or volume_id_from_path(Path(source)),
        source=source,
        modality=series.modality,
        info=info,
    )


def dicom_folder_series(folder: Path) -> DicomSeries:
    """The one image series in a folder, or a clear error."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise InputError(f"{folder}: folder is empty")
    candidates = [p for p in files if _is_dicom_file(p) or p.suffix.lower() == ".dcm"]
    if not candidates:
        raise InputError(f"{folder}: folder holds no DICOM files")
    series, skipped = scan_dicom_files(candidates)
    if not series:
        reason = skipped[0][1] if skipped else "no image slices"
        raise InputError(f"{folder}: holds no readable DICOM image series ({reason})")
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series; point at a folder with one series, or use `raptor batch`"
        )
    return series[0]


# ---------------------------------------------------------------------------
# Arrays without geometry


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


# The loaders below are module-level functions bound with functools.partial, never closures, so a
# VolumeRef pickles and `raptor embed` can read in loader processes (see loaders.py).


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


def _load_dicom_folder(folder: Path) -> Volume:
    return read_dicom_series(dicom_folder_series(folder), str(folder), id=volume_id_from_path(folder))


def read_npy(path: Path) -> Volume:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:
        raise InputError(f"{path}: .npy holds Python objects, which Raptor never unpickles") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({type(exc).__name__})") from None
    return Volume(array=array, ijk_to_ras=np.eye(4), id=volume_id_from_path(path), source=str(path), has_geometry=False)


# ---------------------------------------------------------------------------
# Dispatch


def volume_id_from_path(path: Path) -> str:
    """A file-name-safe id: the file name without volume suffixes."""
    name = path.name
    for suffix in (".nii.gz",) + SLICER_VOLUME_SUFFIXES + (".npy", ".npz", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "volume"


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
        return [VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(_load_dicom_folder, path))]
    name = path.name.lower()
    if name.endswith(".npz"):
        return medmnist_refs(path, selector)
    if name.endswith(".npy"):
        return [VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(read_npy, path))]
    if name.endswith(SLICER_VOLUME_SUFFIXES):
        return [VolumeRef(id=volume_id_from_path(path), source=str(path), loader=functools.partial(read_slicer_file, path))]
    if name.endswith(".dcm") or _is_dicom_file(path):
        folder = path.parent
        return [VolumeRef(id=volume_id_from_path(folder), source=str(folder), loader=functools.partial(_load_dicom_folder, folder))]
    raise InputError(
        f"{path}: unsupported file type (use NRRD, NIfTI, MetaImage, a DICOM series folder, .npz or .npy)"
    )


def read_volume(spec: str) -> Volume:
    """Read exactly one volume (the first, for a multi-volume .npz with a selector)."""
    refs = expand_input(spec)
    if len(refs) != 1:
        raise InputError(f"{spec}: holds {len(refs)} volumes; pick one with {spec}#test_0")
    return refs[0].load()
