"""A client for the Raptor server, on the standard library only (no PyTorch, no FastAPI, no requests).

The Slicer modules use it from a ``qt.QTimer``: every call is one short HTTP
request (status, one upload piece, one small download), so the interface
never waits on the GPU.  ``raptor embed|explain|batch --server URL`` use it to
send work to a GPU machine.

Every failure is one :class:`~..errors.RaptorError` line that says what to do:
the server is unreachable, refused the token, runs another Raptor version,
or answered an error (its own one-line message).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_write
from ..errors import Cancelled, RaptorError
from ..version import __version__
from .protocol import (
    API_VERSION,
    FINISHED,
    PREFIX,
    TOKEN_ENV,
    UPLOAD_SIZE_HEADER,
    compatible_versions,
)

CHUNK_BYTES = 8 << 20


class ServerUnreachable(RaptorError):
    """No answer from the server (not running, wrong address, crashed, network down)."""


class ServerRefused(RaptorError):
    """The server refused the token (HTTP 401)."""


class ServerError(RaptorError):
    """The server answered with an error; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def token_from(token_file: str | None = None) -> str | None:
    """The bearer token: from a file (first line), else ``RAPTOR_TOKEN``, else none."""
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise RaptorError(f"{token_file}: cannot read the token ({exc.strerror or exc})") from None
    return os.environ.get(TOKEN_ENV) or None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A Raptor server never redirects; following one would send the bearer token elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RaptorClient:
    def __init__(self, url: str, token: str | None = None, *, cafile: str | None = None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RaptorError(f"{url}: a Raptor server address looks like http://host:port or https://host:port")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self.token = token
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=cafile) if parsed.scheme == "https" else None
        handlers: list = [_NoRedirects()]
        if parsed.hostname in LOOPBACK_HOSTS:  # a proxy (http_proxy) must never see a local server's token or scans
            handlers.append(urllib.request.ProxyHandler({}))
        if self._context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._context))
        self._opener = urllib.request.build_opener(*handlers)

    # -- plumbing -------------------------------------------------------------
    def request(self, method: str, path: str, *, body: bytes | None = None, data: dict | None = None,
                headers: dict | None = None, timeout: float | None = None, raw: bool = False):
        headers = dict(headers or {})
        if data is not None:
            body = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
        payload, _status, _headers = self._exchange(method, path, body=body, headers=headers, timeout=timeout)
        if raw:
            return payload
        try:
            return json.loads(payload or b"{}")
        except json.JSONDecodeError:
            raise ServerError(f"{self.url} answered something that is not a Raptor server's JSON", 502) from None

    def _exchange(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
                  timeout: float | None = None, accept: tuple[int, ...] = ()):
        """``(payload, status, headers)`` of one request with the token; an HTTP error outside ``accept``, or no
        connection, is one :class:`RaptorError`."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + PREFIX + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                return response.read(), response.status, response.headers
        except urllib.error.HTTPError as exc:
            if exc.code in accept:
                return b"", exc.code, exc.headers
            raise self._http_error(exc) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachable(
                f"cannot reach the Raptor server at {self.url} ({reason}); is it running, and is the address right?"
            ) from None

    def _http_error(self, exc: urllib.error.HTTPError) -> RaptorError:
        try:
            message = json.loads(exc.read() or b"{}").get("error") or exc.reason
        except (json.JSONDecodeError, AttributeError, OSError):
            message = exc.reason
        if exc.code == 401:
            return ServerRefused(f"the Raptor server at {self.url} refused the token ({message}); check the token")
        return ServerError(str(message), exc.code)

    # -- the API ----------------------------------------------------------------
    def health(self) -> dict:
        """The server's health, checked to be a Raptor server of a compatible version."""
        info = self.request("GET", "/health", timeout=min(self.timeout, 10.0))
        if info.get("service") != "raptor" or info.get("api") != API_VERSION:
            raise ServerError(f"{self.url} is not a Raptor {API_VERSION} server", 502)
        if not compatible_versions(str(info.get("version", "")), __version__):
            raise ServerError(
                f"the Raptor server at {self.url} runs raptor {info.get('version')}, this is raptor {__version__}; "
                "use the same version on both sides", 409)
        return info

    def start_upload(self, purpose: str, size: int, first: bytes = b"", name: str = "") -> dict:
        query = urllib.parse.urlencode({"purpose": purpose, **({"name": name} if name else {})})
        return self.request("POST", f"/uploads?{query}", body=first,
                            headers={UPLOAD_SIZE_HEADER: str(size), "Content-Type": "application/octet-stream"})

    def continue_upload(self, upload_id: str, offset: int, data: bytes) -> dict:
        return self.request("PUT", f"/uploads/{upload_id}?offset={offset}", body=data,
                            headers={"Content-Type": "application/octet-stream"})

    def upload_bytes(self, purpose: str, data: bytes) -> str:
        return self.start_upload(purpose, len(data), data)["upload"]

    def upload_file(self, purpose: str, path: str | Path, progress: Callable[[int, int], None] | None = None) -> str:
        """Send a file in pieces; returns the upload id to name in a job."""
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as handle:
            first = handle.read(CHUNK_BYTES)
            answer = self.start_upload(purpose, size, first, path.name)
            sent = len(first)
            while sent < size:
                if progress:
                    progress(sent, size)
                piece = handle.read(CHUNK_BYTES)
                answer = self.continue_upload(answer["upload"], sent, piece)
                sent += len(piece)
        if progress:
            progress(size, size)
        return answer["upload"]

    def submit(self, request: dict) -> dict:
        return self.request("POST", "/jobs", data=request)

    def status(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/jobs/{job_id}/cancel")

    def forget(self, job_id: str) -> None:
        self.request("DELETE", f"/jobs/{job_id}")

    def fetch(self, job_id: str, name: str) -> bytes:
        return self.request("GET", f"/jobs/{job_id}/files/{urllib.parse.quote(name)}", raw=True, timeout=300.0)

    def fetch_piece(self, job_id: str, name: str, start: int, size: int) -> tuple[bytes, int]:
        """Bytes ``start`` to ``start + size`` of a result file, and the file's whole size (an HTTP Range request).

        Slicer's timer fetches a large result (an explanation of a 512x512 CT is
        hundreds of MB) one piece per tick, so the interface never waits for the
        whole file; a piece past the end is empty.
        """
        payload, status, headers = self._exchange(
            "GET", f"/jobs/{job_id}/files/{urllib.parse.quote(name)}",
            headers={"Range": f"bytes={int(start)}-{int(start) + max(1, int(size)) - 1}"}, accept=(416,))
        total = (headers.get("Content-Range") or "").rpartition("/")[2]
        if status == 416:  # the range starts at or past the end: nothing left (an empty file included)
            return b"", int(total) if total.isdigit() else int(start)
        if status == 200:  # a server that ignores Range sends the whole file
            return payload[start:start + size], len(payload)
        if status != 206 or not total.isdigit():
            raise ServerError(f"{self.url} answered a piece of {name} without its size (HTTP {status})", 502)
        return payload, int(total)

    def fetch_to(self, job_id: str, name: str, path: str | Path) -> Path:
        payload = self.fetch(job_id, name)
        with atomic_write(path) as handle:
            handle.write(payload)
        return Path(path)

    def unload(self) -> dict:
        return self.request("POST", "/models/unload")

    def wait(self, job_id: str, *, progress: Callable[[dict], None] | None = None, cancel=None,
             interval: float = 0.25) -> dict:
        """Poll until the job ends; ``cancel`` (anything with ``is_set()``) or Ctrl-C cancels it on the server."""
        cancelled = False
        try:
            while True:
                snapshot = self.status(job_id)
                if progress:
                    progress(snapshot)
                if snapshot["state"] in FINISHED:
                    return snapshot
                if cancel is not None and cancel.is_set() and not cancelled:
                    self.cancel(job_id)
                    cancelled = True
                time.sleep(interval)
        except KeyboardInterrupt:
            try:
                self.cancel(job_id)
            except RaptorError:
                pass
            raise


def finished_or_raise(snapshot: dict, what: str) -> dict:
    """The snapshot of a job that succeeded; raise its one-line error (or :class:`Cancelled`) otherwise."""
    state = snapshot.get("state")
    if state == "done":
        return snapshot
    if state == "cancelled":
        raise Cancelled(f"{what}: cancelled; nothing was written")
    raise RaptorError(snapshot.get("error") or f"{what}: the job failed on the server")


__all__ = ["RaptorClient", "ServerUnreachable", "ServerRefused", "ServerError", "token_from", "finished_or_raise",
           "CHUNK_BYTES"]
