"""The embedding CSV's columns and how one row is written and its settings read back.

Columns, in order: ``id``; any extra identifying columns (DICOM UIDs, node
name); the metadata columns :data:`META_COLUMNS`; then the features
``e0 ... eN``.  Floats are written with 9 significant digits, which round-trips
float32 exactly, so a CSV row equals the ``.npz`` embedding bit for bit.
Shared by the whole-table reader (:mod:`.table`) and the streaming one
(:mod:`.stream`).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence

from ..errors import InputError
from .embedding import Embedding
from .settings import ADDED_SETTINGS, SETTINGS_KEYS, with_defaults

META_COLUMNS = ("source", "modality", "format_version", "encoder", *SETTINGS_KEYS[1:], "settings_hash")
"""Metadata columns of a table: provenance, the comparable settings (with the encoder's name), their hash.

Tables written before a setting was added (:data:`.settings.ADDED_SETTINGS`)
lack its column; they are read as made with its default, and a run with the
defaults appends to them in their own columns.
"""


FEATURE_RE = re.compile(r"^e(\d+)$")


def feature_columns(n: int) -> list[str]:
    return [f"e{i}" for i in range(n)]


def meta_value(meta: dict, key: str) -> str:
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
        row[key] = meta_value(meta, key)
    row.update(zip(feature_columns(embedding.vector.size), (format(float(v), ".9g") for v in embedding.vector)))
    return row


def header_for(embedding: Embedding, extra_columns: Sequence[str] = ()) -> list[str]:
    return ["id", *extra_columns, *META_COLUMNS, *feature_columns(embedding.vector.size)]


def csv_line(values: Iterable[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(list(values))
    return buffer.getvalue()


def row_settings(values: dict[str, str], where: str = "the table") -> dict:
    """The settings of one row (column name -> text); missing added columns mean their defaults."""
    settings = with_defaults({k: parse_setting(k, values.get(k, ""), where) for k in SETTINGS_KEYS})
    settings["encoder"] = values.get("encoder", "")
    return settings


def missing_setting_columns(header: Sequence[str], settings: dict) -> list[str]:
    """Added settings this header has no column for although ``settings`` holds a non-default value.

    A row with such a value cannot be written into an older table without
    losing what made it.
    """
    full = with_defaults(settings)
    return [k for k, default in ADDED_SETTINGS.items() if k not in header and full[k] != default]


def parse_setting(key: str, value: str, where: str = "the table"):
    """A metadata column's value as the embedding metadata holds it; a malformed one is one :class:`InputError` line."""
    if value == "":
        return None

    def bad(expected: str) -> InputError:
        return InputError(f"{where}: column {key} holds {value[:40]!r}, not {expected}")

    if key in ("k", "seed", "image_size", "format_version"):
        if not re.fullmatch(r"-?\d{1,18}", value.strip()):
            raise bad("a whole number")
        number = int(value)
        if key != "seed" and number < (0 if key == "format_version" else 1):
            raise bad("a positive number")
        return number
    if key == "grid":
        if value == "native":
            return value
        if not re.fullmatch(r"\d{1,9}", value.strip()) or int(value) < 2:
            raise bad("a number of voxels or 'native'")
        return int(value)
    if key == "keep_cls":
        if value.lower() not in ("true", "false"):
            raise bad("true or false")
        return value.lower() == "true"
    if key == "planes":
        planes = value.split("|")
        if any(p not in ("axial", "coronal", "sagittal") for p in planes) or len(set(planes)) != len(planes):
            raise bad("planes such as axial|coronal|sagittal")
        return planes
    return value
