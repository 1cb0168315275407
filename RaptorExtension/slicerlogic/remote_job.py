"""One job on the Raptor server, driven from the main thread's timer one small step at a time.

Why steps: Slicer's main thread keeps Python's GIL while its event loop
idles, so nothing may wait there and no Python thread can be trusted to make
progress.  Each :meth:`RemoteJob.step` does at most one short thing: ask
whether a local server is up yet, send one piece of a file, submit the job,
read its status (at most every :attr:`RemoteJob.poll_interval` seconds), or
fetch one result file.  A piece's size adapts so that a step stays near
:attr:`RemoteJob.step_seconds`, so even a large volume never freezes the
interface.

What can go wrong becomes one line in :attr:`RemoteJob.error`: the server is
unreachable, refused the token, runs another version, refused the request,
the job failed there, or the server vanished mid-job (a local server is then
started afresh for the next job).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import RaptorError
from ..server.client import ServerUnreachable
from ..server.protocol import CANCELLED, DONE, FAILED, FINISHED
from ..server.remote import PieceSender

CONNECTING, UPLOADING, SUBMITTING, WAITING, FETCHING = "connecting", "uploading", "submitting", "waiting", "fetching"


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


@dataclass
class JobProgress:
    """What a progress bar shows: the stage, how much of it is done, and the time left."""

    stage: str
    done: int = 0
    total: int = 0
    unit: str = "slices"
    seconds_elapsed: float = 0.0
    eta_seconds: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def describe(self) -> str:
        """One line for the panel, e.g. ``encoding: 312 of 768 slices, about 9 s left``."""
        if self.total:
            text = f"{self.stage}: {self.done} of {self.total} {self.unit}"
            if self.eta_seconds is not None and self.done < self.total:
                text += f", about {format_seconds(self.eta_seconds)} left"
            return text
        return f"{self.stage}{': ' + self.detail if self.detail else ''}"


class RemoteJob:
    """Uploads, submits, follows and fetches one job.  Call :meth:`step` from a timer until :attr:`finished`."""

    poll_interval = 0.2
    step_seconds = 0.03
    min_piece, max_piece = 256 << 10, 32 << 20  # bytes sent or received in one step

    def __init__(self, compute, request: dict, *, uploads: Sequence[tuple[str, PieceSender]] = (),
                 fetch: Sequence[str] = (), optional: Sequence[str] = (), label: str = "job") -> None:
        self.compute = compute
        self.request = dict(request)
        self.uploads = list(uploads)
        self.fetch_names = list(fetch)
        self.optional_names = set(optional)  # fetched when the result names them (e.g. a classification probe's plot)
        self.label = label
        self.phase = CONNECTING
        self.state = "running"
        self.error: str | None = None
        self.job_id: str | None = None
        self.snapshot: dict = {}
        self.results: dict[str, bytes] = {}
        self.cancel_reason: str | None = None
        self.started = time.perf_counter()
        self.progress = JobProgress("starting", unit="")
        self._client = None
        self._checked = False
        self._last_poll = 0.0
        self._budget = 4 << 20
        self._receiving: dict[str, bytearray] = {}  # result files arriving piece by piece

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_reason is not None

    # ------------------------------------------------------------------
    def step(self) -> None:
        if self.finished:
            return
        try:
            self._step()
        except ServerUnreachable as exc:
            self.compute.server_lost()
            if self.job_id is not None:
                self._fail(f"{self.label}: the Raptor server stopped answering during the job (it may have crashed); "
                           "nothing was changed. The next job starts a new local server." if self.compute.is_local else
                           f"{self.label}: the Raptor server stopped answering during the job; nothing was changed ({exc})")
            else:
                self._fail(str(exc))
        except RaptorError as exc:
            self._fail(str(exc))

    def _step(self) -> None:
        if self.cancel_requested and self.job_id is None:
            self._end(CANCELLED)
            return
        if self._client is None:
            self._client = self.compute.client()
            if self._client is None:
                self._report(JobProgress("starting the Raptor server", unit=""))
                return
        client = self._client
        if not self._checked:
            client.health()
            self._checked = True
            self.phase = UPLOADING if self.uploads else SUBMITTING
            return
        if self.phase == UPLOADING:
            self._upload_one(client)
            return
        if self.phase == SUBMITTING:
            self.snapshot = client.submit(self.request)
            self.job_id = self.snapshot["id"]
            self.phase = WAITING
            self._report_snapshot()
            return
        if self.phase == WAITING:
            now = time.perf_counter()
            if now - self._last_poll < self.poll_interval:
                return
            self._last_poll = now
            self.snapshot = client.status(self.job_id)
            self._report_snapshot()
            state = self.snapshot["state"]
            if state == DONE:
                if self.cancel_requested:
                    self._end(CANCELLED)
                else:
                    self.phase = FETCHING
            elif state == CANCELLED:
                self._end(CANCELLED)
            elif state == FAILED:
                self._fail(self.snapshot.get("error") or f"{self.label}: the job failed on the server")
            return
        if self.phase == FETCHING:
            if self.cancel_requested:  # cancelled while its results came: they are dropped, nothing is shown
                self._forget(client)
                self._end(CANCELLED)
                return
            files = self.snapshot.get("result", {}).get("files", {})
            for name in self.fetch_names:
                if name not in self.results:
                    if name not in files:
                        if name in self.optional_names:
                            continue
                        raise RaptorError(f"{self.label}: the server sent no {name}")
                    self._fetch_piece(client, name, files[name])
                    return
            self._forget(client)
            self._end(DONE)

    def _next_budget(self, spent: float) -> int:
        """Aim each step at ``step_seconds``: bigger pieces on a fast link, smaller on a slow one."""
        if spent <= 0:
            return self._budget
        return int(min(self.max_piece, max(self.min_piece, self._budget * self.step_seconds / spent)))

    def _fetch_piece(self, client, name: str, file_name: str) -> None:
        """One piece of a result file per step, sized like the upload's pieces, so no step waits for a whole file."""
        buffer = self._receiving.setdefault(name, bytearray())
        began = time.perf_counter()
        piece, total = client.fetch_piece(self.job_id, file_name, len(buffer), self._budget)
        self._budget = self._next_budget(time.perf_counter() - began)
        buffer += piece
        if len(buffer) >= total:
            self.results[name] = bytes(self._receiving.pop(name))
        elif not piece:
            raise RaptorError(f"{self.label}: the server's {name} ended after {len(buffer)} of {total} bytes")
        mb = 1 << 20
        self._report(JobProgress("receiving the result", len(buffer) // mb, max(1, total // mb), "MB",
                                 time.perf_counter() - self.started))

    def _upload_one(self, client) -> None:
        index = next((i for i, (_key, sender) in enumerate(self.uploads) if not sender.done), None)
        if index is None:
            self.phase = SUBMITTING
            return
        key, sender = self.uploads[index]
        began = time.perf_counter()
        if sender.step(client, self._budget):
            _set(self.request, key, {"upload": sender.upload_id})
        self._budget = self._next_budget(time.perf_counter() - began)
        total = sum(s.size for _k, s in self.uploads)
        sent = sum(s.sent for _k, s in self.uploads)
        mb = 1 << 20
        self._report(JobProgress("sending to the server", sent // mb, max(1, total // mb), "MB",
                                 time.perf_counter() - self.started))

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the server to stop at its next batch; whatever arrives afterwards is dropped."""
        if self.finished or self.cancel_requested:
            return
        self.cancel_reason = reason
        if self.job_id is not None and self._client is not None:
            try:
                self._client.cancel(self.job_id)
            except RaptorError:
                self._end(CANCELLED)
        else:
            self._end(CANCELLED)

    # ------------------------------------------------------------------
    def _report_snapshot(self) -> None:
        s = self.snapshot
        stage = s.get("stage") or s.get("state") or "queued"
        self._report(JobProgress(stage, int(s.get("done") or 0), int(s.get("total") or 0), s.get("unit") or "",
                                 time.perf_counter() - self.started, s.get("eta_seconds"), s.get("message") or ""))

    def _report(self, progress: JobProgress) -> None:
        self.progress = progress

    def _fail(self, message: str) -> None:
        self.error = message
        self._end(FAILED)

    def _end(self, state: str) -> None:
        self.state = state
        if state != DONE:
            self.results = {}
            if self._client is not None and self.job_id is not None:
                self._forget(self._client)
        for _key, sender in self.uploads:
            if sender.upload_id and self._client is not None:
                try:
                    self._client.request("DELETE", f"/uploads/{sender.upload_id}")
                except RaptorError:
                    pass

    def _forget(self, client) -> None:
        try:
            client.forget(self.job_id)
        except RaptorError:
            pass

    def wait(self, idle=None, timeout: float | None = None) -> "RemoteJob":
        """Step until finished (scripts and tests); ``idle()`` runs between steps (Slicer processes events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.step()
            if idle is not None:
                idle()
            time.sleep(0.005)
            if deadline is not None and time.monotonic() > deadline:
                raise RaptorError(f"{self.label}: no result within {timeout:.0f} s")
        return self


def _set(request: dict, key: str, value) -> None:
    """``"volume"`` or ``"embeddings.2"``: put an upload reference where the request names it."""
    parts = key.split(".")
    target = request
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


__all__ = ["RemoteJob", "JobProgress", "format_seconds"]
