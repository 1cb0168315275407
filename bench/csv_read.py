"""How long reading a cohort's embedding table takes: CSV (as `raptor probe fit` and `raptor info` read it) vs Parquet.

Writes a table of N rows of Raptor K=100 embeddings (76,800 features, about
0.9 MB of text a row) with the engine's own row writer, as `raptor batch`
writes it, converts it to Parquet with `raptor batch --parquet`'s converter,
then times reading each back into a (rows, features) float32 array:

    python bench/csv_read.py                    # 1000 rows, K=100: the README's number
    python bench/csv_read.py --rows 200 --k 10  # smaller

The files are kept in --work (default out/bench/csv_read) and reused by a
second run with the same shape.  Wall-clock and CPU seconds (all threads of
this process) are printed with the machine's load average: on a shared,
loaded machine the wall clock measures the other work as much as this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def write_table(path: Path, rows: int, k: int, p: int = 16, planes: int = 3, seed: int = 0) -> None:
    """A batch-style table with random float32 features (the reader's cost does not depend on their values)."""
    from RaptorExtension.cohort.plan import header_for_job
    from RaptorExtension.embeddings.embedding import Embedding, build_metadata
    from RaptorExtension.embeddings.settings import settings_hash
    from RaptorExtension.embeddings.stream import StreamingAppender

    n_features = planes * k * p * p
    meta = build_metadata(encoder="facebook/dinov2-large", weight_sha256="ab" * 32, k=k, seed=0, projection_sha256="cd" * 32,
                          planes=["axial", "coronal", "sagittal"][:planes], grid=256, image_size=224,
                          preset="ct[-1000,1000]", keep_cls=False, n_features=n_features)
    meta["settings_hash"] = settings_hash(meta)
    tmp = path.with_name(path.name + ".part")
    if tmp.exists():
        tmp.unlink()
    table = StreamingAppender(tmp, header_for_job(n_features))
    rng = np.random.default_rng(seed)
    for r in range(rows):
        vector = rng.normal(size=n_features).astype(np.float32)
        row_meta = dict(meta, id=f"1.2.826.0.1.3680043.8.498.{r}", source=f"/data/cohort/patient{r:05d}/ct", modality="CT")
        fields = {"PatientID": f"P{r:05d}", "StudyInstanceUID": f"1.2.3.{r}", "SeriesInstanceUID": row_meta["id"],
                  "SeriesDescription": "CT, abdomen portal venous"}  # a comma: the identifying columns get quoted
        table.append(Embedding(vector=vector, metadata=row_meta), fields)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--work", default=str(ROOT / "out" / "bench" / "csv_read"))
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from RaptorExtension.embeddings.parquet import csv_to_parquet
    from RaptorExtension.embeddings.table import read_table

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"table_{args.rows}x{args.k}.csv"
    parquet_path = csv_path.with_suffix(".parquet")
    if not csv_path.exists():
        start = time.perf_counter()
        write_table(csv_path, args.rows, args.k)
        print(f"wrote {csv_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not parquet_path.exists() or parquet_path.stat().st_mtime < csv_path.stat().st_mtime:
        csv_to_parquet(csv_path, parquet_path)

    start, cpu = time.perf_counter(), time.process_time()
    table = read_table(csv_path)
    csv_seconds, csv_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    pq_table = pq.read_table(parquet_path)
    column = pq_table.column("embedding").combine_chunks()
    parquet_features = column.values.to_numpy().reshape(len(column), -1)
    parquet_seconds, parquet_cpu = time.perf_counter() - start, time.process_time() - cpu

    assert np.array_equal(table.features.view(np.uint32), parquet_features.view(np.uint32)), "CSV and Parquet differ"
    result = {
        "rows": len(table.ids),
        "features": int(table.features.shape[1]),
        "csv_bytes": csv_path.stat().st_size,
        "csv_read_s": round(csv_seconds, 2),
        "csv_read_cpu_s": round(csv_cpu, 2),
        "parquet_bytes": parquet_path.stat().st_size,
        "parquet_read_s": round(parquet_seconds, 2),
        "parquet_read_cpu_s": round(parquet_cpu, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
