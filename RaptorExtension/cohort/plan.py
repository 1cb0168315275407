"""Planning a batch: discover the series, filter them, give each a stable id, keep this shard's.

No voxel is read here: headers and database rows only.  A shard is a hash of
the id, so adding series to a cohort never moves the old ones to another
shard.  Also here: the identifying columns of each series' row, anonymized
when the job says so.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..embeddings.csv_format import META_COLUMNS, feature_columns
from ..embeddings.embedding import Embedding
from ..errors import Cancelled, RaptorError
from .job import BATCH_COLUMNS, BatchJob, BatchProgress, ProgressCallback
from .sources import (
    Discovery,
    SeriesItem,
    assign_ids,
    discover_folder,
    fill_headers,
    read_manifest,
    shard_of,
)


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
    failed_sources: list[tuple[str, str]] = field(default_factory=list)
    """(where, reason) for each source that could not be listed (a PACS that refused or was unreachable)."""
    modalities: list[str] = field(default_factory=list)
    """Every shard's series' modalities ('' when unknown), one per series: the intensity preset is the cohort's,
    so each shard (an empty one too) records the same settings and the parts merge."""

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
            if outside(item):
                excluded.append((item, "its files lie outside the folders this server may read"))
                continue
            if fill and (filters.needs_headers or needs_modality):
                fill_headers(item)
            reason = filters.exclusion(item)
            if reason:
                excluded.append((item, reason))
            else:
                found.items.append(item)

    roots = [Path(r).resolve() for r in job.read_roots] if job.read_roots is not None else None

    def outside(item: SeriesItem) -> bool:
        if roots is None or item.kind == "dicomweb":
            return False
        for path in item.paths:
            resolved = Path(path).resolve()
            if not any(resolved == root or root in resolved.parents for root in roots):
                return True
        return False

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
        excluded.extend(left_out)
        keep(part.items, fill=False)
        part.items = []
        found.extend(part)
    keep(list(job.sources.items), fill=True)
    for access in job.sources.dicomweb:
        from .dicomweb import discover_dicomweb

        if progress:
            progress(BatchProgress("discovering", message=f"listing DICOMweb {access.url}"))
        try:
            part, left_out = discover_dicomweb(access, filters, cancel=cancel)
        except Cancelled:
            raise
        except RaptorError as exc:  # one line; the other sources still run (and a rerun retries this one)
            found.failed_sources.append((access.url, str(exc)))
            continue
        found.extend(part)
        excluded.extend(left_out)
    if found.failed_sources and not found.items and len(found.failed_sources) == _source_count(job):
        raise RaptorError(found.failed_sources[0][1])
    # The same series reached twice (a folder and a database holding the same files) is embedded once.
    unique: dict[str, SeriesItem] = {}
    for item in found.items:
        unique.setdefault(item.key, item)
    found.items = list(unique.values())
    return found, excluded


def _source_count(job: BatchJob) -> int:
    s = job.sources
    return len(s.folders) + len(s.manifests) + len(s.dicom_databases) + len(s.dicomweb) + (1 if s.items else 0)


def _preset_needs_modality(job: BatchJob) -> bool:
    settings = job.settings
    return (getattr(settings, "preset", "auto") or "auto").lower() == "auto"


def plan_job(job: BatchJob, *, cancel=None, progress: ProgressCallback | None = None) -> Plan:
    """Discover, filter, name and shard the job's series (no voxel is read)."""
    if job.sources.empty():
        raise RaptorError("no sources: give a --folder, --manifest, --dicom-db or --dicomweb")
    index, count = job.shard
    if count < 1 or not 0 <= index < count:
        raise RaptorError(f"shard {index}/{count}: shards are numbered 0..N-1")
    found, excluded = discover(job, cancel=cancel, progress=progress)
    # Ids are paths below the folder or manifest a file was found in: never renamed by files added later.
    roots = [*job.sources.folders, *(os.path.dirname(os.path.abspath(m)) for m in job.sources.manifests)]
    raw_ids = assign_ids(found.items, roots=roots)
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
                shard=(index, count), failed_sources=found.failed_sources,
                modalities=[p.item.modality or "" for p in planned])


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
