"""One embedding run of the Raptor Embed module: its state, its progress, and what its worker thread runs.

The worker never sees a node or Qt: it gets a copy of the voxels and reports
through a queue that the main thread drains (see :mod:`.embed`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..embeddings.embedding import Embedding
from ..errors import Cancelled, RaptorError
from .choices import format_seconds

if TYPE_CHECKING:
    from ..encoding.pipeline import EmbedSettings
    from ..volumes.volume import Volume
    from .embed import EmbedLogic

log = logging.getLogger(__name__)


@dataclass
class EmbedProgress:
    """What the progress bar shows: the stage, how much of it is done, and the time left."""

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


ProgressCallback = Callable[["EmbedProgress"], None]


CompletionCallback = Callable[["EmbedJob"], None]


RUNNING = "running"


DONE = "done"


CANCELLED = "cancelled"


FAILED = "failed"


class EitherToken:
    """Set when the job's own event or the caller's token is set (what the engine checks per batch)."""

    def __init__(self, own: threading.Event, extra: Any | None) -> None:
        self.own, self.extra = own, extra

    def is_set(self) -> bool:
        return self.own.is_set() or bool(self.extra is not None and self.extra.is_set())


@dataclass
class EmbedJob:
    """One embedding run: its inputs, its state as the main thread last saw it, and its result."""

    node: Any
    node_id: str
    node_name: str
    settings: "EmbedSettings"
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress_callback: ProgressCallback | None = None
    completion_callback: CompletionCallback | None = None
    status: str = RUNNING
    embedding: Embedding | None = None
    error: str | None = None
    exception: RaptorError | None = None
    cancel_reason: str | None = None
    progress: EmbedProgress = field(default_factory=lambda: EmbedProgress("starting"))
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None
    thread: threading.Thread | None = None
    _rate_started: float | None = None
    _rate_kind: str | None = None
    _rate_done: int = 0

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the worker to stop at its next batch; the node will not get a partial result."""
        if not self.finished and not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()


def run_worker(job: EmbedJob, volume: "Volume", logic: "EmbedLogic", cancel) -> None:
    put = job.events.put
    try:
        if logic.needsDownload(job.settings):
            put(("stage", "downloading model", job.settings.model))
            _download(job, cancel)
        put(("stage", "loading model", job.settings.model))
        embedder = logic.embedderFor(job.settings)
        if cancel.is_set():
            raise Cancelled()
        put(("stage", "preparing", f"resampling to {job.settings.grid}^3 on {embedder.encoder.device}"))

        def progress(_volume_id, done: int, total: int) -> None:
            put(("progress", done, total))

        embedding = embedder.embed_volume(volume, progress=progress, cancel=cancel)
        put(("done", embedding))
    except Cancelled:
        put(("cancelled",))
    except RaptorError as exc:
        put(("failed", str(exc), exc))
    except MemoryError:
        put(("failed", f"{job.node_name}: out of memory; use a smaller grid"))
    except Exception as exc:  # a bug or an unexpected library error: report it, never kill Slicer
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError outside the batch loop
            put(("failed", f"{job.node_name}: the GPU ran out of memory while preparing the volume; use a smaller grid or the CPU"))
        else:
            log.exception("Raptor: embedding %s failed", job.node_name)
            put(("failed", f"{job.node_name}: embedding failed unexpectedly ({type(exc).__name__}: {exc})"))


def _download(job: EmbedJob, cancel) -> None:
    """Fetch the model into the cache with byte progress; a failure is left for the loader to explain."""
    from ..encoding.model_cache import download_model

    def report(done: int, total: int) -> None:
        if cancel.is_set():
            raise Cancelled()
        job.events.put(("download", done, total))

    try:
        download_model(job.settings.model, job.settings.cache_dir, report)
    except Cancelled:
        raise
    except Exception as exc:  # no network, gated model...: load_encoder gives the user-facing sentence
        log.info("Raptor: download of %s failed (%s: %s)", job.settings.model, type(exc).__name__, exc)
