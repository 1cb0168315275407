"""Settings added later (preprocess, projection): carried by every file and read as their defaults when absent."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import numpy as np
import pytest

from RaptorExtension.embeddings.csv_format import META_COLUMNS, header_for
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.embeddings.settings import (
    ADDED_SETTINGS,
    REQUIRED_SETTINGS_KEYS,
    SETTINGS_KEYS,
    describe_differences,
    settings_hash,
    settings_of,
)
from RaptorExtension.embeddings.stream import (
    StreamingAppender,
    TableAppender,
    index_table,
)
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.encoding.projection import GENERATOR_NAME
from RaptorExtension.errors import MetadataMismatch

OLD_KEYS = ("format_version", "weight_sha256", "k", "seed", "projection_sha256", "planes", "grid", "image_size",
            "preset", "keep_cls")
"""SETTINGS_KEYS before preprocess and projection were added."""


def metadata(row_id: str = "a", **changes) -> dict:
    meta = {"format": "raptor-embedding", "id": row_id, "source": "s", "modality": "CT", "format_version": 1,
            "encoder": "m", "weight_sha256": "w" * 64, "k": 4, "seed": 0, "projection": GENERATOR_NAME,
            "projection_sha256": "p" * 64, "planes": ["axial"], "grid": 32, "image_size": 56,
            "preset": "minmax", "keep_cls": False, "preprocess": "direct", "n_features": 6}
    meta.update(changes)
    meta["settings_hash"] = settings_hash(meta)
    return meta


def embedding(row_id: str = "a", seed: int = 0, **changes) -> Embedding:
    vector = np.random.default_rng(seed).normal(size=6).astype(np.float32)
    return Embedding(vector=vector, metadata=metadata(row_id, **changes))


def old_table(path, rows=("a", "b")) -> None:
    """A CSV exactly as the release before these settings wrote it: no preprocess/projection columns."""
    old_meta = ("source", "modality", "format_version", "encoder", *OLD_KEYS[1:], "settings_hash")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *old_meta, *[f"e{i}" for i in range(6)]])
    for n, row_id in enumerate(rows):
        e = embedding(row_id, seed=n)
        values = {"planes": "axial", "keep_cls": "false"}
        writer.writerow([row_id, *[values.get(k, str(e.metadata[k])) for k in old_meta],
                         *[format(float(v), ".9g") for v in e.vector]])
    path.write_text(buffer.getvalue())


def test_new_keys_are_settings_and_columns():
    assert SETTINGS_KEYS[: len(OLD_KEYS)] == OLD_KEYS
    assert set(SETTINGS_KEYS) - set(OLD_KEYS) == set(ADDED_SETTINGS) == {"preprocess", "projection"}
    assert {"preprocess", "projection"} <= set(META_COLUMNS)
    assert set(REQUIRED_SETTINGS_KEYS) == set(OLD_KEYS)
    assert ADDED_SETTINGS["projection"] == GENERATOR_NAME and ADDED_SETTINGS["preprocess"] == "direct"


def test_default_settings_hash_is_the_old_one():
    """Resumable batches key rows by this hash: embeddings with the defaults must keep it."""
    meta = metadata()
    old = json.dumps({k: meta.get(k) for k in OLD_KEYS}, sort_keys=True, separators=(",", ":"))
    assert settings_hash(meta) == hashlib.sha256(old.encode()).hexdigest()[:16]
    assert settings_hash(metadata(preprocess="reference")) != settings_hash(meta)
    old_meta = {k: v for k, v in meta.items() if k not in ("preprocess", "projection")}
    assert settings_hash(old_meta) == settings_hash(meta)


def test_missing_keys_read_as_defaults():
    old_meta = {k: v for k, v in metadata().items() if k not in ("preprocess", "projection")}
    assert settings_of(old_meta) == settings_of(metadata())
    assert describe_differences(old_meta, metadata()) == []
    assert describe_differences(old_meta, metadata(preprocess="reference")) == ["preprocess 'direct' vs 'reference'"]


def test_old_csv_reads_with_defaults(tmp_path):
    path = tmp_path / "old.csv"
    old_table(path)
    table = read_table(path)
    assert table.ids == ["a", "b"]
    assert table.settings["preprocess"] == "direct" and table.settings["projection"] == GENERATOR_NAME
    index = index_table(path)
    assert index.settings == table.settings


def test_new_csv_carries_the_new_columns(tmp_path):
    path = tmp_path / "new.csv"
    TableAppender(path).append(embedding("a", preprocess="reference"))
    table = read_table(path)
    assert table.columns["preprocess"] == ["reference"] and table.columns["projection"] == [GENERATOR_NAME]
    assert table.settings["preprocess"] == "reference"


@pytest.mark.parametrize("appender", ["table", "streaming"])
def test_default_rows_append_to_an_old_csv_in_its_own_columns(tmp_path, appender):
    path = tmp_path / "old.csv"
    old_table(path)
    header_before = path.read_text().splitlines()[0]
    e = embedding("c", seed=5)
    if appender == "table":
        TableAppender(path).append(e)
    else:
        StreamingAppender(path, header_for(e), settings_of(e.metadata) | {"encoder": "m"}).append(e)
    assert path.read_text().splitlines()[0] == header_before
    table = read_table(path)
    assert table.ids == ["a", "b", "c"] and np.array_equal(table.features[2], e.vector)


@pytest.mark.parametrize("appender", ["table", "streaming"])
def test_other_settings_never_go_into_an_old_csv(tmp_path, appender):
    path = tmp_path / "old.csv"
    old_table(path)
    e = embedding("c", preprocess="reference")
    with pytest.raises(MetadataMismatch, match="preprocess 'direct' vs 'reference'"):
        if appender == "table":
            TableAppender(path).append(e)
        else:
            StreamingAppender(path, header_for(e), settings_of(e.metadata) | {"encoder": "m"})
    # An old table with a header but no rows yet: nothing to compare with, so the missing column decides.
    empty = tmp_path / "empty.csv"
    old_table(empty, rows=())
    with pytest.raises(MetadataMismatch, match="before the preprocess setting existed"):
        if appender == "table":
            TableAppender(empty).append(e)
        else:
            StreamingAppender(empty, header_for(e), settings_of(e.metadata) | {"encoder": "m"})
    assert len(empty.read_text().splitlines()) == 1


def test_old_probe_files_still_load_and_check(tmp_path, tiny_encoder):
    from helpers import random_probe

    from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
    from RaptorExtension.probes.probe import Probe

    embedder = Embedder(EmbedSettings(model="tiny", k=4, grid=16), encoder=tiny_encoder)
    probe = random_probe(embedder)
    for key in ("preprocess", "projection"):  # as a probe saved before these settings existed
        probe.embedding.pop(key, None)
    path = probe.save(tmp_path / "old.raptorprobe")
    loaded = Probe.load(path)
    meta = embedder.settings_metadata("minmax")
    loaded.check_embedding(dict(settings_of(meta), n_features=embedder.n_features), "default")
    reference = Embedder(EmbedSettings(model="tiny", k=4, grid=16, preprocess="reference"), encoder=tiny_encoder)
    with pytest.raises(MetadataMismatch, match="preprocess 'direct' vs 'reference'"):
        loaded.check_embedding(dict(settings_of(reference.settings_metadata("minmax")), n_features=embedder.n_features),
                               "reference")


def test_worker_parts_of_a_resumed_old_table_take_its_columns(tmp_path):
    """Several-GPU batches write parts that are later copied row by row into the table: same columns."""
    from RaptorExtension.embeddings.stream import effective_header

    path = tmp_path / "old.csv"
    old_table(path)
    new = header_for(embedding())
    assert effective_header(path, new) == path.read_text().splitlines()[0].split(",")
    assert effective_header(tmp_path / "none.csv", new) == new
    other = tmp_path / "other.csv"
    other.write_text("id,something,e0\n")
    assert effective_header(other, new) == new  # not an older form: the appender will name the difference
