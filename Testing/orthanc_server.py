"""A real PACS for tests and benchmarks: Debian's Orthanc with its DICOMweb plugin, as a plain process.

``OrthancServer.start(folder)`` writes a config (a free loopback port, HTTP
basic authentication, storage in ``folder``, the DICOM port off), starts
``Orthanc`` and waits until ``GET /system`` answers; ``stop()`` ends it.  The
helpers use Orthanc's own REST API (not DICOMweb) to load and delete data, so
what the tests check goes through the DICOMweb code under test only.

Checked facts behind the config: ../shared/notes/orthanc-dicomweb-highdicom.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACKAGES = "orthanc orthanc-dicomweb (Debian/Ubuntu: apt-get install orthanc orthanc-dicomweb; ./setup.sh does it as root)"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (naming the packages), or None."""
    if shutil.which(ORTHANC) is None:
        return f"Orthanc is not installed: needs {PACKAGES}"
    if not DICOMWEB_PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing: needs {PACKAGES}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OrthancServer:
    folder: Path
    port: int
    user: str
    password: str
    process: subprocess.Popen

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    @classmethod
    def start(cls, folder: Path, *, user: str = "raptor", password: str = "pacs-secret-4711", timeout: float = 60.0) -> "OrthancServer":
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        storage = folder / "db"
        config = {
            "Name": "raptor-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "Plugins": [str(DICOMWEB_PLUGIN)], "HttpServerEnabled": True, "HttpPort": port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
            "DicomServerEnabled": False, "HttpDescribeErrors": True, "SaveJobs": False, "StableAge": 5,
            "OverwriteInstances": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                         "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        (folder / "config.json").write_text(json.dumps(config))
        logs = folder / "logs"
        logs.mkdir(exist_ok=True)
        command = [ORTHANC, f"--logdir={logs}", str(folder / "config.json")]
        setpriv = shutil.which("setpriv")
        if setpriv:  # util-linux: Orthanc ends when the test or bench process dies (a kill skips the teardown)
            command = [setpriv, "--pdeathsig", "TERM", *command]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server = cls(folder, port, user, password, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {process.returncode} (logs in {logs})")
            try:
                if requests.get(f"{server.root}/system", auth=server.auth, timeout=2).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.05)
        server.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s (logs in {logs})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # -- data through Orthanc's REST API ------------------------------------
    def upload(self, files) -> int:
        """Store DICOM files (POST /instances); returns how many."""
        count = 0
        with requests.Session() as session:
            session.auth = self.auth
            for f in files:
                response = session.post(f"{self.root}/instances", data=Path(f).read_bytes(), timeout=60)
                response.raise_for_status()
                count += 1
        return count

    def lookup(self, uid: str) -> list[dict]:
        response = requests.post(f"{self.root}/tools/lookup", data=uid, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def delete_series(self, series_uid: str) -> None:
        for hit in self.lookup(series_uid):
            if hit.get("Type") == "Series":
                requests.delete(f"{self.root}/series/{hit['ID']}", auth=self.auth, timeout=30).raise_for_status()

    def clear(self) -> None:
        """Delete every patient, so each test starts from an empty PACS."""
        patients = requests.get(f"{self.root}/patients", auth=self.auth, timeout=30).json()
        for patient in patients:
            requests.delete(f"{self.root}/patients/{patient}", auth=self.auth, timeout=60).raise_for_status()

    def write_password(self, path: Path) -> Path:
        path.write_text(self.password + "\n")
        os.chmod(path, 0o600)
        return path
