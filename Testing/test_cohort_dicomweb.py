"""A PACS as source and destination, against a real Orthanc with its DICOMweb plugin (see conftest's ``orthanc``).

Small series derived from the shared CT are stored in Orthanc through its
REST API; everything under test then goes through DICOMweb only: QIDO-RS to
list, WADO-RS to retrieve, STOW-RS to send results back.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from batch_fixtures import ROOT, small_ct, tiny_cli_args, tiny_settings, write_cohort
from derived_dicom import write_axial
from helpers import random_probe, sigkill_once_rows_written
from orthanc_server import free_port
from pydicom.uid import generate_uid

from RaptorExtension.cli import main
from RaptorExtension.cohort.dicomweb import DicomWebAccess
from RaptorExtension.cohort.job import BatchJob, BatchSources
from RaptorExtension.cohort.run import run_batch
from RaptorExtension.embeddings.stream import index_table
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.encoding.pipeline import Embedder

pytest.importorskip("dicomweb_client")
hd = pytest.importorskip("highdicom")

PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs-cohort")
    return root, write_cohort(root, 4, patient_prefix="RAPTOR-PACS")


def login(pacs, tmp_path: Path, password: str | None = None) -> list[str]:
    secret = tmp_path / "pacs.password"
    secret.write_text((password or pacs.password) + "\n")
    return ["--dicomweb-user", pacs.user, "--dicomweb-password-file", str(secret)]


def upload(pacs, written) -> None:
    pacs.upload([f for w in written for f in w.files])


def without_source(table):
    columns = {k: v for k, v in table.columns.items() if k != "source"}
    return table.ids, columns


def test_batch_over_dicomweb_equals_batch_over_the_same_files(pacs, cohort, tiny_model_dir, tmp_path, capsys):
    root, written = cohort
    upload(pacs, written)
    web, disk = tmp_path / "web.csv", tmp_path / "disk.csv"
    common = ["--preset", "minmax", "-q", *tiny_cli_args(tiny_model_dir)]
    # Loader processes: the credentials travel to them with each series (and never into the record or the CSV).
    assert main(["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path), "--csv", str(web), "--readers", "2",
                 "--loader", "processes", *common]) == 0
    assert main(["batch", "--folder", str(root), "--csv", str(disk), "--readers", "0", *common]) == 0
    from_web, from_disk = read_table(web), read_table(disk)
    order = np.argsort(from_web.ids)
    assert sorted(from_web.ids) == sorted(from_disk.ids) == sorted(w.series_uid for w in written)
    disk_index = {i: n for n, i in enumerate(from_disk.ids)}
    for n in order:
        m = disk_index[from_web.ids[n]]
        assert np.array_equal(from_web.features[n], from_disk.features[m])  # bit for bit
        for column, values in from_web.columns.items():
            if column != "source":
                assert values[n] == from_disk.columns[column][m], column
        w = next(w for w in written if w.series_uid == from_web.ids[n])
        assert from_web.columns["source"][n] == f"{pacs.dicomweb}/studies/{w.study_uid}/series/{w.series_uid}"
    for path in tmp_path.iterdir():
        if path.is_file() and path.suffix in (".csv", ".json"):
            assert pacs.password not in path.read_text(), path.name

    # Filters reach the server: two series by UID, one by description, none in a date range without them.
    capsys.readouterr()
    wanted = f"{written[0].series_uid},{written[2].series_uid}"
    assert main(["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path), "--csv", str(tmp_path / "f.csv"),
                 "--series-uid", wanted, "--series-description", "axial 2$", "--modality", "CT", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    planned = [line.split("\t")[0] for line in out.splitlines() if "\t" in line]
    assert "1 series to embed; 1 left out by filters" in out and planned == [written[2].series_uid]
    assert main(["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path), "--csv", str(tmp_path / "f.csv"),
                 "--study-date", "18000101-18001231", "--dry-run", *common]) == 0
    assert "0 series to embed" in capsys.readouterr().out
    # One modality goes to the server as ModalitiesInStudy (where Orthanc ignores the page offset: listed once).
    assert main(["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path), "--csv", str(tmp_path / "f.csv"),
                 "--modality", "CT", "--dry-run", *common]) == 0
    assert "4 series to embed; 0 left out by filters" in capsys.readouterr().out

    # The loop closes: score the PACS' series, write one SR each and send them back (STOW-RS).
    settings = tiny_settings(tiny_model_dir, preset="minmax")
    probe = random_probe(Embedder(settings), classes=("benign", "malignant"), task="binary")
    probe.name = "lesion"
    probe_file = probe.save(tmp_path / "lesion.raptorprobe")
    capsys.readouterr()
    assert main(["probe", "apply", str(probe_file), str(web), "-o", str(tmp_path / "scores.csv"),
                 "--dicom-sr", str(tmp_path / "sr"), "--stow", *login(pacs, tmp_path)]) == 0
    assert f"wrote 4 DICOM SR(s) to {tmp_path / 'sr'}, 4 stored with STOW-RS" in capsys.readouterr().err
    client = DicomWebAccess(pacs.dicomweb, pacs.user, pacs.password).client()
    reports = client.search_for_series(search_filters={"Modality": "SR"})
    assert len(reports) == 4
    for entry in reports:
        study = entry["0020000D"]["Value"][0]
        series = entry["0020000E"]["Value"][0]
        (instance,) = client.retrieve_series(study, series)
        referenced = instance.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        assert referenced in from_web.ids and study == next(w.study_uid for w in written if w.series_uid == referenced)


@pytest.mark.needs_shared_data
def test_a_killed_batch_over_dicomweb_resumes(pacs, tiny_model_dir, tmp_path, capsys):
    written = write_cohort(tmp_path / "many", 12, patient_prefix="RAPTOR-KILL")
    upload(pacs, written)
    out = tmp_path / "cohort.csv"
    args = ["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path), "--csv", str(out), "--readers", "0",
            "--preset", "minmax", "-q", *tiny_cli_args(tiny_model_dir)]
    process = subprocess.Popen([sys.executable, "-m", "RaptorExtension", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    sigkill_once_rows_written(process, out)
    survived = index_table(out, allow_torn_tail=True)
    assert 2 <= len(survived.ids) < len(written)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"embedded {len(written) - len(survived.ids)}, skipped {len(survived.ids)} already done, failed 0" in text
    assert sorted(read_table(out).ids) == sorted(w.series_uid for w in written)


def test_refused_unreachable_and_vanished_each_give_one_line_and_the_rest_finish(pacs, cohort, tiny_model_dir, tmp_path,
                                                                                 capsys):
    _root, written = cohort
    upload(pacs, written)
    local = write_axial(small_ct(5), tmp_path / "local" / "series", patient_id="RAPTOR-LOCAL")
    common = ["--folder", str(tmp_path / "local"), "--readers", "0", "--preset", "minmax", "-q", *tiny_cli_args(tiny_model_dir)]

    # Wrong password: the server is named once with the reason; the folder's series is embedded.
    out = tmp_path / "refused.csv"
    code = main(["batch", "--dicomweb", pacs.dicomweb, *login(pacs, tmp_path, "not-the-password"), "--csv", str(out), *common])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("raptor: error:")]
    assert code == 1 and errors == [f"raptor: error: {pacs.dicomweb}: cannot list series: the server refused the credentials (HTTP 401)"]
    assert "not-the-password" not in captured.err + captured.out
    assert read_table(out).ids == [local.series_uid]
    assert "1 source not listed" in captured.out

    # Nothing listens on the port: one line, and the rest finishes.
    out = tmp_path / "unreachable.csv"
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"
    code = main(["batch", "--dicomweb", nowhere, "--csv", str(out), *common])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raptor: error:")]
    assert code == 1 and errors == [f"raptor: error: {nowhere}: cannot list series: cannot reach the server (connection refused or no route)"]
    assert read_table(out).ids == [local.series_uid]
    with open(tmp_path / "unreachable_errors.csv", newline="") as handle:
        assert [row["source"] for row in csv.DictReader(handle)] == [nowhere]

    # The only source refuses: one line, nothing written.
    assert main(["batch", "--dicomweb", pacs.dicomweb, "--csv", str(tmp_path / "alone.csv"), "--readers", "0", "-q",
                 *tiny_cli_args(tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the credentials (HTTP 401)" in err and not (tmp_path / "alone.csv").exists()

    # A series deleted between listing and retrieval: its row is missing, the reason is in the errors CSV.
    gone = written[1].series_uid
    out = tmp_path / "vanished.csv"
    job = BatchJob(csv=out, sources=BatchSources(dicomweb=[DicomWebAccess(pacs.dicomweb, pacs.user, pacs.password)]),
                   settings=tiny_settings(tiny_model_dir, preset="minmax"), readers=0)

    def progress(p):
        if p.phase == "embedding" and pacs.lookup(gone):
            pacs.delete_series(gone)

    summary = run_batch(job, progress=progress)
    assert (summary.done, summary.failed) == (len(written) - 1, 1)
    assert sorted(read_table(out).ids) == sorted(w.series_uid for w in written if w.series_uid != gone)
    with open(tmp_path / "vanished_errors.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["id"] == gone and "no longer on the server" in row["reason"] and "\n" not in row["reason"]


@pytest.mark.needs_shared_data
def test_sr_and_parametric_map_round_trip_through_orthanc(pacs, tiny_model_dir, tiny_encoder, tmp_path, capsys):
    frame = generate_uid(entropy_srcs=["raptor-pacs", "frame"])
    series = write_axial(small_ct(3), tmp_path / "ct", patient_id="RAPTOR-PACS-RT", frame_of_reference_uid=frame)
    upload(pacs, [series])
    settings = tiny_settings(tiny_model_dir, preset="minmax")
    probe = random_probe(Embedder(settings, encoder=tiny_encoder), classes=("a", "b", "c"))
    probe.name = "abc"
    probe_file = probe.save(tmp_path / "abc.raptorprobe")
    url = f"{pacs.dicomweb}/studies/{series.study_uid}/series/{series.series_uid}"
    # The volume is the series' URL: retrieved with WADO-RS, explained, both results sent back to where it came from.
    code = main(["explain", str(probe_file), url, "-o", str(tmp_path / "why.png"), "--model", str(tiny_model_dir),
                 "--device", "cpu", "--dicom-pm", str(tmp_path / "pm.dcm"), "--dicom-sr", str(tmp_path / "sr.dcm"),
                 "--stow", *login(pacs, tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"stored 2 DICOM object(s) on {pacs.dicomweb}" in err
    client = DicomWebAccess(pacs.dicomweb, pacs.user, pacs.password).client()
    (sr_series,) = client.search_for_series(search_filters={"Modality": "SR"})
    (pm_instance,) = client.search_for_instances(search_filters={"SOPClassUID": PM_SOP_CLASS})
    assert sr_series["0020000D"]["Value"][0] == series.study_uid == pm_instance["0020000D"]["Value"][0]
    for local, study, series_uid in (
        (tmp_path / "sr.dcm", series.study_uid, sr_series["0020000E"]["Value"][0]),
        (tmp_path / "pm.dcm", series.study_uid, pm_instance["0020000E"]["Value"][0]),
    ):
        original = pydicom.dcmread(str(local))
        (back,) = client.retrieve_series(study, series_uid)
        assert back.SOPInstanceUID == original.SOPInstanceUID
        # Orthanc may change the transfer syntax: compare attributes and pixels, not bytes.
        assert back.to_json_dict() == original.to_json_dict()
        if "FloatPixelData" in original:
            assert np.array_equal(back.pixel_array, original.pixel_array)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dicomweb-user", "rsmith"], "DICOMweb user 'rsmith' has no password: give --dicomweb-password-file"),
        (["--dicomweb-user", "rsmith", "--dicomweb-password-file", "missing.txt"], "missing.txt: no such password file"),
        (["--dicomweb-user", "rsmith", "--dicomweb-password-file", "empty.txt"], "empty.txt: the password file is empty"),
        (["--dicomweb-user", "rsmith", "--dicomweb-password-file", "pw.txt", "--dicomweb-token-file", "pw.txt"],
         "as a user and password or as a token, not both"),
        (["--dicomweb-password-file", "pw.txt"], "--dicomweb-password-file needs --dicomweb-user"),
    ],
)
def test_credential_mistakes_are_one_line_and_secrets_are_never_shown(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAPTOR_DICOMWEB_PASSWORD", raising=False)
    monkeypatch.delenv("RAPTOR_DICOMWEB_TOKEN", raising=False)
    monkeypatch.delenv("RAPTOR_DICOMWEB_USER", raising=False)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "pw.txt").write_text("s3cret-value\n")
    code = main(["batch", "--dicomweb", "http://127.0.0.1:1/dicom-web", "--csv", "o.csv", *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1 and "s3cret-value" not in err
    assert not (tmp_path / "o.csv").exists()


def test_a_url_with_credentials_in_it_is_refused_and_the_access_hides_its_secrets():
    from RaptorExtension.errors import RaptorError

    with pytest.raises(RaptorError, match="must not hold credentials"):
        DicomWebAccess("https://rsmith:pw@pacs/dicom-web")
    access = DicomWebAccess("https://pacs/dicom-web/", "rsmith", "s3cret-value")
    assert access.url == "https://pacs/dicom-web" and "s3cret-value" not in repr(access) + access.describe()
    assert "tok-123" not in repr(DicomWebAccess("https://pacs/dicom-web", token="tok-123"))


def test_a_server_that_drops_connections_is_named_after_one_attempt():
    """A DICOMweb address where something accepts and hangs up at once (a PACS going down, a wrong service):
    listing is refused after one connection, not after the client's five attempts over half a minute."""
    import socket
    import threading

    from RaptorExtension.cohort.dicomweb import discover_dicomweb
    from RaptorExtension.errors import RaptorError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def hang_up():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            accepted.append(connection)
            connection.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    try:
        with pytest.raises(RaptorError) as error:
            discover_dicomweb(DicomWebAccess(url))
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert str(error.value) == f"{url}: cannot list series: cannot reach the server (connection refused or no route)"
    assert len(accepted) == 1
