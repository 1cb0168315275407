"""Embedding tables read and written whole: :func:`read_table` for probes and ``raptor info``.

The columns are :mod:`.csv_format`'s.  Rows are appended with one ``write`` +
``fsync`` each (:mod:`.stream`), so a killed job leaves at most one torn last
line, which :func:`read_table` detects and :func:`.stream.repair_tail` removes
before a resumed job appends again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import InputError
from .csv_format import FEATURE_RE, csv_line, embedding_row, header_for, row_settings
from .embedding import Embedding
from .settings import REQUIRED_SETTINGS_KEYS, check_compatible


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
    text = csv_line(header) + "".join(
        csv_line(embedding_row(e, {c: x.get(c, "") for c in extra_columns}).get(h, "") for h in header)
        for e, x in zip(embeddings, extras)
    )
    atomic_write_text(path, text)
    return Path(path)


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
    if all(k in columns for k in REQUIRED_SETTINGS_KEYS) and ids:
        settings = row_settings({k: v[0] for k, v in columns.items()})
        for r in range(1, len(ids)):
            check_compatible(settings, row_settings({k: v[r] for k, v in columns.items()}),
                             f"{path}: row {ids[r]!r} vs row {ids[0]!r}")
    elif require_settings and ids:
        missing = [k for k in REQUIRED_SETTINGS_KEYS if k not in columns]
        raise InputError(f"{path}: lacks the embedding metadata columns {', '.join(missing)}")
    features = np.stack(rows) if rows else np.zeros((0, len(feature_idx)), dtype=np.float32)
    return Table(path=path, header=header, ids=ids, features=features, columns=columns, settings=settings)
