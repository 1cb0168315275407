"""Fuzzing the embedding readers: a damaged or forged embedding loads exactly as written or is one InputError.

Random byte flips and truncations of a real embedding ``.npz``, and metadata
fields swapped for values of another type, are read by
:meth:`Embedding.load`, by the probes' :func:`load_embeddings` and by
``raptor info``.  Each either loads with the content the file holds (after a
harmless flip: the original) or raises the project's own error.  Tables (CSV,
no checksum) may change content under a flip, but still never raise anything
else.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding, build_metadata
from RaptorExtension.embeddings.table import read_table, write_table
from RaptorExtension.errors import RaptorError
from RaptorExtension.probes.probe import load_embeddings

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
F = 12


def _embedding(i: int = 0) -> Embedding:
    meta = build_metadata(encoder="tiny", weight_sha256="a" * 64, k=1, seed=0, projection_sha256="b" * 64,
                          planes=["axial", "coronal", "sagittal"], grid=8, image_size=28, preset="minmax",
                          keep_cls=False, shape=[3, 1, 2, 2], n_features=F, id=f"v{i}", source=f"v{i}.nrrd",
                          source_ijk_to_ras=np.eye(4).tolist(), slices_per_plane=[8, 8, 8], seconds=0.5,
                          dicom={"PatientID": "x"})
    return Embedding(vector=np.random.default_rng(i).normal(size=F).astype(np.float32), metadata=meta)


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory) -> bytes:
    return _embedding().save(tmp_path_factory.mktemp("fuzz") / "v0.npz").read_bytes()


def _load(path):
    """``Embedding.load``, ``load_embeddings`` and ``raptor info``; returns the embedding or the RaptorError."""
    try:
        result = Embedding.load(path)
    except RaptorError as exc:
        result = exc
    try:
        loaded = load_embeddings([path])
    except RaptorError:
        assert isinstance(result, RaptorError)
    else:
        assert isinstance(result, Embedding) and np.array_equal(loaded.features[0], result.vector)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["info", str(path)])  # any other exception escapes here and fails the test
    assert code == (0 if isinstance(result, Embedding) else 1)
    return result


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips_load_the_original_or_fail_cleanly(tmp_path, npz_bytes, flips):
    data = bytearray(npz_bytes)
    for offset, mask in flips:
        data[offset % len(data)] ^= mask
    path = tmp_path / "v0.npz"
    path.write_bytes(bytes(data))
    result = _load(path)
    if isinstance(result, Embedding):
        original = _embedding()
        assert np.array_equal(result.vector, original.vector) and result.metadata == original.metadata


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncations_fail_cleanly(tmp_path, npz_bytes, cut):
    path = tmp_path / "v0.npz"
    path.write_bytes(npz_bytes[: cut % len(npz_bytes)])
    assert isinstance(_load(path), RaptorError)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@FUZZ
@given(data=st.data())
def test_metadata_type_swaps_load_as_written_or_fail_cleanly(tmp_path, data):
    original = _embedding()
    meta = json.loads(json.dumps(original.metadata))
    path_in_meta = data.draw(st.sampled_from(list(_paths(meta))))
    if path_in_meta:
        target = meta
        for key in path_in_meta[:-1]:
            target = target[key]
        old = target[path_in_meta[-1]]
        target[path_in_meta[-1]] = data.draw(ANY_JSON.filter(lambda v: _kind(v) != _kind(old)))
    else:  # the whole metadata replaced by another kind of JSON value
        meta = data.draw(ANY_JSON.filter(lambda v: not isinstance(v, dict)))
    path = tmp_path / "forged.npz"
    np.savez(path, embedding=original.vector, metadata=np.array(json.dumps(meta)))
    result = _load(path)
    if isinstance(result, Embedding):  # accepted: exactly what the file says, nothing coerced
        assert result.metadata == json.loads(json.dumps(meta)) and np.array_equal(result.vector, original.vector)


@pytest.fixture(scope="module")
def table_bytes(tmp_path_factory) -> bytes:
    path = write_table(tmp_path_factory.mktemp("fuzz") / "t.csv", [_embedding(i) for i in range(3)])
    return path.read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.integers(min_value=0))
def test_damaged_tables_raise_only_the_projects_error(tmp_path, table_bytes, flips, cut):
    data = bytearray(table_bytes)
    for offset, mask in flips:
        data[offset % len(data)] ^= mask
    path = tmp_path / "t.csv"
    path.write_bytes(bytes(data[: len(data) - cut % 200]))
    try:
        table = read_table(path)
    except RaptorError:
        return
    assert np.isfinite(table.features).all() and len(set(table.ids)) == len(table.ids)
