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
3. embeds the rest with :meth:`..encoding.pipeline.Embedder.embed_many`: loader
   processes read and decode the next series while the encoder works, and
   every finished series is appended as one fsync'ed row, so a kill loses at
   most the series in flight;
4. with several devices, runs one worker process per device, each appending
   to its own part, and merges the parts into the table at the end (or at the
   start of the next run, after a kill);
5. logs every series that could not be embedded to an errors CSV, and keeps a
   record (``OUT.batch.json``: settings, shard, the ids this shard must hold)
   that :func:`.merge.merge_parts` checks when it combines shards.

The parts: :mod:`.job` (the job as data), :mod:`.plan` (discovery, ids,
shards), :mod:`.rows` (rows and the writer thread), :mod:`.workers` (one
process per GPU), :mod:`.record` (the record beside the output), :mod:`.merge`.

The API is Qt-free: progress arrives through a callback with a
:class:`BatchProgress`, and a cancel token (anything with ``is_set()``) stops
the job within one encoder batch, keeping every row already written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from ..embeddings.embedding import Embedding
from ..embeddings.stream import StreamingAppender
from ..errors import Cancelled, RaptorError
from ..outputs import TableLocks, check_outputs, check_outputs_against_files, output_path
from ..volumes.prefetch import resolve_loader
from .job import BatchJob, BatchSummary, ProgressCallback
from .plan import Plan, PlannedSeries, header_for_job, plan_job
from .record import (
    check_previous_settings,
    check_record,
    finish_record,
    init_errors,
    read_record,
    write_record,
)
from .rows import RowWriter, RunState, expected_settings, with_device
from .workers import merge_worker_parts, run_workers


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


def run_batch(
    job: BatchJob,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    embedder=None,
    load_embedder=None,
) -> BatchSummary:
    """Run (or resume) a batch job; returns its summary.  See the module docstring.

    ``embedder``: an already loaded :class:`..encoding.pipeline.Embedder` to
    reuse; its settings then win over ``job.settings``.  ``load_embedder``:
    ``f(settings) -> Embedder`` used instead of loading a model of its own (a
    server shares its loaded models this way); called only when there is one
    device and once the plan is known.
    """
    from ..encoding.settings import EmbedSettings

    if job.settings is None:
        job.settings = embedder.settings if embedder is not None else EmbedSettings()
    if embedder is not None:
        job.settings = embedder.settings
    job.csv = output_path(job.csv)
    outputs = job_outputs(job)
    check_outputs(outputs, job_inputs(job))
    with TableLocks([("table", job.csv_path)]):
        return _run_locked(job, outputs, progress=progress, cancel=cancel, embedder=embedder, load_embedder=load_embedder)


def job_outputs(job: BatchJob) -> list[tuple[str, object]]:
    """Every file a batch writes, named as the user knows it."""
    return [("--csv", job.csv_path), ("--errors" if job.errors_csv else "the errors CSV", job.errors_path),
            ("the batch record", job.record_path), ("--parquet", job.parquet)]


def job_inputs(job: BatchJob) -> list[tuple[str, object]]:
    """The files and folders a batch names as its sources (the volumes they list are checked after discovery)."""
    from pathlib import Path

    return ([("--manifest", m) for m in job.sources.manifests] + [("--folder", f) for f in job.sources.folders]
            + [("--dicom-db", d) for d in job.sources.dicom_databases]
            + [("the DICOM database", Path(d) / "ctkDICOM.sql") for d in job.sources.dicom_databases])


def _run_locked(job: BatchJob, outputs, *, progress, cancel, embedder, load_embedder=None) -> BatchSummary:
    run = RunState(job, progress, cancel)
    summary = BatchSummary(csv=job.csv_path, errors_csv=job.errors_path, record=job.record_path)
    run.report(phase="discovering")
    plan = plan_job(job, cancel=cancel, progress=run.progress_cb)
    check_outputs_against_files(outputs, (path for planned in plan.series for path in planned.item.paths))
    summary.total = len(plan.series)
    summary.excluded = len(plan.excluded)
    summary.other_shards = len(plan.cohort_ids) - len(plan.series)
    summary.unusable_files = len(plan.unusable_files)
    summary.failed_sources = list(plan.failed_sources)
    previous = read_record(job.record_path)
    check_record(previous, job, plan)
    preset = _single_preset(job, plan)
    devices = resolve_devices(job.devices, getattr(job.settings, "device", "auto"))
    loader = resolve_loader(job.loader, job.readers)
    if previous and previous.get("settings"):  # before loading a model for a run that would be refused
        from ..encoding.pipeline import check_known_settings

        check_known_settings(previous["settings"], job.settings, f"{job.csv_path} (earlier run) vs this run", preset)
    try:
        if embedder is None and _resume_without_model(run, plan, preset, previous, summary):
            pass  # every series of this shard is in the table already: no model is loaded for nothing
        elif len(devices) == 1 and embedder is None:
            from ..encoding.pipeline import Embedder

            run.report(phase="loading model", message=f"loading {job.settings.model}")
            settings = with_device(job.settings, devices[0])
            embedder = (load_embedder or Embedder)(settings)
            embedder.notice = lambda text: run.report(message=text)
            embedder.notice_by_id = job.anonymizer is not None
        if embedder is not None:
            _run_in_process(run, plan, preset, embedder, loader, summary, previous)
        elif not summary.resumed_without_model:
            run_workers(run, plan, preset, devices, loader, summary, previous)
    except Cancelled:
        summary.cancelled = True
    for where, reason in plan.failed_sources:  # in the errors CSV too, beside the series that failed
        run.errors.add("", where, reason)
    summary.seconds = time.perf_counter() - (run.embed_start or run.start)
    summary.failed = run.state.failed
    summary.done = run.state.done
    finish_record(job, summary)
    if job.parquet and not summary.cancelled:
        from ..embeddings.parquet import csv_to_parquet

        run.report(phase="writing parquet")
        summary.parquet = csv_to_parquet(job.csv_path, job.parquet)
    run.report(phase="finished", message=summary.line())
    return summary


def _single_preset(job: BatchJob, plan: Plan) -> str:
    """The one intensity preset of this cohort (all shards); a cohort whose modalities need different ones is refused."""
    from ..volumes.intensity import resolve_preset

    s = job.settings
    presets: dict[str, set[str]] = {}
    for modality in plan.modalities:
        modality = modality or None
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


def _resume_without_model(run: RunState, plan: Plan, preset: str, previous: dict | None, summary: BatchSummary) -> bool:
    """When a rerun finds every series of its shard in the table: check what can be checked, record, and say so.

    Only for a table this job wrote (its record is there, the same model name,
    no worker parts waiting to be merged, no torn last line); otherwise the
    model is loaded and the usual checks run.
    """
    from ..embeddings.stream import effective_header, index_table
    from ..encoding.pipeline import check_known_settings
    from ..names import recorded_model_name
    from .job import workers_dir_for

    job = run.job
    path = job.csv_path
    old = (previous or {}).get("settings")
    if not old or not path.is_file() or workers_dir_for(path).exists():
        return False
    if old.get("encoder") != recorded_model_name(job.settings.model):
        return False
    index = index_table(path, allow_torn_tail=True)
    n_features = int(previous.get("n_features") or 0)
    planned = {p.id for p in plan.series}
    # A table from before an added setting lacks its column: the header it will keep is its own.
    if index.torn_tail or index.header != effective_header(path, header_for_job(n_features)) or not planned <= set(index.ids):
        return False
    if index.settings is not None:
        check_known_settings(index.settings, job.settings, f"{path} (existing rows) vs this run", preset)
    summary.skipped = len(plan.series)
    summary.foreign_rows = len(set(index.ids) - planned)
    summary.resumed_without_model = True
    write_record(job, plan, old, n_features, status="running", summary=summary)
    init_errors(job.errors_path)
    run.embed_start = time.perf_counter()
    run.report(phase="embedding", total=0, skipped=summary.skipped)
    return True


def _embed_planned(embedder, todo: list[PlannedSeries], *, readers: int, loader: str, cancel,
                   slices: Callable[[str, int, int], None] | None) -> Iterator[tuple[PlannedSeries, Embedding | None, str | None]]:
    """Embed planned series in order; yields (planned, embedding, error)."""
    by_id = {p.id: p for p in todo}
    refs = (p.item.ref(p.id) for p in todo)
    for ref, embedding, error in embedder.embed_many(refs, progress=slices, cancel=cancel, readers=readers, loader=loader):
        yield by_id.pop(ref.id), embedding, error


def _run_in_process(run: RunState, plan: Plan, preset: str, embedder, loader: str, summary: BatchSummary, previous) -> None:
    job = run.job
    expected, n_features = expected_settings(embedder, preset)
    check_previous_settings(previous, expected, job)
    header = header_for_job(n_features)
    merge_worker_parts(job.csv_path)
    table = StreamingAppender(job.csv_path, header, expected)
    todo = [p for p in plan.series if p.id not in table.ids]
    summary.skipped = len(plan.series) - len(todo)
    summary.foreign_rows = len(table.ids - {p.id for p in plan.series})
    write_record(job, plan, expected, n_features, status="running", summary=summary)
    init_errors(job.errors_path)
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


# ---------------------------------------------------------------------------
# The record beside each output


# ---------------------------------------------------------------------------
# Merging shards


__all__ = ["run_batch", "resolve_devices"]
