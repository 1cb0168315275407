"""The RaptorEmbed module's logic, without Qt: embed a volume node in a worker thread.

Decision: the logic lives in the engine package.  ``RaptorEmbed.py`` (which
imports qt, ctk and ScriptedLoadableModule, so it only loads inside Slicer)
subclasses :class:`EmbedLogic` and adds nothing testable; this module runs
headless with ``slicer-core`` and is tested against a real ``vtkMRMLScene``.

Threading, the one rule: **only the main thread touches MRML**.

1. :meth:`EmbedLogic.embed` (main thread) copies the voxels and the
   IJK-to-RAS matrix into a :class:`~RaptorExtension.volumes.volume.Volume`
   (``volumes.slicer_io.volume_from_node``) and starts a worker thread with it
   (:mod:`.embed_job`).
2. The worker loads (or reuses) the model, embeds the copy and puts
   progress, result and error events on a :class:`queue.Queue`.  It never
   sees a node.
3. The main thread calls :meth:`EmbedLogic.poll` (from a ``qt.QTimer`` in
   Slicer, in a loop in scripts and tests), which drains the queue, calls the
   callbacks and, on success, writes the attributes on the node.

Cancelling sets a :class:`threading.Event` that the engine checks before every
batch of slices.  Closing the scene or deleting the node cancels the job (a
scene observer); a result that arrives for a cancelled job is dropped, so a
node gets a complete embedding or none, never part of one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..embeddings.embedding import Embedding
from ..errors import Cancelled, InputError, RaptorError
from .embed_job import (
    CANCELLED,
    DONE,
    FAILED,
    CompletionCallback,
    EitherToken,
    EmbedJob,
    EmbedProgress,
    ProgressCallback,
    run_worker,
)
from .node_attributes import node_label, write_embedding
from .provenance import node_provenance
from .scene_embeddings import SceneEmbeddings

if TYPE_CHECKING:  # torch is imported only when a job runs (it is installed at first use)
    from ..encoding.model import Encoder
    from ..encoding.pipeline import Embedder, EmbedSettings

log = logging.getLogger(__name__)


class EmbedLogic(SceneEmbeddings):
    """Embed volume nodes in a background thread and keep the results on the nodes.

    ``scene`` defaults to ``slicer.mrmlScene``.  One job runs at a time; the
    loaded model is kept between runs (see :meth:`embedderFor`).
    """

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self.job: EmbedJob | None = None
        self._embedder: "Embedder | None" = None
        self._encoders: dict[str, "Encoder"] = {}
        self._embedder_lock = threading.Lock()
        self._observed_scene = None
        self._observer_tags: list[int] = []

    # -- scene -----------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # -- model -----------------------------------------------------------
    def useEncoder(self, encoder: "Encoder") -> None:
        """Serve ``settings.model == encoder.name`` from this already-built encoder.

        For a model made in memory (a random-init test model, a fine-tuned
        backbone): it is used as is, whatever the device and image size asked.
        """
        with self._embedder_lock:
            self._encoders[encoder.name] = encoder
            if self._embedder is not None and self._embedder.settings.model == encoder.name:
                self._embedder = None

    @staticmethod
    def _reload_key(settings: "EmbedSettings") -> tuple:
        """Settings that need the model loaded again; the others only rebuild the projection."""
        return (settings.model, settings.device, settings.image_size, settings.cache_dir)

    def embedderFor(self, settings: "EmbedSettings") -> "Embedder":
        """The :class:`Embedder` for these settings, reusing the loaded model when possible.

        Same model, device, image size and cache: the encoder is shared and
        only the projection (K, seed) and the slicing options are rebuilt,
        which takes milliseconds instead of reloading gigabytes of weights.
        Runs in the worker thread (loading may download); guarded by a lock.
        """
        from ..encoding.pipeline import Embedder

        with self._embedder_lock:
            cached = self._embedder
            if cached is not None and cached.settings == settings:
                return cached
            if settings.model in self._encoders:
                embedder = Embedder(settings, encoder=self._encoders[settings.model])
            elif cached is not None and self._reload_key(cached.settings) == self._reload_key(settings):
                embedder = Embedder(settings, encoder=cached.encoder)
            else:
                self._embedder = None
                cached = None
                _release_gpu_memory()
                embedder = Embedder(settings)
            self._embedder = embedder
            return embedder

    def needsDownload(self, settings: "EmbedSettings") -> bool:
        """True when the model is a hub id that is not cached yet (and the hub may be used)."""
        from ..encoding.model_cache import hub_offline, is_cached

        if settings.model in self._encoders or hub_offline():
            return False
        return not is_cached(settings.model, settings.cache_dir)

    @property
    def embedder(self) -> "Embedder | None":
        """The model loaded by the last run (None before the first)."""
        return self._embedder

    def unloadModel(self) -> None:
        """Free the loaded model (GPU memory) until the next run needs it."""
        if self.isRunning():
            raise RaptorError("cannot unload the model while an embedding is running")
        with self._embedder_lock:
            self._embedder = None
        _release_gpu_memory()

    # -- running -----------------------------------------------------------
    def isRunning(self) -> bool:
        return self.job is not None and not self.job.finished

    def embed(
        self,
        volumeNode,
        settings: "EmbedSettings | None" = None,
        *,
        waitForCompletion: bool = False,
        progressCallback: ProgressCallback | None = None,
        completionCallback: CompletionCallback | None = None,
        cancel: Any | None = None,
        **overrides,
    ):
        """Embed a scalar volume node; the result is stored on the node's attributes.

        ``settings`` default to :class:`EmbedSettings` (DINOv2-L, K=100, grid
        256); keyword ``overrides`` change single fields (``k=10, grid=128``).
        ``cancel`` is an optional extra token (anything with ``is_set()``)
        checked with the job's own one.

        With ``waitForCompletion=True`` this returns the :class:`Embedding`
        (raising :class:`RaptorError` on failure, :class:`Cancelled` when
        cancelled).  Otherwise it returns the running :class:`EmbedJob` at
        once; call :meth:`poll` regularly on the main thread to receive
        ``progressCallback(EmbedProgress)`` and ``completionCallback(job)``.
        """
        from ..encoding.pipeline import EmbedSettings
        from ..volumes.slicer_io import volume_from_node

        if self.isRunning():
            raise RaptorError(f"an embedding of {self.job.node_name} is already running; cancel it or wait for it")
        node = self._check_node(volumeNode)
        settings = dataclasses.replace(settings or EmbedSettings(), **overrides) if overrides else (settings or EmbedSettings())
        if settings.cache_dir is None:
            from ..encoding.model_cache import model_cache_dir

            settings = dataclasses.replace(settings, cache_dir=str(model_cache_dir()))
        provenance = node_provenance(node)
        volume = volume_from_node(
            node, id=node_label(node), source=provenance["source"], modality=provenance["modality"], info=provenance["info"]
        )
        job = EmbedJob(
            node=node, node_id=node.GetID(), node_name=node_label(node), settings=settings,
            progress_callback=progressCallback, completion_callback=completionCallback,
        )
        token = EitherToken(job.cancel_event, cancel)
        self._observe(node.GetScene())
        job.thread = threading.Thread(
            target=run_worker, args=(job, volume, self, token), name="raptor-embed", daemon=True
        )
        self.job = job
        job.thread.start()
        if not waitForCompletion:
            return job
        return self.wait(job)

    def wait(self, job: EmbedJob | None = None) -> Embedding:
        """Block until the job ends, polling meanwhile; return its embedding or raise why it has none."""
        job = job or self.job
        if job is None:
            raise RaptorError("no embedding is running")
        while True:
            self.poll()
            if job.finished:
                break
            if job.thread is not None:
                job.thread.join(0.05)
            self._idle()
        if job.status == DONE:
            return job.embedding
        if job.status == CANCELLED:
            raise Cancelled(f"{job.node_name}: {job.cancel_reason or 'cancelled'}; nothing was written")
        if job.exception is not None:  # the engine's own error class (InputError, ModelError, ...)
            raise job.exception.with_traceback(None) from None
        raise RaptorError(job.error or f"{job.node_name}: embedding failed")

    def _idle(self) -> None:
        """Called while :meth:`wait` blocks; Slicer's logic processes Qt events here."""

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Cancel the running job (takes effect before the next batch of slices)."""
        if self.job is not None:
            self.job.cancel(reason)

    def poll(self) -> bool:
        """Handle what the worker reported; returns True while a job is still running.

        Main thread only: this is where callbacks run and attributes are written.
        """
        job = self.job
        if job is None:
            return False
        while not job.finished:
            try:
                event = job.events.get_nowait()
            except queue.Empty:
                break
            self._handle(job, event)
        return not job.finished

    def _handle(self, job: EmbedJob, event: tuple) -> None:
        kind = event[0]
        now = time.perf_counter()
        if kind == "stage":
            job.progress = EmbedProgress(event[1], detail=event[2], seconds_elapsed=now - job.started)
            self._report(job)
        elif kind in ("progress", "download"):
            done, total = int(event[1]), int(event[2])
            if job._rate_started is None or job._rate_kind != kind:
                job._rate_started, job._rate_kind, job._rate_done = now, kind, done
            elapsed = now - job._rate_started
            progressed = done - job._rate_done
            eta = elapsed / progressed * (total - done) if progressed > 0 and elapsed > 0 else None
            if kind == "progress":
                job.progress = EmbedProgress("encoding", done, total, "slices", now - job.started, eta)
            else:
                mb = 1024 * 1024
                job.progress = EmbedProgress("downloading model", done // mb, max(1, total // mb), "MB", now - job.started, eta)
            self._report(job)
        elif kind == "done":
            embedding = event[1]
            if job.cancel_event.is_set():
                self._finish(job, CANCELLED)
                return
            node = self._live_node(job)
            if node is None:
                job.cancel_reason = job.cancel_reason or "the volume was removed from the scene"
                self._finish(job, CANCELLED)
                return
            try:
                write_embedding(node, embedding)
            except RaptorError as exc:
                job.error = str(exc)
                self._finish(job, FAILED)
                return
            job.embedding = embedding
            self._finish(job, DONE)
        elif kind == "cancelled":
            self._finish(job, CANCELLED)
        elif kind == "failed":
            job.error = event[1]
            job.exception = event[2] if len(event) > 2 else None
            self._finish(job, FAILED)

    def _report(self, job: EmbedJob) -> None:
        if job.progress_callback is not None:
            job.progress_callback(job.progress)

    def _finish(self, job: EmbedJob, status: str) -> None:
        job.status = status
        job.seconds = time.perf_counter() - job.started
        if status == CANCELLED and not job.cancel_reason:
            job.cancel_reason = "cancelled"
        job.node = None  # do not keep a removed node alive
        self._unobserve()
        if status == FAILED:
            log.warning("Raptor: %s", job.error)
        if job.completion_callback is not None:
            job.completion_callback(job)

    def _live_node(self, job: EmbedJob):
        """The job's node if it is still in the scene it was in (not deleted, scene not closed)."""
        node = job.node
        scene = node.GetScene() if node is not None else None
        if scene is None or scene.GetNodeByID(job.node_id) is not node:
            return None
        return node

    @staticmethod
    def _check_node(node):
        if node is None:
            raise InputError("choose a volume to embed")
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"{node_label(node)}: is a {node.GetClassName()}, not a scalar volume")
        if node.GetScene() is None:
            raise InputError(f"{node_label(node)}: is not in a scene")
        if node.GetImageData() is None:
            raise InputError(f"{node_label(node)}: holds no image data")
        return node

    # -- scene observation ---------------------------------------------------
    def _observe(self, scene) -> None:
        import vtk

        self._unobserve()

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_removed(_caller, _event, node) -> None:
            job = self.job
            if job is not None and not job.finished and node is not None and node.GetID() == job.node_id:
                job.cancel("the volume was removed from the scene")

        def on_close(_caller, _event) -> None:
            if self.job is not None:
                self.job.cancel("the scene was closed")

        self._observed_scene = scene
        self._observer_tags = [
            scene.AddObserver(scene.NodeAboutToBeRemovedEvent, on_node_removed),
            scene.AddObserver(scene.StartCloseEvent, on_close),
        ]

    def _unobserve(self) -> None:
        if self._observed_scene is not None:
            for tag in self._observer_tags:
                self._observed_scene.RemoveObserver(tag)
        self._observed_scene, self._observer_tags = None, []

    # -- model cache -------------------------------------------------------
    @staticmethod
    def modelCacheFolder() -> Path:
        from ..encoding.model_cache import model_cache_dir

        return model_cache_dir()

    @staticmethod
    def setModelCacheFolder(folder) -> Path:
        from ..encoding.model_cache import set_model_cache_dir

        return set_model_cache_dir(folder)

    @staticmethod
    def cachedModels():
        from ..encoding.model_cache import cached_models

        return cached_models()

    def clearModelCache(self, repoIds: list[str] | None = None) -> list[str]:
        """Delete cached models Raptor can use (never other models in a shared cache)."""
        from ..encoding.model_cache import clear_model_cache

        if self.isRunning():
            raise RaptorError("cannot clear the model cache while an embedding is running")
        self.unloadModel()
        return clear_model_cache(repo_ids=repoIds)

    def importModelFolder(self, folder, repoId: str | None = None) -> str:
        """Copy a local model folder into the cache (validated) and return the model id to use."""
        from ..encoding.model_cache import import_model_folder

        if self.isRunning():
            raise RaptorError("cannot import a model while an embedding is running")
        return import_model_folder(folder, repoId)




def _release_gpu_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["EmbedLogic"]
