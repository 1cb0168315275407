"""Jobs on the server: a queue per lane, one worker thread per lane, progress, cancel, result files.

A job's function runs in its lane's worker thread and reports through
:meth:`Job.progress` and :meth:`Job.stage`; it writes its result files into
``job.folder`` and describes them in ``job.result``.  The HTTP side only ever
reads :meth:`Job.snapshot` (under the job's lock), so a status request never
waits for the GPU.  Cancelling sets an event that the engine checks before
every batch of slices (and a fit between two candidate C values); a job
still in its queue is cancelled at once.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, RaptorError
from .protocol import CANCELLED, DONE, FAILED, FINISHED, LANES, QUEUED, RUNNING

log = logging.getLogger("raptor.server")

KEEP_FINISHED = 100
"""Finished jobs (and their result files) kept for clients to fetch; older ones are deleted."""


@dataclass
class Job:
    id: str
    kind: str
    folder: Path
    run: Callable[["Job"], None] = field(repr=False)
    state: str = QUEUED
    stage: str = "queued"
    done: int = 0
    total: int = 0
    unit: str = ""
    message: str = ""
    error: str | None = None
    result: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    on_finish: Callable[[], None] | None = field(default=None, repr=False)
    """Called once the job has ended, whatever the outcome (the server removes the uploads it consumed)."""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rate_start: tuple[float, int] | None = field(default=None, repr=False)
    _rate: float | None = field(default=None, repr=False)

    # -- reported by the running task (worker thread) ------------------------
    def set_stage(self, stage: str, message: str = "") -> None:
        with self.lock:
            self.stage, self.message = stage, message
            self.done, self.total, self.unit = 0, 0, ""
            self._rate_start, self._rate = None, None

    def progress(self, done: int, total: int, unit: str = "slices", **extra) -> None:
        """``done`` of ``total``; the rate counts from the first report, so start-up time is not in it."""
        now = time.perf_counter()
        with self.lock:
            if self._rate_start is None or unit != self.unit or done < self.done:
                self._rate_start, self._rate = (now, done), None
            else:
                t0, d0 = self._rate_start
                if now > t0 and done > d0:
                    self._rate = (done - d0) / (now - t0)
            self.done, self.total, self.unit = int(done), int(total), unit
            self.extra.update(extra)

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    # -- read by the HTTP side -------------------------------------------------
    def snapshot(self) -> dict:
        with self.lock:
            rate = self._rate
            eta = (self.total - self.done) / rate if rate and self.total >= self.done else None
            return {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "unit": self.unit,
                "rate": rate,
                "eta_seconds": eta,
                "message": self.message,
                "error": self.error,
                "result": dict(self.result),
                "extra": dict(self.extra),
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "cancel_requested": self.cancel_event.is_set(),
            }


class JobManager:
    """Runs submitted jobs, one at a time per lane (``interactive``: embed, explain, fit; ``batch``)."""

    def __init__(self, work_dir: Path, redact: Callable[[str], str] = lambda message: message) -> None:
        self.work_dir = Path(work_dir)
        (self.work_dir / "jobs").mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir / "jobs", 0o700)  # results of patients' scans: this server's user only
        self.redact = redact
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._closed = False
        for lane in sorted(set(LANES.values())):
            self._queues[lane] = queue.Queue()
            thread = threading.Thread(target=self._worker, args=(lane,), name=f"raptor-{lane}", daemon=True)
            self._threads[lane] = thread
            thread.start()

    def submit(self, kind: str, run: Callable[[Job], None], *, start: bool = True,
               on_finish: Callable[[], None] | None = None) -> Job:
        """Register a job (queued); ``start=False`` leaves it out of its lane until :meth:`start`."""
        if self._closed:
            raise RaptorError("the server is shutting down")
        job_id = uuid.uuid4().hex
        folder = self.work_dir / "jobs" / job_id
        folder.mkdir(parents=True)
        job = Job(id=job_id, kind=kind, folder=folder, run=run, on_finish=on_finish)
        with self._lock:
            self.jobs[job_id] = job
        if start:
            self.start(job)
        self._forget_old()
        return job

    def start(self, job: Job) -> None:
        """Put a submitted job in its lane's queue (a job cancelled meanwhile is skipped there)."""
        self._queues[LANES[job.kind]].put(job)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        job.cancel_event.set()
        with job.lock:
            if job.state == QUEUED:
                job.state, job.stage, job.finished = CANCELLED, CANCELLED, time.time()
        return job

    def delete(self, job_id: str) -> bool:
        job = self.cancel(job_id)
        if job is None:
            return False
        with self._lock:
            self.jobs.pop(job_id, None)
        if job.state in FINISHED:
            shutil.rmtree(job.folder, ignore_errors=True)
        return True

    def queue_lengths(self) -> dict[str, int]:
        counts = {lane: 0 for lane in self._queues}
        with self._lock:
            for job in self.jobs.values():
                if job.state == QUEUED:
                    counts[LANES[job.kind]] += 1
        return counts

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self.jobs.values() if j.state == RUNNING]

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and give running jobs ``timeout`` seconds to stop at their next batch."""
        self._closed = True
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.cancel(job.id)
        for q in self._queues.values():
            q.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------
    def _worker(self, lane: str) -> None:
        q = self._queues[lane]
        while True:
            job = q.get()
            if job is None:
                return
            with job.lock:
                skipped = job.state != QUEUED  # cancelled while it waited
                if not skipped:
                    job.state, job.started = RUNNING, time.time()
            if skipped:
                self._call_on_finish(job)
                continue
            self._execute(job)

    def _execute(self, job: Job) -> None:
        state, error = DONE, None
        try:
            job.check_cancel()
            job.run(job)
            if job.cancel_event.is_set():
                state = CANCELLED
        except Cancelled:
            state = CANCELLED
        except RaptorError as exc:
            state, error = FAILED, str(exc)
        except MemoryError:
            state, error = FAILED, "the server ran out of memory; use a smaller grid or fewer readers"
        except Exception as exc:  # one line for the client; the traceback stays in the server's log
            log.exception("job %s (%s) failed", job.id, job.kind)
            if type(exc).__name__ == "OutOfMemoryError":
                state, error = FAILED, "the GPU ran out of memory; use a smaller grid or the CPU"
            else:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                state, error = FAILED, f"{job.kind} failed unexpectedly ({type(exc).__name__}: {first})"
        if error is not None:
            error = self.redact(error).replace(str(job.folder), "the job's folder")
        with job.lock:
            job.state, job.error, job.finished = state, error, time.time()
            job.stage = state
            if state != DONE:
                job.result = {}
        self._call_on_finish(job)
        with self._lock:
            forgotten = job.id not in self.jobs  # deleted while it ran: nobody will fetch its files
        if state != DONE or forgotten:
            shutil.rmtree(job.folder, ignore_errors=True)

    @staticmethod
    def _call_on_finish(job: Job) -> None:
        if job.on_finish is not None:
            try:
                job.on_finish()
            except Exception:  # cleaning up must never turn a result into a failure
                log.exception("job %s: cleaning up failed", job.id)

    def _forget_old(self) -> None:
        with self._lock:
            finished = sorted((j for j in self.jobs.values() if j.state in FINISHED), key=lambda j: j.finished or 0)
            stale = finished[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []
            for job in stale:
                self.jobs.pop(job.id, None)
        for job in stale:
            shutil.rmtree(job.folder, ignore_errors=True)


__all__ = ["Job", "JobManager"]
