"""A probe's results as DICOM: scores as a Structured Report, heatmaps as a Parametric Map (highdicom).

What is written
---------------
**Scores: a Comprehensive 3D SR holding a TID 1500 Measurement Report**, one
per series.  One measurement group (TID 1501) per class of the probe: its
*finding type* is the class, its one measurement is the class probability (the
predicted value for a regression probe), and its *algorithm identification*
names Raptor's version, the encoder and the SHA-256 of its weights, K, the seed
of the projection, the probe's checksum and its label column(s), so that a
number in a PACS can be traced back to exactly what made it.  The report
references every instance of the source series (current requested procedure
evidence and the image library), so a viewer shows it under the right patient,
study and series.

With an explanation, the report also holds the **slice curves**: one group per
plane whose measurements are the contributions of each slice (in Raptor's cube
of the volume) to the explained logit, each with the slice's rectangle as 3D
coordinates (SCOORD3D) in the series' frame of reference; and one group with
the logit and the probe's bias (logit = bias + the sum of every slice curve).

**Heatmap: a Parametric Map** in the source series' own geometry: float32, one
frame per source slice (same frame of reference, positions, orientation and
spacing as the scan, taken from the source instances), with a real-world value
mapping that says what a value is: the signed contribution of that voxel to the
logit of the explained class (identity mapping, no unit).  The voxels equal the
NRRD heatmap of ``raptor explain --heatmap`` to the bit.

The codes, and why
------------------
* **Class probability: (122157, DCM, "Probability")**.  It is in DICOM's own
  coding scheme (PS3.16 Annex D) but in no context group.  The alternatives we
  weighed: (111047, DCM, "Probability of cancer") is in CID 6048, a CAD
  template's group, and asserts cancer, which a probe's class need not be;
  (113270, DCM, "Bayesian-Probability") belongs to tractography algorithm
  families (CID 7274); (246262008, SCT, "Score") is vaguer than what we store.
  TID 1501 leaves the concept name of a measurement open (no context group is
  required there), so the code that says exactly what the number is wins.
  Unit: (1, UCUM, "no units"), UCUM's unit for a dimensionless ratio.
* **Heatmap values and slice contributions: (130402, DCM, "Class activation")**
  (CIDs 217, 218, 7180, 7469; 7180 is the group for a real-world value
  mapping's Quantity Definition).  A class activation map is, by its origin, a
  linear classifier's weights applied to pooled feature maps, location by
  location: exactly what Raptor's exact decomposition is.  (130404, DCM,
  "Saliency") is the alternative; it usually names unsigned importance, and a
  Raptor heatmap is signed, so it is used only for regression probes, which
  have no class.  The real-world value mapping's explanation says in words
  that values are signed contributions to the logit per voxel.
* **The class itself (finding type) and the logit/bias: local codes** in the
  private scheme ``99RAPTOR`` (value ``<label column>=<class>``), declared in
  the SR's Coding Scheme Identification Sequence: a probe's classes are the
  user's own labels and have no standard code.
* **Procedure reported**: (25045-6, LN, "CT unspecified body region") for CT,
  (25056-3, LN, "MRI unspecified body region") for MR, else (363679005, SCT,
  "Imaging procedure"), all in CID 100.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import InputError, RaptorError
from ..version import __version__
from .probe import Probe

RAPTOR_SCHEME = "99RAPTOR"
RAPTOR_SCHEME_NAME = "Raptor local codes"
SR_SERIES_NUMBER = 9901
PM_SERIES_NUMBER = 9902
MANUFACTURER = "Raptor"
MODEL_NAME = "Raptor probe"


def _codes():
    """The codes (imported lazily: highdicom is only needed when DICOM results are asked for)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "probability": Code("122157", "DCM", "Probability"),
        "class_activation": Code("130402", "DCM", "Class activation"),
        "saliency": Code("130404", "DCM", "Saliency"),
        "no_units": codes.UCUM.NoUnits,
        "logit": Code("LOGIT", RAPTOR_SCHEME, "Logit of the explained output"),
        "bias": Code("BIAS", RAPTOR_SCHEME, "Probe bias"),
        "predicted": Code("PREDICTED", RAPTOR_SCHEME, "Predicted value"),
        "ct": codes.LN.CTUnspecifiedBodyRegion,
        "mr": codes.LN.MRIUnspecifiedBodyRegion,
        "imaging": codes.SCT.ImagingProcedure,
    }


def require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise RaptorError("DICOM results need the highdicom package: pip install highdicom") from None


# ---------------------------------------------------------------------------
# The source series


@dataclass
class SourceSeries:
    """The instances of one image series (headers only), in slice order, that results refer to."""

    datasets: list
    where: str

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", ""))

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", "") or "")


def source_series(datasets: Sequence, where: str, series_uid: str | None = None) -> SourceSeries:
    """Check and order the instances of one series (from files, a PACS' metadata or Slicer's database)."""
    images = [ds for ds in datasets if "Rows" in ds and "ImagePositionPatient" in ds and "SOPInstanceUID" in ds]
    if series_uid:
        images = [ds for ds in images if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    if not images:
        which = f" of series {series_uid}" if series_uid else ""
        raise InputError(f"{where}: holds no DICOM image instances{which}; there is no series to reference")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
    if len(uids) > 1:
        raise InputError(f"{where}: holds {len(uids)} DICOM series; name the one the results belong to")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "ImageOrientationPatient", "PixelSpacing"):
        if key not in images[0]:
            raise InputError(f"{where}: DICOM instances lack {key}; cannot write results that refer to them")
    iop = np.array([float(v) for v in images[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    images.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    return SourceSeries(datasets=images, where=where)


def read_source_files(files: Sequence[str | Path], where: str, series_uid: str | None = None) -> SourceSeries:
    """The headers of a series' files (pixel data is not read)."""
    import pydicom

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception:  # pydicom raises many types; files that are not DICOM are not part of the series
            continue
    return source_series(datasets, where, series_uid)


def read_source_folder(folder: str | Path, series_uid: str | None = None) -> SourceSeries:
    """The series in a folder (or in ``|``-separated folders, as a batch CSV's ``source`` column lists them)."""
    from ..volumes.dicom import is_dicom_file

    files: list[Path] = []
    for part in str(folder).split("|"):
        path = Path(part)
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise InputError(f"{part}: no such DICOM folder; there is no series to reference")
        files += [p for p in sorted(path.iterdir()) if p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p))]
    if not files:
        raise InputError(f"{folder}: holds no DICOM files; there is no series to reference")
    return read_source_files(files, str(folder), series_uid)


# ---------------------------------------------------------------------------
# Identification


def probe_checksum(probe: Probe) -> str:
    """The probe's ``content_sha256`` (read from its file when the probe was saved, not loaded)."""
    if probe.checksum:
        return probe.checksum
    if probe.path is not None and Path(probe.path).exists():
        from .probe_file import read_probe_file

        probe.checksum = str(read_probe_file(probe.path)[0].get("content_sha256") or "")
    return probe.checksum or "unsaved"


def algorithm_parameters(probe: Probe) -> list[str]:
    """What made the numbers, one ``key=value`` text per item."""
    e = probe.embedding
    planes = e.get("planes") or []
    return [
        f"probe={probe.name or probe.label()}",
        f"probe_sha256={probe_checksum(probe)}",
        f"label_column={'|'.join(probe.label_columns)}",
        f"task={probe.task}; model={probe.model}",
        f"encoder={e.get('encoder', '')}",
        f"weight_sha256={e.get('weight_sha256', '')}",
        f"K={e.get('k')}",
        f"seed={e.get('seed')}",
        f"projection_sha256={e.get('projection_sha256', '')}",
        f"grid={e.get('grid')}; preset={e.get('preset')}; planes={'|'.join(planes)}; image_size={e.get('image_size')}; "
        f"keep_cls={e.get('keep_cls')}",
    ]


def _algorithm(probe: Probe):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name="Raptor", version=__version__, parameters=algorithm_parameters(probe))


def class_code(probe: Probe, name: str):
    """The finding type of one class: a local code ``<label column>=<class>``."""
    from pydicom.sr.coding import Code

    column = "|".join(probe.label_columns) if probe.task in ("binary", "multiclass") else ""
    value = f"{column}={name}" if column else name
    meaning = f"{column} = {name}" if column else name
    return Code(value.replace("\\", "/"), RAPTOR_SCHEME, meaning[:64])


def _observation_context():
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["raptor", __version__]), name="Raptor", manufacturer_name=MANUFACTURER,
        model_name=MODEL_NAME,
    )
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _procedure(modality: str):
    c = _codes()
    return {"CT": c["ct"], "MR": c["mr"]}.get(modality.upper(), c["imaging"])


def _add_coding_scheme(dataset) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = RAPTOR_SCHEME
    item.CodingSchemeName = RAPTOR_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "Raptor (3D Slicer extension)"
    dataset.CodingSchemeIdentificationSequence = [item]


# ---------------------------------------------------------------------------
# The SR


def score_report(
    source: SourceSeries,
    probe: Probe,
    scores: Sequence[float],
    *,
    explanation=None,
    series_number: int = SR_SERIES_NUMBER,
    series_uid: str | None = None,
):
    """A Comprehensive 3D SR (TID 1500) with one probability per class, optionally the slice curves."""
    require_highdicom()
    import highdicom as hd
    from highdicom.sr import (
        Comprehensive3DSR,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        TrackingIdentifier,
    )

    c = _codes()
    scores = [float(v) for v in scores]
    if len(scores) != len(probe.classes):
        raise RaptorError(f"probe {probe.label()} has {len(probe.classes)} outputs, got {len(scores)} scores")
    algorithm = _algorithm(probe)
    label = probe.name or probe.label()
    regression = probe.task == "regression"
    groups = []
    for name, value in zip(probe.classes, scores):
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"Raptor {label}: {name}"[:64]),
            finding_type=class_code(probe, name),
            algorithm_id=algorithm,
            measurements=[_measurement(c["predicted"] if regression else c["probability"], value)],
        ))
    if explanation is not None:
        groups += _curve_groups(source, probe, explanation, algorithm)
    report = MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=_procedure(source.modality),
        imaging_measurements=groups,
        referenced_images=source.datasets,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a source's one-component PatientName, copied as it is
        sr = Comprehensive3DSR(
            evidence=source.datasets,
            content=report,
            series_instance_uid=series_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
        )
    sr.SeriesDescription = f"Raptor scores: {label}"[:64]
    _add_coding_scheme(sr)
    return sr


def _measurement(name, value: float, coordinates=None):
    from highdicom.sr import Measurement

    return Measurement(name=name, value=float(value), unit=_codes()["no_units"], referenced_coordinates=coordinates)


def _curve_groups(source: SourceSeries, probe: Probe, explanation, algorithm) -> list:
    import highdicom as hd
    from highdicom.sr import (
        CoordinatesForMeasurement3D,
        GraphicTypeValues3D,
        MeasurementsAndQualitativeEvaluations,
        TrackingIdentifier,
    )

    c = _codes()
    for_uid = source.frame_of_reference_uid
    if not for_uid:
        raise InputError(f"{source.where}: the DICOM series has no FrameOfReferenceUID; slice positions cannot be referenced")
    quantity = c["saliency"] if probe.task == "regression" else c["class_activation"]
    finding = class_code(probe, explanation.output)
    label = probe.name or probe.label()
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"Raptor {label}: {explanation.output} decision"[:64]),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=[_measurement(c["logit"], explanation.decision), _measurement(c["bias"], explanation.bias)],
    )]
    for plane_index, plane in enumerate(explanation.planes):
        measurements = []
        for s, value in enumerate(explanation.slice_curves[plane_index]):
            polygon = slice_rectangle_lps(explanation, plane_index, s)
            coordinates = [CoordinatesForMeasurement3D(graphic_type=GraphicTypeValues3D.POLYGON, graphic_data=polygon,
                                                       frame_of_reference_uid=for_uid)]
            measurements.append(_measurement(quantity, value, coordinates))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"Raptor {label}: {explanation.output} {plane} slice curve"[:64]),
            finding_type=finding,
            algorithm_id=algorithm,
            measurements=measurements,
        ))
    return groups


def slice_rectangle_lps(explanation, plane_index: int, index: int) -> np.ndarray:
    """The corners of one slice of the cube (voxel centres), closed, in DICOM patient coordinates (LPS, mm)."""
    shape = explanation.cube_shape
    axis = explanation.plane_axes[plane_index]
    others = [a for a in range(3) if a != axis]
    matrix = explanation.cube_ijk_to_ras if explanation.cube_ijk_to_ras is not None else explanation.input_ijk_to_ras
    corners = []
    for u, v in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0)):
        a = [0.0, 0.0, 0.0]
        a[axis] = float(index)
        a[others[0]] = u * (shape[others[0]] - 1)
        a[others[1]] = v * (shape[others[1]] - 1)
        ras = np.asarray(matrix, dtype=np.float64) @ np.array([a[2], a[1], a[0], 1.0])
        corners.append([-ras[0], -ras[1], ras[2]])
    return np.array(corners, dtype=np.float64)


# ---------------------------------------------------------------------------
# The Parametric Map


def frames_for_source(heatmap: np.ndarray, ijk_to_ras: np.ndarray, source: SourceSeries, tolerance: float = 0.1) -> np.ndarray:
    """The heatmap's voxels as one (rows, columns) frame per source instance, in ``source.datasets`` order.

    Each instance's position, orientation and spacing are mapped through the
    volume's IJK-to-RAS: every pixel must land on a voxel centre (within
    ``tolerance`` voxels), so the frame holds exactly the heatmap's values
    for that slice, whatever the order or flips of the array axes.
    """
    heat = np.asarray(heatmap)
    to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    flip = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
    nk, nj, ni = heat.shape
    frames = []
    for ds in source.datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        origin = to_ijk @ np.append(flip * np.array([float(v) for v in ds.ImagePositionPatient]), 1.0)
        step_c = to_ijk[:3, :3] @ (flip * iop[:3] * dc)  # one column to the right
        step_r = to_ijk[:3, :3] @ (flip * iop[3:] * dr)  # one row down
        rr, cc = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
        ijk = origin[:3, None, None] + step_c[:, None, None] * cc + step_r[:, None, None] * rr
        index = np.rint(ijk)
        if np.abs(ijk - index).max() > tolerance:
            raise InputError(
                f"{source.where}: instance {ds.SOPInstanceUID} does not lie on the heatmap's voxel grid "
                "(the volume was not read from these files, or its slices are unevenly spaced)"
            )
        i, j, k = (index[n].astype(np.int64) for n in range(3))
        if i.min() < 0 or j.min() < 0 or k.min() < 0 or i.max() >= ni or j.max() >= nj or k.max() >= nk:
            raise InputError(f"{source.where}: instance {ds.SOPInstanceUID} lies outside the heatmap's volume")
        frames.append(heat[k, j, i])
    return np.stack(frames).astype(np.float32)


def parametric_map(
    source: SourceSeries,
    probe: Probe,
    explanation,
    *,
    series_number: int = PM_SERIES_NUMBER,
    series_uid: str | None = None,
):
    """The explanation's heatmap as a float32 Parametric Map in the source series' geometry."""
    require_highdicom()
    import highdicom as hd
    from highdicom.pm import ParametricMap, RealWorldValueMapping

    if explanation.heatmap is None:
        raise RaptorError("the explanation has no heatmap")
    if not source.frame_of_reference_uid:
        raise InputError(f"{source.where}: the DICOM series has no FrameOfReferenceUID; a Parametric Map needs one")
    c = _codes()
    frames = frames_for_source(explanation.heatmap, explanation.input_ijk_to_ras, source)
    regression = probe.task == "regression"
    kind = "predicted value" if regression else "logit"
    low, high = float(frames.min()), float(frames.max())
    if low == high:
        low, high = low - 1.0, high + 1.0
    mapping = RealWorldValueMapping(
        lut_label="RaptorContrib",
        lut_explanation=f"signed contribution per voxel to the {kind} of {explanation.output}"[:64],
        unit=c["no_units"],
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
        quantity_definition=c["saliency"] if regression else c["class_activation"],
    )
    extent = max(abs(low), abs(high))
    label = probe.name or probe.label()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm = ParametricMap(
            source_images=source.datasets,
            pixel_array=frames,
            series_instance_uid=series_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MODEL_NAME,
            software_versions=f"raptor {__version__}",
            device_serial_number="none",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            # LINEAR_EXACT: contributions are often far below 1, and a plain LINEAR window may not be narrower than 1.
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=2.0 * extent,
                                                              window_explanation="symmetric about 0",
                                                              voi_lut_function="LINEAR_EXACT")],
            content_label="RAPTORHEATMAP",
            content_description=f"Raptor heatmap: {label}, {explanation.output}"[:64],
        )
    pm.SeriesDescription = f"Raptor heatmap: {label} {explanation.output}"[:64]
    if "Laterality" not in pm:
        pm.Laterality = source.datasets[0].get("Laterality", "")  # the Image Plane module needs it present
    _add_coding_scheme(pm)
    return pm


# ---------------------------------------------------------------------------
# Where scored embeddings came from


def embedding_origins(inputs: Sequence[str | Path]) -> dict[str, dict]:
    """Per embedding id: ``source`` (folder(s) or DICOMweb series URL) and ``series_uid`` where recorded.

    Read from the same inputs ``raptor probe apply`` scores: a table's
    ``source`` and ``SeriesInstanceUID`` columns, an ``.npz``'s metadata.
    Only those columns are parsed (a row's features are skipped).
    """
    import csv

    from ..embeddings.embedding import Embedding

    origins: dict[str, dict] = {}
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            with open(path, encoding="utf-8", newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, [])
                column = {name: header.index(name) for name in ("id", "source", "SeriesInstanceUID") if name in header}
                if "id" not in column:
                    continue
                for row in reader:
                    if len(row) != len(header):
                        continue
                    origins[row[column["id"]]] = {
                        "source": row[column["source"]] if "source" in column else "",
                        "series_uid": row[column["SeriesInstanceUID"]] if "SeriesInstanceUID" in column else "",
                    }
            continue
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz") if path.is_dir() else [path]
        for f in files:
            e = Embedding.load(f)
            dicom = e.metadata.get("dicom") or {}
            origins[e.id or f.stem] = {"source": str(e.metadata.get("source") or ""),
                                       "series_uid": str(dicom.get("SeriesInstanceUID") or "")}
    return origins


# ---------------------------------------------------------------------------
# Files


def write_dicom(dataset, path: str | Path) -> Path:
    """Write a DICOM object atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with atomic_write(path) as handle:
        handle.write(buffer.getbuffer())
    _user_mode(Path(path))
    return Path(path)


def _user_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def result_file_name(identifier: str, kind: str) -> str:
    """``<id>_<kind>.dcm`` with anything unsafe in a file name replaced."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", identifier).strip("._") or "series"
    return f"{safe}_{kind}.dcm"


__all__ = [
    "SourceSeries",
    "source_series",
    "read_source_files",
    "read_source_folder",
    "score_report",
    "parametric_map",
    "frames_for_source",
    "slice_rectangle_lps",
    "algorithm_parameters",
    "write_dicom",
    "result_file_name",
    "embedding_origins",
    "RAPTOR_SCHEME",
]
