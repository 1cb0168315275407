"""A batch job as plain data (sources, settings, filters, outputs) and what it reports.

Slicer's GUI and the command line build the same :class:`BatchJob`; the
runner (:mod:`.run`) turns it into rows and a :class:`BatchSummary`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .anonymize import Anonymizer
from .sources import SeriesFilter, SeriesItem

BATCH_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription")
"""Identifying columns between ``id`` and the embedding metadata columns."""


@dataclass
class BatchSources:
    """Where the series come from; any mix of these."""

    folders: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    dicom_databases: list[str] = field(default_factory=list)
    items: list[SeriesItem] = field(default_factory=list)
    """Series listed by the caller, e.g. from ``dicomdb.discover_slicer_database`` inside Slicer."""
    dicomweb: list = field(default_factory=list)
    """DICOMweb servers (:class:`.dicomweb.DicomWebAccess`): QIDO-RS lists their series, WADO-RS retrieves them."""

    def describe(self) -> dict:
        described = {
            "folders": [os.path.abspath(f) for f in self.folders],
            "manifests": [os.path.abspath(m) for m in self.manifests],
            "dicom_databases": [os.path.abspath(d) for d in self.dicom_databases],
            "listed_series": len(self.items),
        }
        if self.dicomweb:
            described["dicomweb"] = [access.url for access in self.dicomweb]  # never the credentials
        return described

    def empty(self) -> bool:
        return not (self.folders or self.manifests or self.dicom_databases or self.items or self.dicomweb)


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
    read_roots: Sequence[Path] | None = None
    """Folders every series' files must lie in (a server's ``--allow-root``): a manifest or a DICOM database
    that lists files elsewhere gets those series left out, unread.  None: anywhere (the command line)."""

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
    failed_sources: list[tuple[str, str]] = field(default_factory=list)  # (where, reason): a server not listed
    cancelled: bool = False
    seconds: float = 0.0
    parquet: Path | None = None
    resumed_without_model: bool = False  # every series was done already, so no model was loaded

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
        if self.failed_sources:
            extra.append(f"{len(self.failed_sources)} source{'s' if len(self.failed_sources) > 1 else ''} not listed")
        if extra:
            text += " (" + ", ".join(extra) + ")"
        if self.seconds > 0 and self.done + self.failed:
            text += f"; {self.volumes_per_second:.2f} volumes/s"
        return text
