"""DICOM series: group files by series from headers only, order slices, read with Slicer's reader."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .slicer_io import read_with_storage_node
from .volume import Volume, check_voxel_count, volume_id_from_path


def is_dicom_file(path: Path) -> bool:
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
    if not info["mixed_geometry"] and all(ds.get("ImagePositionPatient") is not None for _, ds in ordered) and (
        orientation is not None or all(ds.get("ImageOrientationPatient") is not None for _, ds in ordered)
    ):
        info["mixed_geometry"] = slice_spacing_problem([(position_along_normal(item), item[0].name) for item in ordered])
    return DicomSeries(files=[str(p) for p, _ in ordered], modality=modality, info=info)


SPACING_TOLERANCE_MM = 0.01
"""Slices closer than this are duplicates; gaps differing by more (or by 1% of the usual gap) are uneven."""


def slice_spacing_problem(positions: list[tuple[float, str]]) -> str:
    """Why slices at these positions along the normal (in order) do not form an evenly spaced volume, or "".

    Why: Slicer's reader stacks whatever it is given.  Two copies of each slice
    were read as a volume of twice the slices at half the spacing, and a
    missing slice silently stretches the volume's geometry (ITK only prints a
    warning).  Slicer's DICOM plugin warns about both; Raptor refuses them,
    naming the positions.
    """
    if len(positions) < 2:
        return ""
    for (a, name_a), (b, name_b) in zip(positions, positions[1:]):
        if b - a < SPACING_TOLERANCE_MM:
            count = sum(1 for (x, _), (y, _) in zip(positions, positions[1:]) if y - x < SPACING_TOLERANCE_MM)
            return (f"duplicate slice positions: {name_a} and {name_b} are both at {a:.3f} mm along the slice normal "
                    f"({count} duplicate(s) in all)")
    gaps = np.diff([p for p, _ in positions])
    usual = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE_MM, 0.01 * usual)
    odd = np.flatnonzero(np.abs(gaps - usual) > tolerance)
    if odd.size:
        i = int(odd[0])
        (a, name_a), (b, name_b) = positions[i], positions[i + 1]
        return (f"uneven slice spacing: {gaps[i]:.3f} mm between {name_a} ({a:.3f} mm) and {name_b} ({b:.3f} mm) "
                f"where the usual gap is {usual:.3f} mm ({odd.size} uneven gap(s); a missing or extra slice?)")
    return ""


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


def _check_series_size(series: DicomSeries, source: str) -> None:
    """Refuse a series whose slices declare more voxels than Raptor reads, before Slicer allocates them."""
    import pydicom

    try:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception:  # pydicom raises many types; Slicer's reader then gives its own reason
        return
    check_voxel_count(rows * columns * len(series.files), source, (len(series.files), rows, columns))


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
    _check_series_size(series, source)
    for file in series.files:
        problem = pixel_data_problem(file)
        if problem:
            raise InputError(f"{source}: DICOM file {Path(file).name} {problem}")
    array, ijk_to_ras = read_with_storage_node(series.files, source)
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
    candidates = [p for p in files if is_dicom_file(p) or p.suffix.lower() == ".dcm"]
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


def series_id(series_uid: str, folder: Path) -> str:
    """The id of a DICOM series everywhere in Raptor (``raptor embed``, ``raptor batch``, Slicer's batch).

    Its SeriesInstanceUID, so rows made by different commands join; a series
    without one is named after the folder holding it.
    """
    return series_uid or volume_id_from_path(folder)


def dicom_folder_uid(folder: Path) -> str:
    """The SeriesInstanceUID of the first image file of a folder (headers only), or ''.

    Cheap enough to list thousands of folders: it stops at the first DICOM
    image; a folder holding several series is refused when it is loaded.
    """
    import pydicom

    try:
        names = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return ""
    for path in names:
        if not (path.suffix.lower() == ".dcm" or is_dicom_file(path)):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # pydicom raises many types; the load says what is wrong
            continue
        if "Rows" in ds and "Columns" in ds:
            return str(ds.get("SeriesInstanceUID", ""))
    return ""


def load_dicom_folder(folder: Path, id: str | None = None) -> Volume:
    series = dicom_folder_series(folder)
    return read_dicom_series(series, str(folder), id=id or series_id(series.uid, folder))
