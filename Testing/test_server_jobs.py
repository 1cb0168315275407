"""Jobs on a real ``raptor serve`` over real HTTP on 127.0.0.1, with a tiny random DINOv2.

What the server promises and these tests hold it to: an embed or an explain
through the server equals the same work done in this process, bit for bit;
progress only moves forward; a cancel stops the job before it ends; two
clients at once both get their own correct results; a server killed mid-job
leaves the client with one line and nothing half-written.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from conftest import synthetic_volume  # noqa: E402
from helpers import oblique_matrix, random_probe, start_server, write_volume  # noqa: E402

from RaptorExtension.embeddings.embedding import Embedding  # noqa: E402
from RaptorExtension.encoding.pipeline import Embedder  # noqa: E402
from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402
from RaptorExtension.errors import RaptorError  # noqa: E402
from RaptorExtension.probes.explain import explain_volume  # noqa: E402
from RaptorExtension.probes.explanation import load_explanation  # noqa: E402
from RaptorExtension.server.client import finished_or_raise  # noqa: E402
from RaptorExtension.server.remote import (  # noqa: E402
    embedding_from_bytes,
    file_sender,
    server_settings,
    volume_info,
    volume_sender,
)
from RaptorExtension.volumes.readers import read_volume  # noqa: E402
from RaptorExtension.volumes.volume import Volume  # noqa: E402


@pytest.fixture
def settings(tiny_model_dir) -> EmbedSettings:
    return EmbedSettings(model=str(tiny_model_dir), k=8, seed=0, grid=16, device="cpu", batch_size=4)


def embed_request(settings: EmbedSettings, **fields) -> dict:
    return {"kind": "embed", "settings": server_settings(settings), **fields}


def run_job(client, request: dict) -> dict:
    job = client.submit(request)
    return finished_or_raise(client.wait(job["id"], interval=0.05), "test job")


def test_embed_of_a_file_equals_raptor_embed_in_process(raptor_server, settings, tmp_path):
    path = write_volume(tmp_path / "scan.nrrd", synthetic_volume(), oblique_matrix())
    client = raptor_server.client()
    upload = file_sender(path, "volume").run(client)
    snapshot = run_job(client, embed_request(settings, volume={"upload": upload}, volume_info={"id": "scan"}))
    remote = embedding_from_bytes(client.fetch(snapshot["id"], snapshot["result"]["files"]["embedding"]), "scan")
    local = Embedder(settings).embed_volume(read_volume(str(path)))
    assert remote.vector.dtype == np.float32 and np.array_equal(remote.vector, local.vector)
    assert remote.settings() == local.settings()
    assert remote.metadata["source"] == "upload:scan"  # never the server's own path


def test_embed_of_an_in_memory_volume_keeps_its_exact_geometry(raptor_server, settings):
    """A Slicer node's voxels travel as NRRD pieces with the declared IJK-to-RAS; the server embeds exactly that."""
    volume = Volume(array=synthetic_volume().astype(np.int16), ijk_to_ras=oblique_matrix(), id="node", source="slicer:node",
                    modality="CT", info={"SeriesInstanceUID": "1.2.3"})
    client = raptor_server.client()
    sender = volume_sender(volume)
    while not sender.step(client, budget=4096):  # many small pieces, as a GUI timer would send them
        pass
    snapshot = run_job(client, embed_request(settings, volume={"upload": sender.upload_id}, volume_info=volume_info(volume)))
    remote = embedding_from_bytes(client.fetch(snapshot["id"], "embedding.npz"), "node")
    local = Embedder(settings).embed_volume(volume)
    assert np.array_equal(remote.vector, local.vector)
    assert remote.metadata["source_ijk_to_ras"] == local.metadata["source_ijk_to_ras"]
    assert remote.metadata["modality"] == "CT" and remote.metadata["dicom"] == {"SeriesInstanceUID": "1.2.3"}


def test_explain_through_the_server_equals_explain_in_process(raptor_server, settings, tmp_path):
    """The heatmap and the scores are bit-identical.  The float64 slice curves agree to their last float32 bit:
    their sums go through BLAS, whose float64 results may differ in the last bits between two processes
    (memory alignment picks the kernel), far below what the float32 embedding itself can resolve."""
    embedder = Embedder(settings)
    probe = random_probe(embedder, task="binary", classes=("normal", "finding"))
    probe_path = probe.save(tmp_path / "p.raptorprobe")
    volume_path = write_volume(tmp_path / "v.nrrd", synthetic_volume(seed=3), oblique_matrix())
    client = raptor_server.client()
    request = {"kind": "explain", "probe": {"upload": file_sender(probe_path, "probe").run(client)},
               "volume": {"upload": file_sender(volume_path, "volume").run(client)}, "volume_info": {"id": "v"},
               "output": "finding"}
    snapshot = run_job(client, request)
    remote = load_explanation(client.fetch_to(snapshot["id"], "explanation.npz", tmp_path / "remote.npz"))
    local = explain_volume(probe, embedder, read_volume(str(volume_path))).explain("finding")
    assert np.array_equal(remote.heatmap, local.heatmap.astype(np.float32))
    for a, b in zip(remote.slice_curves, local.slice_curves):
        assert a.dtype == b.dtype == np.float64
        assert np.array_equal(a.astype(np.float32), b.astype(np.float32))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert (remote.decision, remote.bias, remote.score) == (local.decision, local.bias, local.score)
    assert remote.slice_ras(1, 3).tolist() == local.slice_ras(1, 3).tolist()
    assert snapshot["result"]["scores"]["finding"] == pytest.approx(local.score)
    assert client.fetch(snapshot["id"], "figure.png").startswith(b"\x89PNG")


def test_progress_is_monotonic_and_ends_at_the_total(raptor_server, settings, slow_model_dir):
    client = raptor_server.client()
    volume = Volume(array=synthetic_volume(), ijk_to_ras=np.eye(4), id="p", source="p")
    upload = volume_sender(volume).run(client)
    slow = EmbedSettings(**{**server_settings(settings), "model": str(slow_model_dir), "grid": 40, "batch_size": 1})
    job = client.submit(embed_request(slow, volume={"upload": upload}, volume_info=volume_info(volume)))
    seen = []
    snapshot = client.wait(job["id"], progress=lambda s: seen.append((s["stage"], s["done"], s["total"])), interval=0.02)
    assert snapshot["state"] == "done"
    encoding = [(d, t) for stage, d, t in seen if stage == "encoding" and t]
    assert len(encoding) >= 3, seen
    assert all(b[0] >= a[0] for a, b in zip(encoding, encoding[1:])), encoding
    assert snapshot["done"] == snapshot["total"] == 3 * 40


def test_cancel_stops_the_job_before_it_ends(raptor_server, settings, slow_model_dir):
    client = raptor_server.client()
    volume = Volume(array=synthetic_volume(), ijk_to_ras=np.eye(4), id="c", source="c")
    upload = volume_sender(volume).run(client)
    slow = EmbedSettings(**{**server_settings(settings), "model": str(slow_model_dir), "grid": 64, "batch_size": 1})
    job = client.submit(embed_request(slow, volume={"upload": upload}, volume_info=volume_info(volume)))
    while True:
        snapshot = client.status(job["id"])
        if snapshot["stage"] == "encoding" and snapshot["done"] > 0:
            break
        assert snapshot["state"] in ("queued", "running"), snapshot
        time.sleep(0.01)
    at_cancel = client.cancel(job["id"])["done"]
    final = client.wait(job["id"], interval=0.02)
    assert final["state"] == "cancelled" and final["result"] == {}
    assert at_cancel <= final["done"] < final["total"] == 3 * 64
    with pytest.raises(RaptorError, match="no result file|still|no job"):
        client.fetch(job["id"], "embedding.npz")


def test_two_clients_at_once_both_get_their_own_result(raptor_server, settings):
    volumes = [Volume(array=synthetic_volume(seed=s), ijk_to_ras=oblique_matrix(), id=f"v{s}", source=f"v{s}") for s in (1, 2)]
    results: dict[str, Embedding] = {}
    errors: list[BaseException] = []

    def work(volume: Volume) -> None:
        try:
            client = raptor_server.client()
            upload = volume_sender(volume).run(client)
            snapshot = run_job(client, embed_request(settings, volume={"upload": upload}, volume_info=volume_info(volume)))
            results[volume.id] = embedding_from_bytes(client.fetch(snapshot["id"], "embedding.npz"), volume.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    embedder = Embedder(settings)
    for volume in volumes:
        assert np.array_equal(results[volume.id].vector, embedder.embed_volume(volume).vector)
        assert results[volume.id].id == volume.id


def test_a_server_killed_mid_job_leaves_one_line_and_nothing_written(tmp_path_factory, settings, slow_model_dir):
    server = start_server(tmp_path_factory.getbasetemp())
    try:
        client = server.client()
        volume = Volume(array=synthetic_volume(), ijk_to_ras=np.eye(4), id="k", source="k")
        upload = volume_sender(volume).run(client)
        slow = EmbedSettings(**{**server_settings(settings), "model": str(slow_model_dir), "grid": 64, "batch_size": 1})
        job = client.submit(embed_request(slow, volume={"upload": upload}, volume_info=volume_info(volume)))
        while client.status(job["id"])["done"] == 0:
            time.sleep(0.01)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        with pytest.raises(RaptorError) as caught:
            client.wait(job["id"])
        message = str(caught.value)
        assert "cannot reach the Raptor server" in message and "\n" not in message
    finally:
        server.stop()
