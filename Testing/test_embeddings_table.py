"""Whole embedding tables read back: bit-exact features, one-line errors, and the forms a hand-edited CSV takes.

The speed is measured by ``bench/csv_read.py`` (a 1,000-row K=100 table; README, Measured numbers).
"""

from __future__ import annotations

import numpy as np
import pytest

from RaptorExtension.embeddings import feature_block
from RaptorExtension.embeddings.embedding import Embedding, build_metadata
from RaptorExtension.embeddings.table import read_table, write_table
from RaptorExtension.errors import InputError


def embeddings(n=4, features=96, seed=0):
    rng = np.random.default_rng(seed)
    meta = build_metadata(encoder="tiny", weight_sha256="a" * 64, k=2, seed=0, projection_sha256="b" * 64,
                          planes=["axial", "coronal", "sagittal"], grid=16, image_size=56, preset="minmax",
                          keep_cls=False, n_features=features)
    out = []
    for i in range(n):
        vector = (rng.normal(size=features) * 10.0 ** rng.integers(-8, 8, size=features)).astype(np.float32)
        vector[:3] = [0.0, -0.0, np.float32(1e-45)]  # zero, negative zero, the smallest subnormal
        out.append(Embedding(vector=vector, metadata=dict(meta, id=f"v{i}", source=f"/data/scan {i}.nrrd", modality="CT")))
    return out


@pytest.fixture(params=["arrow", "numpy"])
def parser(request, monkeypatch):
    """Both ways of parsing the numbers: Arrow's cast, and NumPy where pyarrow is missing (a fresh Slicer)."""
    if request.param == "numpy":
        monkeypatch.setattr(feature_block, "_arrow", lambda: None)
    else:
        pytest.importorskip("pyarrow")
    return request.param


def test_a_table_reads_back_bit_for_bit(tmp_path, parser, monkeypatch):
    items = embeddings()
    extras = [{"SeriesDescription": 'CT, "arterial"', "PatientID": f"P{i}"} for i in range(len(items))]
    path = write_table(tmp_path / "t.csv", items, extras)
    monkeypatch.setattr(feature_block, "BLOCK_BYTES", 700)  # lines cross block boundaries
    table = read_table(path)
    assert table.ids == [e.id for e in items]
    np.testing.assert_array_equal(table.features.view(np.uint32), np.stack([e.vector for e in items]).view(np.uint32))
    assert table.columns["SeriesDescription"] == ['CT, "arterial"'] * len(items)
    assert table.columns["source"][1] == "/data/scan 1.nrrd"
    assert table.settings["k"] == 2 and table.settings["planes"] == ["axial", "coronal", "sagittal"]


def test_hand_edited_forms_still_read(tmp_path, parser):
    """CRLF line endings, a byte-order mark, blank lines, a quoted number, spaces, features not last."""
    items = embeddings(n=3, features=6)
    text = write_table(tmp_path / "t.csv", items).read_text()
    lines = text.splitlines()
    first_value = lines[1].split(",")[-6]
    lines[1] = lines[1].replace("," + first_value + ",", ',"' + first_value + '",', 1)  # quoted
    lines[2] = ",".join(lines[2].split(",")[:-1] + [" " + lines[2].split(",")[-1] + " "])  # spaces
    (tmp_path / "edited.csv").write_bytes(("\ufeff" + "\r\n".join([lines[0], lines[1], "", lines[2], lines[3]]) + "\r\n").encode())
    table = read_table(tmp_path / "edited.csv")
    np.testing.assert_array_equal(table.features, np.stack([e.vector for e in items]))
    # A column added after the features (a spreadsheet's doing) is kept as a column.
    rows = [line + ",note" for line in text.splitlines()]
    rows[0] = text.splitlines()[0] + ",remark"
    (tmp_path / "extra.csv").write_text("\n".join(rows) + "\n")
    table = read_table(tmp_path / "extra.csv")
    np.testing.assert_array_equal(table.features, np.stack([e.vector for e in items]))
    assert table.columns["remark"] == ["note"] * 3


def test_a_torn_row_is_one_line_naming_the_line(tmp_path, parser):
    text = write_table(tmp_path / "t.csv", embeddings(n=3)).read_text()
    torn = text[: text.rindex("\n", 0, len(text) - 1) + 200]  # the last row cut short, no newline
    (tmp_path / "torn.csv").write_text(torn)
    with pytest.raises(InputError, match=r"torn\.csv: line 4 has \d+ columns, the header \d+ \(a torn or edited row\)$"):
        read_table(tmp_path / "torn.csv")
    lines = text.splitlines()
    lines[1] = lines[1] + ",0.5"  # one value too many
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 2 has 1\d\d columns"):
        read_table(tmp_path / "long.csv")


def test_a_non_numeric_value_is_one_line_naming_line_and_column(tmp_path, parser):
    text = write_table(tmp_path / "t.csv", embeddings(n=3, features=6)).read_text()
    lines = text.splitlines()
    cells = lines[2].split(",")
    cells[-2] = "n/a"
    lines[2] = ",".join(cells)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 3 has a non-numeric feature value \(e4 = 'n/a'\)$"):
        read_table(tmp_path / "bad.csv")
    cells[-2] = ""
    lines[2] = ",".join(cells)
    (tmp_path / "empty.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 3 has a non-numeric feature value \(e4 = ''\)"):
        read_table(tmp_path / "empty.csv")


def test_duplicate_ids_and_empty_files(tmp_path, parser):
    text = write_table(tmp_path / "t.csv", embeddings(n=2)).read_text()
    lines = text.splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(InputError, match=r"id 'v0' appears more than once"):
        read_table(tmp_path / "dup.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty CSV"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(lines[0] + "\n")
    assert read_table(tmp_path / "header.csv").features.shape == (0, 96)


@pytest.mark.parametrize("threads", [1, 3])
def test_every_block_size_gives_the_same_table(tmp_path, monkeypatch, threads):
    """Blocks ending mid-line, on a line's end, on the file's end, and lines longer than a block."""
    items = embeddings(n=5, features=30)
    path = write_table(tmp_path / "t.csv", items)
    expected = np.stack([e.vector for e in items])
    header_bytes = len(path.read_bytes().split(b"\n", 1)[0]) + 1
    body = path.stat().st_size - header_bytes
    with open(path, "rb") as handle:
        handle.readline()
        first_row = len(handle.readline())
    for size in (7, first_row - 1, first_row, first_row + 1, body - 1, body, body + 1, 1 << 20):
        monkeypatch.setattr(feature_block, "BLOCK_BYTES", size)
        with open(path, "rb") as handle:
            header = handle.readline().decode().rstrip("\n").split(",")
            prefixes, features = feature_block.read_feature_rows(handle, path, header, header.index("e0"), threads=threads)
        assert [p[0] for p in prefixes] == [e.id for e in items], size
        np.testing.assert_array_equal(features, expected)
