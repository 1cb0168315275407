"""Reading the feature block of an embedding CSV fast: 76,800 numbers a row, a thousand rows in seconds.

Why: a default Raptor row holds 76,800 floats (about 1 MB of text), so a
1,000-volume table is about 0.9 GB.  Converting it one Python ``float`` at a
time takes minutes; here the text is cut into numbers with NumPy and the
numbers are parsed by Arrow's C++ string-to-float cast, which is exact
(correctly rounded, so the 9-digit text Raptor writes reads back bit for bit).

How: the file is read in blocks of whole lines.  In each block the positions
of every comma and newline are found at once; dropping those bytes leaves the
fields packed end to end, and the positions become the offsets of an Arrow
string array of all the fields, built without copying them again.  Each row's
identifying columns (before ``e0``) are parsed with :mod:`csv` (they may be
quoted), and its features are one slice of that array, cast to float32.

The errors are the whole-table reader's: a row with another number of columns
(a torn or edited row) and a feature that is not a number are one line each,
naming the line.  A row the fast path cannot take (a quoted number, spaces
around a number) is parsed the slow way, so what Python's ``float`` accepts is
still accepted.  Without ``pyarrow`` the numbers are parsed by NumPy, about
ten times slower.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InputError
from .csv_format import csv_line

BLOCK_BYTES = 16 << 20
"""Bytes read at a time (rounded to whole lines): big enough for the C code to dominate, small enough for the cache."""

HEAD_BYTES = 1 << 16
"""The identifying columns of a row are far shorter than this."""

COMMA, NEWLINE = 0x2C, 0x0A


def _arrow():
    try:
        import pyarrow
        import pyarrow.compute
    except ImportError:  # a Slicer install that has not got pyarrow yet: NumPy parses instead
        return None
    return pyarrow


def read_feature_rows(handle: BinaryIO, path: Path, header: list[str], n_prefix: int, *, first_line: int = 2,
                      use_arrow: bool = True, threads: int | None = None) -> tuple[list[list[str]], np.ndarray]:
    """Read every row after the header: the fields before ``e0`` and the features (rows, n) float32.

    ``header`` ends with the feature columns ``e0 ... eN`` (``n_prefix`` fields come before them).
    Blank lines are skipped, as :mod:`csv` does.  Blocks are parsed by ``threads``
    threads (default: one per core, at most two blocks ahead of the reader); NumPy
    and Arrow release the GIL, so they really run side by side.
    """
    reader = _BlockReader(path, header, n_prefix, _arrow() if use_arrow else None)
    workers = max(1, min(4, threads or os.cpu_count() or 1))
    prefixes: list[list[str]] = []
    features: list[np.ndarray] = []
    line_no = first_line
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raptor-csv") as pool:
        in_flight: collections.deque = collections.deque()

        def collect(limit: int) -> None:
            while len(in_flight) > limit:
                block_prefixes, block_features = in_flight.popleft().result()  # in file order: the first error wins
                prefixes.extend(block_prefixes)
                features.append(block_features)

        tail = b""
        while True:
            data = bytearray(len(tail) + BLOCK_BYTES)  # one buffer per block: a worker may still be reading the last
            data[: len(tail)] = tail
            filled = len(tail)
            while filled < len(data):  # a short read is not the end of the file; an empty one is
                got = handle.readinto(memoryview(data)[filled:])
                if not got:
                    break
                filled += got
            at_end = filled < len(data)
            end = filled if at_end else data.rfind(b"\n", 0, filled) + 1
            if end == 0 and not at_end:  # one line longer than a block: read on
                tail = bytes(data[:filled])
                continue
            tail = bytes(data[end:filled])
            del data[end:]
            if data:
                lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
                in_flight.append(pool.submit(reader.block, data, line_no))
                line_no += lines
                collect(workers)
            if at_end:
                break
        collect(0)
    matrix = np.concatenate(features) if features else np.zeros((0, reader.n_features), np.float32)
    return prefixes, matrix


class _BlockReader:
    def __init__(self, path: Path, header: list[str], n_prefix: int, arrow) -> None:
        self.path, self.header, self.n_prefix, self.arrow = path, header, n_prefix, arrow
        self.n_columns = len(header)
        self.n_features = self.n_columns - n_prefix

    def block(self, data: bytearray, line_no: int) -> tuple[list[list[str]], np.ndarray]:
        """Parse the whole lines in ``data`` (the first is line ``line_no``): their prefixes and features."""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if not data.endswith(b"\n"):
            data += b"\n"  # the file's last line without its newline
        buf = np.frombuffer(data, dtype=np.uint8)
        is_delimiter = buf == COMMA  # two comparisons: several times faster than a lookup table here
        is_delimiter |= buf == NEWLINE
        delimiters = np.flatnonzero(is_delimiter)
        ends = np.flatnonzero(buf[delimiters] == NEWLINE)  # for each line, the index of its newline in ``delimiters``
        fields = None
        if self.arrow is not None:
            # Field t runs from after delimiter t-1 to delimiter t; without the delimiters the fields lie end to end.
            np.logical_not(is_delimiter, out=is_delimiter)
            packed = buf[is_delimiter]
            del is_delimiter
            offsets = np.empty(len(delimiters) + 1, dtype=np.int64)
            offsets[0] = 0
            np.subtract(delimiters, np.arange(len(delimiters), dtype=np.int64), out=offsets[1:])
            pa = self.arrow
            fields = pa.LargeStringArray.from_buffers(len(delimiters), pa.py_buffer(offsets), pa.py_buffer(packed))
        rows = np.empty((len(ends), self.n_features), dtype=np.float32)
        prefixes: list[list[str]] = []
        first = 0  # index in ``delimiters`` of the current line's first delimiter
        for last in ends.tolist():
            start = 0 if first == 0 else int(delimiters[first - 1]) + 1
            end = int(delimiters[last])
            if end > start:
                prefix, values = self._row(data, start, end, first, last, delimiters, fields, line_no)
                rows[len(prefixes)] = values
                prefixes.append(prefix)
            first = last + 1
            line_no += 1
        return prefixes, rows[: len(prefixes)]

    def _row(self, data: bytearray, start: int, end: int, first: int, last: int, delimiters: np.ndarray, fields,
             line_no: int) -> tuple[list[str], np.ndarray]:
        n_prefix = self.n_prefix
        split_at = first + n_prefix - 1  # the comma before e0 when no identifying field holds a comma
        feature_start = None
        if n_prefix == 0:
            prefix, feature_start = [], start
        elif split_at < last and b'"' not in data[start : int(delimiters[split_at])]:
            prefix = self._decode(data[start : int(delimiters[split_at])], line_no).split(",")
            feature_start = int(delimiters[split_at]) + 1
        else:
            for size in (4096, HEAD_BYTES):  # quoted identifying fields: parse the head of the line as CSV
                head = self._decode(bytes(data[start : min(end, start + size)]), line_no, errors="replace")
                parsed = next(csv.reader([head]), [])
                if len(parsed) > n_prefix:
                    prefix = parsed[:n_prefix]
                    written = csv_line(prefix)[:-1].encode("utf-8") + b","
                    if data.startswith(written, start):
                        feature_start = start + len(written)
                    break
        if feature_start is None:  # odd quoting: parse the whole line as CSV
            row = next(csv.reader([self._decode(data[start:end], line_no)]), [])
            self._check_columns(len(row), line_no)
            return row[:n_prefix], self._slow_values(row[n_prefix:], line_no)
        j0 = int(np.searchsorted(delimiters, feature_start))  # the delimiter ending e0
        self._check_columns(n_prefix + last - j0 + 1, line_no)
        if fields is not None:
            try:
                return prefix, self.arrow.compute.cast(fields.slice(j0, self.n_features), self.arrow.float32()).to_numpy()
            except (self.arrow.ArrowInvalid, ValueError):
                pass
        else:
            try:
                values = np.fromstring(bytes(data[feature_start:end]), dtype=np.float32, sep=",")
                if values.size == self.n_features:
                    return prefix, values
            except ValueError:
                pass
        text = self._decode(data[feature_start:end], line_no)
        return prefix, self._slow_values(next(csv.reader([text]), []), line_no)

    def _check_columns(self, count: int, line_no: int) -> None:
        if count != self.n_columns:
            raise InputError(f"{self.path}: line {line_no} has {count} columns, the header {self.n_columns} "
                             "(a torn or edited row)")

    def _slow_values(self, values: list[str], line_no: int) -> np.ndarray:
        """What Python's ``float`` reads (spaces, quoted numbers), or the one-line error."""
        self._check_columns(self.n_prefix + len(values), line_no)
        out = np.empty(len(values), dtype=np.float32)
        for i, value in enumerate(values):
            try:
                out[i] = float(value)
            except ValueError:
                shown = value if len(value) <= 20 else value[:20] + "..."
                raise InputError(f"{self.path}: line {line_no} has a non-numeric feature value "
                                 f"({self.header[self.n_prefix + i]} = {shown!r})") from None
        return out

    def _decode(self, raw: bytes, line_no: int, errors: str = "strict") -> str:
        try:
            return raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: line {line_no} is not UTF-8 text (not a readable CSV)") from None


__all__ = ["read_feature_rows", "BLOCK_BYTES"]
