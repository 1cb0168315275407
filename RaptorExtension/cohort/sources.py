"""Find the series of a cohort: DICOM folder trees, volume files and manifest CSVs.

Discovery reads headers only (``pydicom`` with ``stop_before_pixels``), so a
cohort is listed, filtered and split into shards before a single voxel is
decoded.  Every series becomes a :class:`SeriesItem`: plain, picklable data
(paths, UIDs, modality, slice count) that a job can sort, filter, shard, send
to worker processes and, only then, load with :func:`load_item` through the
engine's Slicer readers.

The same item type comes out of a Slicer DICOM database (:mod:`.dicomdb`), so
filtering and the rows written for each series are the same whatever the
source.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, RaptorError
from ..volumes.dicom import (
    DicomSeries,
    dicom_folder_series,
    dicom_folder_uid,
    is_dicom_file,
    read_dicom_series,
    scan_dicom_files,
)
from ..volumes.headers import _header_shape
from ..volumes.readers import expand_input
from ..volumes.volume import (
    SLICER_VOLUME_SUFFIXES,
    Volume,
    VolumeRef,
    volume_id_from_path,
)

NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC", "FID", "OT-SR", "AU", "ECG", "PLAN"}
)
"""DICOM modalities that never hold a volume; skipped unless asked for by name."""

MANIFEST_PATH_COLUMNS = ("path", "source", "file")
MANIFEST_FIELD_COLUMNS = {
    "id": "user_id",
    "patientid": "patient_id",
    "studyinstanceuid": "study_uid",
    "seriesinstanceuid": "series_uid",
    "modality": "modality",
    "seriesdescription": "description",
}


@dataclass
class SeriesItem:
    """One series (or volume file) of a cohort, before anything is read.

    ``kind`` says how :func:`load_item` reads it:

    ``dicom``  ``paths`` are the slice files of one series; ``sorted_files``
               says whether they are already in slice order (a header scan
               did it) or must be sorted from their headers at load time (a
               database lists files, not positions).
    ``path``   ``paths[0]`` is anything ``raptor embed`` reads: a NRRD, NIfTI
               or MetaImage file, a one-series DICOM folder, ``.npy``.
    ``dicomweb`` a series on a DICOMweb server (``url``); ``access`` (a
               :class:`.dicomweb.DicomWebAccess`, credentials included, never
               shown in a repr) retrieves its instances when it is loaded.
    """

    key: str
    kind: str
    paths: list[str]
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    description: str = ""
    n_slices: int | None = None
    sorted_files: bool = False
    mixed_geometry: str = ""
    user_id: str = ""
    info: dict = field(default_factory=dict)
    url: str = ""
    """The DICOMweb root a ``dicomweb`` item comes from."""
    access: object = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> str:
        """Where the series lives: the folder(s) holding its files, the file itself, or its DICOMweb URL."""
        if self.kind == "dicomweb":
            return f"{self.url}/studies/{self.study_uid}/series/{self.series_uid}"
        if self.kind == "dicom":
            return "|".join(dict.fromkeys(os.path.dirname(p) for p in self.paths)) or self.key
        return self.paths[0] if self.paths else self.key

    def ref(self, id: str) -> VolumeRef:
        """A lazily loading reference; picklable, so a loader process can read it."""
        return VolumeRef(id=id, source=self.source, loader=functools.partial(load_item, self, id))


# ---------------------------------------------------------------------------
# Loading


def load_item(item: SeriesItem, id: str) -> Volume:
    """Read one item with the engine's Slicer readers (runs in a loader thread or process)."""
    source = item.source
    if item.kind == "dicom":
        series = _dicom_series_for(item)
        volume = read_dicom_series(series, source, id=id)
    elif item.kind == "path":
        refs = expand_input(item.paths[0])
        if len(refs) != 1:
            raise InputError(f"{item.paths[0]}: holds {len(refs)} volumes; list each one in the manifest")
        volume = refs[0].load()
    elif item.kind == "dicomweb":
        volume = item.access.load_series(item, id)  # .dicomweb.DicomWebAccess (no import: dicomweb builds items)
    else:  # pragma: no cover - items are built by this module
        raise InputError(f"{source}: unknown series kind {item.kind!r}")
    volume.id = id
    if not volume.modality and item.modality:
        volume.modality = item.modality
    return volume


def _dicom_series_for(item: SeriesItem) -> DicomSeries:
    if item.sorted_files:
        info = {"PatientID": item.patient_id, "StudyInstanceUID": item.study_uid,
                "SeriesInstanceUID": item.series_uid, "SeriesDescription": item.description,
                "mixed_geometry": item.mixed_geometry}
        info.update({k: v for k, v in item.info.items() if k not in info})
        return DicomSeries(files=list(item.paths), modality=item.modality or None, info=info)
    missing = [p for p in item.paths if not os.path.isfile(p)]
    if missing:
        raise InputError(
            f"{item.source}: {len(missing)} of {len(item.paths)} files of series {item.series_uid or item.key} "
            f"are missing on disk (first: {missing[0]})"
        )
    series, skipped = scan_dicom_files(Path(p) for p in item.paths)
    if item.series_uid:
        series = [s for s in series if s.uid == item.series_uid] or series
    if not series:
        reason = skipped[0][1] if skipped else "no image slices"
        raise InputError(f"{item.source}: series {item.series_uid or item.key} holds no readable DICOM image ({reason})")
    if len(series) > 1:
        raise InputError(f"{item.source}: the files of series {item.series_uid or item.key} hold {len(series)} series")
    return series[0]


# ---------------------------------------------------------------------------
# Filters


@dataclass
class SeriesFilter:
    """Which series to embed: by modality, minimum slice count, description pattern, UIDs, study date.

    Every source applies them to what it lists; a DICOMweb source also sends
    the UIDs, the date range and a single modality to the server (QIDO-RS),
    so a large PACS is never listed whole.  Dates are ``YYYYMMDD``; a series
    whose study date is unknown is left out when a date range is given.
    """

    modalities: tuple[str, ...] = ()
    min_slices: int = 0
    description: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    date_from: str = ""
    date_to: str = ""

    def __post_init__(self) -> None:
        self.modalities = tuple(m.strip().upper() for m in self.modalities if m.strip())
        self.study_uids = tuple(u.strip() for u in self.study_uids if u.strip())
        self.series_uids = tuple(u.strip() for u in self.series_uids if u.strip())
        for name in ("date_from", "date_to"):
            value = (getattr(self, name) or "").strip()
            if value and not re.fullmatch(r"\d{8}", value):
                raise RaptorError(f"study dates are YYYYMMDD (got {value!r})")
            setattr(self, name, value)
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise RaptorError(f"study date range {self.date_from}-{self.date_to} ends before it starts")
        if self.min_slices < 0:
            raise RaptorError(f"minimum slice count must be 0 or more (got {self.min_slices})")
        self._pattern = None
        if self.description:
            try:
                self._pattern = re.compile(self.description, re.IGNORECASE)
            except re.error as exc:
                raise RaptorError(f"series-description pattern {self.description!r} is not a valid regular expression ({exc})") from None

    @property
    def needs_headers(self) -> bool:
        return bool(self.modalities or self.min_slices or self._pattern or self.study_uids or self.series_uids
                    or self.date_from or self.date_to)

    @property
    def date_range(self) -> str:
        """The QIDO-RS range ``FROM-TO`` (either end may be empty), or ``""``."""
        return f"{self.date_from}-{self.date_to}" if (self.date_from or self.date_to) else ""

    def describe(self) -> dict:
        described = {"modalities": list(self.modalities), "min_slices": self.min_slices, "description": self.description}
        if self.study_uids or self.series_uids or self.date_range:
            described.update(study_uids=list(self.study_uids), series_uids=list(self.series_uids), study_date=self.date_range)
        return described

    def exclusion(self, item: SeriesItem) -> str | None:
        """Why ``item`` is left out, or None to keep it."""
        modality = (item.modality or "").upper()
        if self.modalities:
            if not modality:
                return f"modality unknown, not one of {','.join(self.modalities)}"
            if modality not in self.modalities:
                return f"modality {modality} not one of {','.join(self.modalities)}"
        elif modality in NON_IMAGE_MODALITIES:
            return f"modality {modality} holds no image volume"
        if self.min_slices and item.n_slices is not None and item.n_slices < self.min_slices:
            return f"{item.n_slices} slices, fewer than {self.min_slices}"
        if self._pattern is not None and not self._pattern.search(item.description or ""):
            return f"series description {item.description!r} does not match {self.description!r}"
        if self.study_uids and item.study_uid not in self.study_uids:
            return "study not among the requested study UIDs"
        if self.series_uids and item.series_uid not in self.series_uids:
            return "series not among the requested series UIDs"
        if self.date_range:
            date = str(item.info.get("StudyDate", "") or "")[:8]
            if not date:
                return f"study date unknown, not in {self.date_range}"
            if (self.date_from and date < self.date_from) or (self.date_to and date > self.date_to):
                return f"study date {date} not in {self.date_range}"
        return None


# ---------------------------------------------------------------------------
# Discovery results


@dataclass
class Discovery:
    """What a source holds: the items, files that were not usable, and sources that could not be listed."""

    items: list[SeriesItem] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    failed_sources: list[tuple[str, str]] = field(default_factory=list)
    """(where, reason) for a server that refused or could not be reached: the other sources still run."""

    def extend(self, other: "Discovery") -> None:
        self.items.extend(other.items)
        self.skipped_files.extend(other.skipped_files)
        self.failed_sources.extend(other.failed_sources)


def _series_item(series: DicomSeries) -> SeriesItem:
    info = series.info
    return SeriesItem(
        key=series.uid or series.files[0],
        kind="dicom",
        paths=list(series.files),
        patient_id=info.get("PatientID", ""),
        study_uid=info.get("StudyInstanceUID", ""),
        series_uid=series.uid,
        modality=series.modality or "",
        description=info.get("SeriesDescription", ""),
        n_slices=len(series.files),
        sorted_files=True,
        mixed_geometry=info.get("mixed_geometry", ""),
        info={k: v for k, v in info.items() if k in ("StudyDate", "Manufacturer") and v},
    )


def _file_item(path: Path) -> SeriesItem:
    shape = _header_shape(path)
    return SeriesItem(
        key=os.path.abspath(path),
        kind="path",
        paths=[os.path.abspath(path)],
        n_slices=int(shape[2]) if shape and len(shape) >= 3 else None,
    )


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(SLICER_VOLUME_SUFFIXES)


# ---------------------------------------------------------------------------
# Folder trees


def discover_folder(
    root: str | Path,
    *,
    cancel=None,
    progress: Callable[[int, int], None] | None = None,
) -> Discovery:
    """Every series under ``root``: DICOM files grouped by SeriesInstanceUID, plus volume files.

    Headers are scanned one folder at a time, so memory holds one folder's
    headers, not the tree's; the rare series spread over several folders is
    regrouped afterwards.  Hidden files and folders are ignored, as are files
    that are neither DICOM nor a volume format (``.raw`` beside ``.mhd``,
    licences, spreadsheets).  ``progress(folders_done, folders_total)``.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: is not a folder (use --manifest for a list of files)")
    folders: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(f for f in filenames if not f.startswith("."))
        if names:
            folders.append((dirpath, names))
    found = Discovery()
    by_uid: dict[str, list[DicomSeries]] = {}
    for n, (dirpath, names) in enumerate(folders):
        if cancel is not None and cancel.is_set():
            from ..errors import Cancelled

            raise Cancelled()
        candidates = []
        for name in names:
            path = Path(dirpath) / name
            if _is_volume_file(name):
                found.items.append(_file_item(path))
            elif name.lower().endswith(".dcm") or is_dicom_file(path):
                candidates.append(path)
        if candidates:
            series, skipped = scan_dicom_files(candidates)
            found.skipped_files.extend(skipped)
            for s in series:
                by_uid.setdefault(s.uid, []).append(s)
        if progress is not None:
            progress(n + 1, len(folders))
    for uid, parts in by_uid.items():
        if len(parts) == 1:
            found.items.append(_series_item(parts[0]))
            continue
        merged, skipped = scan_dicom_files(Path(f) for part in parts for f in part.files)
        found.skipped_files.extend(skipped)
        found.items.extend(_series_item(s) for s in merged)
    return found


# ---------------------------------------------------------------------------
# Manifest CSV


def read_manifest(path: str | Path) -> Discovery:
    """Items listed in a CSV with a ``path`` column and optional ``id`` and DICOM columns.

    Relative paths are relative to the manifest's folder.  Other columns
    (labels, notes) are ignored.  A path may be a volume file or a folder with
    one DICOM series; whether it exists is checked when it is loaded, so one
    bad line is logged as a failure and the rest are embedded.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV manifest ({type(exc).__name__})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise InputError(f"{path}: manifest is empty")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    path_col = next((lower.index(c) for c in MANIFEST_PATH_COLUMNS if c in lower), None)
    if path_col is None:
        raise InputError(f"{path}: manifest has no 'path' column (columns: {', '.join(header) or 'none'})")
    fields = {i: MANIFEST_FIELD_COLUMNS[h] for i, h in enumerate(lower) if h in MANIFEST_FIELD_COLUMNS}
    base = path.parent
    found = Discovery()
    seen_ids: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{path}: line {line_no} has {len(row)} columns, the header {len(header)}")
        raw = row[path_col].strip()
        if not raw:
            raise InputError(f"{path}: line {line_no} has an empty path")
        target = Path(raw) if os.path.isabs(raw) else base / raw
        target_s = os.path.abspath(target)
        values = {attr: _clean(row[i]) for i, attr in fields.items()}
        user_id = values.get("user_id", "")
        if user_id:
            if user_id in seen_ids:
                raise InputError(f"{path}: id {user_id!r} on line {line_no} is already used on line {seen_ids[user_id]}")
            seen_ids[user_id] = line_no
        item = SeriesItem(key=user_id or target_s, kind="path", paths=[target_s], **values)
        item.modality = item.modality.upper()
        found.items.append(item)
    return found


def fill_headers(item: SeriesItem) -> None:
    """Read what a filter needs (modality, description, slice count) from the headers of a manifest entry.

    Only done when a filter asks for it, so a large manifest without filters
    is listed without touching the files.  Unreadable entries are left as
    they are: loading them later logs the precise reason.
    """
    if item.kind != "path":
        return
    path = Path(item.paths[0])
    try:
        if path.is_dir():
            series = dicom_folder_series(path)
            item.kind, item.paths, item.sorted_files = "dicom", list(series.files), True
            item.modality = item.modality or (series.modality or "")
            item.description = item.description or series.info.get("SeriesDescription", "")
            item.patient_id = item.patient_id or series.info.get("PatientID", "")
            item.study_uid = item.study_uid or series.info.get("StudyInstanceUID", "")
            item.series_uid = item.series_uid or series.uid
            item.mixed_geometry = series.info.get("mixed_geometry", "")
            item.n_slices = len(series.files)
            if series.info.get("StudyDate"):
                item.info.setdefault("StudyDate", series.info["StudyDate"])
        elif path.is_file() and _is_volume_file(path.name):
            shape = _header_shape(path)
            item.n_slices = int(shape[2]) if shape and len(shape) >= 3 else None
    except RaptorError:
        return


def _clean(value: str) -> str:
    """One-line text: CSV cells and DICOM strings must never break a table row."""
    return " ".join(str(value).split())


# ---------------------------------------------------------------------------
# Ids and shards


def assign_ids(items: Sequence[SeriesItem], roots: Iterable[str | Path] = ()) -> list[str]:
    """A unique id per item that depends on the item alone, never on the rest of the cohort.

    A manifest id wins; a DICOM series is its SeriesInstanceUID (the rule
    ``raptor embed`` follows too, :func:`..volumes.dicom.series_id`, so their rows
    join); anything else (a volume file, a DICOM folder without a UID) is named
    by its path below the source it was found in (``roots``: the ``--folder``
    folders and the manifests' folders; the innermost one that holds it),
    without its suffix and with ``__`` between folders: ``p1/ct.nrrd`` is
    ``p1__ct`` and a file directly in the folder keeps its name.  So adding
    files to a cohort never renames an earlier one, which would move it to
    another shard and embed it again.  Only two paths that still give the same
    id (``ct.nrrd`` beside ``ct.nii.gz``, or the same path below two source
    folders) get a short hash of their full path each.
    """
    import hashlib

    roots = sorted({os.path.abspath(r) for r in roots}, key=len, reverse=True)  # the innermost root first
    for it in items:  # a manifest's DICOM folder: its UID from one header, as raptor embed reads it
        if it.kind == "path" and not it.user_id and not it.series_uid and os.path.isdir(it.paths[0]):
            it.series_uid = dicom_folder_uid(Path(it.paths[0]))
    is_series = [it.kind in ("dicom", "dicomweb") or (it.kind == "path" and os.path.isdir(it.paths[0])) for it in items]
    fixed = [bool(it.user_id) or (series and bool(it.series_uid)) for it, series in zip(items, is_series)]
    ids = [
        it.user_id or (it.series_uid if fx else _relative_id(os.path.dirname(it.paths[0]) if it.kind == "dicom" else it.paths[0], roots))
        for it, fx in zip(items, fixed)
    ]

    def collisions() -> set[str]:
        seen: dict[str, int] = {}
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
        return {i for i, c in seen.items() if c > 1}

    clash = collisions()
    for n, item in enumerate(items):
        if ids[n] in clash and not fixed[n]:
            ids[n] = f"{ids[n]}-{hashlib.sha256(item.paths[0].encode()).hexdigest()[:8]}"
    clash = collisions()
    if clash:
        raise InputError(f"two series would get the same id {sorted(clash)[0]!r}; give them distinct ids in a manifest")
    return ids


def _relative_id(path: str, roots: list[str]) -> str:
    """``path`` below the first of ``roots`` that holds it (else the whole path), as a file-name-safe id."""
    best = os.path.abspath(path)
    for root in roots:
        if best == root:  # the source folder is the series folder itself
            return volume_id_from_path(Path(best))
        if best.startswith(root.rstrip(os.sep) + os.sep):
            best = best[len(root.rstrip(os.sep)) + 1 :]
            break
    parts = Path(best).parts
    name = volume_id_from_path(Path(parts[-1]))
    return "__".join([re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in parts[:-1]] + [name]).lstrip("_") or name


def shard_of(id: str, count: int) -> int:
    """The shard (0-based) an id belongs to: a hash, so adding series never moves old ones."""
    import hashlib

    return int.from_bytes(hashlib.sha256(id.encode("utf-8")).digest()[:8], "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), shards numbered 0..N-1 like ``--array=0-7`` array jobs."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise RaptorError(f"shard must be I/N with I in 0..N-1, e.g. 0/8 (got {text!r})")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise RaptorError(f"shard {text!r}: shards are numbered 0..N-1, so I must be below N")
    return i, n


__all__ = [
    "SeriesItem",
    "SeriesFilter",
    "Discovery",
    "discover_folder",
    "read_manifest",
    "fill_headers",
    "load_item",
    "assign_ids",
    "shard_of",
    "parse_shard",
    "NON_IMAGE_MODALITIES",
]
