"""A server's life: where it says it listens, TLS, the local server the modules start, and no orphans.

The modules start ``raptor serve`` themselves (:class:`LocalServer`) with a
pipe on its standard input; when the parent dies, however it dies, the pipe
closes and the server exits, so no orphan keeps the GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from RaptorExtension.errors import RaptorError
from RaptorExtension.server.client import RaptorClient, ServerUnreachable
from RaptorExtension.server.launcher import LocalServer
from RaptorExtension.slicerlogic.compute import Compute

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a dead parent's init) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_local_server_starts_on_first_use_is_reused_and_restarts_after_a_crash():
    server = LocalServer()
    try:
        assert not server.running
        client = server.wait(120)
        first_pid = client.health()["pid"]
        assert server.client().health()["pid"] == first_pid  # reused, not started again
        assert server.starts == 1
        assert Compute(local=server).try_health()["pid"] == first_pid
        os.kill(first_pid, signal.SIGKILL)
        server.process.wait(10)
        with pytest.raises(RaptorError, match="local Raptor server stopped"):
            server.client()
        again = server.wait(120)  # the next use starts a fresh one
        assert again.health()["pid"] != first_pid and server.starts == 2
        with pytest.raises(ServerUnreachable):
            RaptorClient(client.url, server.token, timeout=5).health()
    finally:
        server.stop()
    assert not server.running


def test_the_panel_test_button_never_waits_for_a_starting_local_server():
    """``try_health`` (polled by the Compute panel's timer) answers None at once while the server starts."""
    compute = Compute(local=LocalServer())
    try:
        assert compute.try_health() is None  # the first call starts the server and returns without waiting
        assert compute.local.running and compute.local.url is None
        deadline = time.monotonic() + 120
        info = None
        while info is None and time.monotonic() < deadline:
            time.sleep(0.1)
            info = compute.try_health()
        assert info is not None and info["pid"] == compute.local.process.pid
    finally:
        compute.shutdown()


def test_the_server_exits_when_its_parent_dies(tmp_path):
    """A parent starts a local server the way the modules do, then is killed with SIGKILL."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from RaptorExtension.server.launcher import LocalServer
        server = LocalServer()
        client = server.wait(120)
        print(client.health()["pid"], flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
        parent.kill()
        parent.wait(10)
        assert wait_gone(server_pid), "the server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_url_comes_first_and_a_url_file_is_written(tmp_path):
    url_file = tmp_path / "url"
    process = subprocess.Popen([sys.executable, "-m", "RaptorExtension", "serve", "--port", "0", "--exit-with-stdin",
                                "--url-file", str(url_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k != "RAPTOR_TOKEN"})
    try:
        first = process.stdout.readline().decode().strip()
        assert first.startswith("http://127.0.0.1:") and url_file.read_text().strip() == first
        assert RaptorClient(first).health()["service"] == "raptor"  # loopback without a token
    finally:
        process.stdin.close()
        process.wait(20)
    assert not url_file.exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (it makes the test certificate)")
def test_tls_with_a_certificate_the_client_trusts(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token = "s" * 32
    env = dict(os.environ, RAPTOR_TOKEN=token)
    process = subprocess.Popen([sys.executable, "-m", "RaptorExtension", "serve", "--port", "0", "--exit-with-stdin",
                                "--tls-cert", str(cert), "--tls-key", str(key)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        url = process.stdout.readline().decode().strip()
        assert url.startswith("https://")
        assert RaptorClient(url, token, cafile=str(cert)).health()["service"] == "raptor"
        with pytest.raises(ServerUnreachable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            RaptorClient(url, token).health()  # an untrusted certificate is refused by default
    finally:
        process.stdin.close()
        process.wait(20)


def test_the_self_test_model_is_made_by_another_process_once(tmp_path):
    """The modules' self-tests get their tiny model from the server's Python (Slicer never imports PyTorch)."""
    from RaptorExtension.server.launcher import self_test_model

    folder = tmp_path / "RaptorSelfTestModel"
    assert self_test_model(folder) == str(folder)
    config = folder / "config.json"
    made = config.stat().st_mtime_ns
    assert any(folder.glob("*.safetensors"))
    assert self_test_model(folder) == str(folder) and config.stat().st_mtime_ns == made  # reused, not rewritten
