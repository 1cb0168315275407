"""Cohort batch embedding: sources -> pipelined embedding -> one CSV, resumable and sharded.

A job (:class:`BatchJob`) names its sources (folder trees, manifest CSVs,
Slicer DICOM databases, or series already listed by the caller), the
embedding settings, filters, the output CSV and, for cluster array jobs, a
shard.  :func:`run_batch` then

1. discovers the series (headers and database rows only), filters them, gives
   each a stable id, and keeps this shard's share (a hash of the id, so adding
   series to a cohort never moves the old ones to another shard);
2. opens the output table as a stream, repairs a torn last line, refuses
   other settings, and skips the series already in it (resume);
3. embeds the rest with :meth:`.pipeline.Embedder.embed_many`: loader
   processes read and decode the next series while the encoder works, and
   every finished series is appended as one fsync'ed row, so a kill loses at
   most the series in flight;
4. with several devices, runs one worker process per device, each appending
   to its own part, and merges the parts into the table at the end (or at the
   start of the next run, after a kill);
5. logs every series that could not be embedded to an errors CSV, and keeps a
   record (``OUT.batch.json``: settings, shard, the ids this shard must hold)
   that :func:`merge_parts` checks when it combines shards.

The API is Qt-free: progress arrives through a callback with a
:class:`BatchProgress`, and a cancel token (anything with ``is_set()``) stops
the job within one encoder batch, keeping every row already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue as queue_module
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__
from .anonymize import Anonymizer
from .atomic import atomic_write_text
from .batchtable import StreamingAppender, index_table, iter_rows, read_line_at, repair_tail
from .embedding import Embedding, check_compatible, settings_hash, settings_of
from .errorlog import COLUMNS as ERROR_COLUMNS
from .errorlog import ErrorLog
from .errors import Cancelled, InputError, MetadataMismatch, RaptorError
from .sources import (
    Discovery,
    SeriesFilter,
    SeriesItem,
    assign_ids,
    discover_folder,
    fill_headers,
    read_manifest,
    shard_of,
)
from .tables import META_COLUMNS, feature_columns

BATCH_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription")
"""Identifying columns between ``id`` and the embedding metadata columns."""

RECORD_FORMAT = "raptor-batch"
RECORD_VERSION = 1


# ---------------------------------------------------------------------------
# The job


@dataclass
class BatchSources:
    """Where the series come from; any mix of these."""

    folders: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    dicom_databases: list[str] = field(default_factory=list)
    items: list[SeriesItem] = field(default_factory=list)
    """Series listed by the caller, e.g. from ``dicomdb.discover_slicer_database`` inside Slicer."""

    def describe(self) -> dict:
        return {
            "folders": [os.path.abspath(f) for f in self.folders],
            "manifests": [os.path.abspath(m) for m in self.manifests],
            "dicom_databases": [os.path.abspath(d) for d in self.dicom_databases],
            "listed_series": len(self.items),
        }

    def empty(self) -> bool:
        return not (self.folders or self.manifests or self.dicom_databases or self.items)


@dataclass
class BatchJob:
    """Everything a batch needs; plain data, so Slicer's GUI and the CLI build the same thing."""

    csv: str | Path
    sources: BatchSources
    settings: object = None  # EmbedSettings; None means the defaults
    filters: SeriesFilter = field(default_factory=SeriesFilter)
    shard: tuple[int, int] = (0, 1)
    devices: Sequence[str] | None = None
    """One worker per entry (``cuda:0``, ``cuda:1``...); None: every visible GPU, else the settings' device."""
    readers: int = 2
    loader: str = "auto"
    """``processes`` (fastest outside Slicer), ``threads`` (inside Slicer), ``auto`` picks."""
    anonymizer: Anonymizer | None = None
    keep_descriptions: bool = False
    errors_csv: str | Path | None = None
    parquet: str | Path | None = None

    @property
    def csv_path(self) -> Path:
        return Path(self.csv)

    @property
    def errors_path(self) -> Path:
        return Path(self.errors_csv) if self.errors_csv else errors_path_for(self.csv_path)

    @property
    def record_path(self) -> Path:
        return record_path_for(self.csv_path)


def errors_path_for(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "_errors.csv")


def record_path_for(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + ".batch.json")


def workers_dir_for(csv_path: Path) -> Path:
    return csv_path.with_name("." + csv_path.name + ".workers")


# ---------------------------------------------------------------------------
# Progress and result


@dataclass
class BatchProgress:
    """A snapshot for a progress bar: series done of total, rate, ETA."""

    phase: str  # discovering, loading model, embedding, merging, finished
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    current: str = ""
    slices_done: int = 0
    slices_total: int = 0
    elapsed: float = 0.0
    message: str | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def volumes_per_second(self) -> float:
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.volumes_per_second
        return (self.total - self.finished) / rate if rate > 0 else None


ProgressCallback = Callable[[BatchProgress], None]


@dataclass
class BatchSummary:
    csv: Path
    errors_csv: Path
    record: Path
    total: int = 0  # series this run is responsible for (this shard)
    done: int = 0  # embedded now
    skipped: int = 0  # already in the table
    failed: int = 0
    excluded: int = 0  # left out by the filters
    other_shards: int = 0
    unusable_files: int = 0
    foreign_rows: int = 0  # rows in the table that this run's cohort does not list
    cancelled: bool = False
    seconds: float = 0.0
    parquet: Path | None = None

    @property
    def volumes_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = f"embedded {self.done}, skipped {self.skipped} already done, failed {self.failed}"
        extra = []
        if self.excluded:
            extra.append(f"{self.excluded} left out by filters")
        if self.other_shards:
            extra.append(f"{self.other_shards} in other shards")
        if self.unusable_files:
            extra.append(f"{self.unusable_files} files not usable")
        if extra:
            text += " (" + ", ".join(extra) + ")"
        if self.seconds > 0 and self.done + self.failed:
            text += f"; {self.volumes_per_second:.2f} volumes/s"
        return text


# ---------------------------------------------------------------------------
# Planning


@dataclass
class PlannedSeries:
    id: str  # the row id (anonymized when the job anonymizes)
    item: SeriesItem


@dataclass
class Plan:
    series: list[PlannedSeries]  # this shard's, sorted by id
    cohort_ids: list[str]  # every shard's, sorted
    excluded: list[tuple[SeriesItem, str]]
    unusable_files: list[tuple[str, str]]
    shard: tuple[int, int]

    @property
    def cohort_sha256(self) -> str:
        return cohort_digest(self.cohort_ids)


def cohort_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def discover(job: BatchJob, *, cancel=None, progress: ProgressCallback | None = None) -> tuple[Discovery, list[tuple[SeriesItem, str]]]:
    """Every series of the job's sources that passes the filters, and those left out with the reason."""
    from .dicomdb import discover_database

    filters = job.filters
    found = Discovery()
    excluded: list[tuple[SeriesItem, str]] = []
    needs_modality = _preset_needs_modality(job)

    def keep(items: list[SeriesItem], fill: bool) -> None:
        for item in items:
            if fill and (filters.needs_headers or needs_modality):
                fill_headers(item)
            reason = filters.exclusion(item)
            if reason:
                excluded.append((item, reason))
            else:
                found.items.append(item)

    def shown(kind: str, path: str, n: int, of: int) -> str:
        # Anonymized jobs never print a path: a folder may be named after a patient.
        return f"{kind} {n} of {of}" if job.anonymizer else f"{kind} {path}"

    for n, folder in enumerate(job.sources.folders, start=1):
        if progress:
            progress(BatchProgress("discovering", message=f"scanning {shown('folder', folder, n, len(job.sources.folders))}"))
        part = discover_folder(folder, cancel=cancel)
        found.skipped_files.extend(part.skipped_files)
        keep(part.items, fill=False)
    for manifest in job.sources.manifests:
        part = read_manifest(manifest)
        keep(part.items, fill=True)
    for n, database in enumerate(job.sources.dicom_databases, start=1):
        if progress:
            progress(BatchProgress("discovering", message=f"reading {shown('database', database, n, len(job.sources.dicom_databases))}"))
        part, left_out = discover_database(database, filters, cancel=cancel)
        found.extend(part)
        excluded.extend(left_out)
    keep(list(job.sources.items), fill=True)
    # The same series reached twice (a folder and a database holding the same files) is embedded once.
    unique: dict[str, SeriesItem] = {}
    for item in found.items:
        unique.setdefault(item.key, item)
    found.items = list(unique.values())
    return found, excluded


def _preset_needs_modality(job: BatchJob) -> bool:
    settings = job.settings
    return (getattr(settings, "preset", "auto") or "auto").lower() == "auto"


def plan_job(job: BatchJob, *, cancel=None, progress: ProgressCallback | None = None) -> Plan:
    """Discover, filter, name and shard the job's series (no voxel is read)."""
    if job.sources.empty():
        raise RaptorError("no sources: give a --folder, --manifest or --dicom-db")
    index, count = job.shard
    if count < 1 or not 0 <= index < count:
        raise RaptorError(f"shard {index}/{count}: shards are numbered 0..N-1")
    found, excluded = discover(job, cancel=cancel, progress=progress)
    raw_ids = assign_ids(found.items, roots=job.sources.folders)
    anonymizer = job.anonymizer
    planned = []
    for raw, item in zip(raw_ids, found.items):
        row_id = anonymizer.row_id(raw, item.series_uid) if anonymizer else raw
        planned.append(PlannedSeries(row_id, item))
    ids = [p.id for p in planned]
    if len(set(ids)) != len(ids):  # pragma: no cover - a 80-bit hash collision
        raise RaptorError("two series got the same anonymized id; use another salt")
    planned.sort(key=lambda p: p.id)
    mine = [p for p in planned if shard_of(p.id, count) == index] if count > 1 else planned
    return Plan(series=mine, cohort_ids=sorted(ids), excluded=excluded, unusable_files=found.skipped_files,
                shard=(index, count))


# ---------------------------------------------------------------------------
# Rows


def _one_line(value) -> str:
    return " ".join(str(value or "").split())


def row_fields(planned: PlannedSeries, embedding: Embedding, job: BatchJob) -> tuple[dict, str]:
    """The identifying columns of a row and its source, anonymized when the job says so."""
    item = planned.item
    info = embedding.metadata.get("dicom") or {}
    patient = item.patient_id or info.get("PatientID", "")
    study = item.study_uid or info.get("StudyInstanceUID", "")
    series = item.series_uid or info.get("SeriesInstanceUID", "")
    description = item.description or info.get("SeriesDescription", "")
    source = item.source
    anonymizer = job.anonymizer
    if anonymizer is not None:
        description = anonymizer.redact(description, {patient: anonymizer.patient_id(patient)}) if job.keep_descriptions else ""
        patient, study, series = anonymizer.patient_id(patient), anonymizer.uid(study), anonymizer.uid(series)
        source = ""
    fields = dict(zip(BATCH_COLUMNS, (_one_line(patient), _one_line(study), _one_line(series), _one_line(description))))
    return fields, _one_line(source)


def redaction_map(planned: PlannedSeries, job: BatchJob) -> dict[str, str]:
    """Every string that could identify this series' patient, mapped to a stand-in."""
    anonymizer = job.anonymizer
    if anonymizer is None:
        return {}
    item = planned.item
    secrets = {p: planned.id for p in item.paths}
    secrets.update({os.path.dirname(p): planned.id for p in item.paths})
    secrets.update({item.source: planned.id, item.key: planned.id, item.user_id: planned.id})
    if item.study_uid:
        secrets[item.study_uid] = anonymizer.uid(item.study_uid)
    if item.series_uid:
        secrets[item.series_uid] = anonymizer.uid(item.series_uid)
    if item.patient_id:
        secrets[item.patient_id] = anonymizer.patient_id(item.patient_id)
    secrets.pop("", None)
    return secrets


def header_for_job(n_features: int) -> list[str]:
    return ["id", *BATCH_COLUMNS, *META_COLUMNS, *feature_columns(n_features)]


# ---------------------------------------------------------------------------
# Running


def resolve_devices(devices: Sequence[str] | None, device_setting: str) -> list[str]:
    """One entry per worker.  ``None``: every visible GPU when there are several, else the settings' device."""
    if devices:
        return [str(d) for d in devices]
    if device_setting and device_setting != "auto":
        return [device_setting]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1:
        return [f"cuda:{i}" for i in range(count)]
    return [device_setting or "auto"]


def resolve_loader(loader: str, readers: int) -> str:
    if loader not in ("auto", "threads", "processes"):
        raise RaptorError(f"loader must be auto, threads or processes (got {loader!r})")
    if loader != "auto":
        return loader
    in_slicer = hasattr(sys.modules.get("slicer"), "app")
    return "threads" if in_slicer or readers <= 0 else "processes"


class _Run:
    """The state of one :func:`run_batch` call."""

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


def run_batch(
    job: BatchJob,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    embedder=None,
) -> BatchSummary:
    """Run (or resume) a batch job; returns its summary.  See the module docstring.

    ``embedder``: an already loaded :class:`.pipeline.Embedder` to reuse (Slicer
    keeps one); its settings then win over ``job.settings``.
    """
    from .pipeline import EmbedSettings

    if job.settings is None:
        job.settings = embedder.settings if embedder is not None else EmbedSettings()
    if embedder is not None:
        job.settings = embedder.settings
    run = _Run(job, progress, cancel)
    summary = BatchSummary(csv=job.csv_path, errors_csv=job.errors_path, record=job.record_path)
    run.report(phase="discovering")
    plan = plan_job(job, cancel=cancel, progress=run.progress_cb)
    summary.total = len(plan.series)
    summary.excluded = len(plan.excluded)
    summary.other_shards = len(plan.cohort_ids) - len(plan.series)
    summary.unusable_files = len(plan.unusable_files)
    previous = _read_record(job.record_path)
    _check_record(previous, job, plan)
    preset = _single_preset(job, plan)
    devices = resolve_devices(job.devices, getattr(job.settings, "device", "auto"))
    loader = resolve_loader(job.loader, job.readers)
    try:
        if len(devices) == 1 and embedder is None:
            from .pipeline import Embedder

            run.report(phase="loading model", message=f"loading {job.settings.model}")
            settings = _with_device(job.settings, devices[0])
            embedder = Embedder(settings)
        if embedder is not None:
            _run_in_process(run, plan, preset, embedder, loader, summary, previous)
        else:
            _run_workers(run, plan, preset, devices, loader, summary, previous)
    except Cancelled:
        summary.cancelled = True
    summary.seconds = time.perf_counter() - (run.embed_start or run.start)
    summary.failed = run.state.failed
    summary.done = run.state.done
    _finish_record(job, summary)
    if job.parquet and not summary.cancelled:
        from .parquet import csv_to_parquet

        run.report(phase="writing parquet")
        summary.parquet = csv_to_parquet(job.csv_path, job.parquet)
    run.report(phase="finished", message=summary.line())
    return summary


def _with_device(settings, device: str):
    return replace(settings, device=device)


def _single_preset(job: BatchJob, plan: Plan) -> str:
    """The one intensity preset of this cohort; a cohort whose modalities need different ones is refused."""
    from .intensity import resolve_preset

    s = job.settings
    presets: dict[str, set[str]] = {}
    for planned in plan.series:
        modality = planned.item.modality or None
        name = resolve_preset(s.preset, modality, s.ct_window).describe()
        presets.setdefault(name, set()).add(modality or "unknown")
    if len(presets) > 1:
        detail = "; ".join(f"{', '.join(sorted(m))} -> {p}" for p, m in sorted(presets.items()))
        raise RaptorError(
            f"this cohort mixes modalities that get different intensity presets ({detail}); "
            "embeddings with different presets cannot share one table: filter with --modality, or set --preset"
        )
    if presets:
        return next(iter(presets))
    return resolve_preset(s.preset, None, s.ct_window).describe()


def _init_errors(path: Path) -> None:
    """Each run lists its own failures (failed series are retried on a rerun)."""
    atomic_write_text(path, ",".join(ERROR_COLUMNS) + "\n")


def _expected_settings(embedder, preset: str) -> tuple[dict, int]:
    meta = embedder.settings_metadata(preset)
    return settings_of(meta) | {"encoder": meta.get("encoder")}, embedder.n_features


def _embed_planned(embedder, todo: list[PlannedSeries], *, readers: int, loader: str, cancel,
                   slices: Callable[[str, int, int], None] | None) -> Iterator[tuple[PlannedSeries, Embedding | None, str | None]]:
    """Embed planned series in order; yields (planned, embedding, error)."""
    by_id = {p.id: p for p in todo}
    refs = (p.item.ref(p.id) for p in todo)
    for ref, embedding, error in embedder.embed_many(refs, progress=slices, cancel=cancel, readers=readers, loader=loader):
        yield by_id.pop(ref.id), embedding, error


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


def _run_in_process(run: _Run, plan: Plan, preset: str, embedder, loader: str, summary: BatchSummary, previous) -> None:
    job = run.job
    expected, n_features = _expected_settings(embedder, preset)
    _check_previous_settings(previous, expected, job)
    header = header_for_job(n_features)
    _merge_worker_parts(job.csv_path)
    table = StreamingAppender(job.csv_path, header, expected)
    todo = [p for p in plan.series if p.id not in table.ids]
    summary.skipped = len(plan.series) - len(todo)
    summary.foreign_rows = len(table.ids - {p.id for p in plan.series})
    _write_record(job, plan, expected, n_features, status="running", summary=summary)
    _init_errors(job.errors_path)
    run.embed_start = time.perf_counter()
    run.report(phase="embedding", total=len(todo), skipped=summary.skipped)

    def slices(volume_id: str, done: int, total: int) -> None:
        run.report(current=volume_id, slices_done=done, slices_total=total)

    writer = RowWriter(table, job, done=run.done, failed=run.failed)
    try:
        for planned, embedding, error in _embed_planned(embedder, todo, readers=job.readers, loader=loader,
                                                         cancel=run.cancel, slices=slices):
            if error is not None:
                run.failed(planned, error)
            else:
                writer.put(planned, embedding)
            if run.cancel is not None and run.cancel.is_set():
                raise Cancelled()
    finally:
        writer.close()  # rows already embedded are written, even when cancelled


# ---------------------------------------------------------------------------
# Several devices: one worker process each


@dataclass
class _WorkerConfig:
    settings: object
    part: str
    preset: str
    expected: dict | None
    readers: int
    loader: str
    job: BatchJob


def _worker_main(config: _WorkerConfig, work, results, cancel) -> None:
    """Runs in a worker process: embed what the queue hands out, append to this worker's part."""
    try:
        from .pipeline import Embedder

        embedder = Embedder(config.settings)
        expected, n_features = _expected_settings(embedder, config.preset)
        if config.expected is not None:
            check_compatible(config.expected, expected, f"{config.job.csv_path} (existing rows) vs this run")
        header = header_for_job(n_features)
        table = StreamingAppender(config.part, header, expected)
        results.put(("ready", expected, n_features))
        parent = os.getppid()

        def handed_out() -> Iterator[PlannedSeries]:
            while True:
                try:
                    planned = work.get(timeout=1.0)
                except queue_module.Empty:
                    if os.getppid() != parent:  # the job was killed: stop, the rows so far are safe
                        return
                    continue
                if planned is None:
                    return
                yield planned

        def slices(volume_id: str, done: int, total: int) -> None:
            results.put(("slices", volume_id, done, total))

        todo = handed_out()
        by_id: dict[str, PlannedSeries] = {}

        def refs():
            for planned in todo:
                by_id[planned.id] = planned
                yield planned.item.ref(planned.id)

        writer = RowWriter(table, config.job, done=lambda p: results.put(("done", p.id)),
                           failed=lambda p, reason: results.put(("failed", p.id, reason)))
        try:
            for ref, embedding, error in embedder.embed_many(refs(), progress=slices, cancel=cancel,
                                                             readers=config.readers, loader=config.loader):
                planned = by_id.pop(ref.id)
                if error is not None:
                    results.put(("failed", planned.id, error))
                else:
                    writer.put(planned, embedding)
        finally:
            writer.close()
        results.put(("finished",))
    except Cancelled:
        results.put(("cancelled",))
    except RaptorError as exc:
        results.put(("fatal", str(exc)))
    except BaseException as exc:  # report, never hang the parent
        import traceback

        traceback.print_exc()
        results.put(("fatal", f"worker crashed ({type(exc).__name__}: {exc})"))


def _run_workers(run: _Run, plan: Plan, preset: str, devices: list[str], loader: str, summary: BatchSummary,
                 previous) -> None:
    import multiprocessing

    job = run.job
    _merge_worker_parts(job.csv_path)
    expected_before = previous.get("settings") if previous else None
    existing_ids: set[str] = set()
    if job.csv_path.exists() and job.csv_path.stat().st_size > 0:
        repair_tail(job.csv_path)
        existing = index_table(job.csv_path)
        existing_ids = set(existing.ids)
        expected_before = existing.settings or expected_before
    parts_dir = workers_dir_for(job.csv_path)
    todo = [p for p in plan.series if p.id not in existing_ids]
    summary.skipped = len(plan.series) - len(todo)
    parts_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    work, results, stop = context.Queue(), context.Queue(), context.Event()
    for planned in todo:
        work.put(planned)
    for _ in devices:
        work.put(None)
    # Loader processes are shared out: --readers is a total for the machine, not per device.
    readers = 0 if job.readers <= 0 else max(1, job.readers // len(devices))
    workers = []
    for n, device in enumerate(devices):
        config = _WorkerConfig(settings=_with_device(job.settings, device), part=str(parts_dir / f"worker-{n}.csv"),
                               preset=preset, expected=expected_before, readers=readers, loader=loader, job=job)
        process = context.Process(target=_worker_main, args=(config, work, results, stop), daemon=True,
                                  name=f"raptor-batch-{device}")
        process.start()
        workers.append(process)
    run.report(phase="loading model", message=f"starting {len(devices)} workers on {', '.join(devices)}")
    by_id = {p.id: p for p in todo}
    running = len(workers)
    fatal: str | None = None
    recorded = False
    try:
        while running:
            if run.cancel is not None and run.cancel.is_set() and not stop.is_set():
                stop.set()
            try:
                message = results.get(timeout=0.5)
            except queue_module.Empty:
                if not any(w.is_alive() for w in workers):
                    fatal = fatal or "every worker process exited without finishing"
                    break
                continue
            kind = message[0]
            if kind == "ready":
                if not recorded:
                    expected, n_features = message[1], message[2]
                    if not job.csv_path.exists() or job.csv_path.stat().st_size == 0:
                        StreamingAppender(job.csv_path, header_for_job(n_features), expected)
                    _write_record(job, plan, expected, n_features, status="running", summary=summary)
                    _init_errors(job.errors_path)
                    recorded = True
                    run.embed_start = time.perf_counter()
                    run.report(phase="embedding", total=len(todo), skipped=summary.skipped)
            elif kind == "slices":
                run.report(current=message[1], slices_done=message[2], slices_total=message[3])
            elif kind == "done":
                run.done(by_id.pop(message[1]))
            elif kind == "failed":
                run.failed(by_id.pop(message[1]), message[2])
            elif kind in ("finished", "cancelled"):
                running -= 1
            elif kind == "fatal":
                running -= 1
                fatal = fatal or message[1]
                stop.set()
    finally:
        if fatal or (run.cancel is not None and run.cancel.is_set()):
            stop.set()
        for process in workers:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join()
    run.report(phase="merging")
    _merge_worker_parts(job.csv_path)
    if fatal:
        raise RaptorError(fatal)
    if run.cancel is not None and run.cancel.is_set():
        raise Cancelled()


def _merge_worker_parts(csv_path: Path) -> int:
    """Move rows from worker parts (this run's, or a killed run's) into the main table; returns rows moved.

    Rows already in the main table are not copied twice, so a merge killed
    half-way is simply done again.
    """
    parts_dir = workers_dir_for(csv_path)
    if not parts_dir.exists():
        return 0
    moved = 0
    main: StreamingAppender | None = None
    for part in sorted(parts_dir.glob("worker-*.csv")):
        if part.stat().st_size == 0:
            part.unlink()
            continue
        index = index_table(part, allow_torn_tail=True)
        if index.ids:
            if main is None:
                main = StreamingAppender(csv_path, index.header, index.settings)
            elif index.header != main.header:
                raise MetadataMismatch(f"{part}: worker part has other columns than {csv_path}; remove it or use another output")
            if index.settings is not None and main.settings is not None:
                check_compatible(main.settings, index.settings, f"{part} vs {csv_path}")
            rows = iter_rows(part, allow_torn_tail=True)
            next(rows)
            for _line_no, _offset, raw, prefix in rows:
                if prefix[0] not in main.ids:
                    main.append_raw(prefix[0], raw)
                    moved += 1
        part.unlink()
    try:
        parts_dir.rmdir()
    except OSError:
        pass
    return moved


# ---------------------------------------------------------------------------
# The record beside each output


def _read_record(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: batch record is not readable JSON ({type(exc).__name__}); delete it to start over") from None
    if record.get("format") != RECORD_FORMAT:
        raise InputError(f"{path}: not a Raptor batch record")
    if int(record.get("format_version", 0)) > RECORD_VERSION:
        raise InputError(f"{path}: written by a newer Raptor; upgrade to resume this job")
    return record


def _check_record(previous: dict | None, job: BatchJob, plan: Plan) -> None:
    """A rerun must be the same shard of the same kind of job (same anonymization, same salt)."""
    if not previous:
        return
    where = job.csv_path
    old_shard = tuple(previous.get("shard", (0, 1)))
    if old_shard != tuple(plan.shard):
        raise RaptorError(
            f"{where}: was written as shard {old_shard[0]}/{old_shard[1]}, this run is shard "
            f"{plan.shard[0]}/{plan.shard[1]}; use another output file"
        )
    anonymized = job.anonymizer is not None
    if bool(previous.get("anonymized")) != anonymized:
        state = "anonymized" if previous.get("anonymized") else "not anonymized"
        raise RaptorError(f"{where}: was written {state}; rerun with the same --anonymize choice or use another output file")
    if anonymized and previous.get("salt_check") != job.anonymizer.salt_check:
        raise RaptorError(f"{where}: was anonymized with another salt; rerun with the same salt or use another output file")


def _check_previous_settings(previous: dict | None, expected: dict, job: BatchJob) -> None:
    if previous and previous.get("settings"):
        check_compatible(previous["settings"], expected, f"{job.csv_path} (earlier run) vs this run")


def _write_record(job: BatchJob, plan: Plan, expected: dict, n_features: int, *, status: str, summary: BatchSummary) -> None:
    record = {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "software": f"raptor {__version__}",
        "status": status,
        "csv": job.csv_path.name,
        "errors_csv": job.errors_path.name,
        "shard": list(plan.shard),
        "cohort_size": len(plan.cohort_ids),
        "cohort_sha256": plan.cohort_sha256,
        "settings": expected,
        "settings_hash": settings_hash(expected),
        "n_features": n_features,
        "anonymized": job.anonymizer is not None,
        "salt_check": job.anonymizer.salt_check if job.anonymizer else None,
        "filters": job.filters.describe(),
        "sources": None if job.anonymizer else job.sources.describe(),
        "counts": _counts(summary),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "assigned": [p.id for p in plan.series],
    }
    atomic_write_text(job.record_path, json.dumps(record, indent=1) + "\n")


def _counts(summary: BatchSummary) -> dict:
    return {"total": summary.total, "done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
            "excluded": summary.excluded, "other_shards": summary.other_shards}


def _finish_record(job: BatchJob, summary: BatchSummary) -> None:
    record = _read_record(job.record_path)
    if not record:
        return
    record["status"] = "cancelled" if summary.cancelled else "complete"
    record["counts"] = _counts(summary)
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(job.record_path, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------
# Merging shards


@dataclass
class MergeSummary:
    output: Path
    rows: int
    failed: int
    parts: int
    errors_csv: Path | None


def merge_parts(parts: Sequence[str | Path], output: str | Path) -> MergeSummary:
    """Combine the CSVs of all shards of one job into ``output``, rows sorted by id.

    Refused, with the reason, when the parts do not share the embedding
    settings, the cohort, the shard count or the anonymization salt, when a
    shard is missing or given twice, when a row is not in its shard's plan or
    appears in two parts, or when a series of the plan is neither in its
    part nor in that part's errors CSV (the shard did not finish: rerun it).
    Series that failed are listed in ``OUTPUT_errors.csv``.
    """
    output = Path(output)
    if not parts:
        raise RaptorError("merge needs the part CSVs of every shard")
    records = []
    for part in parts:
        part = Path(part)
        if not part.exists():
            raise InputError(f"{part}: no such file")
        record = _read_record(record_path_for(part))
        if record is None:
            raise InputError(f"{part}: no batch record {record_path_for(part).name} beside it (was it written by raptor batch?)")
        records.append((part, record))
    first_part, first = records[0]
    count = int(first["shard"][1])
    seen_shards: dict[int, Path] = {}
    for part, record in records:
        check_compatible(first["settings"], record["settings"], f"{part} vs {first_part}")
        if int(record["shard"][1]) != count:
            raise RaptorError(f"{part}: is shard {record['shard'][0]}/{record['shard'][1]}, {first_part} one of {count}")
        if record["cohort_sha256"] != first["cohort_sha256"]:
            raise RaptorError(f"{part}: was planned from another cohort than {first_part} (sources or filters differ)")
        if bool(record.get("anonymized")) != bool(first.get("anonymized")) or record.get("salt_check") != first.get("salt_check"):
            raise RaptorError(f"{part}: anonymization (or its salt) differs from {first_part}")
        index = int(record["shard"][0])
        if index in seen_shards:
            raise RaptorError(f"shard {index}/{count} is given twice: {seen_shards[index]} and {part}")
        seen_shards[index] = part
    missing_shards = [i for i in range(count) if i not in seen_shards]
    if missing_shards:
        raise RaptorError(f"shard{'s' if len(missing_shards) > 1 else ''} {', '.join(f'{i}/{count}' for i in missing_shards)} missing; give every part")
    all_assigned: list[str] = []
    locations: dict[str, tuple[Path, int]] = {}
    failures: list[list[str]] = []
    header: list[str] | None = None
    for part, record in records:
        assigned = list(record.get("assigned", []))
        index = int(record["shard"][0])
        wrong = next((i for i in assigned if shard_of(i, count) != index), None)
        if wrong is not None:
            raise RaptorError(f"{part}: its plan lists {wrong!r}, which belongs to shard {shard_of(wrong, count)}/{count}")
        all_assigned.extend(assigned)
        table = index_table(part)
        if table.torn_tail:
            raise RaptorError(f"{part}: ends with a torn row; rerun its shard to repair it")
        if header is None:
            header = table.header
        elif table.header != header:
            raise MetadataMismatch(f"{part}: has other columns than {first_part}")
        if table.settings is not None:
            check_compatible(first["settings"], table.settings, f"{part} rows vs {first_part}")
        assigned_set = set(assigned)
        for row_id, offset in zip(table.ids, table.offsets):
            if row_id not in assigned_set:
                raise RaptorError(f"{part}: row {row_id!r} is not in its shard's plan (the cohort changed since; rerun the shard)")
            if row_id in locations:
                raise RaptorError(f"series {row_id!r} appears in {locations[row_id][0]} and {part}")
            locations[row_id] = (part, offset)
        failed_rows = _read_errors(errors_path_for_record(part, record))
        failed_ids = {r[0] for r in failed_rows}
        lacking = [i for i in assigned if i not in locations and i not in failed_ids]
        if lacking:
            raise RaptorError(
                f"{part}: shard {index}/{count} is incomplete: {len(lacking)} series neither embedded nor failed "
                f"(e.g. {lacking[0]!r}); rerun that shard"
            )
        failures.extend(r for r in failed_rows if r[0] not in locations)
    if cohort_digest(all_assigned) != first["cohort_sha256"] or len(set(all_assigned)) != len(all_assigned):
        raise RaptorError("the shards' plans do not add up to the planned cohort (a part was edited, or its plan is stale)")
    assert header is not None
    from .atomic import atomic_write

    with atomic_write(output, "wb") as handle:
        handle.write(_csv_line(header).encode("utf-8") + b"\n")
        for row_id in sorted(locations):
            part, offset = locations[row_id]
            handle.write(read_line_at(part, offset))
    errors_csv = None
    if failures:
        errors_csv = errors_path_for(output)
        atomic_write_text(errors_csv, _csv_text([list(ERROR_COLUMNS), *failures]))
    merged = dict(first, shard=[0, 1], assigned=sorted(locations), status="complete", csv=output.name,
                  errors_csv=errors_csv.name if errors_csv else None,
                  counts={"done": len(locations), "failed": len(failures)},
                  updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    merged["merged_from"] = [str(Path(p).name) for p, _ in records]
    atomic_write_text(record_path_for(output), json.dumps(merged, indent=1) + "\n")
    return MergeSummary(output=output, rows=len(locations), failed=len(failures), parts=len(records), errors_csv=errors_csv)


def errors_path_for_record(part: Path, record: dict) -> Path:
    name = record.get("errors_csv")
    return part.with_name(name) if name else errors_path_for(part)


def _read_errors(path: Path) -> list[list[str]]:
    import csv

    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    return [r for r in rows[1:] if r and len(r) == len(ERROR_COLUMNS)]


def _csv_line(values: Sequence[str]) -> str:
    return _csv_text([list(values)]).rstrip("\n")


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


__all__ = [
    "BATCH_COLUMNS",
    "BatchJob",
    "BatchSources",
    "BatchProgress",
    "BatchSummary",
    "Plan",
    "PlannedSeries",
    "plan_job",
    "run_batch",
    "merge_parts",
    "MergeSummary",
    "resolve_devices",
]
