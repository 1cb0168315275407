"""A Slicer DICOM database (CTK schema) as a batch source: walked read-only, embedded like any folder."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import small_ct, tiny_cli_args
from conftest import DICOM_SERIES, require
from ctk_database import create_database, insert_files
from derived_dicom import write_axial, write_sagittal

from RaptorExtension.cli import main
from RaptorExtension.cohort.dicomdb import (
    SqliteDicomIndex,
    discover_database,
    walk_index,
)
from RaptorExtension.cohort.sources import SeriesFilter
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import InputError


@pytest.fixture(scope="module")
def ctk_db(shared_data, tmp_path_factory):
    """A database holding the shared TCIA series, an axial copy Slicer 'copied' into the database folder
    (stored by relative path) in the same study, a sagittal reslice of that copy for a second patient
    (stored by absolute path), an SR object and a series known only from a remote query."""
    import pydicom

    real_files = sorted(require(DICOM_SERIES).glob("*.dcm"))
    real = pydicom.dcmread(str(real_files[0]), stop_before_pixels=True)
    root = tmp_path_factory.mktemp("ctkdb")
    folder = root / "SlicerDICOMDatabase"
    db = create_database(folder / "ctkDICOM.sql")
    insert_files(db, real_files, folder)
    copied = write_axial(small_ct(0), folder / "dicom" / "axial", patient_id=str(real.PatientID),
                         study_uid=str(real.StudyInstanceUID), description="derived axial copy", series_number=901)
    insert_files(db, copied.files, folder, stored_name=lambda p: str(Path(p).relative_to(folder)))
    resliced = write_sagittal(small_ct(0), root / "elsewhere" / "sagittal", patient_id="RAPTOR-TEST-0002",
                              description="derived sagittal reslice")
    insert_files(db, resliced.files, folder)
    db.execute("INSERT INTO Series (SeriesInstanceUID, StudyInstanceUID, Modality, SeriesDescription, InsertTimestamp) "
               "VALUES ('1.2.3.99.1', ?, 'SR', 'dose report', 'now')", (resliced.study_uid,))
    db.execute("INSERT INTO Images VALUES ('1.2.3.99.1.1', ?, '1.2.3.99.1', 'now', NULL)", (str(root / "sr.dcm"),))
    db.execute("INSERT INTO Series (SeriesInstanceUID, StudyInstanceUID, Modality, SeriesDescription, InsertTimestamp) "
               "VALUES ('1.2.3.99.2', ?, 'CT', 'on the PACS only', 'now')", (resliced.study_uid,))
    db.execute("INSERT INTO Images VALUES ('1.2.3.99.2.1', '', '1.2.3.99.2', 'now', NULL)")
    db.commit()
    db.close()
    return {"folder": folder, "real": real, "copied": copied, "resliced": resliced, "root": root}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_walk_lists_patients_studies_series_files(ctk_db):
    folder = ctk_db["folder"]
    with SqliteDicomIndex(folder) as index:
        assert index.schema_version == "0.7.0"
        found, excluded = walk_index(index)
    real, copied, resliced = ctk_db["real"], ctk_db["copied"], ctk_db["resliced"]
    items = {i.series_uid: i for i in found.items}
    assert list(items) == [str(real.SeriesInstanceUID), copied.series_uid, resliced.series_uid]
    first = items[str(real.SeriesInstanceUID)]
    assert (first.patient_id, first.study_uid, first.modality, first.n_slices) == (
        str(real.PatientID), str(real.StudyInstanceUID), "CT", 134)
    assert first.description == str(real.SeriesDescription)
    assert all(Path(p).is_absolute() and Path(p).exists() for i in found.items for p in i.paths)
    relative = items[copied.series_uid]
    assert relative.study_uid == str(real.StudyInstanceUID) and relative.n_slices == 17
    assert sorted(relative.paths) == sorted(str(f) for f in copied.files)  # stored relative to the database folder
    assert items[resliced.series_uid].patient_id == "RAPTOR-TEST-0002" and items[resliced.series_uid].n_slices == 32
    assert [(i.series_uid, reason) for i, reason in excluded] == [("1.2.3.99.1", "modality SR holds no image volume")]
    assert [(p.split("#")[-1], "not retrieved" in r) for p, r in found.skipped_files] == [("1.2.3.99.2", True)]

    kept, left = discover_database(folder, SeriesFilter(modalities=("CT",), min_slices=20, description="idose"))
    assert [i.series_uid for i in kept.items] == [str(real.SeriesInstanceUID)]
    assert len(left) == 3


def test_database_is_opened_read_only(ctk_db):
    path = ctk_db["folder"] / "ctkDICOM.sql"
    before = _digest(path)
    index = SqliteDicomIndex(ctk_db["folder"])
    walk_index(index)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        index.connection.execute("DELETE FROM Images")
    index.close()
    assert _digest(path) == before
    assert sorted(p.name for p in ctk_db["folder"].iterdir()) == ["ctkDICOM.sql", "dicom"]  # no journal left behind


def test_not_a_database_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no Slicer DICOM database here"):
        SqliteDicomIndex(tmp_path)
    with pytest.raises(InputError, match="no such DICOM database"):
        SqliteDicomIndex(tmp_path / "nope")
    (tmp_path / "ctkDICOM.sql").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="not a readable SQLite database"):
        SqliteDicomIndex(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(str(other / "ctkDICOM.sql")).execute("CREATE TABLE Patients (UID INTEGER)").connection.commit()
    with pytest.raises(InputError, match=r"not a Slicer/CTK DICOM database \(no Studies, Series, Images table\)"):
        SqliteDicomIndex(other)


@pytest.mark.slow
def test_raptor_batch_embeds_the_database(ctk_db, tiny_model_dir, tmp_path, capsys):
    folder = ctk_db["folder"]
    out = tmp_path / "db.csv"
    assert main(["batch", "--dicom-db", str(folder), "--csv", str(out), "--readers", "0", "-q", *tiny_cli_args(tiny_model_dir)]) == 0
    assert "embedded 3, skipped 0 already done, failed 0" in capsys.readouterr().out
    table = read_table(out)
    real, copied, resliced = ctk_db["real"], ctk_db["copied"], ctk_db["resliced"]
    assert table.ids == sorted([str(real.SeriesInstanceUID), copied.series_uid, resliced.series_uid])
    row = table.ids.index(copied.series_uid)
    assert table.columns["PatientID"][row] == str(real.PatientID)
    assert table.columns["StudyInstanceUID"][row] == str(real.StudyInstanceUID)
    assert table.columns["SeriesDescription"][row] == "derived axial copy"
    assert table.columns["source"][row] == str(copied.folder)
    assert set(table.columns["modality"]) == {"CT"} and set(table.columns["preset"]) == {"ct[-1000,1000]"}
    # The sagittal reslice of the same voxels lands on the same RAS cube: the same embedding.
    sag = table.features[table.ids.index(resliced.series_uid)]
    ax = table.features[row]
    np.testing.assert_allclose(sag, ax, rtol=1e-4, atol=1e-4)
    assert not np.allclose(table.features[table.ids.index(str(real.SeriesInstanceUID))], ax, atol=1e-2)

    # The same series found in a folder gives the very same row.
    by_folder = tmp_path / "folder.csv"
    assert main(["batch", "--folder", str(copied.folder), "--csv", str(by_folder), "--readers", "0", "-q",
                 *tiny_cli_args(tiny_model_dir)]) == 0
    assert by_folder.read_text().splitlines()[1] == out.read_text().splitlines()[1 + row]

    # Filters work on the database without reading any DICOM file.
    capsys.readouterr()
    assert main(["batch", "--dicom-db", str(folder), "--csv", str(tmp_path / "x.csv"), "--dry-run", "--modality", "CT",
                 "--min-slices", "40", *tiny_cli_args(tiny_model_dir)]) == 0
    listed = capsys.readouterr().out
    assert "1 series to embed; 3 left out by filters" in listed and str(real.SeriesInstanceUID) in listed


def test_missing_files_of_a_database_series_are_a_logged_failure(ctk_db, tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "db"
    shutil.copytree(ctk_db["folder"], folder)
    (folder / "dicom" / "axial" / "slice0003.dcm").unlink()
    out = tmp_path / "out.csv"
    code = main(["batch", "--dicom-db", str(folder), "--csv", str(out), "--readers", "0", "-q",
                 "--series-description", "derived", *tiny_cli_args(tiny_model_dir)])
    assert code == 1
    assert read_table(out).ids == [ctk_db["resliced"].series_uid]
    errors = (tmp_path / "out_errors.csv").read_text().splitlines()
    assert len(errors) == 2 and "1 of 17 files of series" in errors[1] and "missing on disk" in errors[1]
    assert "1 series failed" in capsys.readouterr().err


class CtkDatabaseStandIn:
    """The part of ``ctkDICOMDatabase``'s Python API that ``SlicerDicomIndex`` calls, answered from the
    same SQLite file the way CTK answers it (slicer-core has no DICOM database to test against)."""

    isOpen = True

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = sqlite3.connect(f"file:{folder / 'ctkDICOM.sql'}?mode=ro", uri=True)

    def _list(self, sql: str, *args) -> list[str]:
        return [str(r[0]) for r in self.db.execute(sql, args).fetchall()]

    def patients(self):
        return self._list("SELECT UID FROM Patients")

    def studiesForPatient(self, patient):
        return self._list("SELECT StudyInstanceUID FROM Studies WHERE PatientsUID = ?", patient)

    def seriesForStudy(self, study):
        return self._list("SELECT SeriesInstanceUID FROM Series WHERE StudyInstanceUID = ?", study)

    def filesForSeries(self, series):
        names = self._list("SELECT Filename FROM Images WHERE SeriesInstanceUID = ?", series)
        return [n if not n or Path(n).is_absolute() else str(self.folder / n) for n in names]

    def fieldForPatient(self, field, patient):
        row = self.db.execute(f"SELECT {field} FROM Patients WHERE UID = ?", (patient,)).fetchone()
        return "" if row is None or row[0] is None else str(row[0])

    def fieldForSeries(self, field, series):
        row = self.db.execute(f"SELECT {field} FROM Series WHERE SeriesInstanceUID = ?", (series,)).fetchone()
        return "" if row is None or row[0] is None else str(row[0])

    def fileValue(self, filename, tag):
        """Like CTK: the tag's value read from the file, empty when the file or the tag is missing."""
        import pydicom

        group, element = (int(part, 16) for part in tag.split(","))
        try:
            element_value = pydicom.dcmread(filename, stop_before_pixels=True).get((group, element))
        except (OSError, pydicom.errors.InvalidDicomError):
            return ""
        return "" if element_value is None else str(element_value.value)


def test_slicer_database_walk_gives_the_same_series_as_the_file(ctk_db):
    from RaptorExtension.cohort.dicomdb import discover_slicer_database

    filters = SeriesFilter(modalities=("CT",))
    in_slicer, left_in_slicer = discover_slicer_database(filters, database=CtkDatabaseStandIn(ctk_db["folder"]))
    headless, left_headless = discover_database(ctk_db["folder"], filters)
    key = lambda i: (i.key, sorted(i.paths), i.patient_id, i.study_uid, i.modality, i.description, i.n_slices)  # noqa: E731
    assert sorted(map(key, in_slicer.items)) == sorted(map(key, headless.items))
    assert len(in_slicer.items) == 3
    assert sorted(i.key for i, _ in left_in_slicer) == sorted(i.key for i, _ in left_headless)
