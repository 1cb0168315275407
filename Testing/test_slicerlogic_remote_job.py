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


def test_a_cancel_while_the_results_arrive_drops_them(raptor_server, tiny_model_dir):
    """A Cancel (or a scene close) once the job is done on the server but before its files came: nothing is shown."""
    volume = Volume(array=synthetic_volume(seed=3), ijk_to_ras=np.eye(4), id="v", source="v")
    request = {"kind": "embed", "settings": server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8,
                                                                          device="cpu")),
               "volume_info": volume_info(volume)}
    job = RemoteJob(raptor_server.compute(), request, uploads=[("volume", volume_sender(volume))], fetch=["embedding"])
    for _ in range(100_000):
        job.step()
        if job.phase == FETCHING or job.finished:
            break
        time.sleep(0.01)
    assert job.phase == FETCHING and not job.finished and not job.results
    job.cancel()
    job.step()
    assert job.state == "cancelled" and job.results == {}
