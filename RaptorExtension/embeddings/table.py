"""Embedding tables read and written whole: :func:`read_table` for probes and ``raptor info``.

The columns are :mod:`.csv_format`'s.  Rows are appended with one ``write`` +
``fsync`` each (:mod:`.stream`), so a killed job leaves at most one torn last
line, which :func:`read_table` detects and :func:`.stream.repair_tail` removes
before a resumed job appends again.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import InputError
from .csv_format import FEATURE_RE, csv_line, embedding_row, feature_columns, header_for, row_settings
from .embedding import Embedding
from .feature_block import read_feature_rows
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
    """Read an embedding CSV, checking that every row has the same settings.

    The features are parsed in bulk (:mod:`.feature_block`): a 1,000-row K=100 table
    (0.9 GB) reads in seconds.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    with handle:
        try:
            first = handle.readline().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
        header = next(csv.reader([first.rstrip("\r\n")]), []) if first.strip() else []
        if not header:
            raise InputError(f"{path}: empty CSV")
        if "id" not in header:
            raise InputError(f"{path}: no 'id' column")
        feature_idx = [i for i, h in enumerate(header) if FEATURE_RE.match(h)]
        if not feature_idx:
            raise InputError(f"{path}: no feature columns e0..eN")
        names = [header[i] for i in feature_idx]
        if names != feature_columns(len(names)) and [int(FEATURE_RE.match(h).group(1)) for h in names] != list(
            range(len(names))
        ):
            raise InputError(f"{path}: feature columns are not e0..e{len(feature_idx) - 1} in order")
        features_last = feature_idx == list(range(len(header) - len(feature_idx), len(header)))
        if features_last:  # as Raptor writes them: parsed in bulk
            other_idx = list(range(feature_idx[0]))
            prefixes, features = read_feature_rows(handle, path, header, feature_idx[0])
        else:
            other_idx, prefixes, features = _read_rows_by_column(handle, path, header, feature_idx)
    id_col = other_idx.index(header.index("id"))
    ids = [row[id_col] for row in prefixes]
    columns = {header[i]: [row[n] for row in prefixes] for n, i in enumerate(other_idx)}
    counts = Counter(ids)
    if len(counts) != len(ids):
        dup = next(i for i in ids if counts[i] > 1)
        raise InputError(f"{path}: id {dup!r} appears more than once")
    settings = None
    if all(k in columns for k in REQUIRED_SETTINGS_KEYS) and ids:
        settings = row_settings({k: v[0] for k, v in columns.items()}, f"{path}: line 2")
        for r in range(1, len(ids)):
            check_compatible(settings, row_settings({k: v[r] for k, v in columns.items()}, f"{path}: row {ids[r]!r}"),
                             f"{path}: row {ids[r]!r} vs row {ids[0]!r}")
    elif require_settings and ids:
        missing = [k for k in REQUIRED_SETTINGS_KEYS if k not in columns]
        raise InputError(f"{path}: lacks the embedding metadata columns {', '.join(missing)}")
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():  # Raptor never writes one: an edited or damaged row would give NaN scores
        r = int(np.argmin(finite))
        raise InputError(f"{path}: row {ids[r]!r} has a NaN or infinite feature (e{int(np.argmin(np.isfinite(features[r])))})")
    return Table(path=path, header=header, ids=ids, features=features, columns=columns, settings=settings)


def _read_rows_by_column(handle, path: Path, header: list[str], feature_idx: list[int]):
    """A table whose features are not its last columns (edited by hand): parsed row by row."""
    try:
        text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    features_set = set(feature_idx)
    other_idx = [i for i in range(len(header)) if i not in features_set]
    prefixes, rows = [], []
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"{path}: line {line_no} has {len(row)} columns, the header {len(header)} (a torn or edited row)")
        try:
            rows.append(np.array([float(row[i]) for i in feature_idx], dtype=np.float32))
        except ValueError:
            raise InputError(f"{path}: line {line_no} has a non-numeric feature value") from None
        prefixes.append([row[i] for i in other_idx])
    features = np.stack(rows) if rows else np.zeros((0, len(feature_idx)), dtype=np.float32)
    return other_idx, prefixes, features
