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
from ..embeddings.embedding import METADATA_SCHEMA
from ..embeddings.settings import SETTINGS_KEYS, check_compatible, settings_hash
from ..errors import InputError, RaptorError
from ..fields import BOOL, DICT, INT, LIST, NULLABLE, SCHEMA, STR, check_fields, is_int
from ..version import __version__
from .errorlog import COLUMNS as ERROR_COLUMNS
from .job import BatchJob, BatchSummary, errors_path_for
from .plan import Plan

RECORD_FORMAT = "raptor-batch"


RECORD_VERSION = 1


def init_errors(path: Path) -> None:
    """Each run lists its own failures (failed series are retried on a rerun)."""
    atomic_write_text(path, ",".join(ERROR_COLUMNS) + "\n")


def _plain_name(value) -> str | None:
    """A file name beside the record, never a path (a record must not point a merge elsewhere)."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value or ":" in value:
        return "must be a plain file name beside the record"
    return None


def _shard(value) -> str | None:
    if LIST(INT(0), min_len=2, max_len=2)(value) or value[1] < 1 or value[0] >= value[1]:
        return "must be [I, N] with 0 <= I < N"
    return None


RECORD_SCHEMA = {
    "format": STR,
    "format_version": INT(0),
    "software": STR,
    "status": STR,
    "csv": _plain_name,
    "errors_csv": NULLABLE(_plain_name),
    "shard": _shard,
    "cohort_size": INT(0),
    "cohort_sha256": STR,
    "settings": SCHEMA({k: NULLABLE(METADATA_SCHEMA[k]) for k in (*SETTINGS_KEYS, "encoder")}),
    "settings_hash": STR,
    "n_features": INT(1),
    "anonymized": BOOL,
    "salt_check": NULLABLE(STR),
    "filters": DICT(),
    "sources": NULLABLE(DICT()),
    "counts": DICT(INT(0)),
    "updated": STR,
    "assigned": LIST(STR),
    "merged_from": LIST(STR),
}
"""The type of every field of a batch record that a resume or a merge uses."""
RECORD_REQUIRED = ("format", "format_version", "shard", "settings", "cohort_sha256", "assigned")


def read_record(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: batch record is not readable JSON ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise InputError(f"{path}: not a Raptor batch record")
    if is_int(record.get("format_version")) and record["format_version"] > RECORD_VERSION:
        raise InputError(f"{path}: written by a newer Raptor; upgrade to resume this job")
    return check_fields(record, RECORD_SCHEMA, str(path), required=RECORD_REQUIRED, what="batch record")


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
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable errors CSV ({type(exc).__name__})") from None
    return [r for r in rows[1:] if r and len(r) == len(ERROR_COLUMNS)]
