"""Failures are logged and skipped while the rest finish; --anonymize leaves no patient identifier behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import small_ct, tiny_cli_args, write_cohort
from derived_dicom import subsample, write_axial
from helpers import write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.embeddings.table import read_table


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[400:800] = b"\xff" * 400
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_bad_series_go_to_the_errors_csv_and_the_rest_finish(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "cohort"
    good = write_cohort(root, 3)
    garbage = write_axial(small_ct(3), root / "bad" / "garbage", description="corrupt slice")
    _corrupt(garbage.files[5])
    cut = write_axial(small_ct(6), root / "bad" / "cut", description="truncated copy")
    cut.files[7].write_bytes(cut.files[7].read_bytes()[:-200])
    localizer = write_axial(subsample(small_ct(4), 1, 1, slices=1), root / "bad" / "localizer", description="localizer")
    mixed = write_axial(small_ct(5), root / "bad" / "mixed", description="mixed")
    write_axial(subsample(small_ct(5), 1, 2, slices=2), root / "bad" / "mixed_small", series_uid=mixed.series_uid,
                study_uid=mixed.study_uid, description="mixed")
    (root / "bad" / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    out = tmp_path / "out" / "cohort.csv"
    args = ["batch", "--folder", str(root), "--csv", str(out), "--preset", "ct", *tiny_cli_args(tiny_model_dir)]
    code = main([*args, "--readers", "2", "--loader", "processes"])
    captured = capsys.readouterr()
    assert code == 1
    assert "embedded 3, skipped 0 already done, failed 5" in captured.out
    assert "5 series failed, listed with the reason in" in captured.err
    assert sorted(read_table(out).ids) == sorted(w.series_uid for w in good)
    with open(tmp_path / "out" / "cohort_errors.csv", newline="") as handle:
        errors = {row["id"]: row for row in csv.DictReader(handle)}
    assert len(errors) == 5
    assert "Slicer could not read it as a volume" in errors[garbage.series_uid]["reason"]
    assert f"DICOM file {cut.files[7].name} is truncated" in errors[cut.series_uid]["reason"]
    assert "single slice, a 2D image" in errors[localizer.series_uid]["reason"]
    assert "mixed geometry" in errors[mixed.series_uid]["reason"]
    nifti = next(row for row in errors.values() if row["source"].endswith("broken.nii.gz"))
    assert nifti["id"] == "bad__broken" and "broken.nii.gz" in nifti["reason"]
    assert all("\n" not in row["reason"] for row in errors.values())
    record = json.loads((tmp_path / "out" / "cohort.batch.json").read_text())
    assert record["status"] == "complete" and record["counts"]["failed"] == 5

    # A rerun retries the failures (they may have been fixed) and skips what is done.
    assert main([*args, "--readers", "0", "-q"]) == 1
    assert "embedded 0, skipped 3 already done, failed 5" in capsys.readouterr().out


PATIENT = "RPT-PAT-0042"


def identifying_cohort(root):
    """One patient's series, all named after them: a CT, a late phase of the same study, a series with a
    corrupt slice and a NRRD file; returns the three DICOM series."""
    ct = write_axial(small_ct(0), root / "ct", patient_id=PATIENT, description=f"abdomen {PATIENT}")
    late = write_axial(small_ct(1), root / "late", patient_id=PATIENT, study_uid=ct.study_uid, description="late phase")
    broken = write_axial(small_ct(2), root / "broken", patient_id=PATIENT)
    _corrupt(broken.files[3])
    write_nrrd(root / f"{PATIENT}_scan.nrrd", (np.arange(8 * 9 * 10) % 17).astype(np.int16).reshape(8, 9, 10))
    return ct, late, broken


@pytest.mark.needs_shared_data
def test_anonymize_leaves_no_patient_id_anywhere(tiny_model_dir, tmp_path, capsys, monkeypatch):
    ct, other, broken = identifying_cohort(tmp_path / "data" / PATIENT)
    out = tmp_path / "out" / "anon.csv"
    salt = "a secret salt of the hospital"
    args = ["batch", "--folder", str(tmp_path / "data"), "--csv", str(out), "--anonymize", "--readers", "0",
            "--preset", "minmax", *tiny_cli_args(tiny_model_dir)]
    monkeypatch.setenv("RAPTOR_ANON_SALT", salt)
    assert main(args) == 1
    captured = capsys.readouterr()
    secrets = [PATIENT, PATIENT.replace("-", "^"), ct.study_uid, ct.series_uid, other.series_uid, broken.series_uid,
               str(tmp_path / "data")]
    outputs = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert sorted(outputs) == ["anon.batch.json", "anon.csv", "anon_errors.csv"]
    for name, text in [*outputs.items(), ("stdout", captured.out), ("stderr", captured.err)]:
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {name}"

    table = read_table(out)
    assert len(table.ids) == 3
    dicom_rows = [i for i, s in enumerate(table.columns["SeriesInstanceUID"]) if s]
    assert len(dicom_rows) == 2
    assert all(table.ids[i].startswith("2.25.") and table.ids[i] == table.columns["SeriesInstanceUID"][i] for i in dicom_rows)
    assert len({table.columns["PatientID"][i] for i in dicom_rows}) == 1  # same patient, same pseudonym
    assert len({table.columns["StudyInstanceUID"][i] for i in dicom_rows}) == 1
    assert table.columns["PatientID"][dicom_rows[0]].startswith("anon-")
    assert set(table.columns["source"]) == {""} and set(table.columns["SeriesDescription"]) == {""}
    assert any(i.startswith("anon-") for i in table.ids)  # the NRRD file named after the patient
    errors = list(csv.DictReader(outputs["anon_errors.csv"].splitlines()))
    assert len(errors) == 1 and errors[0]["id"].startswith("2.25.") and errors[0]["id"] in errors[0]["reason"]
    assert json.loads(outputs["anon.batch.json"])["sources"] is None

    # Same salt: a resume.  Another salt, or none: refused before anything is written.
    assert main(args) == 1
    assert "embedded 0, skipped 3 already done, failed 1" in capsys.readouterr().out
    monkeypatch.setenv("RAPTOR_ANON_SALT", "another salt, another cohort")
    assert main(args) == 1
    assert "was anonymized with another salt" in capsys.readouterr().err
    monkeypatch.delenv("RAPTOR_ANON_SALT")
    assert main(args) == 1
    assert "needs a secret salt of at least 16 characters" in capsys.readouterr().err
    assert read_table(out).ids == table.ids


@pytest.mark.needs_shared_data
def test_anonymize_can_keep_descriptions_with_the_patient_masked(tiny_model_dir, tmp_path, capsys):
    write_axial(small_ct(0), tmp_path / "data" / "ct", patient_id=PATIENT, description=f"abdomen {PATIENT} arterial")
    out = tmp_path / "keep.csv"
    assert main(["batch", "--folder", str(tmp_path / "data"), "--csv", str(out), "--anonymize", "--salt", "x" * 16,
                 "--keep-descriptions", "--readers", "0", "-q", *tiny_cli_args(tiny_model_dir)]) == 0
    description = read_table(out).columns["SeriesDescription"][0]
    assert description.startswith("abdomen anon-") and description.endswith(" arterial") and PATIENT not in out.read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--salt", "x" * 16], "--salt is only used with --anonymize"),
        (["--shard", "3/3"], "shards are numbered 0..N-1"),
        (["--series-description", "(oops"], "not a valid regular expression"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    code = main(["batch", "--folder", str(tmp_path), "--csv", str(tmp_path / "o.csv"), *extra, *tiny_cli_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.needs_shared_data
def test_a_cohort_mixing_intensity_presets_is_refused(tiny_model_dir, tmp_path, capsys):
    write_axial(small_ct(0), tmp_path / "data" / "ct")
    write_nrrd(tmp_path / "data" / "plain.nrrd", (np.arange(8 * 9 * 10) % 17).astype(np.int16).reshape(8, 9, 10))
    code = main(["batch", "--folder", str(tmp_path / "data"), "--csv", str(tmp_path / "o.csv"), "--readers", "0",
                 *tiny_cli_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "mixes modalities that get different intensity presets (CT -> ct[-1000,1000]; unknown -> minmax)" in err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.needs_shared_data
@pytest.mark.slow
def test_anonymize_with_the_default_loader_processes_and_parquet_leaves_no_patient_id(tiny_model_dir, tmp_path, capsys):
    """What a user gets by default (series read in loader processes) plus Parquet: pseudonyms only, everywhere."""
    import hashlib
    import hmac
    import os

    import pyarrow.parquet as pq

    ct, late, broken = identifying_cohort(tmp_path / "data" / PATIENT)
    out = tmp_path / "out"
    salt = "the hospital's own secret salt"
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # where loader processes hand volumes over
    shm_before = set(os.listdir(shm)) if shm else set()
    code = main(["batch", "--folder", str(tmp_path / "data"), "--csv", str(out / "anon.csv"), "--parquet",
                 str(out / "anon.parquet"), "--anonymize", "--salt", salt, "--preset", "minmax",
                 *tiny_cli_args(tiny_model_dir)])  # default --readers and --loader: processes outside Slicer
    captured = capsys.readouterr()
    assert code == 1 and "embedded 3, skipped 0 already done, failed 1" in captured.out
    secrets = [PATIENT, PATIENT.replace("-", "^"), ct.study_uid, ct.series_uid, late.series_uid, broken.series_uid,
               str(tmp_path / "data"), "abdomen", "late phase"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["anon.batch.json", "anon.csv", "anon.parquet", "anon_errors.csv"]
    parquet = pq.read_table(out / "anon.parquet")
    texts = {name: (out / name).read_bytes().decode("latin-1") for name in files}
    texts["parquet values"] = repr(parquet.drop(["embedding"]).to_pylist()) + repr(parquet.schema.metadata)
    texts.update(stdout=captured.out, stderr=captured.err)
    texts["/dev/shm"] = repr(sorted(set(os.listdir(shm)) - shm_before) if shm else [])
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {name}"

    def digest(kind: str, value: str) -> bytes:
        return hmac.new(salt.encode(), f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(value: str) -> str:
        return f"2.25.{int.from_bytes(digest('UID', value)[:16], 'big')}"

    table = read_table(out / "anon.csv")
    assert sorted(i for i in table.ids if i.startswith("2.25.")) == sorted([uid(ct.series_uid), uid(late.series_uid)])
    assert {table.columns["PatientID"][table.ids.index(uid(s.series_uid))] for s in (ct, late)} == {
        f"anon-{digest('PatientID', PATIENT).hex()[:16]}"}
    assert {table.columns["StudyInstanceUID"][table.ids.index(uid(s.series_uid))] for s in (ct, late)} == {uid(ct.study_uid)}
    errors = list(csv.DictReader((out / "anon_errors.csv").read_text().splitlines()))
    assert [e["id"] for e in errors] == [uid(broken.series_uid)] and errors[0]["source"] == ""
    # The Parquet file holds the same rows as the CSV, features bit for bit.
    assert parquet.column("id").to_pylist() == table.ids
    assert parquet.column("PatientID").to_pylist() == table.columns["PatientID"]
    features = np.stack(parquet.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.array_equal(features, table.features)
