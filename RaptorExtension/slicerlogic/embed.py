"""The RaptorEmbed module's logic, without Qt: embed a volume node in a worker thread.

Decision: the logic lives in the engine package.  ``RaptorEmbed.py`` (which
imports qt, ctk and ScriptedLoadableModule, so it only loads inside Slicer)
subclasses :class:`EmbedLogic` and adds nothing testable; this module runs
headless with ``slicer-core`` and is tested against a real ``vtkMRMLScene``.

Threading, the one rule: **only the main thread touches MRML**.

1. :meth:`EmbedLogic.embed` (main thread) copies the voxels and the
   IJK-to-RAS matrix into a :class:`~RaptorExtension.volume.Volume`
   (``readers.volume_from_node``) and starts a worker thread with it.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .embedding import Embedding, check_compatible, describe_differences
from .errors import Cancelled, InputError, MetadataMismatch, RaptorError
from .names import KNOWN_MODELS, PRESETS
from .node_attributes import embedded_nodes, node_label, read_embedding, write_embedding

if TYPE_CHECKING:  # torch is imported only when a job runs (it is installed at first use)
    from .pipeline import EmbedSettings, Embedder
    from .model import Encoder
    from .volume import Volume

log = logging.getLogger(__name__)

# Choices offered by the module panel: the engine's own lists, from the torch-free
# names module, so the panel builds before torch is installed.
MODEL_IDS = KNOWN_MODELS
MODEL_CHOICES = tuple(MODEL_IDS)
OTHER_MODEL_CHOICE = "other"
"""The choice that takes a model folder or any Hugging Face id from a text field."""
DEFAULT_MODEL_CHOICE = "dinov2-l"
PRESET_CHOICES = PRESETS
DEVICE_CHOICES = ("auto", "cuda", "cpu")
TABLE_NODE_NAME = "Raptor embedded volumes"
TABLE_COLUMNS = (
    "Volume", "Model", "K", "Seed", "Grid", "Preset", "Features", "Settings", "Compatible",
    "Device", "Seconds", "Created", "SeriesInstanceUID",
)
DICOM_ID_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def settings_from_choices(
    *,
    model: str = DEFAULT_MODEL_CHOICE,
    other_model: str = "",
    k: int = 100,
    seed: int = 0,
    preset: str = "auto",
    grid: int = 256,
    device: str = "auto",
    keep_cls: bool = False,
    cache_dir: str | None = None,
) -> "EmbedSettings":
    """The engine settings for what the panel shows (the widget only gathers these values).

    ``model`` is one of :data:`MODEL_CHOICES`, or :data:`OTHER_MODEL_CHOICE`
    with ``other_model`` a local model folder or a hub id such as
    ``facebook/dinov2-with-registers-large`` (or one imported into the cache).
    """
    from .model_cache import REPO_ID_RE
    from .pipeline import EmbedSettings

    if model == OTHER_MODEL_CHOICE:
        text = (other_model or "").strip()
        if not text:
            raise InputError("enter a model folder or a Hugging Face model id (or pick a model from the list)")
        folder = Path(text).expanduser()
        if folder.is_dir():
            model = str(folder)
        elif REPO_ID_RE.match(text):
            model = text
        else:
            raise InputError(f"{text}: is neither a model folder nor a model id of the form ORGANIZATION/NAME")
    elif model not in MODEL_CHOICES:
        raise InputError(f"unknown model '{model}' (choose from {', '.join(MODEL_CHOICES)} or {OTHER_MODEL_CHOICE})")
    if preset not in PRESET_CHOICES:
        raise InputError(f"unknown intensity preset '{preset}' (choose from {', '.join(PRESET_CHOICES)})")
    if device not in DEVICE_CHOICES and not str(device).startswith("cuda:"):
        raise InputError(f"unknown device '{device}' (choose from {', '.join(DEVICE_CHOICES)})")
    if int(k) < 1:
        raise InputError(f"K must be at least 1 (got {k})")
    return EmbedSettings(
        model=model, k=int(k), seed=int(seed), grid=int(grid), preset=preset, device=device,
        keep_cls=bool(keep_cls), cache_dir=cache_dir,
    )


def choice_for_model(model_id: str) -> tuple[str, str]:
    """The panel's (model choice, other-model text) that select ``model_id``."""
    for choice, repo_id in MODEL_IDS.items():
        if model_id in (choice, repo_id):
            return choice, ""
    return OTHER_MODEL_CHOICE, model_id


# ---------------------------------------------------------------------------
# Progress and jobs


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


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


ProgressCallback = Callable[["EmbedProgress"], None]
CompletionCallback = Callable[["EmbedJob"], None]

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"


class _EitherToken:
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


# ---------------------------------------------------------------------------
# What the worker thread runs: no MRML, no Qt


def _run_worker(job: EmbedJob, volume: "Volume", logic: "EmbedLogic", cancel) -> None:
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
    from .model_cache import download_model

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


# ---------------------------------------------------------------------------
# Node -> Volume (main thread)


def node_provenance(node) -> dict:
    """Where a node's voxels came from: ``source``, ``modality``, DICOM ``info`` (main thread only).

    DICOM header fields come from the first file of the node's storage node
    when it was read from a DICOM series (what Slicer's DICOM loader and
    ``raptor embed FOLDER`` both record), else from the subject hierarchy's
    DICOM attributes, which Slicer sets when loading from its database.
    """
    from .readers import DICOM_INFO_TAGS, _is_dicom_file

    files = storage_files(node)
    info: dict = {}
    modality = None
    if files:
        first = Path(files[0])
        is_dicom = first.is_file() and (_is_dicom_file(first) or first.suffix.lower() == ".dcm")
        source = str(first.parent) if is_dicom else str(first)
        if is_dicom:
            modality, info = _dicom_header(first, DICOM_INFO_TAGS)
    else:
        source = f"slicer:{node_label(node)}"
    sh_modality, sh_info = _subject_hierarchy_dicom(node)
    for key, value in sh_info.items():
        info.setdefault(key, value)
    return {"source": source, "modality": modality or sh_modality, "info": info}


def storage_files(node) -> list[str]:
    """The files a node was read from (all slices of a DICOM series), or []."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is None:
        return []
    files = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())]
    files = [f for f in files if f]
    if not files and storage.GetFileName():
        files = [storage.GetFileName()]
    return files


def _dicom_header(path: Path, tags: Sequence[str]) -> tuple[str | None, dict]:
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # an unreadable header only loses provenance, not the embedding
        return None, {}
    info = {tag: str(ds.get(tag, "")) for tag in tags}
    return (str(ds.get("Modality", "")) or None), {k: v for k, v in info.items() if v}


def _subject_hierarchy_dicom(node) -> tuple[str | None, dict]:
    """DICOM UIDs that Slicer's DICOM loader put in the subject hierarchy (series, study, patient)."""
    import slicer

    scene = node.GetScene()
    if scene is None:
        return None, {}
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return None, {}
    item = sh.GetItemByDataNode(node)
    if not item:
        return None, {}
    info = {}
    series_uid = sh.GetItemUID(item, "DICOM")
    if series_uid:
        info["SeriesInstanceUID"] = series_uid
    modality = sh.GetItemAttribute(item, "DICOM.Modality") or None
    study = sh.GetItemParent(item)
    if study and study != sh.GetSceneItemID():
        study_uid = sh.GetItemUID(study, "DICOM")
        if study_uid:
            info["StudyInstanceUID"] = study_uid
        patient = sh.GetItemParent(study)
        if patient and patient != sh.GetSceneItemID():
            patient_id = sh.GetItemAttribute(patient, "DICOM.PatientID")
            if patient_id:
                info["PatientID"] = patient_id
    return modality, info


# ---------------------------------------------------------------------------
# The logic


class EmbedLogic:
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
        from .pipeline import Embedder

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
        from .model_cache import hub_offline, is_cached

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
        from .pipeline import EmbedSettings
        from .readers import volume_from_node

        if self.isRunning():
            raise RaptorError(f"an embedding of {self.job.node_name} is already running; cancel it or wait for it")
        node = self._check_node(volumeNode)
        settings = dataclasses.replace(settings or EmbedSettings(), **overrides) if overrides else (settings or EmbedSettings())
        if settings.cache_dir is None:
            from .model_cache import model_cache_dir

            settings = dataclasses.replace(settings, cache_dir=str(model_cache_dir()))
        provenance = node_provenance(node)
        volume = volume_from_node(
            node, id=node_label(node), source=provenance["source"], modality=provenance["modality"], info=provenance["info"]
        )
        job = EmbedJob(
            node=node, node_id=node.GetID(), node_name=node_label(node), settings=settings,
            progress_callback=progressCallback, completion_callback=completionCallback,
        )
        token = _EitherToken(job.cancel_event, cancel)
        self._observe(node.GetScene())
        job.thread = threading.Thread(
            target=_run_worker, args=(job, volume, self, token), name="raptor-embed", daemon=True
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

    # -- results in the scene -------------------------------------------------
    def embeddedVolumeNodes(self) -> list:
        """Scalar volume nodes of the scene that carry an embedding, in scene order."""
        return embedded_nodes(self.scene)

    def updateEmbeddingsTable(self, tableNode=None):
        """Fill (or create) a table node listing every embedded volume of the scene.

        The ``Compatible`` column compares each node's settings with the first
        one's, so a volume embedded with another K or model stands out before
        an export refuses to mix them.
        """
        import vtk

        scene = self.scene
        if tableNode is None:
            tableNode = scene.GetFirstNodeByName(TABLE_NODE_NAME)
            if tableNode is None or not tableNode.IsA("vtkMRMLTableNode"):
                tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NODE_NAME)
        rows = self.embeddingsTableRows()
        table = tableNode.GetTable()
        was_modifying = tableNode.StartModify()
        try:
            table.Initialize()
            for name in TABLE_COLUMNS:
                column = vtk.vtkStringArray()
                column.SetName(name)
                table.AddColumn(column)
            table.SetNumberOfRows(len(rows))
            for r, row in enumerate(rows):
                for c, name in enumerate(TABLE_COLUMNS):
                    table.SetValue(r, c, vtk.vtkVariant(row[name]))
            tableNode.Modified()
        finally:
            tableNode.EndModify(was_modifying)
        return tableNode

    def embeddingsTableRows(self) -> list[dict]:
        """The rows :meth:`updateEmbeddingsTable` shows (strings), one per embedded volume."""
        rows = []
        reference = None
        for node in self.embeddedVolumeNodes():
            try:
                embedding = read_embedding(node)
            except InputError as exc:
                rows.append({c: "" for c in TABLE_COLUMNS} | {"Volume": node_label(node), "Compatible": str(exc)})
                continue
            meta = embedding.metadata
            if reference is None:
                reference = meta
                compatible = "reference"
            else:
                diffs = describe_differences(reference, meta)
                compatible = "yes" if not diffs else "no: " + "; ".join(diffs)
            rows.append({
                "Volume": node_label(node),
                "Model": str(meta.get("encoder", "")),
                "K": str(meta.get("k", "")),
                "Seed": str(meta.get("seed", "")),
                "Grid": str(meta.get("grid", "")),
                "Preset": str(meta.get("preset", "")),
                "Features": str(embedding.vector.size),
                "Settings": str(meta.get("settings_hash", "")),
                "Compatible": compatible,
                "Device": str(meta.get("device", "")),
                "Seconds": str(meta.get("seconds", "")),
                "Created": str(meta.get("created", "")),
                "SeriesInstanceUID": str((meta.get("dicom") or {}).get("SeriesInstanceUID", "")),
            })
        return rows

    def exportCSV(self, path: str | Path, nodes: Sequence | None = None) -> Path:
        """Write one CSV row per embedded volume (all of the scene's by default).

        Columns: ``id`` (the node name), ``node``, the DICOM ``PatientID``,
        ``StudyInstanceUID`` and ``SeriesInstanceUID`` when known, then the
        same metadata columns and ``e0..eN`` as ``raptor embed --csv``
        (:func:`tables.write_table`), so a row equals the engine's row for the
        same volume.  Volumes embedded with different settings are refused,
        naming the volume and what differs, and nothing is written.
        """
        from .tables import write_table

        nodes = list(nodes) if nodes is not None else self.embeddedVolumeNodes()
        if not nodes:
            raise InputError("no embedded volumes in the scene to export; embed a volume first")
        embeddings, extras = [], []
        ids = _unique_ids(nodes)
        for node, row_id in zip(nodes, ids):
            embedding = read_embedding(node)
            if embedding is None:
                raise InputError(f"{node_label(node)}: has no Raptor embedding; embed it first")
            embeddings.append(Embedding(embedding.vector, dict(embedding.metadata, id=row_id)))
            dicom = embedding.metadata.get("dicom") or {}
            extras.append({"node": node_label(node), **{c: dicom.get(c, "") for c in DICOM_ID_COLUMNS}})
        first = embeddings[0]
        for node, embedding in zip(nodes[1:], embeddings[1:]):
            diffs = describe_differences(first.metadata, embedding.metadata)
            if diffs:
                raise MetadataMismatch(
                    f"{path}: not written: volume '{node_label(node)}' was embedded with other settings than "
                    f"'{node_label(nodes[0])}' ({'; '.join(diffs)}); re-embed it or export the volumes separately"
                )
        return write_table(path, embeddings, extras)

    def checkCompatible(self, nodes: Sequence) -> None:
        """Raise :class:`MetadataMismatch` naming the first pair of nodes whose settings differ."""
        embeddings = [(node, read_embedding(node)) for node in nodes]
        embeddings = [(n, e) for n, e in embeddings if e is not None]
        for node, embedding in embeddings[1:]:
            check_compatible(embeddings[0][1].metadata, embedding.metadata, f"{node_label(node)} vs {node_label(embeddings[0][0])}")

    # -- model cache -------------------------------------------------------
    @staticmethod
    def modelCacheFolder() -> Path:
        from .model_cache import model_cache_dir

        return model_cache_dir()

    @staticmethod
    def setModelCacheFolder(folder) -> Path:
        from .model_cache import set_model_cache_dir

        return set_model_cache_dir(folder)

    @staticmethod
    def cachedModels():
        from .model_cache import cached_models

        return cached_models()

    def clearModelCache(self, repoIds: list[str] | None = None) -> list[str]:
        """Delete cached models Raptor can use (never other models in a shared cache)."""
        from .model_cache import clear_model_cache

        if self.isRunning():
            raise RaptorError("cannot clear the model cache while an embedding is running")
        self.unloadModel()
        return clear_model_cache(repo_ids=repoIds)

    def importModelFolder(self, folder, repoId: str | None = None) -> str:
        """Copy a local model folder into the cache (validated) and return the model id to use."""
        from .model_cache import import_model_folder

        if self.isRunning():
            raise RaptorError("cannot import a model while an embedding is running")
        return import_model_folder(folder, repoId)


def _unique_ids(nodes: Sequence) -> list[str]:
    """Node names as row ids; a name shared by several nodes gets the node ID appended."""
    names = [node_label(n) for n in nodes]
    return [f"{name} ({node.GetID()})" if names.count(name) > 1 else name for name, node in zip(names, nodes)]


def _release_gpu_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_embedding(embedding: Embedding) -> str:
    """The module panel's summary: model, K, shape, time taken, device."""
    meta = embedding.metadata
    shape = "x".join(str(s) for s in meta.get("shape", []))
    cls = " + CLS" if meta.get("keep_cls") else ""
    return (
        f"{meta.get('encoder', '?')} | K={meta.get('k')} seed={meta.get('seed')} | "
        f"{shape}{cls} = {embedding.vector.size:,} values | grid {meta.get('grid')}, preset {meta.get('preset')} | "
        f"{format_seconds(meta.get('seconds') or 0)} on {meta.get('device', '?')} ({meta.get('precision', '?')})"
    )


__all__ = [
    "EmbedLogic",
    "EmbedJob",
    "EmbedProgress",
    "settings_from_choices",
    "describe_embedding",
    "choice_for_model",
    "MODEL_IDS",
    "node_provenance",
    "storage_files",
    "MODEL_CHOICES",
    "OTHER_MODEL_CHOICE",
    "DEFAULT_MODEL_CHOICE",
    "PRESET_CHOICES",
    "DEVICE_CHOICES",
    "TABLE_NODE_NAME",
]
