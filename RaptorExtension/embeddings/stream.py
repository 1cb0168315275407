"""Embedding CSVs as a stream: index them, append to them, copy rows between them, never load them.

A cohort table is large (a default Raptor row has 76,800 features, about
1 MB of text; 100,000 series make a 100 GB CSV), so a resumed job or a merge
must never hold the features in memory the way :func:`.table.read_table`
does.  Here a table is read one line at a time and only the identifying
columns before ``e0`` are parsed; the features are counted, not converted.

Rows are the ones :mod:`.csv_format` describes (same columns, same quoting), and
appends go through :class:`TableAppender` (one ``write`` + ``fsync``
per row), so a killed job leaves at most a torn last line, which
:func:`repair_tail` removes by reading only the end of the file.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import InputError, MetadataMismatch, write_failure
from .csv_format import (
    FEATURE_RE,
    META_COLUMNS,
    csv_line,
    embedding_row,
    header_for,
    meta_value,
    missing_setting_columns,
    row_settings,
)
from .embedding import Embedding
from .settings import (
    ADDED_SETTINGS,
    REQUIRED_SETTINGS_KEYS,
    check_compatible,
    settings_of,
)

PREFIX_PARSE_BYTES = 1 << 16  # identifying columns are far shorter than this
FORMAT_CHUNK = 2048  # floats formatted per C call (about half a millisecond)


@functools.lru_cache(maxsize=4)
def _chunk_format(n: int) -> str:
    """``%.9g`` like :func:`.csv_format.embedding_row`: 9 significant digits round-trip float32 exactly."""
    return ",".join(["%.9g"] * n)



def repair_tail(path: str | Path) -> int:
    """Cut a torn last line (no final newline) left by a killed writer; returns the bytes removed.

    Reads only the end of the file, however large it is.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "r+b") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        end = size
        cut = 0
        block = 1 << 20
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            pos = chunk.rfind(b"\n")
            if pos >= 0:
                cut = start + pos + 1
                break
            end = start
        handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())
    return size - cut


@dataclass
class TableIndex:
    """The identifying part of a table: header, ids, shared settings, where each row starts."""

    path: Path
    header: list[str]
    ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    settings: dict | None = None
    torn_tail: bool = False
    prefix_columns: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_prefix(self) -> int:
        return first_feature_column(self.header, self.path)

    @property
    def n_features(self) -> int:
        return len(self.header) - self.n_prefix


def first_feature_column(header: Sequence[str], path: Path | str) -> int:
    for i, name in enumerate(header):
        if FEATURE_RE.match(name):
            features = header[i:]
            if [int(FEATURE_RE.match(h).group(1)) if FEATURE_RE.match(h) else -1 for h in features] != list(range(len(features))):
                raise InputError(f"{path}: feature columns are not e0..e{len(features) - 1} in order at the end")
            return i
    raise InputError(f"{path}: no feature columns e0..eN")


def _split_prefix(raw: bytes, header: list[str], n_prefix: int, path: Path, line_no: int) -> list[str]:
    """The fields before ``e0``, checking the row has exactly the header's number of columns."""
    expected = len(header)
    head = raw[:PREFIX_PARSE_BYTES].decode("utf-8", errors="replace")
    fields = next(csv.reader([head]), [])
    if len(fields) > n_prefix:
        prefix = fields[:n_prefix]
        written = csv_line(prefix)[:-1].encode("utf-8") + b","
        if raw.startswith(written):
            tail = raw[len(written) :].rstrip(b"\r\n")
            if tail.count(b",") + 1 + n_prefix == expected and b'"' not in tail:
                return prefix
    fields = next(csv.reader([raw.decode("utf-8", errors="replace").rstrip("\r\n")]), [])
    if len(fields) != expected:
        raise InputError(f"{path}: line {line_no} has {len(fields)} columns, the header {expected} (a torn or edited row)")
    return fields[:n_prefix]


def iter_rows(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, int, bytes, list[str]] | list[str]]:
    """Yield the header (a list), then ``(line_no, offset, raw_line, prefix_fields)`` per row."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    with handle:
        first = handle.readline()
        if not first.strip():
            raise InputError(f"{path}: empty CSV")
        if not first.endswith(b"\n"):
            raise InputError(f"{path}: the header line is torn (the writer was killed while creating the file)")
        header = next(csv.reader([first.decode("utf-8").rstrip("\r\n")]))
        if not header or header[0] != "id":
            raise InputError(f"{path}: not an embedding table (the first column is not 'id')")
        yield header
        n_prefix = first_feature_column(header, path)
        offset = len(first)
        line_no = 1
        while True:
            raw = handle.readline()
            if not raw:
                return
            line_no += 1
            if not raw.endswith(b"\n"):
                if allow_torn_tail:
                    return
                raise InputError(f"{path}: line {line_no} is torn (the writer was killed mid-row); rerun the job to repair it")
            if raw.strip():
                yield line_no, offset, raw, _split_prefix(raw, header, n_prefix, path, line_no)
            offset += len(raw)


def index_table(path: str | Path, *, allow_torn_tail: bool = False, keep: Sequence[str] = ()) -> TableIndex:
    """Stream through a table: ids, row offsets, the shared settings (checked on every row).

    ``keep`` names identifying columns whose per-row values to keep (e.g.
    ``SeriesInstanceUID``).  Features are never parsed.
    """
    path = Path(path)
    rows = iter_rows(path, allow_torn_tail=allow_torn_tail)
    header = next(rows)
    n_prefix = first_feature_column(header, path)
    names = header[:n_prefix]
    index = TableIndex(path=path, header=list(header), prefix_columns={k: [] for k in keep if k in names})
    has_settings = all(k in names for k in REQUIRED_SETTINGS_KEYS)
    seen: set[str] = set()
    for line_no, offset, raw, prefix in rows:
        values = dict(zip(names, prefix))
        row_id = values["id"]
        if row_id in seen:
            raise InputError(f"{path}: id {row_id!r} appears more than once (line {line_no})")
        seen.add(row_id)
        if has_settings:
            settings = row_settings(values, f"{path}: line {line_no}")
            if index.settings is None:
                index.settings = settings
            else:
                check_compatible(index.settings, settings, f"{path}: row {row_id!r} vs row {index.ids[0]!r}")
        index.ids.append(row_id)
        index.offsets.append(offset)
        for k in index.prefix_columns:
            index.prefix_columns[k].append(values[k])
    if allow_torn_tail:
        index.torn_tail = not _ends_clean(path)
    return index


def _ends_clean(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read_line_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.readline()


class TableAppender:
    """Append rows to a CSV one at a time, durably, checking every row's settings.

    Opening an existing table repairs a torn last line and refuses to mix
    settings (the header and the first row fix them).
    """

    def __init__(self, path: str | Path, extra_columns: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.extra_columns = list(extra_columns)
        self.header: list[str] | None = None
        self.settings: dict | None = None
        self.ids: set[str] = set()
        # Streamed, never loaded: a resumed cohort table can be far larger than memory.
        if self.path.exists():
            repair_tail(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            existing = index_table(self.path)
            self.header = existing.header
            self.settings = existing.settings
            self.ids = set(existing.ids)

    def append(self, embedding: Embedding, extra: dict | None = None) -> None:
        if self.settings is not None:
            check_compatible(self.settings, settings_of(embedding.metadata), f"{self.path} vs {embedding.id}")
        if self.header is not None:
            _refuse_lost_settings(self.path, self.header, settings_of(embedding.metadata))
        text = ""
        if self.header is None:
            self.header = header_for(embedding, self.extra_columns)
            self.settings = settings_of(embedding.metadata)
            text += csv_line(self.header)
        row = embedding_row(embedding, extra)
        expected = sum(1 for h in self.header if FEATURE_RE.match(h))
        if embedding.vector.size != expected:
            raise MetadataMismatch(f"{self.path}: {embedding.id} has {embedding.vector.size} features, the table {expected}")
        text += csv_line(row.get(h, "") for h in self.header)
        _refuse_duplicate(self.path, self.ids, embedding.id)
        append_durably(self.path, text.encode("utf-8"))
        self.ids.add(embedding.id)


class StreamingAppender(TableAppender):
    """A :class:`TableAppender` that opens a big table without loading it.

    The header is fixed up front (the job knows its columns and feature
    count before the first row), so even a table with no rows yet says what
    it will hold, and a resumed job refuses a table with other columns or
    other settings before embedding anything.
    """

    def __init__(self, path: str | Path, header: Sequence[str], settings: dict | None = None) -> None:
        self.path = Path(path)
        self.extra_columns = []
        self.header = list(header)
        self.settings = settings
        self.ids = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            repair_tail(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            existing = index_table(self.path)
            if existing.settings is not None:
                if settings is not None:
                    check_compatible(existing.settings, settings, f"{self.path} (existing rows) vs this run")
                self.settings = existing.settings
            if existing.header != self.header:
                if not _older_header(existing.header, self.header):
                    raise MetadataMismatch(_header_difference(self.path, existing.header, self.header))
                # A table from before some settings existed: append in its own columns, which
                # is lossless as long as this run uses those settings' defaults.
                _refuse_lost_settings(self.path, existing.header, settings or {})
                self.header = existing.header
            self.ids = set(existing.ids)
        else:
            atomic_write_text(self.path, csv_line(self.header))

    def format_row(self, embedding: Embedding, extra: dict | None = None) -> bytes:
        """The row exactly as :func:`.csv_format.embedding_row` would write it, formatted in small chunks.

        Safe to call from a writer thread: formatting 76,800 floats takes tens
        of milliseconds, and doing it in chunks lets the thread that feeds the
        GPU take the GIL between chunks.
        """
        n_prefix = first_feature_column(self.header, self.path)
        n_features = len(self.header) - n_prefix
        if embedding.vector.size != n_features:
            raise MetadataMismatch(f"{self.path}: {embedding.id} has {embedding.vector.size} features, the table {n_features}")
        values = {"id": embedding.id}
        values.update({k: "" if v is None else str(v) for k, v in (extra or {}).items()})
        values.update({k: meta_value(embedding.metadata, k) for k in META_COLUMNS})
        prefix = csv_line([values.get(h, "") for h in self.header[:n_prefix]])[:-1]
        floats = np.asarray(embedding.vector, dtype=np.float32).astype(np.float64).tolist()
        chunks = []
        for start in range(0, len(floats), FORMAT_CHUNK):
            part = floats[start : start + FORMAT_CHUNK]
            chunks.append(_chunk_format(len(part)) % tuple(part))
        return (prefix + "," + ",".join(chunks) + "\n").encode("utf-8")

    def append(self, embedding: Embedding, extra: dict | None = None) -> None:
        """Check the settings, then append one row with one write and an fsync."""
        if self.settings is not None:
            check_compatible(self.settings, settings_of(embedding.metadata), f"{self.path} vs {embedding.id}")
        self.write_row(embedding.id, self.format_row(embedding, extra))

    def write_row(self, row_id: str, data: bytes) -> None:
        _refuse_duplicate(self.path, self.ids, row_id)
        append_durably(self.path, data)
        self.ids.add(row_id)

    def append_raw(self, row_id: str, raw: bytes) -> None:
        """Append a row copied verbatim from a table with the same header."""
        self.write_row(row_id, raw if raw.endswith(b"\n") else raw + b"\n")


def _refuse_duplicate(path: Path, ids: set[str], row_id: str) -> None:
    """A table holds each id once: a second row for an id would make it unreadable."""
    if row_id in ids:
        raise InputError(f"{path}: already holds a row for {row_id!r}; a table keeps one row per id")


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` with one write and an fsync; a failed write is cut back off, never left half-written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise write_failure(path, exc) from None
    finally:
        os.close(fd)


def effective_header(path: str | Path, header: list[str]) -> list[str]:
    """The header rows for ``path`` get: its own when it is an older form of ``header``, else ``header``."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return list(header)
    with open(path, "rb") as handle:
        first = handle.readline()
    if not first.endswith(b"\n"):
        return list(header)
    found = next(csv.reader([first.decode("utf-8", errors="replace").rstrip("\r\n")]), [])
    return found if found != header and _older_header(found, header) else list(header)


def _older_header(found: list[str], wanted: list[str]) -> bool:
    """True when ``found`` is ``wanted`` less some added settings' columns (a table from an older release)."""
    return [h for h in wanted if h not in ADDED_SETTINGS or h in found] == found


def _refuse_lost_settings(path: Path, header: Sequence[str], settings: dict) -> None:
    lost = missing_setting_columns(header, settings)
    if lost:
        full = {**ADDED_SETTINGS, **{k: v for k, v in settings.items() if v not in (None, "")}}
        raise MetadataMismatch(
            f"{path}: was written before the {', '.join(lost)} setting existed (so with "
            + ", ".join(f"{k} {ADDED_SETTINGS[k]}" for k in lost)
            + "); this run uses " + ", ".join(f"{k} {full[k]}" for k in lost) + "; use another output file"
        )


def _header_difference(path: Path, found: list[str], wanted: list[str]) -> str:
    n_found = sum(1 for h in found if FEATURE_RE.match(h))
    n_wanted = sum(1 for h in wanted if FEATURE_RE.match(h))
    if n_found != n_wanted:
        return f"{path}: holds {n_found} features per row, this run makes {n_wanted} (other K, model or planes); use another output file"
    extra = [h for h in found if h not in wanted]
    lacking = [h for h in wanted if h not in found]
    detail = ", ".join([f"extra column {h}" for h in extra[:3]] + [f"no column {h}" for h in lacking[:3]]) or "columns in another order"
    return f"{path}: was written with other columns ({detail}); use another output file"


__all__ = ["effective_header", "TableAppender", "repair_tail", "index_table", "iter_rows", "TableIndex", "StreamingAppender", "read_line_at", "first_feature_column"]
