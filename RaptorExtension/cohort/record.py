"""The record beside each batch output (``OUT.batch.json``): settings, shard, the ids it must hold.

A rerun checks it (same shard, same anonymization and salt, same settings),
and :func:`.merge.merge_parts` uses it to prove that the shards add up to the
planned cohort.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..embeddings.settings import check_compatible, settings_hash
from ..errors import InputError, RaptorError
from ..version import __version__
from .errorlog import COLUMNS as ERROR_COLUMNS
from .job import BatchJob, BatchSummary, errors_path_for
from .plan import Plan

RECORD_FORMAT = "raptor-batch"


RECORD_VERSION = 1


def init_errors(path: Path) -> None:
    """Each run lists its own failures (failed series are retried on a rerun)."""
    atomic_write_text(path, ",".join(ERROR_COLUMNS) + "\n")


def read_record(path: Path) -> dict | None:
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


def check_record(previous: dict | None, job: BatchJob, plan: Plan) -> None:
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


def check_previous_settings(previous: dict | None, expected: dict, job: BatchJob) -> None:
    if previous and previous.get("settings"):
        check_compatible(previous["settings"], expected, f"{job.csv_path} (earlier run) vs this run")


def write_record(job: BatchJob, plan: Plan, expected: dict, n_features: int, *, status: str, summary: BatchSummary) -> None:
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


def finish_record(job: BatchJob, summary: BatchSummary) -> None:
    record = read_record(job.record_path)
    if not record:
        return
    record["status"] = "cancelled" if summary.cancelled else "complete"
    record["counts"] = _counts(summary)
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(job.record_path, json.dumps(record, indent=1) + "\n")


def errors_path_for_record(part: Path, record: dict) -> Path:
    name = record.get("errors_csv")
    return part.with_name(name) if name else errors_path_for(part)


def read_errors(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    return [r for r in rows[1:] if r and len(r) == len(ERROR_COLUMNS)]
