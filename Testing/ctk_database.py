"""Build a Slicer DICOM database file (``ctkDICOM.sql``) the way CTK lays it out, for tests.

The tables and columns below are those of CTK's published schema
(commontk/CTK ``Libs/DICOM/Core/Resources/dicom-schema.sql``, schema version
0.7.0, the one Slicer 5 writes; CTK is Apache-2.0).  They are restated here
as data rather than copied as SQL text; what matters for compatibility is
the names and types of the tables and columns Raptor reads, and the
``SchemaInfo`` version row.  Rows are filled as ``ctkDICOMDatabase`` fills
them: ``Patients.UID`` is an integer key that ``Studies.PatientsUID`` points
to, and ``Images.Filename`` is absolute, or relative to the database folder
for files copied into it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom

CTK_SCHEMA_VERSION = "0.7.0"

CTK_TABLES: dict[str, list[tuple[str, str]]] = {
    "SchemaInfo": [("Version", "VARCHAR(1024) NOT NULL")],
    "Images": [
        ("SOPInstanceUID", "VARCHAR(64) NOT NULL"),
        ("Filename", "VARCHAR(1024) NOT NULL"),
        ("SeriesInstanceUID", "VARCHAR(64) NOT NULL"),
        ("InsertTimestamp", "VARCHAR(20) NOT NULL"),
        ("DisplayedFieldsUpdatedTimestamp", "DATETIME NULL"),
    ],
    "Patients": [
        ("UID", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        ("PatientsName", "VARCHAR(255) NULL"),
        ("PatientID", "VARCHAR(255) NULL"),
        ("PatientsBirthDate", "DATE NULL"),
        ("PatientsBirthTime", "TIME NULL"),
        ("PatientsSex", "VARCHAR(1) NULL"),
        ("PatientsAge", "VARCHAR(10) NULL"),
        ("PatientsComments", "VARCHAR(255) NULL"),
        ("InsertTimestamp", "VARCHAR(20) NOT NULL"),
        ("DisplayedPatientsName", "VARCHAR(255) NULL"),
        ("DisplayedNumberOfStudies", "INT NULL"),
        ("DisplayedLastStudyDate", "DATE NULL"),
        ("DisplayedFieldsUpdatedTimestamp", "DATETIME NULL"),
    ],
    "Studies": [
        ("StudyInstanceUID", "VARCHAR(64) NOT NULL"),
        ("PatientsUID", "INT NOT NULL"),
        ("StudyID", "VARCHAR(255) NULL"),
        ("StudyDate", "DATE NULL"),
        ("StudyTime", "VARCHAR(20) NULL"),
        ("StudyDescription", "VARCHAR(255) NULL"),
        ("AccessionNumber", "VARCHAR(255) NULL"),
        ("ModalitiesInStudy", "VARCHAR(255) NULL"),
        ("InstitutionName", "VARCHAR(255) NULL"),
        ("ReferringPhysician", "VARCHAR(255) NULL"),
        ("PerformingPhysiciansName", "VARCHAR(255) NULL"),
        ("InsertTimestamp", "VARCHAR(20) NOT NULL"),
        ("DisplayedNumberOfSeries", "INT NULL"),
        ("DisplayedFieldsUpdatedTimestamp", "DATETIME NULL"),
    ],
    "Series": [
        ("SeriesInstanceUID", "VARCHAR(64) NOT NULL"),
        ("StudyInstanceUID", "VARCHAR(64) NOT NULL"),
        ("SeriesNumber", "INT NULL"),
        ("SeriesDate", "DATE NULL"),
        ("SeriesTime", "VARCHAR(20) NULL"),
        ("SeriesDescription", "VARCHAR(255) NULL"),
        ("Modality", "VARCHAR(20) NULL"),
        ("BodyPartExamined", "VARCHAR(255) NULL"),
        ("FrameOfReferenceUID", "VARCHAR(64) NULL"),
        ("AcquisitionNumber", "INT NULL"),
        ("ContrastAgent", "VARCHAR(255) NULL"),
        ("ScanningSequence", "VARCHAR(45) NULL"),
        ("EchoNumber", "INT NULL"),
        ("TemporalPosition", "INT NULL"),
        ("InsertTimestamp", "VARCHAR(20) NOT NULL"),
        ("DisplayedCount", "INT NULL"),
        ("DisplayedSize", "VARCHAR(20) NULL"),
        ("DisplayedNumberOfFrames", "INT NULL"),
        ("DisplayedFieldsUpdatedTimestamp", "DATETIME NULL"),
    ],
    "Directories": [("Dirname", "VARCHAR(1024)")],
}
PRIMARY_KEYS = {"Images": "SOPInstanceUID", "Studies": "StudyInstanceUID", "Series": "SeriesInstanceUID", "Directories": "Dirname"}
INDEXES = [
    ("ImagesFilenameIndex", "Images", "Filename", True),
    ("ImagesSeriesIndex", "Images", "SeriesInstanceUID", False),
    ("SeriesStudyIndex", "Series", "StudyInstanceUID", False),
    ("StudiesPatientIndex", "Studies", "PatientsUID", False),
]


def create_database(path: Path) -> sqlite3.Connection:
    """An empty database with CTK's tables, indexes and schema version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path))
    for table, columns in CTK_TABLES.items():
        body = [f"'{name}' {kind}" for name, kind in columns]
        if table in PRIMARY_KEYS:
            body.append(f"PRIMARY KEY ('{PRIMARY_KEYS[table]}')")
        db.execute(f"CREATE TABLE '{table}' ({', '.join(body)})")
    for name, table, column, unique in INDEXES:
        db.execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX '{name}' ON '{table}' ('{column}')")
    db.execute("INSERT INTO SchemaInfo VALUES (?)", (CTK_SCHEMA_VERSION,))
    db.commit()
    return db


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def insert_files(db: sqlite3.Connection, files: list[Path], database_folder: Path, *, stored_name=None) -> None:
    """Index DICOM files as CTK's importer does (patient, study, series, one Images row per file).

    ``stored_name(path)`` gives the Filename to store (default: absolute path).
    """
    for path in files:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        row = db.execute("SELECT UID FROM Patients WHERE PatientID = ?", (str(ds.PatientID),)).fetchone()
        if row is None:
            cursor = db.execute(
                "INSERT INTO Patients (PatientsName, PatientID, PatientsBirthDate, PatientsSex, InsertTimestamp, "
                "DisplayedPatientsName) VALUES (?, ?, ?, ?, ?, ?)",
                (str(ds.get("PatientName", "")), str(ds.PatientID), str(ds.get("PatientBirthDate", "")),
                 str(ds.get("PatientSex", "")), _now(), str(ds.get("PatientName", ""))),
            )
            patient_uid = cursor.lastrowid
        else:
            patient_uid = row[0]
        db.execute(
            "INSERT OR IGNORE INTO Studies (StudyInstanceUID, PatientsUID, StudyID, StudyDate, StudyTime, StudyDescription, "
            "ModalitiesInStudy, InsertTimestamp) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (str(ds.StudyInstanceUID), patient_uid, str(ds.get("StudyID", "")), str(ds.get("StudyDate", "")),
             str(ds.get("StudyTime", "")), str(ds.get("StudyDescription", "")), str(ds.get("Modality", "")), _now()),
        )
        db.execute(
            "INSERT OR IGNORE INTO Series (SeriesInstanceUID, StudyInstanceUID, SeriesNumber, SeriesDate, SeriesTime, "
            "SeriesDescription, Modality, BodyPartExamined, InsertTimestamp) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), int(ds.get("SeriesNumber", 0) or 0),
             str(ds.get("SeriesDate", "")), str(ds.get("SeriesTime", "")), str(ds.get("SeriesDescription", "")),
             str(ds.get("Modality", "")), str(ds.get("BodyPartExamined", "")), _now()),
        )
        name = stored_name(path) if stored_name else str(Path(path).resolve())
        db.execute(
            "INSERT INTO Images (SOPInstanceUID, Filename, SeriesInstanceUID, InsertTimestamp) VALUES (?, ?, ?, ?)",
            (str(ds.SOPInstanceUID), name, str(ds.SeriesInstanceUID), _now()),
        )
    db.commit()
