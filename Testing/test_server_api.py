"""The server's front door: tokens, size limits, refused files and paths, one-line errors, and it keeps serving.

All against a real ``raptor serve`` on 127.0.0.1 over real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from conftest import synthetic_volume  # noqa: E402
from helpers import start_server  # noqa: E402

from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402
from RaptorExtension.server.client import RaptorClient, ServerError, ServerRefused  # noqa: E402
from RaptorExtension.server.remote import server_settings, volume_info, volume_sender  # noqa: E402
from RaptorExtension.volumes.transfer import nrrd_header  # noqa: E402
from RaptorExtension.volumes.volume import Volume  # noqa: E402


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A request without the client's help: status and JSON body, errors included."""
    request = urllib.request.Request(server.url + "/v1" + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def one_line(body: dict) -> str:
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message, body
    return message


def job_count(server) -> int:
    return len(server.client().request("GET", "/jobs")["jobs"])


def small_volume(seed: int = 0) -> Volume:
    return Volume(array=synthetic_volume(seed=seed), ijk_to_ras=np.eye(4), id=f"s{seed}", source="test")


def test_a_missing_or_wrong_token_gets_401_and_does_no_work(raptor_server, tiny_model_dir):
    before = job_count(raptor_server)
    request = {"kind": "embed", "settings": server_settings(EmbedSettings(model=str(tiny_model_dir), grid=8, k=4)),
               "volume": {"upload": "x"}}
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": "Basic abc"}):
        status, body = raw(raptor_server, "POST", "/jobs", json.dumps(request).encode(), {**headers, "Content-Type": "application/json"})
        assert status == 401 and "token" in one_line(body)
        status, body = raw(raptor_server, "POST", "/uploads?purpose=volume", b"NRRD0004", {**headers, "X-Raptor-Upload-Size": "8"})
        assert status == 401
        status, _ = raw(raptor_server, "GET", "/health", None, headers)
        assert status == 401
    assert job_count(raptor_server) == before
    with pytest.raises(ServerRefused, match="refused the token"):
        raptor_server.client(token="not-the-token-at-all").health()


def test_listening_beyond_loopback_without_a_token_is_refused_at_start():
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAPTOR_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "RaptorExtension", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raptor: error: refusing to listen on 0.0.0.0 without a token")


@pytest.mark.slow
def test_an_oversized_upload_gets_413_and_the_server_goes_on(tmp_path):
    server = start_server(tmp_path, "--max-upload-mb", "1")
    try:
        client = server.client()
        with pytest.raises(ServerError) as caught:
            client.start_upload("volume", 2 << 20, b"")
        assert caught.value.status == 413 and "at most 1 MB" in str(caught.value)
        # Declared small, sent large: refused as it arrives, and the upload is dropped.
        status, body = raw(server, "POST", "/uploads?purpose=volume", b"x" * 5000,
                           {"Authorization": f"Bearer {server.token}", "X-Raptor-Upload-Size": "10"})
        assert status == 413 and one_line(body)
        assert client.health()["service"] == "raptor"
    finally:
        server.stop()


def test_corrupt_and_self_referencing_volumes_get_400_and_the_server_goes_on(raptor_server, tiny_model_dir, tmp_path):
    client = raptor_server.client()
    settings = server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8, device="cpu"))
    # A NRRD whose header promises more voxels than it holds.
    corrupt = nrrd_header(np.zeros((10, 10, 10), np.int16), np.eye(4)) + b"\x00" * 100
    upload = client.upload_bytes("volume", corrupt)
    status, body = raw(raptor_server, "POST", "/jobs",
                       json.dumps({"kind": "embed", "settings": settings, "volume": {"upload": upload}}).encode(),
                       {"Authorization": f"Bearer {raptor_server.token}", "Content-Type": "application/json"})
    assert status == 400 and one_line(body)
    # Headers that point at other files on the server's disk are refused on arrival.
    for data, words in (
        (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/passwd\n\n", "detached NRRD"),
        (b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = /etc/passwd\n", "MetaImage"),
        (b"plain text, not a volume at all", "not a NRRD"),
    ):
        with pytest.raises(ServerError) as caught:
            client.upload_bytes("volume", data)
        assert caught.value.status == 400 and words in str(caught.value)
    # Not JSON, not an object, an unknown kind, a wrong type: 400, one line each.
    auth = {"Authorization": f"Bearer {raptor_server.token}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"kind": "launch"}', json.dumps({"kind": "embed", "settings": {"k": "ten"}}).encode()):
        status, answer = raw(raptor_server, "POST", "/jobs", body, auth)
        assert status == 400 and one_line(answer)
    # ... and it still embeds.
    volume = small_volume()
    good = volume_sender(volume).run(client)
    job = client.submit({"kind": "embed", "settings": settings, "volume": {"upload": good}, "volume_info": volume_info(volume)})
    assert client.wait(job["id"], interval=0.05)["state"] == "done"


def test_paths_outside_the_allowed_roots_get_403(raptor_server, tmp_path):
    client = raptor_server.client()
    for request in (
        {"kind": "batch", "sources": {"folders": ["/etc"]}, "csv": str(tmp_path / "out.csv")},
        {"kind": "batch", "sources": {"folders": [str(tmp_path)]}, "csv": "/etc/raptor.csv"},
        {"kind": "batch", "sources": {"folders": [str(tmp_path / ".." / ".." / ".." / "etc")]}, "csv": str(tmp_path / "o.csv")},
        {"kind": "embed", "settings": {"model": "/opt/some-model"}, "volume": {"path": str(tmp_path / "v.nrrd")}},
        {"kind": "embed", "volume": {"path": "/etc/hostname"}},
    ):
        with pytest.raises(ServerError) as caught:
            client.submit(request)
        assert caught.value.status == 403 and "outside the folders this server may use" in str(caught.value)


@pytest.mark.slow
def test_a_server_with_no_allowed_root_reads_no_paths(tmp_path):
    import os

    # Started by hand: start_server always allows its root.
    env = dict(os.environ, RAPTOR_TOKEN="z" * 20)
    process = subprocess.Popen([sys.executable, "-m", "RaptorExtension", "serve", "--port", "0", "--exit-with-stdin"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        url = process.stdout.readline().decode().strip()
        with pytest.raises(ServerError) as caught:
            RaptorClient(url, "z" * 20).submit({"kind": "batch", "sources": {"folders": [str(tmp_path)]},
                                                 "csv": str(tmp_path / "o.csv")})
        assert caught.value.status == 403 and "--allow-root" in str(caught.value)
    finally:
        process.stdin.close()
        process.wait(20)


def test_health_says_version_devices_models_and_queue(raptor_server):
    from RaptorExtension.version import __version__

    info = raptor_server.client().health()
    assert info["version"] == __version__ and info["api"] == "v1"
    for _ in range(600):  # the device list is found in the background (importing PyTorch takes a while)
        if info["devices_ready"]:
            break
        time.sleep(0.05)
        info = raptor_server.client().health()
    assert info["devices"][0]["name"] == "cpu"
    assert set(info["queue"]) == {"interactive", "batch"}
    assert isinstance(info["models"], list)


def test_a_server_of_another_version_is_one_line_before_any_work():
    """A stand-in that answers /v1/health as a Raptor server of another minor version would."""
    import http.server
    import threading

    from RaptorExtension.server.protocol import compatible_versions
    from RaptorExtension.version import __version__

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"service": "raptor", "api": "v1", "version": "9.9.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServerError) as caught:
            RaptorClient(f"http://127.0.0.1:{server.server_address[1]}").health()
        assert f"runs raptor 9.9.0, this is raptor {__version__}" in str(caught.value)
    finally:
        server.shutdown()
    assert compatible_versions("0.1.0", "0.1.7") and not compatible_versions("0.2.0", "0.1.0")
