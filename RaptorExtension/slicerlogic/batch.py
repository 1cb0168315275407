"""The Batch section of RaptorEmbed: a cohort from Slicer's DICOM database to one CSV, without freezing Slicer.

Qt-free, like :mod:`.mrml_embed`, so it is tested headless.  The split of work:

* **Main thread** (``start``): list the series.  Inside Slicer that walks
  ``slicer.dicomDatabase`` (a Qt object, main thread only) through
  :func:`.dicomdb.discover_slicer_database`; tests and scripts pass the series
  they found elsewhere (a ``ctkDICOM.sql`` file, a folder).
* **Worker thread**: :func:`.batch.run_batch` with the module's already loaded
  model, thread loaders (Slicer's Python cannot spawn loader processes
  safely), progress snapshots on a queue, and a cancel event checked before
  every encoder batch.  Every finished series is already a durable CSV row, so
  cancelling or closing Slicer loses at most the series in flight, and
  starting again resumes.
* **Main thread** (``poll``, from a ``qt.QTimer``): drain the queue and call
  the callbacks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, RaptorError

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"


@dataclass
class BatchRun:
    """One batch started from the module: its state as seen by the main thread."""

    csv: Path
    total_listed: int
    status: str = RUNNING
    progress: object = None  # the latest batch.BatchProgress
    summary: object = None  # batch.BatchSummary when finished
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)


class BatchLogic:
    """Runs one cohort batch at a time in a worker thread, reusing the embed logic's loaded model."""

    def __init__(self, embedLogic=None) -> None:
        from .embed import EmbedLogic

        self.embedLogic = embedLogic if embedLogic is not None else EmbedLogic()
        self._queue: queue.Queue = queue.Queue()
        self._run: BatchRun | None = None
        self._progressCallback: Callable | None = None
        self._completionCallback: Callable | None = None

    # ------------------------------------------------------------------
    @staticmethod
    def discoverSlicerDatabase(modalities: Sequence[str] = ("CT", "MR"), minSlices: int = 0,
                               description: str | None = None, database=None):
        """Series of Slicer's DICOM database that pass the filters (call on the main thread)."""
        from ..cohort.dicomdb import discover_slicer_database
        from ..cohort.sources import SeriesFilter

        found, _skipped = discover_slicer_database(
            SeriesFilter(modalities=tuple(modalities), min_slices=minSlices, description=description or None),
            database=database,
        )
        return found.items

    def isRunning(self) -> bool:
        return self._run is not None and self._run.status == RUNNING

    def start(
        self,
        items,
        csvPath: str | Path,
        settings,
        *,
        anonymizeSalt: str | None = None,
        progressCallback: Callable | None = None,
        completionCallback: Callable | None = None,
    ) -> BatchRun:
        """Start embedding ``items`` (series listed on the main thread) into ``csvPath``."""
        from ..cohort.anonymize import Anonymizer
        from ..cohort.job import BatchJob, BatchSources

        if self.isRunning():
            raise RaptorError("a batch is already running; cancel it or wait for it to finish")
        if self.embedLogic.isRunning():
            raise RaptorError("an embedding is running in this module; wait for it before starting a batch")
        items = list(items)
        if not items:
            raise RaptorError("no series to embed: the DICOM database has none that pass the filters")
        job = BatchJob(
            csv=csvPath,
            sources=BatchSources(items=items),
            settings=settings,
            readers=1,
            loader="threads",
            anonymizer=Anonymizer(anonymizeSalt) if anonymizeSalt else None,
        )
        run = BatchRun(csv=Path(csvPath), total_listed=len(items))
        self._run = run
        self._progressCallback = progressCallback
        self._completionCallback = completionCallback
        run.thread = threading.Thread(target=self._work, args=(run, job), name="raptor-batch", daemon=True)
        run.thread.start()
        return run

    def _work(self, run: BatchRun, job) -> None:
        """Worker thread: never touches MRML or Qt; reports through the queue."""
        from ..cohort.run import run_batch

        try:
            embedder = self.embedLogic.embedderFor(job.settings)
            summary = run_batch(job, progress=lambda p: self._queue.put(("progress", run, p)),
                                cancel=run.cancel_event, embedder=embedder)
            self._queue.put(("finished", run, summary))
        except Cancelled:
            self._queue.put(("cancelled", run, None))
        except RaptorError as exc:
            self._queue.put(("failed", run, str(exc)))
        except Exception as exc:  # keep Slicer alive and say what happened in one line
            self._queue.put(("failed", run, f"the batch stopped unexpectedly: {type(exc).__name__}: {exc}"))

    def cancel(self) -> None:
        """Stop after the current encoder batch; finished rows stay in the CSV (a rerun resumes)."""
        if self._run is not None:
            self._run.cancel_event.set()

    def poll(self) -> bool:
        """Main thread: deliver queued events to the callbacks; True while a batch is running."""
        while True:
            try:
                kind, run, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "progress":
                run.progress = payload
                if self._progressCallback:
                    self._progressCallback(payload)
                continue
            if kind == "finished":
                run.summary = payload
                run.status = CANCELLED if payload.cancelled else DONE
            elif kind == "cancelled":
                run.status = CANCELLED
            else:
                run.status, run.error = FAILED, payload
            if self._completionCallback:
                self._completionCallback(run)
        return self.isRunning()

    def wait(self, timeout: float | None = None) -> BatchRun | None:
        """Block until the batch ends (scripts and tests), delivering callbacks."""
        run = self._run
        if run is not None and run.thread is not None:
            run.thread.join(timeout)
        self.poll()
        return run
