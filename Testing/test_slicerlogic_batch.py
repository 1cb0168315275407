"""The RaptorEmbed Batch section's logic: a DICOM database cohort to CSV on a real Raptor server."""

from __future__ import annotations

import threading

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


def test_batch_section_embeds_the_database_with_the_loaded_model(database, tiny_model_dir, tmp_path, raptor_server):
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
    # The batch ran on the embed logic's server, which keeps the model loaded for the next job.
    assert [m["model"] for m in embed.compute.health()["models"]] == [str(tiny_model_dir)]
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
    found, _ = discover_database(database)
    logic = BatchLogic(EmbedLogic(compute=raptor_server.compute()))
    settings = tiny_settings(tiny_model_dir)
    with pytest.raises(RaptorError, match="no series to embed"):
        logic.start([], tmp_path / "none.csv", settings)
    run, _, _ = run_to_end(logic, found.items, tmp_path / "anon.csv", settings, anonymizeSalt="a-long-enough-salt-123")
    assert run.status == DONE
    text = (tmp_path / "anon.csv").read_text()
    assert "RAPTOR-BATCH" not in text
