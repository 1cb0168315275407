"""``raptor batch`` (a cohort to one CSV) and ``raptor merge`` (shards to one CSV).

Examples::

    raptor batch --dicom-db ~/Documents/SlicerDICOMDatabase --modality CT --min-slices 40 --csv cohort.csv
    raptor batch --folder /data/scans --csv cohort.csv --anonymize          # salt from RAPTOR_ANON_SALT
    raptor batch --manifest scans.csv --csv part$SLURM_ARRAY_TASK_ID.csv --shard $SLURM_ARRAY_TASK_ID/8
    raptor merge part*.csv -o cohort.csv

Rerunning the same command resumes: series already in the CSV are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import RaptorError
from ..names import device_problem


def default_readers() -> int:
    """Loader processes: most of the cores, leaving some to the process that feeds the GPU."""
    return max(1, min(8, (os.cpu_count() or 2) - 2))


def add_parser(sub) -> None:
    from ..cohort.anonymize import SALT_ENV
    from .options import add_embedding_options, non_negative_int

    p = sub.add_parser(
        "batch",
        help="embed a cohort (DICOM database, folder tree, manifest) into one CSV; resumable and shardable",
        description="Embed every series of a cohort into one CSV row each. Rerun the same command to resume.",
    )
    src = p.add_argument_group("sources (any mix, each repeatable)")
    src.add_argument("--dicom-db", action="append", default=[], metavar="FOLDER",
                     help="a Slicer DICOM database folder (holding ctkDICOM.sql), read-only")
    src.add_argument("--folder", action="append", default=[], metavar="DIR",
                     help="a folder tree of DICOM files (grouped by SeriesInstanceUID), NIfTI, NRRD or MetaImage files")
    src.add_argument("--manifest", action="append", default=[], metavar="CSV",
                     help="a CSV with a 'path' column (files or one-series DICOM folders) and optional 'id', 'modality', ... columns")
    flt = p.add_argument_group("filters")
    flt.add_argument("--modality", default="", help="comma-separated DICOM modalities to keep, e.g. CT or CT,MR (default: all image series)")
    flt.add_argument("--min-slices", type=non_negative_int, default=0, help="skip series with fewer slices (files)")
    flt.add_argument("--series-description", default=None, metavar="REGEX",
                     help="keep series whose description matches this regular expression (case-insensitive search)")
    out = p.add_argument_group("output")
    out.add_argument("--csv", required=True, help="the output CSV (appended to when it exists: resume)")
    out.add_argument("--errors", default=None, help="errors CSV (default: OUT_errors.csv)")
    out.add_argument("--parquet", default=None, help="also write this Parquet file at the end (needs pyarrow)")
    out.add_argument("--anonymize", action="store_true",
                     help="replace PatientID, Study/Series UIDs and ids with salted hashes; drop source paths and descriptions")
    out.add_argument("--salt", default=None, help=f"secret salt for --anonymize (default: ${SALT_ENV}); reuse it for every shard and rerun")
    out.add_argument("--keep-descriptions", action="store_true", help="with --anonymize, keep series descriptions (PatientIDs in them are masked)")
    run = p.add_argument_group("scale")
    run.add_argument("--shard", default=None, metavar="I/N", help="do only shard I of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/8); combine with raptor merge")
    run.add_argument("--gpus", default="auto",
                     help="one worker per device: auto (every visible GPU, else --device), a list of GPU indices (0,1), or devices (cuda:0,cuda:1)")
    run.add_argument("--readers", type=non_negative_int, default=None,
                     help=f"loader processes (or threads) reading the next series while the encoder works, shared by all devices (default {default_readers()} here)")
    run.add_argument("--loader", default="auto", choices=("auto", "processes", "threads"), help="how loaders run (default: processes)")
    run.add_argument("--dry-run", action="store_true",
                     help="list what would be embedded and exit (with --anonymize it prints anonymized ids beside real sources: keep that private)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_embedding_options(p)
    p.set_defaults(func=run_batch_command)

    m = sub.add_parser("merge", help="combine the CSVs of all shards of a batch into one CSV",
                       description="Combine shard CSVs, checking equal settings and that no series is missing or duplicated.")
    m.add_argument("parts", nargs="+", help="the CSV of every shard (each with its .batch.json record beside it)")
    m.add_argument("-o", "--output", required=True, help="the combined CSV")
    m.set_defaults(func=run_merge_command)


def _devices(spec: str) -> list[str] | None:
    spec = (spec or "auto").strip()
    if spec in ("auto", "all"):
        return None
    devices = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        name = f"cuda:{part}" if part.isdigit() else part
        problem = device_problem(name)
        if problem or name == "auto":
            raise RaptorError(f"--gpus {spec!r}: {problem or 'auto stands alone'}")
        devices.append(name)
    if not devices:
        raise RaptorError(f"--gpus {spec!r} names no device")
    return devices


def job_from_args(args: argparse.Namespace):
    from ..cohort.anonymize import Anonymizer
    from ..cohort.job import BatchJob, BatchSources
    from ..cohort.sources import SeriesFilter, parse_shard
    from .options import settings_from_args

    if not (args.dicom_db or args.folder or args.manifest):
        raise RaptorError("give at least one source: --dicom-db FOLDER, --folder DIR or --manifest CSV")
    if args.salt is not None and not args.anonymize:
        raise RaptorError("--salt is only used with --anonymize")
    if args.keep_descriptions and not args.anonymize:
        raise RaptorError("--keep-descriptions is only used with --anonymize (descriptions are kept otherwise)")
    if args.parquet:
        from ..embeddings.parquet import require_pyarrow

        require_pyarrow()
    filters = SeriesFilter(
        modalities=tuple(m for m in args.modality.split(",") if m.strip()),
        min_slices=args.min_slices,
        description=args.series_description,
    )
    return BatchJob(
        csv=args.csv,
        sources=BatchSources(folders=list(args.folder), manifests=list(args.manifest), dicom_databases=list(args.dicom_db)),
        settings=settings_from_args(args),
        filters=filters,
        shard=parse_shard(args.shard) if args.shard else (0, 1),
        devices=_devices(args.gpus),
        readers=default_readers() if args.readers is None else args.readers,
        loader=args.loader,
        anonymizer=Anonymizer.from_options(args.salt) if args.anonymize else None,
        keep_descriptions=args.keep_descriptions,
        errors_csv=args.errors,
        parquet=args.parquet,
    )


class ConsoleProgress:
    """tqdm bars on a terminal; a plain line every ``interval`` seconds in a log file (cluster jobs)."""

    def __init__(self, quiet: bool, interval: float = 30.0) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.interval = interval
        self.bar = None
        self.last_line = 0.0
        self.phase = ""

    def __call__(self, p) -> None:
        if self.quiet:
            return
        if p.message and p.phase != "finished":
            self.write(f"raptor: {p.message}")
        if p.phase != self.phase:
            self.phase = p.phase
            if p.phase == "embedding" and self.tty and p.total:
                from tqdm import tqdm

                self.bar = tqdm(total=p.total, desc="series", unit="series", file=sys.stderr, dynamic_ncols=True)
            elif p.phase in ("merging", "finished", "writing parquet"):
                self.close()
        if p.phase != "embedding":
            return
        if self.bar is not None:
            self.bar.n = p.finished
            self.bar.set_postfix_str(f"{p.current[:20]} {p.slices_done}/{p.slices_total} slices, {p.failed} failed", refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            eta = p.eta_seconds
            eta_text = f", ETA {_duration(eta)}" if eta is not None else ""
            self.write(f"raptor: {p.finished}/{p.total} series ({p.failed} failed), {p.volumes_per_second:.2f} volumes/s{eta_text}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def run_batch_command(args: argparse.Namespace) -> int:
    from ..cohort.plan import plan_job
    from ..cohort.run import run_batch

    job = job_from_args(args)
    if args.dry_run:
        return _dry_run(job, plan_job(job))
    console = ConsoleProgress(args.quiet)
    try:
        summary = run_batch(job, progress=console)
    finally:
        console.close()
    print(f"raptor: {summary.line()} -> {summary.csv}")
    if summary.cancelled:
        print("raptor: cancelled; the rows written are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if summary.foreign_rows:
        print(f"raptor: note: {summary.foreign_rows} rows of {summary.csv} are not in this run's cohort (kept)", file=sys.stderr)
    if summary.failed:
        print(f"raptor: {summary.failed} series failed, listed with the reason in {summary.errors_csv}", file=sys.stderr)
        return 1
    return 0


def _dry_run(job, plan) -> int:
    index, count = plan.shard
    shard = f" (shard {index}/{count} of a cohort of {len(plan.cohort_ids)})" if count > 1 else ""
    print(f"raptor: {len(plan.series)} series to embed{shard}; {len(plan.excluded)} left out by filters; "
          f"{len(plan.unusable_files)} files not usable")
    for item, reason in plan.excluded[:20]:
        shown = "(anonymized)" if job.anonymizer else item.source
        print(f"  left out: {shown}: {reason}")
    for planned in plan.series:
        item = planned.item
        slices = "?" if item.n_slices is None else str(item.n_slices)
        print(f"{planned.id}\t{item.modality or '?'}\t{slices} slices\t{item.description}\t{item.source}")
    return 0


def run_merge_command(args: argparse.Namespace) -> int:
    from ..cohort.merge import merge_parts

    summary = merge_parts(args.parts, args.output)
    print(f"raptor: merged {summary.parts} parts: {summary.rows} series -> {summary.output}")
    if summary.failed:
        print(f"raptor: {summary.failed} series failed in the shards, listed in {summary.errors_csv}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "run_batch_command", "run_merge_command", "job_from_args"]
