"""Several devices: one worker process per GPU, each appending to its own part, merged at the end.

A part left by a killed run is merged at the start of the next one, so no
finished row is lost and none is copied twice.
"""

from __future__ import annotations

import os
import queue as queue_module
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..embeddings.settings import check_compatible
from ..embeddings.stream import (
    StreamingAppender,
    effective_header,
    index_table,
    iter_rows,
    repair_tail,
)
from ..errors import Cancelled, MetadataMismatch, RaptorError
from .job import BatchJob, BatchSummary, workers_dir_for
from .plan import Plan, PlannedSeries, header_for_job
from .record import init_errors, write_record
from .rows import RowWriter, RunState, expected_settings, with_device


@dataclass
class _WorkerConfig:
    settings: object
    part: str
    preset: str
    expected: dict | None
    readers: int
    loader: str
    job: BatchJob
    parent: int | None = None


def _worker_main(config: _WorkerConfig, work, results, cancel) -> None:
    """Runs in a worker process: embed what the queue hands out, append to this worker's part."""
    try:
        from ..encoding.pipeline import Embedder
        from ..volumes.prefetch import die_with_parent

        die_with_parent(parent=config.parent)  # a killed job takes its device workers (and their loaders) with it
        embedder = Embedder(config.settings)
        expected, n_features = expected_settings(embedder, config.preset)
        if config.expected is not None:
            check_compatible(config.expected, expected, f"{config.job.csv_path} (existing rows) vs this run")
        # A resumed table from before some settings existed keeps its columns; so does this part.
        header = effective_header(config.job.csv_path, header_for_job(n_features))
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


def run_workers(run: RunState, plan: Plan, preset: str, devices: list[str], loader: str, summary: BatchSummary,
                 previous) -> None:
    import multiprocessing

    job = run.job
    merge_worker_parts(job.csv_path)
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
        config = _WorkerConfig(settings=with_device(job.settings, device), part=str(parts_dir / f"worker-{n}.csv"),
                               preset=preset, expected=expected_before, readers=readers, loader=loader, job=job,
                               parent=os.getpid())
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
                    write_record(job, plan, expected, n_features, status="running", summary=summary)
                    init_errors(job.errors_path)
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
    merge_worker_parts(job.csv_path)
    if fatal:
        raise RaptorError(fatal)
    if run.cancel is not None and run.cancel.is_set():
        raise Cancelled()


def merge_worker_parts(csv_path: Path) -> int:
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
