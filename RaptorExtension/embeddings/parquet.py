"""An embedding CSV as Parquet, for tools that read columnar files (pandas, Polars, Spark, DuckDB).

Needs ``pyarrow`` (a dependency of Raptor; inside Slicer it is installed at first
use); :func:`require_pyarrow` says so up front, before a long job starts, where it is missing.  The Parquet file holds the
identifying and metadata columns as strings and the features as one
``embedding`` column of fixed-size float32 lists (tens of thousands of
separate ``e`` columns would make every Parquet reader crawl).  It is written
from the finished CSV in row groups, so memory stays bounded, and atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import temp_file_beside
from ..errors import RaptorError, write_failure
from .stream import iter_rows

ROWS_PER_GROUP = 256


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise RaptorError("--parquet needs the pyarrow package (pip install pyarrow); the CSV is written either way") from None


def csv_to_parquet(csv_path: str | Path, parquet_path: str | Path) -> Path:
    """Convert an embedding CSV (as written by a batch) into Parquet."""
    require_pyarrow()
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path, parquet_path = Path(csv_path), Path(parquet_path)
    rows = iter_rows(csv_path)
    header = next(rows)
    n_prefix = next(i for i, h in enumerate(header) if h == "e0")
    names = header[:n_prefix]
    n_features = len(header) - n_prefix
    schema = pa.schema([pa.field(n, pa.string()) for n in names] + [pa.field("embedding", pa.list_(pa.float32(), n_features))])
    fd, tmp = temp_file_beside(parquet_path)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch_prefix: list[list[str]] = []
            batch_features: list[np.ndarray] = []

            def flush() -> None:
                if not batch_prefix:
                    return
                columns = [pa.array([r[i] for r in batch_prefix], pa.string()) for i in range(n_prefix)]
                flat = pa.array(np.concatenate(batch_features), pa.float32())
                columns.append(pa.FixedSizeListArray.from_arrays(flat, n_features))
                writer.write_batch(pa.record_batch(columns, schema=schema))
                batch_prefix.clear()
                batch_features.clear()

            for _line_no, _offset, raw, prefix in rows:
                fields = next(csv.reader([raw.decode("utf-8").rstrip("\r\n")]))
                batch_prefix.append(prefix)
                batch_features.append(np.asarray(fields[n_prefix:], dtype=np.float32))
                if len(batch_prefix) >= ROWS_PER_GROUP:
                    flush()
            flush()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, parquet_path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):  # a full disk, a folder in the way
            raise write_failure(parquet_path, exc) from None
        raise
    return parquet_path


__all__ = ["csv_to_parquet", "require_pyarrow"]
