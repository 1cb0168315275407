"""Fuzzing the probe reader: every damaged or forged ``.raptorprobe`` loads exactly as written or is one InputError.

Random byte flips and truncations of a real probe file, and ``probe.json``
fields swapped for values of another type (with the checksum recomputed, as a
forger would), are read by :meth:`Probe.load` and by ``raptor probe info``.
Each either loads with the content the file holds (after a harmless flip:
the original probe) or raises the project's own error; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from RaptorExtension.cli import main
from RaptorExtension.errors import RaptorError
from RaptorExtension.probes.probe import Probe
from RaptorExtension.probes.probe_file import content_digest, read_probe_file

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
F = 12


@pytest.fixture(scope="module")
def probe_bytes(tmp_path_factory) -> bytes:
    from RaptorExtension.embeddings.embedding import build_metadata
    from RaptorExtension.probes.probe import embedding_description

    rng = np.random.default_rng(0)
    meta = build_metadata(encoder="tiny", weight_sha256="a" * 64, k=1, seed=0, projection_sha256="b" * 64,
                          planes=["axial", "coronal", "sagittal"], grid=8, image_size=28, preset="minmax",
                          keep_cls=False, shape=[3, 1, 2, 2], n_features=F)
    probe = Probe(task="binary", model="logistic", classes=["0", "1"], label_columns=["y"],
                  feature_mean=rng.normal(size=F), feature_scale=rng.uniform(0.5, 2, size=F),
                  weight=rng.normal(size=(1, F)), bias=rng.normal(size=1), embedding=embedding_description(meta),
                  metrics={"test": {"n": 6, "auc": 0.75, "accuracy": 0.5, "aupr": None}},
                  training={"selection": {"method": "val", "parameter": "C", "grid": [0.1, 1.0], "chosen": 1.0,
                                          "scores": {"0.1": 0.5, "1": 0.75}},
                            "labels_file": "labels.csv", "seed": 0, "converged": True, "warnings": []})
    path = probe.save(tmp_path_factory.mktemp("fuzz") / "p.raptorprobe")
    return path.read_bytes()


def _load(path):
    """``Probe.load`` and ``raptor probe info`` (plain and --json); returns the probe or the RaptorError."""
    try:
        probe = Probe.load(path)
    except RaptorError as exc:
        result = exc
    else:
        result = probe
    for argv in (["probe", "info", str(path)], ["probe", "info", "--json", str(path)]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(argv)  # any other exception escapes here and fails the test
        assert code == (0 if isinstance(result, Probe) else 1)
    return result


def _same(a: Probe, b: Probe) -> bool:
    return (a.task, a.model, a.classes, a.label_columns, a.embedding, a.metrics, a.training) == (
        b.task, b.model, b.classes, b.label_columns, b.embedding, b.metrics, b.training
    ) and all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips_load_the_original_or_fail_cleanly(tmp_path, probe_bytes, flips):
    original = Probe.load(_write(tmp_path / "good.raptorprobe", probe_bytes))
    data = bytearray(probe_bytes)
    for offset, mask in flips:
        data[offset % len(data)] ^= mask
    result = _load(_write(tmp_path / "flipped.raptorprobe", bytes(data)))
    assert isinstance(result, RaptorError) or _same(result, original)


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncations_fail_cleanly(tmp_path, probe_bytes, cut):
    result = _load(_write(tmp_path / "cut.raptorprobe", probe_bytes[: cut % len(probe_bytes)]))
    assert isinstance(result, RaptorError)


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
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
def test_field_type_swaps_load_as_written_or_fail_cleanly(tmp_path, probe_bytes, data):
    with zipfile.ZipFile(io.BytesIO(probe_bytes)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(members["probe.json"])
    paths = [p for p in _paths(meta) if p and p[0] != "content_sha256"]
    path = data.draw(st.sampled_from(paths))
    target = meta
    for key in path[:-1]:
        target = target[key]
    old = target[path[-1]]
    new = data.draw(ANY_JSON.filter(lambda v: _kind(v) != _kind(old)))
    target[path[-1]] = new
    meta["content_sha256"] = content_digest(meta)
    members["probe.json"] = json.dumps(meta).encode()
    forged = tmp_path / "forged.raptorprobe"
    with zipfile.ZipFile(forged, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    result = _load(forged)
    if isinstance(result, Probe):  # accepted: exactly what the file says, no field silently coerced
        written, _ = read_probe_file(forged)
        assert result.task == written["task"] and result.classes == written["classes"]
        assert result.embedding == written["embedding"]
        assert result.metrics == (written.get("metrics") or {}) and result.training == (written.get("training") or {})
        assert result.label_columns == (written.get("label_columns") or [])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
