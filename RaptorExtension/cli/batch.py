"""``raptor batch`` (a cohort to one CSV) and ``raptor merge`` (shards to one CSV).

Examples::

    raptor batch --dicom-db ~/Documents/SlicerDICOMDatabase --modality CT --min-slices 40 --csv cohort.csv
    raptor batch --folder /data/scans --csv cohort.csv --anonymize          # salt from RAPTOR_ANON_SALT
    raptor batch --manifest scans.csv --csv part$SLURM_ARRAY_TASK_ID.csv --shard $SLURM_ARRAY_TASK_ID/8
    raptor batch --dicomweb https://pacs/dicom-web --dicomweb-user me --dicomweb-password-file ~/.pacs \
        --modality CT --study-date 20240101-20241231 --csv cohort.csv
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
    from .options import add_dicomweb_credentials, add_embedding_options, add_server_options, non_negative_int

    p = sub.add_parser(
        "batch",
        help="embed a cohort (DICOM database, folder tree, manifest, DICOMweb server) into one CSV; resumable and shardable",
        description="Embed every series of a cohort into one CSV row each. Rerun the same command to resume.",
    )
    src = p.add_argument_group("sources (any mix, each repeatable)")
    src.add_argument("--dicom-db", action="append", default=[], metavar="FOLDER",
                     help="a Slicer DICOM database folder (holding ctkDICOM.sql), read-only")
    src.add_argument("--folder", action="append", default=[], metavar="DIR",
                     help="a folder tree of DICOM files (grouped by SeriesInstanceUID), NIfTI, NRRD or MetaImage files")
    src.add_argument("--manifest", action="append", default=[], metavar="CSV",
                     help="a CSV with a 'path' column (files or one-series DICOM folders) and optional 'id', 'modality', ... columns")
    src.add_argument("--dicomweb", action="append", default=[], metavar="URL",
                     help="a DICOMweb server's root, e.g. https://pacs/dicom-web: QIDO-RS lists its series, WADO-RS retrieves them")
    flt = p.add_argument_group("filters")
    flt.add_argument("--modality", default="", help="comma-separated DICOM modalities to keep, e.g. CT or CT,MR (default: all image series)")
    flt.add_argument("--min-slices", type=non_negative_int, default=0, help="skip series with fewer slices (files)")
    flt.add_argument("--series-description", default=None, metavar="REGEX",
                     help="keep series whose description matches this regular expression (case-insensitive search)")
    flt.add_argument("--study-uid", action="append", default=[], metavar="UID",
                     help="keep only these studies (repeatable or comma-separated; sent to a DICOMweb server as a query)")
    flt.add_argument("--series-uid", action="append", default=[], metavar="UID",
                     help="keep only these series (repeatable or comma-separated)")
    flt.add_argument("--study-date", default=None, metavar="FROM-TO",
                     help="keep studies dated in this range, YYYYMMDD-YYYYMMDD (either end may be left open, e.g. 20240101-)")
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
    add_dicomweb_credentials(p)
    add_server_options(p)
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
    from .options import dicomweb_access, settings_from_args

    if not (args.dicom_db or args.folder or args.manifest or args.dicomweb):
        raise RaptorError("give at least one source: --dicom-db FOLDER, --folder DIR, --manifest CSV or --dicomweb URL")
    if args.salt is not None and not args.anonymize:
        raise RaptorError("--salt is only used with --anonymize")
    if args.keep_descriptions and not args.anonymize:
        raise RaptorError("--keep-descriptions is only used with --anonymize (descriptions are kept otherwise)")
    if args.parquet:
        from ..embeddings.parquet import require_pyarrow

        require_pyarrow()
    date_from, date_to = _date_range(args.study_date)
    filters = SeriesFilter(
        modalities=tuple(m for m in args.modality.split(",") if m.strip()),
        min_slices=args.min_slices,
        description=args.series_description,
        study_uids=_listed(args.study_uid),
        series_uids=_listed(args.series_uid),
        date_from=date_from,
        date_to=date_to,
    )
    dicomweb = [dicomweb_access(args, url) for url in args.dicomweb]
    return BatchJob(
        csv=args.csv,
        sources=BatchSources(folders=list(args.folder), manifests=list(args.manifest), dicom_databases=list(args.dicom_db),
                             dicomweb=dicomweb),
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


def _listed(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def _date_range(text: str | None) -> tuple[str, str]:
    """``FROM-TO``, ``FROM-``, ``-TO`` or one ``DATE`` -> (from, to), as YYYYMMDD strings."""
    if not text:
        return "", ""
    text = text.strip()
    if "-" in text:
        date_from, _, date_to = text.partition("-")
    else:
        date_from = date_to = text
    return date_from.strip(), date_to.strip()


class ConsoleProgress:
    """Series and slice bars (rate and ETA) on a terminal; a plain line every few seconds in a log file (cluster jobs)."""

    def __init__(self, quiet: bool, interval: float | None = None, *, stream=None, clock=time.monotonic) -> None:
        from .progress import RateMeter, SliceCounter, plain_interval

        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = plain_interval() if interval is None else interval
        self.clock = clock
        self.bar = self.slice_bar = None
        self.last_line = None
        self.phase = ""
        self.meter = RateMeter(clock=clock)
        self.counter = SliceCounter()
        self.slice_volume = None

    def __call__(self, p) -> None:
        if self.quiet:
            return
        if p.message and p.phase != "finished":
            self.write(f"raptor: {p.message}")
        if p.phase != self.phase:
            self.phase = p.phase
            if p.phase == "embedding" and self.tty and p.total:
                from tqdm import tqdm

                self.bar = tqdm(total=p.total, desc="series", unit="series", file=self.stream, dynamic_ncols=True, position=0)
            elif p.phase in ("merging", "finished", "writing parquet"):
                self.close()
        if p.phase != "embedding":
            return
        if p.current and p.slices_total:
            self.meter.update(self.counter.report(p.current, p.slices_done, p.slices_total))
        slices = self.meter.describe("slices", p.slices_total - p.slices_done if p.slices_total else None)
        if self.bar is not None:
            self.bar.n = p.finished
            self.bar.set_postfix_str(f"{p.failed} failed", refresh=False)
            self.bar.refresh()
            if p.current and p.slices_total:
                self._slice_bar(p, slices)
            return
        now = self.clock()
        if self.last_line is None or now - self.last_line >= self.interval:
            self.last_line = now
            eta = p.eta_seconds
            eta_text = f", ETA {_duration(eta)}" if eta is not None else ""
            current = f"; {p.current}: {p.slices_done}/{p.slices_total} slices, {slices}" if p.current and p.slices_total else ""
            self.write(f"raptor: {p.finished}/{p.total} series ({p.failed} failed), {p.volumes_per_second:.2f} volumes/s"
                       f"{eta_text}{current}")

    def _slice_bar(self, p, described: str) -> None:
        from tqdm import tqdm

        if self.slice_volume != p.current:
            if self.slice_bar is not None:
                self.slice_bar.close()
            self.slice_bar = tqdm(total=p.slices_total, desc=f"{p.current[:24]:24s}", position=1, leave=False,
                                  file=self.stream, dynamic_ncols=True,
                                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} slices{postfix}")
            self.slice_volume = p.current
        self.slice_bar.n = p.slices_done
        self.slice_bar.set_postfix_str(described, refresh=False)
        self.slice_bar.refresh()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in (self.slice_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.slice_bar = None
        self.slice_volume = None


def _duration(seconds: float) -> str:
    from .progress import duration

    return duration(seconds)


def run_batch_command(args: argparse.Namespace) -> int:
    from ..cohort.plan import plan_job
    from ..cohort.run import run_batch

    job = job_from_args(args)
    if args.server:
        if args.dry_run:
            raise RaptorError("--dry-run lists the cohort on this computer; run it without --server")
        return _batch_on_server(args, job)
    if args.dry_run:
        return _dry_run(job, plan_job(job))
    console = ConsoleProgress(args.quiet)
    try:
        summary = run_batch(job, progress=console)
    finally:
        console.close()
    return _report(summary)


def _report(summary) -> int:
    print(f"raptor: {summary.line()} -> {summary.csv}")
    for _where, reason in summary.failed_sources:
        print(f"raptor: error: {reason}", file=sys.stderr)
    if summary.cancelled:
        print("raptor: cancelled; the rows written are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if summary.foreign_rows:
        print(f"raptor: note: {summary.foreign_rows} rows of {summary.csv} are not in this run's cohort (kept)", file=sys.stderr)
    if summary.failed:
        print(f"raptor: {summary.failed} series failed, listed with the reason in {summary.errors_csv}", file=sys.stderr)
        return 1
    return 1 if summary.failed_sources else 0


def _batch_on_server(args: argparse.Namespace, job) -> int:
    """The same batch on a Raptor server: every path names the server's disk (under its --allow-root)."""
    from types import SimpleNamespace

    from ..cohort.job import BatchProgress
    from ..server.client import finished_or_raise
    from ..server.remote import server_settings
    from .options import client_from_args

    def absolute(path: str) -> str:
        if not os.path.isabs(path):
            raise RaptorError(f"{path}: with --server, give paths as the server sees them, from the root (/...)")
        return path

    if job.sources.dicomweb:
        raise RaptorError("--dicomweb with --server is not supported yet: run raptor batch --dicomweb on the server itself")
    client = client_from_args(args)
    client.health()
    request = {
        "kind": "batch",
        "settings": server_settings(job.settings),
        "sources": {"folders": [absolute(f) for f in job.sources.folders],
                    "manifests": [absolute(m) for m in job.sources.manifests],
                    "dicom_databases": [absolute(d) for d in job.sources.dicom_databases]},
        "filters": {"modalities": list(job.filters.modalities), "min_slices": job.filters.min_slices,
                    "description": job.filters.description},
        "csv": absolute(str(job.csv)),
        "errors_csv": absolute(str(job.errors_csv)) if job.errors_csv else None,
        "parquet": absolute(str(job.parquet)) if job.parquet else None,
        "shard": list(job.shard),
        "anonymize_salt": job.anonymizer.salt if job.anonymizer else None,
        "keep_descriptions": job.keep_descriptions,
        "readers": job.readers,
    }
    submitted = client.submit(request)
    console = ConsoleProgress(args.quiet)
    started = time.monotonic()

    def show(snapshot: dict) -> None:
        extra = snapshot.get("extra", {})
        failed = int(extra.get("failed", 0))
        console(BatchProgress(
            phase=snapshot["stage"], total=snapshot["total"], done=max(0, snapshot["done"] - failed), failed=failed,
            skipped=int(extra.get("skipped", 0)), current=str(extra.get("current", "")),
            slices_done=int(extra.get("slices_done", 0)), slices_total=int(extra.get("slices_total", 0)),
            elapsed=time.monotonic() - started, message=None,
        ))

    try:
        snapshot = client.wait(submitted["id"], progress=show, interval=1.0)
    finally:
        console.close()
    finished_or_raise(snapshot, "batch") if snapshot["state"] == "failed" else None
    result = snapshot["result"] or {}
    summary = SimpleNamespace(
        line=lambda: result.get("summary", "cancelled"), csv=result.get("csv", job.csv),
        cancelled=snapshot["state"] == "cancelled" or bool(result.get("cancelled")), foreign_rows=0,
        failed=int(result.get("failed", 0)), errors_csv=result.get("errors_csv", ""), failed_sources=[],
    )
    return _report(summary)


def _dry_run(job, plan) -> int:
    index, count = plan.shard
    shard = f" (shard {index}/{count} of a cohort of {len(plan.cohort_ids)})" if count > 1 else ""
    print(f"raptor: {len(plan.series)} series to embed{shard}; {len(plan.excluded)} left out by filters; "
          f"{len(plan.unusable_files)} files not usable")
    for _where, reason in plan.failed_sources:
        print(f"raptor: error: {reason}", file=sys.stderr)
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
    parts = f"{summary.parts} part" + ("s" if summary.parts != 1 else "")
    print(f"raptor: merged {parts}: {summary.rows} series -> {summary.output}")
    if summary.failed:
        print(f"raptor: {summary.failed} series failed in the shards, listed in {summary.errors_csv}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "run_batch_command", "run_merge_command", "job_from_args"]
