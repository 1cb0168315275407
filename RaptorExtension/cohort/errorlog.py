"""The errors file of a batch: one CSV row per failed input, with the reason.

Written atomically after each failure, so it is always complete and parseable.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import atomic_write_text

COLUMNS = ("id", "source", "reason")


class ErrorLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[tuple[str, str, str]] = []

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, id: str, source: str, reason: str) -> None:
        self.rows.append((id, source, reason))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())
