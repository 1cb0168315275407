"""Embedding tables: one CSV row per volume.

Columns, in order: ``id``; any extra identifying columns (DICOM UIDs, node
name); the metadata columns :data:`META_COLUMNS`; then the features
``e0 ... eN``.  Floats are written with 9 significant digits, which round-trips
float32 exactly, so a CSV row equals the ``.npz`` embedding bit for bit.

Rows are appended with one ``write`` + ``fsync`` each, so a killed job leaves at
most one torn last line, which :func:`read_table` detects and
:func:`.batchtable.repair_tail` removes before a resumed job appends again.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .embedding import SETTINGS_KEYS, Embedding, check_compatible, settings_of
from .errors import InputError, MetadataMismatch

META_COLUMNS = ("source", "modality", "format_version", "encoder", *SETTINGS_KEYS[1:], "settings_hash")
"""Metadata columns of a table: provenance, the comparable settings (with the encoder's name), their hash."""
FEATURE_RE = re.compile(r"^e(\d+)$")


def feature_columns(n: int) -> list[str]:
    return [f"e{i}" for i in range(n)]


def _meta_value(meta: dict, key: str) -> str:
    value = meta.get(key)
    if key == "planes":
        return "|".join(value or [])
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def embedding_row(embedding: Embedding, extra: dict | None = None) -> dict:
    """One table row (all strings) for an embedding."""
    row = {"id": embedding.id}
    row.update({k: "" if v is None else str(v) for k, v in (extra or {}).items()})
    meta = embedding.metadata
    for key in META_COLUMNS:
        row[key] = _meta_value(meta, key)
    row.update(zip(feature_columns(embedding.vector.size), (format(float(v), ".9g") for v in embedding.vector)))
    return row


def header_for(embedding: Embedding, extra_columns: Sequence[str] = ()) -> list[str]:
    return ["id", *extra_columns, *META_COLUMNS, *feature_columns(embedding.vector.size)]


def _line(values: Iterable[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(list(values))
    return buffer.getvalue()


def write_table(path: str | Path, embeddings: Sequence[Embedding], extras: Sequence[dict] | None = None) -> Path:
    """Write a whole table atomically, refusing embeddings with different settings."""
    if not embeddings:
        raise InputError(f"{path}: no embeddings to write")
    first = embeddings[0]
    for e in embeddings[1:]:
        check_compatible(first.metadata, e.metadata, f"{e.id} vs {first.id}")
    extras = list(extras or [{} for _ in embeddings])
    extra_columns = list(dict.fromkeys(k for x in extras for k in x))
    header = header_for(first, extra_columns)
    text = _line(header) + "".join(
        _line(embedding_row(e, {c: x.get(c, "") for c in extra_columns}).get(h, "") for h in header)
        for e, x in zip(embeddings, extras)
    )
    atomic_write_text(path, text)
    return Path(path)


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
        from .batchtable import index_table, repair_tail

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
        text = ""
        if self.header is None:
            self.header = header_for(embedding, self.extra_columns)
            self.settings = settings_of(embedding.metadata)
            text += _line(self.header)
        row = embedding_row(embedding, extra)
        expected = sum(1 for h in self.header if FEATURE_RE.match(h))
        if embedding.vector.size != expected:
            raise MetadataMismatch(f"{self.path}: {embedding.id} has {embedding.vector.size} features, the table {expected}")
        text += _line(row.get(h, "") for h in self.header)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self.ids.add(embedding.id)


@dataclass
class Table:
    """An embedding table read back: ids, features, per-row columns and shared settings."""

    path: Path
    header: list[str]
    ids: list[str]
    features: np.ndarray  # (rows, n_features) float32
    columns: dict[str, list[str]]  # non-feature columns
    settings: dict | None

    def row_metadata(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


def _parse_setting(key: str, value: str):
    if value == "":
        return None
    if key in ("k", "seed", "image_size", "format_version"):
        return int(value)
    if key == "grid":
        return value if value == "native" else int(value)
    if key == "keep_cls":
        return value.lower() == "true"
    if key == "planes":
        return value.split("|")
    return value


def read_table(path: str | Path, *, require_settings: bool = True) -> Table:
    """Read an embedding CSV, checking that every row has the same settings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty CSV") from None
    if "id" not in header:
        raise InputError(f"{path}: no 'id' column")
    feature_idx = [i for i, h in enumerate(header) if FEATURE_RE.match(h)]
    if not feature_idx:
        raise InputError(f"{path}: no feature columns e0..eN")
    if [int(FEATURE_RE.match(header[i]).group(1)) for i in feature_idx] != list(range(len(feature_idx))):
        raise InputError(f"{path}: feature columns are not e0..e{len(feature_idx) - 1} in order")
    other_idx = [i for i in range(len(header)) if i not in set(feature_idx)]
    ids, rows, columns = [], [], {header[i]: [] for i in other_idx}
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"{path}: line {line_no} has {len(row)} columns, the header {len(header)} (a torn or edited row)")
        try:
            rows.append(np.array([float(row[i]) for i in feature_idx], dtype=np.float32))
        except ValueError:
            raise InputError(f"{path}: line {line_no} has a non-numeric feature value") from None
        for i in other_idx:
            columns[header[i]].append(row[i])
        ids.append(row[header.index("id")])
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: id {dup!r} appears more than once")
    settings = None
    if all(k in columns for k in SETTINGS_KEYS) and ids:
        settings = {k: _parse_setting(k, columns[k][0]) for k in SETTINGS_KEYS}
        settings["encoder"] = columns.get("encoder", [""])[0]
        for r in range(1, len(ids)):
            row_settings = {k: _parse_setting(k, columns[k][r]) for k in SETTINGS_KEYS}
            row_settings["encoder"] = columns.get("encoder", [""])[r]
            check_compatible(settings, row_settings, f"{path}: row {ids[r]!r} vs row {ids[0]!r}")
    elif require_settings and ids:
        missing = [k for k in SETTINGS_KEYS if k not in columns]
        raise InputError(f"{path}: lacks the embedding metadata columns {', '.join(missing)}")
    features = np.stack(rows) if rows else np.zeros((0, len(feature_idx)), dtype=np.float32)
    return Table(path=path, header=header, ids=ids, features=features, columns=columns, settings=settings)
