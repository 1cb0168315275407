"""The Batch section of RaptorEmbed: a cohort from Slicer's DICOM database to one CSV, on the Raptor server.

Qt-free, like :mod:`.embed`, so it is tested headless.  The split of work:

* **The Raptor server** (``startDatabase``, what the panel uses): the path of
  Slicer's database file (``ctkDICOM.sql``), the filters and the CSV path go
  to the server as a batch job; the server lists the series itself (read-only,
  the same walk as :func:`..cohort.dicomdb.discover_slicer_database`) and runs
  :func:`..cohort.run.run_batch` with its loaded model and loader processes.
  So the main thread never walks a large database, and the request stays a
  few hundred bytes whatever the cohort's size.  ``start`` sends series the
  caller listed instead (``discoverSlicerDatabase`` walks
  ``slicer.dicomDatabase`` on the main thread; tests and scripts pass series
  found elsewhere), one entry per series with its files, for a selection that
  no filter expresses.  The files must be readable by the server:
  always true for the local server; for a remote one, the database must sit
  on storage the server sees at the same path.  Every finished series is a
  durable CSV row, so cancelling or closing Slicer loses at most the series
  in flight, and starting again resumes.
* **Main thread** (``poll``, from a ``qt.QTimer``): one short step of the job
  (a status request at most every 0.2 s) and the callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..cohort.job import BatchProgress
from ..encoding.settings import EmbedSettings
from ..errors import RaptorError
from ..server.protocol import FINISHED
from ..server.remote import server_settings
from .compute import Compute, shared_compute
from .remote_job import RemoteJob

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"


@dataclass
class BatchRun:
    """One batch started from the module: its state as seen by the main thread."""

    csv: Path
    remote: RemoteJob | None = field(default=None, repr=False)
    status: str = RUNNING
    progress: BatchProgress | None = None
    summary: object = None  # an object with line(), done, failed, skipped, errors_csv... when finished
    error: str | None = None
    started: float = field(default_factory=time.monotonic)


class BatchLogic:
    """Runs one cohort batch at a time on the Raptor server that the embed logic uses."""

    def __init__(self, embedLogic=None, compute: Compute | None = None) -> None:
        self.embedLogic = embedLogic
        self._compute = compute
        self._run: BatchRun | None = None
        self._progressCallback: Callable | None = None
        self._completionCallback: Callable | None = None

    @property
    def compute(self) -> Compute:
        if self._compute is not None:
            return self._compute
        if self.embedLogic is not None:
            return self.embedLogic.compute
        return shared_compute()

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
        settings: EmbedSettings,
        *,
        anonymizeSalt: str | None = None,
        progressCallback: Callable | None = None,
        completionCallback: Callable | None = None,
    ) -> BatchRun:
        """Start embedding ``items`` (series listed by the caller) into ``csvPath`` on the server."""
        items = list(items)
        self._refuseStart(anonymizeSalt)
        if not items:
            raise RaptorError("no series to embed: the DICOM database has none that pass the filters")
        return self._submit({"items": [_item_json(item) for item in items]}, {}, csvPath, settings, anonymizeSalt,
                            progressCallback, completionCallback)

    def startDatabase(
        self,
        database: str | Path,
        csvPath: str | Path,
        settings: EmbedSettings,
        *,
        modalities: Sequence[str] = ("CT", "MR"),
        minSlices: int = 0,
        description: str | None = None,
        anonymizeSalt: str | None = None,
        progressCallback: Callable | None = None,
        completionCallback: Callable | None = None,
    ) -> BatchRun:
        """Start embedding the series of a DICOM database (``ctkDICOM.sql`` or its folder) that pass the filters.

        The server lists the series (Slicer's own ``slicer.dicomDatabase.databaseFilename``
        is the usual ``database``); when no series passes the filters the job
        ends with nothing embedded and its summary says how many were left out.
        """
        self._refuseStart(anonymizeSalt)
        filters = {"modalities": [str(m) for m in modalities if str(m).strip()], "min_slices": int(minSlices),
                   "description": description or None}
        path = Path(database).expanduser().resolve()
        return self._submit({"dicom_databases": [str(path)]}, filters, csvPath, settings, anonymizeSalt,
                            progressCallback, completionCallback)

    def _refuseStart(self, anonymizeSalt: str | None) -> None:
        if self.isRunning():
            raise RaptorError("a batch is already running; cancel it or wait for it to finish")
        if self.embedLogic is not None and self.embedLogic.isRunning():
            raise RaptorError("an embedding is running in this module; wait for it before starting a batch")
        if anonymizeSalt:
            from ..cohort.anonymize import Anonymizer

            Anonymizer(anonymizeSalt)  # refuse a short salt here, before anything is sent

    def _submit(self, sources: dict, filters: dict, csvPath, settings, anonymizeSalt, progressCallback,
                completionCallback) -> BatchRun:
        csv = Path(csvPath).expanduser().resolve()
        request = {
            "kind": "batch",
            "settings": server_settings(settings),
            "sources": sources,
            "csv": str(csv),
            "anonymize_salt": anonymizeSalt or None,
            "readers": 2,
        }
        if filters:
            request["filters"] = filters
        run = BatchRun(csv=csv, remote=RemoteJob(self.compute, request, label=f"batch into {csv.name}"))
        self._run = run
        self._progressCallback = progressCallback
        self._completionCallback = completionCallback
        return run

    def cancel(self) -> None:
        """Stop after the current encoder batch; finished rows stay in the CSV (a rerun resumes)."""
        if self._run is not None and self._run.remote is not None:
            self._run.remote.cancel()

    def poll(self) -> bool:
        """Main thread: one step of the job, then the callbacks; True while a batch is running."""
        run = self._run
        if run is None or run.status != RUNNING:
            return False
        remote = run.remote
        before = remote.snapshot
        remote.step()
        if remote.snapshot is not before and remote.snapshot:
            run.progress = _progress_of(remote.snapshot, run.started)
            if self._progressCallback:
                self._progressCallback(run.progress)
        if remote.finished:
            result = (remote.snapshot or {}).get("result") or {}
            if remote.state == DONE:
                run.summary = _summary_of(result)
                run.status = CANCELLED if result.get("cancelled") else DONE
            elif remote.state == CANCELLED:
                run.status = CANCELLED
            else:
                run.status, run.error = FAILED, remote.error
            if self._completionCallback:
                self._completionCallback(run)
        return self.isRunning()

    def wait(self, timeout: float | None = None) -> BatchRun | None:
        """Block until the batch ends (scripts and tests), delivering callbacks."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            time.sleep(0.01)
            if deadline is not None and time.monotonic() > deadline:
                break
        return self._run


def _item_json(item) -> dict:
    return {"paths": list(item.paths), "kind": item.kind, "series_uid": item.series_uid, "study_uid": item.study_uid,
            "patient_id": item.patient_id, "modality": item.modality, "description": item.description,
            "user_id": item.user_id, "key": item.key, "sorted_files": bool(item.sorted_files),
            "n_slices": item.n_slices}


def _progress_of(snapshot: dict, started: float) -> BatchProgress:
    extra = snapshot.get("extra") or {}
    failed = int(extra.get("failed", 0))
    return BatchProgress(
        phase="finished" if snapshot.get("state") in FINISHED else (snapshot.get("stage") or "queued"),
        total=int(snapshot.get("total") or 0),
        done=max(0, int(snapshot.get("done") or 0) - failed), failed=failed, skipped=int(extra.get("skipped", 0)),
        current=str(extra.get("current", "")), slices_done=int(extra.get("slices_done", 0)),
        slices_total=int(extra.get("slices_total", 0)), elapsed=time.monotonic() - started,
        message=snapshot.get("message") or None,
    )


def _summary_of(result: dict):
    line = str(result.get("summary", ""))
    return SimpleNamespace(
        line=lambda: line, done=int(result.get("done", 0)), skipped=int(result.get("skipped", 0)),
        failed=int(result.get("failed", 0)), total=int(result.get("total", 0)),
        cancelled=bool(result.get("cancelled")), csv=Path(result.get("csv", "")),
        errors_csv=Path(result.get("errors_csv", "")),
    )


__all__ = ["BatchLogic", "BatchRun", "RUNNING", "DONE", "CANCELLED", "FAILED"]
