"""Walk a Slicer DICOM database: patients -> studies -> series -> image files.

Two ways in, one walk:

* Headless (``raptor batch --dicom-db FOLDER``): the database file
  ``ctkDICOM.sql`` that Slicer's DICOM module keeps (CTK's SQLite schema,
  ``Libs/DICOM/Core/Resources/dicom-schema.sql`` in commontk/CTK: tables
  ``Patients``, ``Studies``, ``Series``, ``Images``), opened **read-only**
  (``file:...?mode=ro``) so a batch can never damage a user's database, even
  while Slicer has it open.
* Inside Slicer: ``slicer.dicomDatabase`` (``patients()``,
  ``studiesForPatient()``, ``seriesForStudy()``, ``filesForSeries()``).

Both are adapters to the same four questions (:class:`DicomIndex`), and
:func:`walk_index` turns the answers into :class:`~.sources.SeriesItem`
objects, so filtering and the rows written do not depend on where the list
came from.  Only the database is read here, never a DICOM file: the slice
order comes from the headers when the series is loaded.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import Cancelled, InputError
from .sources import Discovery, SeriesFilter, SeriesItem

DATABASE_FILENAME = "ctkDICOM.sql"
REQUIRED_TABLES = ("Patients", "Studies", "Series", "Images")

# DICOM tags as ctkDICOMDatabase.fileValue() wants them ("group,element").
TAG_PATIENT_ID = "0010,0020"
TAG_STUDY_UID = "0020,000D"
TAG_SERIES_UID = "0020,000E"
TAG_MODALITY = "0008,0060"
TAG_SERIES_DESCRIPTION = "0008,103E"
TAG_SERIES_NUMBER = "0020,0011"


class DicomIndex(Protocol):
    """What a DICOM database answers; patient keys are the database's own."""

    def patients(self) -> list[str]: ...

    def patient_id(self, patient: str) -> str: ...

    def studies_for_patient(self, patient: str) -> list[str]: ...

    def series_for_study(self, study: str) -> list[str]: ...

    def series_fields(self, series: str) -> dict[str, str]:
        """``Modality``, ``SeriesDescription``, ``SeriesNumber`` (strings, may be empty)."""
        ...

    def files_for_series(self, series: str) -> list[str]:
        """Absolute paths of the series' files that are stored locally."""
        ...


# ---------------------------------------------------------------------------
# The shared walk


def walk_index(
    index: DicomIndex,
    filters: SeriesFilter | None = None,
    *,
    cancel=None,
    progress: Callable[[int, int], None] | None = None,
    source_name: str = "DICOM database",
) -> tuple[Discovery, list[tuple[SeriesItem, str]]]:
    """Every series of the database as an item, and those the filters left out with the reason.

    Slice counts for ``--min-slices`` are the numbers of files the database
    lists, so filtering reads no DICOM file.  ``progress(patients_done, patients_total)``.
    """
    filters = filters or SeriesFilter()
    found = Discovery()
    excluded: list[tuple[SeriesItem, str]] = []
    patients = index.patients()
    for n, patient in enumerate(patients):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        patient_id = index.patient_id(patient)
        for study in index.studies_for_patient(patient):
            for series in index.series_for_study(study):
                fields = index.series_fields(series)
                files = index.files_for_series(series)
                item = SeriesItem(
                    key=series,
                    kind="dicom",
                    paths=files,
                    patient_id=patient_id,
                    study_uid=study,
                    series_uid=series,
                    modality=(fields.get("Modality") or "").strip().upper(),
                    description=" ".join((fields.get("SeriesDescription") or "").split()),
                    n_slices=len(files),
                    sorted_files=False,
                    info={"SeriesNumber": fields["SeriesNumber"]} if fields.get("SeriesNumber") else {},
                )
                if not files:
                    found.skipped_files.append(
                        (f"{source_name}#{series}", "series has no locally stored files (not retrieved, or deleted)")
                    )
                    continue
                reason = filters.exclusion(item)
                if reason:
                    excluded.append((item, reason))
                else:
                    found.items.append(item)
        if progress is not None:
            progress(n + 1, len(patients))
    return found, excluded


# ---------------------------------------------------------------------------
# ctkDICOM.sql with sqlite3


def database_file(path: str | Path) -> Path:
    """The ``ctkDICOM.sql`` file for a database folder (or the file itself)."""
    path = Path(path)
    candidate = path / DATABASE_FILENAME if path.is_dir() else path
    if not candidate.is_file():
        if path.is_dir():
            raise InputError(f"{path}: no Slicer DICOM database here ({DATABASE_FILENAME} not found)")
        raise InputError(f"{path}: no such DICOM database file or folder")
    return candidate


class SqliteDicomIndex:
    """A CTK DICOM database file read with sqlite3, read-only.

    File names are stored absolute, or relative to the database folder for
    files Slicer copied into it (CTK's ``absolutePathFromInternal``); both
    come out absolute.  Rows with an empty file name (instances known from a
    remote query but never retrieved) are left out.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = database_file(path)
        self.folder = self.path.parent
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        try:
            self.connection = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
            tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: not a readable SQLite database ({exc})") from None
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            self.connection.close()
            raise InputError(f"{self.path}: not a Slicer/CTK DICOM database (no {', '.join(missing)} table)")
        self.schema_version = self._schema_version(tables)
        self._series_columns = {row[1] for row in self.connection.execute("PRAGMA table_info('Series')")}

    def _schema_version(self, tables: set[str]) -> str:
        if "SchemaInfo" not in tables:
            return ""
        row = self.connection.execute("SELECT Version FROM SchemaInfo").fetchone()
        return str(row[0]) if row else ""

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "SqliteDicomIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self.connection.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: could not read the DICOM database ({exc})") from None

    # DicomIndex --------------------------------------------------------
    def patients(self) -> list[str]:
        return [str(r[0]) for r in self._query("SELECT UID FROM Patients ORDER BY PatientID, UID")]

    def patient_id(self, patient: str) -> str:
        row = self._query("SELECT PatientID FROM Patients WHERE UID = ?", (patient,))
        return str(row[0][0] or "") if row else ""

    def studies_for_patient(self, patient: str) -> list[str]:
        rows = self._query(
            "SELECT StudyInstanceUID FROM Studies WHERE PatientsUID = ? ORDER BY StudyDate, StudyInstanceUID", (patient,)
        )
        return [str(r[0]) for r in rows]

    def series_for_study(self, study: str) -> list[str]:
        order = "SeriesNumber, SeriesInstanceUID" if "SeriesNumber" in self._series_columns else "SeriesInstanceUID"
        rows = self._query(f"SELECT SeriesInstanceUID FROM Series WHERE StudyInstanceUID = ? ORDER BY {order}", (study,))
        return [str(r[0]) for r in rows]

    def series_fields(self, series: str) -> dict[str, str]:
        wanted = [c for c in ("Modality", "SeriesDescription", "SeriesNumber") if c in self._series_columns]
        if not wanted:
            return {}
        row = self._query(f"SELECT {', '.join(wanted)} FROM Series WHERE SeriesInstanceUID = ?", (series,))
        if not row:
            return {}
        return {k: "" if v is None else str(v) for k, v in zip(wanted, row[0])}

    def files_for_series(self, series: str) -> list[str]:
        rows = self._query("SELECT Filename FROM Images WHERE SeriesInstanceUID = ? ORDER BY Filename", (series,))
        return [self.absolute(str(r[0])) for r in rows if r[0]]

    def absolute(self, filename: str) -> str:
        return filename if os.path.isabs(filename) else os.path.normpath(os.path.join(self.folder, filename))


def discover_database(
    path: str | Path,
    filters: SeriesFilter | None = None,
    *,
    cancel=None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Discovery, list[tuple[SeriesItem, str]]]:
    """Series of a ``ctkDICOM.sql`` database (folder or file), read-only."""
    with SqliteDicomIndex(path) as index:
        return walk_index(index, filters, cancel=cancel, progress=progress, source_name=str(index.path))


# ---------------------------------------------------------------------------
# slicer.dicomDatabase (inside the Slicer application)


class SlicerDicomIndex:
    """``slicer.dicomDatabase`` (a ``ctkDICOMDatabase``) behind :class:`DicomIndex`.

    Must be used from Slicer's main thread (it is a Qt object); the walk only
    lists series, and loading then runs in the batch's worker thread with the
    engine's readers, which use the same ``vtkMRMLVolumeArchetypeStorageNode``
    as Slicer's DICOMScalarVolumePlugin.  Not testable headless: slicer-core
    has no DICOM database, so this class stays a thin translation.
    """

    def __init__(self, database=None) -> None:
        if database is None:
            import slicer  # inside Slicer only

            database = getattr(slicer, "dicomDatabase", None)
        if database is None or not database.isOpen:
            raise InputError("Slicer's DICOM database is not open (open the DICOM module once, or choose a database folder)")
        self.db = database

    def _field(self, getter: str, field: str, key: str, tag: str, files: list[str] | None = None) -> str:
        method = getattr(self.db, getter, None)
        if method is not None:
            value = method(field, key)
            if value:
                return str(value)
        if files is None:
            return ""
        return str(self.db.fileValue(files[0], tag) or "") if files else ""

    def patients(self) -> list[str]:
        return [str(p) for p in self.db.patients()]

    def patient_id(self, patient: str) -> str:
        value = self._field("fieldForPatient", "PatientID", patient, TAG_PATIENT_ID)
        if value:
            return value
        for study in self.studies_for_patient(patient):
            for series in self.series_for_study(study):
                files = self.files_for_series(series)
                if files:
                    return str(self.db.fileValue(files[0], TAG_PATIENT_ID) or "")
        return ""

    def studies_for_patient(self, patient: str) -> list[str]:
        return [str(s) for s in self.db.studiesForPatient(patient)]

    def series_for_study(self, study: str) -> list[str]:
        return [str(s) for s in self.db.seriesForStudy(study)]

    def series_fields(self, series: str) -> dict[str, str]:
        files = self.files_for_series(series)
        return {
            "Modality": self._field("fieldForSeries", "Modality", series, TAG_MODALITY, files),
            "SeriesDescription": self._field("fieldForSeries", "SeriesDescription", series, TAG_SERIES_DESCRIPTION, files),
            "SeriesNumber": self._field("fieldForSeries", "SeriesNumber", series, TAG_SERIES_NUMBER, files),
        }

    def files_for_series(self, series: str) -> list[str]:
        return [str(f) for f in self.db.filesForSeries(series) if f]


def discover_slicer_database(
    filters: SeriesFilter | None = None,
    *,
    database=None,
    cancel=None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Discovery, list[tuple[SeriesItem, str]]]:
    """Series of Slicer's open DICOM database (call from Slicer's main thread)."""
    return walk_index(SlicerDicomIndex(database), filters, cancel=cancel, progress=progress)


__all__ = [
    "DATABASE_FILENAME",
    "DicomIndex",
    "SqliteDicomIndex",
    "SlicerDicomIndex",
    "walk_index",
    "discover_database",
    "discover_slicer_database",
    "database_file",
]
