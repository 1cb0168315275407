"""Cluster shards and several devices: every way of splitting a job gives the single run's rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import tiny_cli_args, tiny_settings, write_cohort

from RaptorExtension.cli import main
from RaptorExtension.cohort.job import BatchJob, BatchSources
from RaptorExtension.cohort.merge import merge_parts
from RaptorExtension.cohort.run import run_batch
from RaptorExtension.cohort.sources import shard_of
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import MetadataMismatch, RaptorError

SHARDS = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "cohort"
    write_cohort(folder, 7)
    return folder


@pytest.fixture(scope="module")
def single_and_shards(cohort, tiny_model_dir, tmp_path_factory):
    """One run over the whole cohort, and the same cohort as SHARDS array jobs through the CLI."""
    out = tmp_path_factory.mktemp("runs")
    single = out / "single.csv"
    run_batch(BatchJob(csv=single, sources=BatchSources(folders=[str(cohort)]), settings=tiny_settings(tiny_model_dir),
                       readers=0))
    parts = []
    for i in range(SHARDS):
        part = out / f"part{i}.csv"
        assert main(["batch", "--folder", str(cohort), "--csv", str(part), "--shard", f"{i}/{SHARDS}", "--readers", "0",
                     "-q", *tiny_cli_args(tiny_model_dir)]) == 0
        parts.append(part)
    return single, parts


def test_shards_plus_merge_equal_the_single_run_row_for_row(single_and_shards, tmp_path, capsys):
    single, parts = single_and_shards
    sizes = [len(read_table(p).ids) for p in parts]
    assert sum(sizes) == 7 and all(sizes)  # a real split, no shard empty for this cohort
    for i, part in enumerate(parts):
        assert all(shard_of(row_id, SHARDS) == i for row_id in read_table(part).ids)
    merged = tmp_path / "merged.csv"
    assert main(["merge", *map(str, reversed(parts)), "-o", str(merged)]) == 0
    assert "merged 3 parts: 7 series" in capsys.readouterr().out
    assert merged.read_text().splitlines() == single.read_text().splitlines()
    record = json.loads((tmp_path / "merged.batch.json").read_text())
    assert record["shard"] == [0, 1] and len(record["assigned"]) == 7


def test_merge_refuses_missing_duplicated_foreign_or_incomplete_parts(single_and_shards, tmp_path):
    single, parts = single_and_shards
    with pytest.raises(RaptorError, match=f"shard 1/{SHARDS} missing"):
        merge_parts([parts[0], parts[2]], tmp_path / "m.csv")
    twin = tmp_path / "twin.csv"
    shutil.copy(parts[0], twin)
    shutil.copy(parts[0].with_name("part0.batch.json"), tmp_path / "twin.batch.json")
    shutil.copy(parts[0].with_name("part0_errors.csv"), tmp_path / "twin_errors.csv")
    with pytest.raises(RaptorError, match=f"shard 0/{SHARDS} is given twice"):
        merge_parts([parts[0], twin, *parts[1:]], tmp_path / "m.csv")
    lonely = tmp_path / "lonely.csv"
    shutil.copy(parts[0], lonely)
    with pytest.raises(RaptorError, match="no batch record lonely.batch.json beside it"):
        merge_parts([lonely], tmp_path / "m.csv")

    # A shard whose job died before finishing: one of its planned series is neither a row nor a logged failure.
    broken = tmp_path / "broken"
    broken.mkdir()
    copies = []
    for part in parts:
        for suffix in (".csv", ".batch.json", "_errors.csv"):
            shutil.copy(part.with_name(part.stem + suffix), broken / (part.stem + suffix))
        copies.append(broken / part.name)
    lines = copies[1].read_text().splitlines(keepends=True)
    copies[1].write_text("".join(lines[:-1]))
    with pytest.raises(RaptorError, match=f"shard 1/{SHARDS} is incomplete: 1 series neither embedded nor failed"):
        merge_parts(copies, tmp_path / "m.csv")
    # A logged failure is not missing: the merge goes on and lists it.
    dropped = lines[-1].split(",", 1)[0]
    (broken / "part1_errors.csv").write_text(f"id,source,reason\n{dropped},somewhere,could not be read\n")
    summary = merge_parts(copies, tmp_path / "m.csv")
    assert (summary.rows, summary.failed) == (6, 1)
    assert dropped in (tmp_path / "m_errors.csv").read_text()
    assert not (tmp_path / "m.csv").read_text().count(dropped)


def test_merge_refuses_other_settings(cohort, single_and_shards, tiny_model_dir, tmp_path):
    _, parts = single_and_shards
    other = tmp_path / "part2.csv"
    run_batch(BatchJob(csv=other, sources=BatchSources(folders=[str(cohort)]), settings=tiny_settings(tiny_model_dir, seed=3),
                       readers=0, shard=(2, SHARDS)))
    with pytest.raises(MetadataMismatch, match="seed 0 vs 3"):
        merge_parts([parts[0], parts[1], other], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_two_worker_processes_give_the_single_run_rows(cohort, single_and_shards, tiny_model_dir, tmp_path):
    """One worker per device ("cpu,cpu" stands in for two GPUs), each writing a part merged into one table."""
    single, _ = single_and_shards
    out = tmp_path / "workers.csv"
    summary = run_batch(BatchJob(csv=out, sources=BatchSources(folders=[str(cohort)]),
                                 settings=tiny_settings(tiny_model_dir), devices=["cpu", "cpu"], readers=0))
    assert (summary.done, summary.failed, summary.cancelled) == (7, 0, False)
    assert not (tmp_path / ".workers.csv.workers").exists()  # parts merged and removed
    got, want = read_table(out), read_table(single)
    order = [got.ids.index(i) for i in want.ids]
    assert sorted(got.ids) == want.ids
    np.testing.assert_array_equal(got.features[order], want.features)
    lines = {line.split(",", 1)[0]: line for line in out.read_text().splitlines()[1:]}
    assert [lines[i] for i in want.ids] == single.read_text().splitlines()[1:]
