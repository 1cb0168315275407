"""Small DICOM series derived from the shared TCIA CT, for batch tests and benchmarks.

The shared series (134 x 512 x 512, 1.07 x 1.07 x 3 mm, axial) is too big to
embed many times on a CPU, so tests embed copies that are subsampled in every
direction, written with pydicom as real DICOM files with new UIDs.  A
sagittal reslice of the same voxels checks that geometry survives any slice
orientation: on the same RAS cube it must give the same embedding as its
axial source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


@dataclass
class StoredCT:
    """The shared CT as stored values (before rescale), slices ordered by increasing z (LPS)."""

    stored: np.ndarray  # (k, j, i) uint16/int16 stored values
    origin: np.ndarray  # LPS position of voxel (0, 0, 0)
    spacing: tuple[float, float, float]  # (dx, dy, dz) mm: columns, rows, slices
    template: pydicom.Dataset


def read_stored_ct(folder: Path) -> StoredCT:
    files = sorted(Path(folder).glob("*.dcm"))
    datasets = [pydicom.dcmread(str(f)) for f in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    for ds in datasets:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0], "expects an axial series"
    stored = np.stack([ds.pixel_array for ds in datasets])
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    dz = float(np.median(np.diff(z)))
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    origin = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    template = datasets[0].copy()
    del template.PixelData
    return StoredCT(stored=stored, origin=origin, spacing=(dx, dy, dz), template=template)


def subsample(ct: StoredCT, step_k: int, step_ij: int, slices: int | None = None, offset_k: int = 0) -> StoredCT:
    """Every ``step``-th voxel (the first voxel's position is unchanged), optionally only ``slices`` slices."""
    stored = ct.stored[offset_k::step_k, ::step_ij, ::step_ij]
    if slices is not None:
        stored = stored[:slices]
    dx, dy, dz = ct.spacing
    origin = ct.origin + np.array([0.0, 0.0, offset_k * dz])
    return StoredCT(np.ascontiguousarray(stored), origin, (dx * step_ij, dy * step_ij, dz * step_k), ct.template)


@dataclass
class WrittenSeries:
    folder: Path
    files: list[Path]
    patient_id: str
    study_uid: str
    series_uid: str
    description: str
    modality: str


def _dataset(ct: StoredCT, image: np.ndarray, *, ipp, iop, pixel_spacing, number: int, patient_id: str,
             study_uid: str, series_uid: str, description: str, modality: str, series_number: int,
             frame_of_reference_uid: str | None = None) -> pydicom.Dataset:
    ds = ct.template.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_id.replace("-", "^")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [round(float(v), 6) for v in pixel_spacing]
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    for tag in ("SliceLocation", "FrameOfReferenceUID"):
        if tag in ds:
            delattr(ds, tag)
    if frame_of_reference_uid:  # a new geometry: the source's frame of reference no longer applies unless given
        ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PixelData = np.ascontiguousarray(image).astype(ct.stored.dtype).tobytes()
    return ds


def write_axial(ct: StoredCT, folder: Path, *, patient_id: str = "RAPTOR-TEST-0001", study_uid: str | None = None,
                series_uid: str | None = None, description: str = "derived axial", modality: str = "CT",
                series_number: int = 901, frame_of_reference_uid: str | None = None) -> WrittenSeries:
    """Write ``ct`` as axial slices (one file per slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    dx, dy, dz = ct.spacing
    files = []
    for k in range(ct.stored.shape[0]):
        ds = _dataset(ct, ct.stored[k], ipp=ct.origin + np.array([0, 0, k * dz]), iop=[1, 0, 0, 0, 1, 0],
                      pixel_spacing=(dy, dx), number=k + 1, patient_id=patient_id, study_uid=study_uid,
                      series_uid=series_uid, description=description, modality=modality, series_number=series_number,
                      frame_of_reference_uid=frame_of_reference_uid)
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return WrittenSeries(folder, files, patient_id, study_uid, series_uid, description, modality)


def write_sagittal(ct: StoredCT, folder: Path, *, patient_id: str = "RAPTOR-TEST-0002", study_uid: str | None = None,
                   series_uid: str | None = None, description: str = "derived sagittal reslice", modality: str = "CT",
                   series_number: int = 902, frame_of_reference_uid: str | None = None) -> WrittenSeries:
    """The same voxels written as sagittal slices (rows run superior -> inferior, columns anterior -> posterior)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    dx, dy, dz = ct.spacing
    nk = ct.stored.shape[0]
    top = ct.origin[2] + (nk - 1) * dz
    descending = ct.stored[::-1]  # row r is at z = top - r * dz
    files = []
    for i in range(ct.stored.shape[2]):
        image = descending[:, :, i]  # (rows = k descending, columns = j)
        ipp = np.array([ct.origin[0] + i * dx, ct.origin[1], top])
        ds = _dataset(ct, image, ipp=ipp, iop=[0, 1, 0, 0, 0, -1], pixel_spacing=(dz, dy), number=i + 1,
                      patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, description=description,
                      modality=modality, series_number=series_number, frame_of_reference_uid=frame_of_reference_uid)
        path = folder / f"sag{i:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return WrittenSeries(folder, files, patient_id, study_uid, series_uid, description, modality)
