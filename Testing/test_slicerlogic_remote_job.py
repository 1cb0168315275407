"""RemoteJob, the step machine the panels drive from their timer, against a real server."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install -e .[standalone])")

from conftest import synthetic_volume  # noqa: E402

from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402
from RaptorExtension.server.remote import server_settings, volume_info, volume_sender  # noqa: E402
from RaptorExtension.slicerlogic.remote_job import FETCHING, RemoteJob  # noqa: E402
from RaptorExtension.volumes.volume import Volume  # noqa: E402


def embed_job_at_fetching(raptor_server, tiny_model_dir, seed: int) -> RemoteJob:
    """An embed job stepped until the server has finished it and its results are about to be fetched."""
    volume = Volume(array=synthetic_volume(seed=seed), ijk_to_ras=np.eye(4), id="v", source="v")
    request = {"kind": "embed", "settings": server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8,
                                                                          device="cpu")),
               "volume_info": volume_info(volume)}
    job = RemoteJob(raptor_server.compute(), request, uploads=[("volume", volume_sender(volume))], fetch=["embedding"])
    for _ in range(100_000):
        job.step()
        if job.phase == FETCHING or job.finished:
            break
        time.sleep(0.01)
    assert job.phase == FETCHING and not job.finished and not job.results, job.error
    return job


def test_a_cancel_while_the_results_arrive_drops_them(raptor_server, tiny_model_dir):
    """A Cancel (or a scene close) once the job is done on the server but before its files came: nothing is shown."""
    job = embed_job_at_fetching(raptor_server, tiny_model_dir, seed=3)
    job.cancel()
    job.step()
    assert job.state == "cancelled" and job.results == {}



def test_results_arrive_in_pieces_one_per_step(raptor_server, tiny_model_dir):
    """A result is fetched with HTTP Range requests, one piece per timer step (an explanation of a CT is hundreds
    of MB, which one request would make the interface wait for); the pieces add up to the file, byte for byte."""
    job = embed_job_at_fetching(raptor_server, tiny_model_dir, seed=4)
    client = raptor_server.compute().client()
    name = job.snapshot["result"]["files"]["embedding"]
    whole = client.fetch(job.job_id, name)
    assert len(whole) > 3000
    pieces = [client.fetch_piece(job.job_id, name, start, 1000) for start in range(0, len(whole), 1000)]
    assert b"".join(p for p, _ in pieces) == whole and {total for _, total in pieces} == {len(whole)}
    assert client.fetch_piece(job.job_id, name, len(whole), 1000) == (b"", len(whole))  # past the end: nothing

    job.min_piece = job._budget = 1000  # bytes a step, so that even this small file takes many steps
    job.step_seconds = 0.0  # every step falls back to the smallest piece
    steps, stages = 0, set()
    while not job.finished and steps < 100_000:
        job.step()
        steps += 1
        stages.add((job.progress.stage, job.progress.unit))
    assert job.state == "done", job.error
    assert job.results["embedding"] == whole
    assert steps >= len(whole) // 1000  # at most one piece of 1000 bytes a step
    assert stages == {("receiving the result", "MB")}
