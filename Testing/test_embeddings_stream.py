"""Streaming tables: the same bytes as tables.py writes, indexed without loading features, torn tails cut."""

from __future__ import annotations

import numpy as np
import pytest

from RaptorExtension.embeddings.csv_format import header_for
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.embeddings.stream import (
    StreamingAppender,
    TableAppender,
    index_table,
    repair_tail,
)
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import InputError, MetadataMismatch

EXTRA = ["PatientID", "SeriesDescription"]


def _embedding(row_id: str, n: int = 3000, seed: int = 0, k: int = 100) -> Embedding:
    rng = np.random.default_rng(seed)
    vector = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    vector[:5] = [0.0, -0.0, 1e-45, 3.4e38, -1.5]
    meta = {"id": row_id, "source": 'a "quoted", path', "modality": "CT", "format_version": 1, "encoder": "m",
            "weight_sha256": "w" * 64, "k": k, "seed": 0, "projection_sha256": "p" * 64, "planes": ["axial", "coronal"],
            "grid": 256, "image_size": 224, "preset": "ct[-1000,1000]", "keep_cls": False, "settings_hash": "h"}
    return Embedding(vector=vector, metadata=meta)


def test_rows_are_byte_identical_to_tables_py(tmp_path):
    extra = {"PatientID": "p,1", "SeriesDescription": 'late "phase", 2'}
    reference = TableAppender(tmp_path / "ref.csv", EXTRA)
    fast = StreamingAppender(tmp_path / "fast.csv", header_for(_embedding("a"), EXTRA))
    for n, row_id in enumerate(["a", "b,c", 'd"e']):
        reference.append(_embedding(row_id, seed=n), extra)
        fast.append(_embedding(row_id, seed=n), extra)
    assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    table = read_table(tmp_path / "fast.csv")
    np.testing.assert_array_equal(table.features[1], _embedding("x", seed=1).vector)  # float32 round trip


def test_index_streams_ids_offsets_and_checks_every_row(tmp_path):
    path = tmp_path / "t.csv"
    table = StreamingAppender(path, header_for(_embedding("a"), EXTRA))
    for n in range(4):
        table.append(_embedding(f"id{n}", seed=n), {"PatientID": f"P{n}", "SeriesDescription": "x, y"})
    index = index_table(path, keep=["PatientID"])
    assert index.ids == ["id0", "id1", "id2", "id3"] and index.prefix_columns["PatientID"] == ["P0", "P1", "P2", "P3"]
    assert index.settings["k"] == 100 and index.n_features == 3000
    with open(path, "rb") as handle:
        handle.seek(index.offsets[2])
        assert handle.readline().startswith(b"id2,P2,")
    # A row with other settings (edited by hand, or appended by another tool) is named.
    other = _embedding("odd", k=10)
    with open(path, "ab") as handle:
        handle.write(StreamingAppender.format_row(table, other, {}))
    with pytest.raises(MetadataMismatch, match="row 'odd' vs row 'id0'.*k 100 vs 10"):
        index_table(path)


@pytest.mark.slow
def test_repair_tail_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "t.csv"
    table = StreamingAppender(path, header_for(_embedding("a", n=300000), EXTRA))  # rows longer than the 1 MB read block
    table.append(_embedding("a", n=300000), {})
    whole = path.read_bytes()
    assert repair_tail(path) == 0 and path.read_bytes() == whole
    with open(path, "ab") as handle:
        handle.write(_embedding("b", n=300000, seed=1).metadata["id"].encode() + b"," + b"1.5," * 400000)
    with pytest.raises(InputError, match="line 3 is torn"):
        index_table(path)
    assert index_table(path, allow_torn_tail=True).torn_tail
    assert repair_tail(path) == 1600002 and path.read_bytes() == whole
    reopened = StreamingAppender(path, header_for(_embedding("a", n=300000), EXTRA))
    assert reopened.ids == {"a"}


def test_a_table_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    StreamingAppender(path, header_for(_embedding("a"), EXTRA)).append(_embedding("a"), {})
    with pytest.raises(MetadataMismatch, match="holds 3000 features per row, this run makes 2000"):
        StreamingAppender(path, header_for(_embedding("a", n=2000), EXTRA))
    with pytest.raises(MetadataMismatch, match="other columns \\(extra column SeriesDescription"):
        StreamingAppender(path, header_for(_embedding("a"), ["PatientID"]))
