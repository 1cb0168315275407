"""`raptor batch --parquet`: the Parquet file holds exactly the CSV's rows, and a missing pyarrow is one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from batch_fixtures import tiny_cli_args, write_cohort

from RaptorExtension.cli import main
from RaptorExtension.embeddings import parquet as parquet_module
from RaptorExtension.embeddings.table import read_table

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is a dependency of Raptor; install it with pip install -e .")


@pytest.mark.needs_shared_data
def test_parquet_holds_the_csv_rows_bit_for_bit(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # Two rows per row group, so three series exercise a partial last group.
    monkeypatch.setattr(parquet_module, "ROWS_PER_GROUP", 2)
    write_cohort(tmp_path / "cohort", 3)
    csv_path, parquet_path = tmp_path / "out" / "cohort.csv", tmp_path / "out" / "cohort.parquet"
    code = main(["batch", "--folder", str(tmp_path / "cohort"), "--csv", str(csv_path), "--parquet", str(parquet_path),
                 "--readers", "0", "-q", *tiny_cli_args(tiny_model_dir)])
    assert code == 0, capsys.readouterr().err
    csv_table = read_table(csv_path)
    parquet_file = pq.ParquetFile(parquet_path)
    assert parquet_file.metadata.num_row_groups == 2
    table = parquet_file.read()
    assert table.num_rows == 3
    assert table.column("id").to_pylist() == csv_table.ids
    features = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert features.dtype == np.float32 and features.shape == csv_table.features.shape
    assert np.array_equal(features, csv_table.features.astype(np.float32))
    for name in ("SeriesInstanceUID", "k", "weight_sha256"):
        assert table.column(name).to_pylist() == [str(v) for v in csv_table.columns[name]]
    assert not list(parquet_path.parent.glob(".cohort.parquet.*"))  # no temporary file left behind


@pytest.mark.needs_shared_data
def test_missing_pyarrow_is_one_line_before_anything_runs(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    write_cohort(tmp_path / "cohort", 1)
    code = main(["batch", "--folder", str(tmp_path / "cohort"), "--csv", str(tmp_path / "o.csv"),
                 "--parquet", str(tmp_path / "o.parquet"), *tiny_cli_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "needs the pyarrow package" in err and err.count("\n") == 1
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.parquet").exists()
