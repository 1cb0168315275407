"""Finished series to table rows: the settings a table expects, the background row writer, the run's state.

Shared by the in-process runner (:mod:`.run`) and the per-device worker
processes (:mod:`.workers`).
"""

from __future__ import annotations

import queue as queue_module
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from ..embeddings.embedding import Embedding
from ..embeddings.settings import settings_of
from ..embeddings.stream import StreamingAppender
from ..errors import MetadataMismatch, RaptorError
from .anonymize import Anonymizer
from .errorlog import ErrorLog
from .job import BatchJob, BatchProgress, ProgressCallback
from .plan import PlannedSeries, redaction_map, row_fields


def with_device(settings, device: str):
    return replace(settings, device=device)


def expected_settings(embedder, preset: str) -> tuple[dict, int]:
    meta = embedder.settings_metadata(preset)
    return settings_of(meta) | {"encoder": meta.get("encoder")}, embedder.n_features


def _append(table: StreamingAppender, planned: PlannedSeries, embedding: Embedding, job: BatchJob) -> None:
    fields, source = row_fields(planned, embedding, job)
    embedding.metadata["id"] = planned.id
    embedding.metadata["source"] = source
    table.append(embedding, fields)


class RowWriter:
    """Formats and appends finished rows in a background thread.

    A default Raptor row is 76,800 numbers (about 1 MB of text) followed by
    an fsync; doing that on the thread that feeds the GPU would leave the GPU
    idle for tens of milliseconds per series.  The queue is short, so a slow
    disk slows the job down instead of piling rows up in memory; ``close``
    writes whatever is queued (also after a cancel) and re-raises a write
    error.
    """

    def __init__(self, table: StreamingAppender, job: BatchJob, *, done: Callable[[PlannedSeries], None],
                 failed: Callable[[PlannedSeries, str], None], depth: int = 4) -> None:
        self.table, self.job = table, job
        self.on_done, self.on_failed = done, failed
        self.queue: queue_module.Queue = queue_module.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="raptor-rows", daemon=True)
        self.thread.start()

    def put(self, planned: PlannedSeries, embedding: Embedding) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((planned, embedding))

    def _run(self) -> None:
        while True:
            entry = self.queue.get()
            if entry is None:
                return
            if self.error is not None:
                continue
            planned, embedding = entry
            try:
                _append(self.table, planned, embedding, self.job)
            except MetadataMismatch as exc:
                self.on_failed(planned, str(exc))
            except BaseException as exc:  # a full disk: stop the job, keep what is written
                self.error = exc
            else:
                self.on_done(planned)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, OSError):
                raise RaptorError(f"{self.table.path}: could not append a row ({error.strerror or error})") from None
            raise error


class RunState:
    """The state of one :func:`.run.run_batch` call: progress, errors, the cancel token (shared with the workers)."""

    def __init__(self, job: BatchJob, progress: ProgressCallback | None, cancel) -> None:
        self.job = job
        self.progress_cb = progress
        self.cancel = cancel
        self.start = time.perf_counter()
        self.embed_start: float | None = None
        self.state = BatchProgress("discovering")
        self.errors = ErrorLog(job.errors_path)
        self.lock = threading.RLock()  # the row writer thread reports too

    def report(self, **changes) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(self.state, k, v)
            self.state.elapsed = time.perf_counter() - (self.embed_start or self.start)
            if self.progress_cb is not None:
                self.progress_cb(replace(self.state))  # a snapshot: a GUI may queue it and read it later
            self.state.message = None

    def done(self, planned: PlannedSeries) -> None:
        with self.lock:
            self.report(done=self.state.done + 1, current=planned.id)

    def failed(self, planned: PlannedSeries, reason: str) -> None:
        secrets = redaction_map(planned, self.job)
        reason = Anonymizer.redact(reason, secrets) if secrets else reason
        source = "" if self.job.anonymizer else planned.item.source
        with self.lock:
            self.errors.add(planned.id, source, reason)
            self.report(failed=self.state.failed + 1, message=f"failed: {reason}")
