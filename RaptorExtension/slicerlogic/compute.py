"""Where the modules' jobs run: "This computer" (a local Raptor server) or "Raptor server" (a URL and a token).

Both modules share one :class:`Compute` (:func:`shared_compute`), so an Embed,
an Explain and a Batch share one server and its loaded model.  Slicer's
process itself never imports PyTorch: every heavy job goes to the server.
The settings the user chose are stored by the panel (Slicer's application
settings); this class only takes them.
"""

from __future__ import annotations

import time

from ..errors import Cancelled, RaptorError
from ..server.client import RaptorClient
from ..server.launcher import LocalServer

LOCAL, REMOTE = "local", "remote"


class Compute:
    """A connection to the server that runs this Slicer session's jobs."""

    def __init__(self, mode: str = LOCAL, url: str = "", token: str = "", cafile: str | None = None,
                 local: LocalServer | None = None) -> None:
        self._local = local
        self.configure(mode, url, token, cafile)

    def configure(self, mode: str, url: str = "", token: str = "", cafile: str | None = None) -> None:
        if mode not in (LOCAL, REMOTE):
            raise RaptorError(f"compute mode must be {LOCAL} or {REMOTE} (got {mode!r})")
        if mode == REMOTE and not (url or "").strip():
            raise RaptorError("enter the Raptor server's address, e.g. https://gpu-host:8765")
        self.mode, self.url, self.token, self.cafile = mode, (url or "").strip(), (token or "").strip() or None, cafile
        self._remote = RaptorClient(self.url, self.token, cafile=cafile) if mode == REMOTE else None

    @property
    def is_local(self) -> bool:
        return self.mode == LOCAL

    @property
    def local(self) -> LocalServer:
        if self._local is None:
            self._local = LocalServer()
        return self._local

    def client(self) -> RaptorClient | None:
        """The client, or ``None`` while a local server is still starting (never blocks)."""
        if self.mode == REMOTE:
            return self._remote
        return self.local.client()

    def connect(self, timeout: float = 120.0) -> RaptorClient:
        """Block until the server answers (scripts, tests, the Test button)."""
        if self.mode == REMOTE:
            self._remote.health()
            return self._remote
        return self.local.wait(timeout)

    def health(self) -> dict:
        return self.connect().health()

    def try_health(self) -> dict | None:
        """The server's health, or ``None`` while a local server is still starting.

        The panel's Test button polls this from a timer, so the interface keeps
        answering while a local server imports PyTorch (seconds to a minute); a
        server that died while starting raises its one-line error.
        """
        client = self.client()
        return None if client is None else client.health()

    def where(self) -> str:
        """Where jobs run, for the panel: ``this computer`` or the server's address."""
        return "this computer" if self.is_local else self.url

    def server_lost(self) -> None:
        """The server stopped answering mid-job: a local one is started afresh for the next job."""
        if self.is_local and self._local is not None and not self._local.running:
            self._local.stop()

    def unload(self) -> bool:
        """Free the server's loaded model (GPU memory); False when there was none or no server yet."""
        if self.is_local and (self._local is None or not self._local.running):
            return False
        return bool(self.connect().unload().get("unloaded"))

    def shutdown(self) -> None:
        if self._local is not None:
            self._local.stop()


def describe_health(info: dict, where: str) -> str:
    """One line for the panel: version, where, devices, the loaded model and the queue."""
    devices = ", ".join(
        f"{d['name']} {d.get('model', '')} ({d['memory_gb']:.0f} GB)".replace("  ", " ") if d.get("kind") == "cuda" else d["name"]
        for d in info.get("devices", [])
    ) or ("still looking for devices" if info.get("devices_ready") is False else "no device reported")
    models = info.get("models") or []
    loaded = "; ".join(f"{m['model']} on {m['device']} ({m['precision']})" for m in models) or "no model loaded"
    queue = sum(int(v) for v in (info.get("queue") or {}).values())
    running = len(info.get("running") or [])
    return (f"raptor {info.get('version', '?')} on {where}: {devices}. Loaded: {loaded}. "
            f"Jobs: {running} running, {queue} waiting.")


_SHARED: Compute | None = None


def shared_compute() -> Compute:
    """The one :class:`Compute` of this Slicer session (local until the panel says otherwise)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Compute()
    return _SHARED


def set_shared_compute(compute: Compute) -> Compute:
    global _SHARED
    if _SHARED is not None and _SHARED is not compute:
        _SHARED.shutdown()
    _SHARED = compute
    return compute


class ServerLogic:
    """What the modules' logics share: the scene they work on, the :class:`Compute` that runs their jobs, and
    a blocking wait for scripts and tests (the panels poll from a timer instead)."""

    _scene = None
    _compute: Compute | None = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    @property
    def compute(self) -> Compute:
        return self._compute if self._compute is not None else shared_compute()

    @compute.setter
    def compute(self, value: Compute) -> None:
        self._compute = value

    def poll(self) -> bool:
        """Main thread: advance the running jobs by one short step; True while one runs."""
        raise NotImplementedError

    def _idle(self) -> None:
        """Called while a blocking call waits; Slicer's logic processes Qt events here."""

    def _pump(self) -> None:
        """Poll until nothing runs (blocking; the interface stays alive through :meth:`_idle`)."""
        while self.poll():
            self._idle()
            time.sleep(0.002)

    def _wait_for(self, job, what: str):
        """Block until ``job`` ends; return it when done, raise its error or :class:`Cancelled` otherwise."""
        self._pump()
        if job.status == "failed":
            raise RaptorError(job.error or f"{what} failed")
        if job.status == "cancelled":
            raise Cancelled()
        return job


__all__ = ["Compute", "LOCAL", "REMOTE", "ServerLogic", "describe_health", "shared_compute", "set_shared_compute"]
