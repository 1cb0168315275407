"""The RaptorEmbed Batch section's logic: a DICOM database cohort to CSV on a real Raptor server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from batch_fixtures import small_ct, tiny_settings
from ctk_database import create_database, insert_files
from derived_dicom import write_axial

from RaptorExtension.cohort.dicomdb import discover_database
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import RaptorError
from RaptorExtension.slicerlogic.batch import BatchLogic
from RaptorExtension.slicerlogic.embed import EmbedLogic
from RaptorExtension.slicerlogic.embed_job import CANCELLED, DONE


@pytest.fixture(scope="module")
def database(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("slicerdb")
    folder = root / "SlicerDICOMDatabase"
    db = create_database(folder / "ctkDICOM.sql")
    for i in range(3):
        series = write_axial(small_ct(i), root / f"s{i}", patient_id=f"RAPTOR-BATCH-{i}", description=f"axial {i}",
                             series_number=700 + i)
        insert_files(db, series.files, folder)
    db.commit()
    db.close()
    return folder


def run_to_end(logic: BatchLogic, items, csv, settings, **kw):
    progress, finished = [], []
    logic.start(items, csv, settings, progressCallback=progress.append, completionCallback=finished.append, **kw)
    run = logic.wait(timeout=300)
    return run, progress, finished


def test_batch_section_embeds_the_database_with_the_loaded_model(database, tiny_model_dir, tiny_encoder, tmp_path,
                                                                  raptor_server):
    """The batch runs on the embed logic's server with the module's model: its rows say which weights made them,
    and each equals the series embedded here, in this process, with that model."""
    from RaptorExtension.cohort.sources import load_item
    from RaptorExtension.encoding.pipeline import Embedder

    found, _ = discover_database(database)
    embed = EmbedLogic(compute=raptor_server.compute())
    logic = BatchLogic(embed)
    settings = tiny_settings(tiny_model_dir)
    run, progress, finished = run_to_end(logic, found.items, tmp_path / "cohort.csv", settings)
    assert finished == [run] and run.status == DONE, run.error
    assert run.summary.done == 3 and run.summary.failed == 0
    assert progress and progress[-1].phase == "finished"
    assert any(p.phase == "embedding" for p in progress)
    table = read_table(tmp_path / "cohort.csv")
    assert len(table.ids) == 3 and set(table.columns["PatientID"]) == {f"RAPTOR-BATCH-{i}" for i in range(3)}
    # The model the batch used, as its rows record it: the module's model folder and its weights.
    assert table.settings["encoder"] == str(tiny_model_dir)
    assert table.settings["weight_sha256"] == tiny_encoder.weight_sha256
    # And as its numbers show: every row equals that series embedded in this process with the tiny model.
    here = Embedder(settings, encoder=tiny_encoder)
    by_uid = {item.series_uid: item for item in found.items}
    for row_id, features in zip(table.ids, table.features):
        expected = here.embed_volume(load_item(by_uid[row_id], row_id)).vector
        np.testing.assert_array_equal(features, expected)
    # The server keeps exactly that model loaded for the module's next job.
    loaded = embed.compute.health()["models"]
    assert [(m["model"], m["weight_sha256"]) for m in loaded] == [(str(tiny_model_dir), tiny_encoder.weight_sha256)]
    # A second start resumes: nothing left to do.
    run2, _, _ = run_to_end(logic, found.items, tmp_path / "cohort.csv", settings)
    assert run2.summary.done == 0 and run2.summary.skipped == 3


def test_cancel_keeps_finished_rows_and_a_rerun_completes(database, slow_model_dir, tmp_path, raptor_server):
    found, _ = discover_database(database)
    logic = BatchLogic(EmbedLogic(compute=raptor_server.compute()))
    settings = tiny_settings(slow_model_dir, grid=48, batch_size=1)  # about a second a series: the cancel lands mid-cohort
    rows_seen = threading.Event()

    def on_progress(p):
        if p.done >= 1:
            logic.cancel()
            rows_seen.set()

    logic.start(found.items, tmp_path / "c.csv", settings, progressCallback=on_progress)
    while logic.isRunning():  # the main thread's timer
        logic.poll()
        rows_seen.wait(0.01)
    run = logic.wait()
    assert run.status == CANCELLED
    done_before = len(read_table(tmp_path / "c.csv").ids)
    assert 1 <= done_before < 3
    run2, _, _ = run_to_end(logic, found.items, tmp_path / "c.csv", settings)
    assert run2.status == DONE and run2.summary.done == 3 - done_before
    assert len(read_table(tmp_path / "c.csv").ids) == 3


def test_anonymized_batch_and_refusals(database, tiny_model_dir, tmp_path, raptor_server):
    """The module's batch with a salt: no PatientID, UID, path or description of the database in any output;
    pseudonyms are the salted HMAC-SHA256 the README describes, computed here independently."""
    import hashlib
    import hmac
    import json

    found, _ = discover_database(database)
    logic = BatchLogic(EmbedLogic(compute=raptor_server.compute()))
    settings = tiny_settings(tiny_model_dir)
    with pytest.raises(RaptorError, match="no series to embed"):
        logic.start([], tmp_path / "none.csv", settings)
    with pytest.raises(RaptorError, match="at least 16 characters"):
        logic.start(found.items, tmp_path / "short.csv", settings, anonymizeSalt="short")
    salt = "a-long-enough-salt-123"
    run, _, _ = run_to_end(logic, found.items, tmp_path / "anon.csv", settings, anonymizeSalt=salt)
    assert run.status == DONE and run.summary.done == 3
    outputs = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    assert sorted(outputs) == ["anon.batch.json", "anon.csv", "anon_errors.csv"]
    secrets = {str(database), str(database.parent)}
    for item in found.items:
        secrets |= {item.patient_id, item.study_uid, item.series_uid, item.description, *item.paths}
    for name, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {name}"

    def digest(kind: str, value: str) -> bytes:
        return hmac.new(salt.encode(), f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    table = read_table(tmp_path / "anon.csv")
    for item in found.items:
        row = table.ids.index(f"2.25.{int.from_bytes(digest('UID', item.series_uid)[:16], 'big')}")
        assert table.columns["SeriesInstanceUID"][row] == table.ids[row]
        assert table.columns["StudyInstanceUID"][row] == f"2.25.{int.from_bytes(digest('UID', item.study_uid)[:16], 'big')}"
        assert table.columns["PatientID"][row] == f"anon-{digest('PatientID', item.patient_id).hex()[:16]}"
        assert table.columns["source"][row] == "" and table.columns["SeriesDescription"][row] == ""
    assert json.loads(outputs["anon.batch.json"])["anonymized"] is True


def test_the_panel_sends_the_database_and_the_server_lists_its_series(database, tiny_model_dir, tmp_path, raptor_server):
    """``startDatabase`` (the panel's path) sends the database file and the filters, not one entry per file: the
    server's listing gives the rows of the caller's listing bit for bit and applies the filters; a filter that
    keeps nothing ends the job saying so."""
    from RaptorExtension.cohort.sources import SeriesFilter

    settings = tiny_settings(tiny_model_dir)
    logic = BatchLogic(EmbedLogic(compute=raptor_server.compute()))
    found, _ = discover_database(database, SeriesFilter(modalities=("CT",), description="axial [02]"))
    assert len(found.items) == 2
    listed, _, _ = run_to_end(logic, found.items, tmp_path / "listed.csv", settings)
    assert listed.status == DONE, listed.error

    progress, finished = [], []
    run = logic.startDatabase(database / "ctkDICOM.sql", tmp_path / "db.csv", settings, modalities=("CT",),
                              description="axial [02]", progressCallback=progress.append,
                              completionCallback=finished.append)
    request = run.remote.request
    assert request["sources"] == {"dicom_databases": [str((database / "ctkDICOM.sql").resolve())]}
    assert request["filters"] == {"modalities": ["CT"], "min_slices": 0, "description": "axial [02]"}
    assert len(str(request)) < 2000  # whatever the database holds
    run = logic.wait(timeout=300)
    assert finished == [run] and run.status == DONE and run.summary.done == 2, run.error
    assert progress[-1].total == 2
    by_caller, by_server = read_table(tmp_path / "listed.csv"), read_table(tmp_path / "db.csv")
    assert sorted(by_server.ids) == sorted(by_caller.ids) == sorted(item.series_uid for item in found.items)
    for row_id, features in zip(by_server.ids, by_server.features):
        np.testing.assert_array_equal(features, by_caller.features[by_caller.ids.index(row_id)])

    run = logic.startDatabase(database, tmp_path / "none.csv", settings, minSlices=10_000)  # the folder works too
    run = logic.wait(timeout=300)
    assert run.status == DONE and run.summary.total == 0 and run.summary.done == 0, run.error
    assert run.summary.line() == "embedded 0, skipped 0 already done, failed 0 (3 left out by filters)"
