"""One embedding run of the Raptor Embed module, as the main thread sees it: node, settings, state, result.

The work itself is a :class:`~.remote_job.RemoteJob` on the Raptor server;
this record ties it to the node that gets the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..embeddings.embedding import Embedding
from .remote_job import JobProgress, RemoteJob

if TYPE_CHECKING:
    from ..encoding.settings import EmbedSettings

EmbedProgress = JobProgress
"""What the panel's progress bar shows (kept under this name for scripts)."""

ProgressCallback = Callable[[JobProgress], None]
CompletionCallback = Callable[["EmbedJob"], None]

RUNNING = "running"
DONE = "done"
CANCELLED = "cancelled"
FAILED = "failed"


@dataclass
class EmbedJob:
    """One embedding run: its inputs, its state as the main thread last saw it, and its result."""

    node: Any
    node_id: str
    node_name: str
    settings: "EmbedSettings"
    remote: RemoteJob
    progress_callback: ProgressCallback | None = None
    completion_callback: CompletionCallback | None = None
    cancel_token: Any | None = None
    status: str = RUNNING
    embedding: Embedding | None = None
    error: str | None = None
    cancel_reason: str | None = None
    progress: JobProgress = field(default_factory=lambda: JobProgress("starting", unit=""))
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the server to stop at its next batch; the node will not get a partial result."""
        if not self.finished and self.cancel_reason is None:
            self.cancel_reason = reason
            self.remote.cancel(reason)


__all__ = ["EmbedJob", "EmbedProgress", "JobProgress", "ProgressCallback", "CompletionCallback",
           "RUNNING", "DONE", "CANCELLED", "FAILED"]
