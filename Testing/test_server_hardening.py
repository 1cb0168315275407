"""What a hostile review of the server found, each pinned by a real server on 127.0.0.1.

A header that names another file beyond the first peek, outputs that would
replace other files under an allowed folder, uploads that were never removed,
a proxy in the environment that would see a local server's token, settings
that would only fail once the model was loaded.
"""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install -e .[standalone])")

from conftest import synthetic_volume  # noqa: E402
from helpers import start_server  # noqa: E402

from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402
from RaptorExtension.errors import RaptorError  # noqa: E402
from RaptorExtension.server.client import RaptorClient, ServerError  # noqa: E402
from RaptorExtension.server.remote import server_settings, volume_info, volume_sender  # noqa: E402
from RaptorExtension.volumes.volume import Volume  # noqa: E402


def test_a_nrrd_header_that_names_a_file_after_64_kib_of_comments_is_refused(raptor_server, tmp_path):
    secret = tmp_path / "outside.raw"
    secret.write_bytes(b"\x01\x00" * 8)
    header = (b"NRRD0004\n" + b"# padding\n" * 7000 + b"type: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
              + f"data file: {secret}\n\n".encode())
    with pytest.raises(ServerError) as caught:
        raptor_server.client().upload_bytes("volume", header)
    assert caught.value.status == 400 and "does not end within its first 64 KiB" in str(caught.value)


def test_a_batch_never_replaces_a_file_raptor_did_not_write(raptor_server, tiny_model_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,split,finding\na,train,1\n")
    table = tmp_path / "volumes"
    table.mkdir()
    np.save(table / "v.npy", synthetic_volume(seed=1))
    settings = server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8, device="cpu"))
    client = raptor_server.client()
    base = {"kind": "batch", "settings": settings, "sources": {"folders": [str(table)]},
            "csv": str(tmp_path / "out.csv")}
    for field, victim in (("errors_csv", labels), ("parquet", labels)):
        with pytest.raises(ServerError) as caught:
            client.submit({**base, field: str(victim)})
        assert caught.value.status == 403 and "is not one Raptor wrote" in str(caught.value)
    (tmp_path / "out_errors.csv").write_text("my notes\n")  # the default errors file, taken by someone else's file
    with pytest.raises(ServerError, match="out_errors.csv exists and is not one Raptor wrote"):
        client.submit(base)
    assert labels.read_text() == "id,split,finding\na,train,1\n"
    assert (tmp_path / "out_errors.csv").read_text() == "my notes\n"


def test_a_job_removes_the_uploads_it_consumed(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    server = start_server(tmp_path, "--work-dir", str(work), "--allow-root", str(tiny_model_dir))
    try:
        client = server.client()
        volume = Volume(array=synthetic_volume(seed=2), ijk_to_ras=np.eye(4), id="v", source="v")
        upload = volume_sender(volume).run(client)
        assert len(list((work / "uploads").iterdir())) == 1
        assert oct((work / "uploads").stat().st_mode & 0o777) == oct(0o700)  # scans: the server's user only
        settings = server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8, device="cpu"))
        job = client.submit({"kind": "embed", "settings": settings, "volume": {"upload": upload},
                             "volume_info": volume_info(volume)})
        assert client.wait(job["id"])["state"] == "done"
        assert list((work / "uploads").iterdir()) == []
        with pytest.raises(ServerError) as caught:  # and the id is gone with it
            client.submit({"kind": "embed", "settings": settings, "volume": {"upload": upload}})
        assert caught.value.status == 404
    finally:
        server.stop()


class _Proxy(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_error(502)

    def log_message(self, *args):
        pass


def test_a_proxy_in_the_environment_never_sees_a_local_servers_traffic(raptor_server, monkeypatch):
    proxy = http.server.HTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{proxy.server_address[1]}"
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(name, address)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert raptor_server.client().health()["service"] == "raptor"
        assert _Proxy.seen == []
    finally:
        proxy.shutdown()


@pytest.mark.parametrize("change, words", [
    ({"k": -5}, "K must be between 1 and 100000"),
    ({"planes": []}, "planes must be some of axial, coronal, sagittal"),
    ({"planes": ["axial", "axial"]}, "each once"),
    ({"image_size": 100000}, "image size must be between 14 and 1024"),
    ({"batch_size": 0}, "batch size must be between 1 and 4096"),
    ({"preset": "bogus"}, "unknown intensity preset 'bogus'"),
    ({"seed": 2**70}, "seed must be between 0 and"),
])
def test_settings_are_checked_on_submit_not_after_the_model_loads(raptor_server, tiny_model_dir, change, words):
    settings = server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8, device="cpu"))
    with pytest.raises(ServerError) as caught:
        raptor_server.client().submit({"kind": "describe", "settings": {**settings, **change}})
    assert caught.value.status == 400 and words in str(caught.value) and "\n" not in str(caught.value)


def test_the_client_never_follows_a_redirect_with_the_token():
    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), _Proxy)  # records what reaches it
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/steal"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    for s in (server, elsewhere):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    _Proxy.seen.clear()
    try:
        with pytest.raises(RaptorError):
            RaptorClient(f"http://127.0.0.1:{server.server_address[1]}", "secret-token-123456").health()
        assert _Proxy.seen == []  # the token never left for the redirect's target
    finally:
        server.shutdown()
        elsewhere.shutdown()


def test_a_job_request_must_say_it_is_json(raptor_server):
    """A web page may POST text/plain across sites without asking first; a Raptor job must come as JSON."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"kind": "describe", "settings": {}}).encode()
    request = urllib.request.Request(raptor_server.url + "/v1/jobs", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {raptor_server.token}", "Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and "Content-Type: application/json" in json.loads(caught.value.read())["error"]


def test_a_manifest_cannot_make_the_server_read_outside_its_folders(raptor_server, tiny_model_dir, tmp_path):
    import csv
    import shutil
    import tempfile
    from pathlib import Path

    outside = Path(tempfile.mkdtemp(prefix="raptor-outside-"))  # not under the server's --allow-root
    try:
        np.save(outside / "secret.npy", synthetic_volume(seed=5))
        np.save(tmp_path / "inside.npy", synthetic_volume(seed=6))
        manifest = tmp_path / "manifest.csv"
        with open(manifest, "w", newline="") as handle:
            csv.writer(handle).writerows([["id", "path"], ["inside", str(tmp_path / "inside.npy")],
                                          ["secret", str(outside / "secret.npy")]])
        settings = server_settings(EmbedSettings(model=str(tiny_model_dir), k=4, grid=8, device="cpu"))
        client = raptor_server.client()
        job = client.submit({"kind": "batch", "settings": settings, "sources": {"manifests": [str(manifest)]},
                             "csv": str(tmp_path / "out.csv")})
        snapshot = client.wait(job["id"])
        assert snapshot["state"] == "done", snapshot
        ids = [row[0] for row in csv.reader(open(tmp_path / "out.csv"))][1:]
        assert ids == ["inside"]  # the series outside the allowed folders was left out, unread
    finally:
        shutil.rmtree(outside, ignore_errors=True)
