"""The RaptorEmbed module's logic, without Qt: embed a volume node on the Raptor server.

Decision: the logic lives in the engine package.  ``RaptorEmbed.py`` (which
imports qt, ctk and ScriptedLoadableModule, so it only loads inside Slicer)
subclasses :class:`EmbedLogic` and adds nothing testable; this module runs
headless with ``slicer-core`` and is tested against a real ``vtkMRMLScene``
and a real server.

Where the work runs: never in Slicer's process.  Slicer's main thread keeps
Python's GIL while Qt idles, so a worker thread there crawls (33 times slower
in a measured imitation); the model runs in a Raptor server instead, local
(started on first use) or remote (:mod:`.compute`).

The one rule that stays: **only the main thread touches MRML**.

1. :meth:`EmbedLogic.embed` (main thread) copies the voxels and the
   IJK-to-RAS matrix into a :class:`~RaptorExtension.volumes.volume.Volume`
   (``volumes.slicer_io.volume_from_node``) and creates a
   :class:`~.remote_job.RemoteJob` that will send them as NRRD pieces.
2. :meth:`EmbedLogic.poll` (from a ``qt.QTimer`` in Slicer, in a loop in
   scripts and tests) advances the job by one short step, calls the progress
   callback, and on success writes the attributes on the node.

Cancelling asks the server to stop at its next batch of slices.  Closing the
scene or deleting the node cancels the job (a scene observer); a result that
arrives for a cancelled job is dropped, so a node gets a complete embedding or
none, never part of one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ..embeddings.embedding import Embedding
from ..encoding.settings import EmbedSettings
from ..errors import Cancelled, InputError, RaptorError
from ..server.remote import (
    embedding_from_bytes,
    server_settings,
    volume_info,
    volume_sender,
)
from .compute import Compute, ServerLogic
from .embed_job import (
    CANCELLED,
    DONE,
    FAILED,
    CompletionCallback,
    EmbedJob,
    ProgressCallback,
)
from .node_attributes import node_label, write_embedding
from .provenance import node_provenance
from .remote_job import RemoteJob
from .scene_embeddings import SceneEmbeddings

log = logging.getLogger(__name__)


class EmbedLogic(SceneEmbeddings, ServerLogic):
    """Embed volume nodes on the Raptor server and keep the results on the nodes.

    ``scene`` defaults to ``slicer.mrmlScene``; ``compute`` to the session's
    shared :class:`~.compute.Compute` (one server and one loaded model for
    both modules).  One job runs at a time.
    """

    def __init__(self, scene=None, compute: Compute | None = None) -> None:
        self._scene = scene
        self._compute = compute
        self.job: EmbedJob | None = None
        self._observed_scene = None
        self._observer_tags: list[int] = []

    # -- scene and server ------------------------------------------------------
    def unloadModel(self) -> bool:
        """Free the server's loaded model (GPU memory) until the next job needs it."""
        if self.isRunning():
            raise RaptorError("cannot unload the model while an embedding is running")
        return self.compute.unload()

    # -- running -----------------------------------------------------------
    def isRunning(self) -> bool:
        return self.job is not None and not self.job.finished

    def embed(
        self,
        volumeNode,
        settings: EmbedSettings | None = None,
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
        ``cancel`` is an optional extra token (anything with ``is_set()``),
        checked at every poll.

        With ``waitForCompletion=True`` this returns the :class:`Embedding`
        (raising :class:`RaptorError` on failure, :class:`Cancelled` when
        cancelled).  Otherwise it returns the running :class:`EmbedJob` at
        once; call :meth:`poll` regularly on the main thread to receive
        ``progressCallback(JobProgress)`` and ``completionCallback(job)``.
        """
        from ..volumes.slicer_io import volume_from_node

        if self.isRunning():
            raise RaptorError(f"an embedding of {self.job.node_name} is already running; cancel it or wait for it")
        node = self._check_node(volumeNode)
        settings = dataclasses.replace(settings or EmbedSettings(), **overrides) if overrides else (settings or EmbedSettings())
        provenance = node_provenance(node)
        volume = volume_from_node(
            node, id=node_label(node), source=provenance["source"], modality=provenance["modality"], info=provenance["info"]
        )
        request = {"kind": "embed", "settings": server_settings(settings), "volume_info": volume_info(volume)}
        remote = RemoteJob(self.compute, request, uploads=[("volume", volume_sender(volume))], fetch=["embedding"],
                           label=node_label(node))
        job = EmbedJob(
            node=node, node_id=node.GetID(), node_name=node_label(node), settings=settings, remote=remote,
            progress_callback=progressCallback, completion_callback=completionCallback, cancel_token=cancel,
        )
        self._observe(node.GetScene())
        self.job = job
        if not waitForCompletion:
            return job
        return self.wait(job)

    def wait(self, job: EmbedJob | None = None) -> Embedding:
        """Block until the job ends, polling meanwhile; return its embedding or raise why it has none."""
        job = job or self.job
        if job is None:
            raise RaptorError("no embedding is running")
        self._pump()
        if job.status == DONE:
            return job.embedding
        if job.status == CANCELLED:
            raise Cancelled(f"{job.node_name}: {job.cancel_reason or 'cancelled'}; nothing was written")
        raise RaptorError(job.error or f"{job.node_name}: embedding failed")

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Cancel the running job (the server stops before its next batch of slices)."""
        if self.job is not None:
            self.job.cancel(reason)

    def poll(self) -> bool:
        """Advance the job by one short step; returns True while it is still running.

        Main thread only: this is where callbacks run and attributes are written.
        """
        job = self.job
        if job is None or job.finished:
            return False
        if job.cancel_token is not None and job.cancel_token.is_set():
            job.cancel()
        remote = job.remote
        remote.step()
        if remote.progress is not job.progress:
            job.progress = remote.progress
            if job.progress_callback is not None:
                job.progress_callback(job.progress)
        if remote.finished:
            self._conclude(job)
        return not job.finished

    def _conclude(self, job: EmbedJob) -> None:
        remote = job.remote
        if remote.state == CANCELLED or job.cancel_reason is not None:
            self._finish(job, CANCELLED)
            return
        if remote.state == FAILED:
            job.error = remote.error
            self._finish(job, FAILED)
            return
        try:
            embedding = embedding_from_bytes(remote.results["embedding"], job.node_name)
        except RaptorError as exc:
            job.error = str(exc)
            self._finish(job, FAILED)
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

    def _finish(self, job: EmbedJob, status: str) -> None:
        job.status = status
        job.seconds = time.perf_counter() - job.started
        if status == CANCELLED and not job.cancel_reason:
            job.cancel_reason = job.remote.cancel_reason or "cancelled"
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

    def setModelCacheFolder(self, folder) -> Path:
        """Use another model cache; a local server is restarted (at its next job) to use it too."""
        from ..encoding.model_cache import set_model_cache_dir

        folder = set_model_cache_dir(folder)
        if self.compute.is_local and not self.isRunning():
            self.compute.local.stop()
        return folder

    @staticmethod
    def cachedModels():
        from ..encoding.model_cache import cached_models

        return cached_models()

    def clearModelCache(self, repoIds: list[str] | None = None) -> list[str]:
        """Delete cached models Raptor can use (never other models in a shared cache)."""
        from ..encoding.model_cache import clear_model_cache

        if self.isRunning():
            raise RaptorError("cannot clear the model cache while an embedding is running")
        try:
            self.unloadModel()
        except RaptorError:  # no server yet, or it is busy with a batch: the files are what matters
            pass
        return clear_model_cache(repo_ids=repoIds)

    def importModelFolder(self, folder, repoId: str | None = None) -> str:
        """Copy a model folder into the server's cache (checked to load offline) and return the model id to use.

        The check loads the model, so it runs on the server (this process never
        imports PyTorch); a remote server can import only folders on its own disk.
        """
        if self.isRunning():
            raise RaptorError("cannot import a model while an embedding is running")
        request = {"kind": "import_model", "folder": str(Path(folder).expanduser().resolve()), "repo_id": repoId or None}
        job = RemoteJob(self.compute, request, label=f"import of {folder}").wait(idle=self._idle)
        if job.state != DONE:
            raise RaptorError(job.error or f"the import of {folder} was cancelled")
        return job.snapshot["result"]["repo_id"]


__all__ = ["EmbedLogic"]
