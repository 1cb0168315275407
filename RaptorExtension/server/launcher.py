"""A ``raptor serve`` on this computer for the Slicer modules: started on first use, reused, restarted after a crash.

Nothing here blocks: :meth:`LocalServer.client` starts the process if needed
and returns ``None`` until the server has written its URL file, so a module's
timer simply asks again at the next tick.  The server gets a random token
through its environment (never on its command line, where ``ps`` would show
it), listens on loopback only, and watches its standard input, a pipe this
process holds and never writes to: when Slicer exits or crashes, the pipe
closes and the server stops, so no orphan keeps the GPU.

Inside Slicer the server runs with ``PythonSlicer`` (Slicer's own Python,
where PyTorch is installed), with ``RaptorExtension`` on its path.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import RaptorError
from .client import RaptorClient
from .protocol import TOKEN_ENV

STARTUP_TIMEOUT = 120.0


def python_for_server() -> str:
    """``PythonSlicer`` inside Slicer (``sys.executable`` there is the application), else this Python."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def self_test_model(folder: str | Path) -> str:
    """A tiny random-init DINOv2 folder for the modules' self-tests, made once by the server's Python.

    Slicer's own process never imports PyTorch, so the folder is written by
    another process (``PythonSlicer`` inside Slicer); an existing one is reused.
    """
    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        subprocess.run([python_for_server(), "-c", "import sys; from RaptorExtension.encoding.model import "
                        "save_random_dinov2; save_random_dinov2(sys.argv[1], 'tiny')", folder], check=True)
    return folder


class LocalServer:
    """One local server process, owned by this process."""

    def __init__(self, *, python: str | None = None, cache_dir: str | None = None, extra_args: tuple = (),
                 env: dict | None = None) -> None:
        self.python = python
        self.cache_dir = cache_dir
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.token: str | None = None
        self.folder: Path | None = None
        self.url: str | None = None
        self.started_at = 0.0
        self.starts = 0
        atexit.register(self.stop)

    # ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (returns at once)."""
        self.stop()
        package_parent = str(Path(__file__).resolve().parents[2])
        self.folder = Path(tempfile.mkdtemp(prefix="raptor-local-server-"))
        self.token = secrets.token_urlsafe(32)
        env = dict(os.environ, **self.env)
        env[TOKEN_ENV] = self.token
        env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        command = [self.python or python_for_server(), "-m", "RaptorExtension", "serve", "--host", "127.0.0.1",
                   "--port", "0", "--exit-with-stdin", "--url-file", str(self.folder / "url"),
                   "--allow-root", Path.home().anchor or "/", "--allow-root", Path(tempfile.gettempdir()).anchor or "/",
                   *(["--cache-dir", self.cache_dir] if self.cache_dir else []), *self.extra_args]
        log = open(self.folder / "server.log", "wb")
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                            env=env, cwd=str(self.folder))
        except OSError as exc:
            raise RaptorError(f"cannot start a local Raptor server with {command[0]} ({exc.strerror or exc})") from None
        finally:
            log.close()
        self.url = None
        self.started_at = time.monotonic()
        self.starts += 1

    def client(self) -> RaptorClient | None:
        """The server's client once it listens; ``None`` while it starts; an error if it died starting."""
        if self.process is None:
            self.start()
        if self.process.poll() is not None:
            message = self._last_log_line()
            self.process = None
            raise RaptorError(f"the local Raptor server stopped{(': ' + message) if message else ''}")
        if self.url is None:
            url_file = self.folder / "url"
            if not url_file.exists():
                if time.monotonic() - self.started_at > STARTUP_TIMEOUT:
                    self.stop()
                    raise RaptorError(f"the local Raptor server did not start within {STARTUP_TIMEOUT:.0f} s")
                return None
            self.url = url_file.read_text(encoding="utf-8").strip()
        return RaptorClient(self.url, self.token, timeout=30.0)

    def wait(self, timeout: float = STARTUP_TIMEOUT) -> RaptorClient:
        deadline = time.monotonic() + timeout
        while True:
            client = self.client()
            if client is not None:
                return client
            if time.monotonic() > deadline:
                raise RaptorError(f"the local Raptor server did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                process.stdin.close()  # the server exits at end of input
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
        if process is not None and process.stdin is not None and not process.stdin.closed:
            process.stdin.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.url = None

    def _last_log_line(self) -> str:
        try:
            lines = (self.folder / "server.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        useful = [line for line in lines if line.strip() and not line.startswith((" ", "Traceback"))]
        return useful[-1][:300] if useful else ""


__all__ = ["LocalServer", "python_for_server"]
