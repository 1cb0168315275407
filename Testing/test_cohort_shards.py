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

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

SHARDS = 3


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory) -> Path:
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


def test_merge_refuses_another_cohort_salt_torn_part_duplicate_or_stale_plan(cohort, single_and_shards, tiny_model_dir,
                                                                               tmp_path):
    """Each refusal of `raptor merge` from parts really written by shard runs, then altered as a user might."""
    from RaptorExtension.cohort.anonymize import Anonymizer
    from RaptorExtension.cohort.sources import SeriesFilter

    _, parts = single_and_shards

    def shard(name: str, i: int, **job) -> Path:
        out = tmp_path / name / f"part{i}.csv"
        run_batch(BatchJob(csv=out, sources=BatchSources(folders=[str(cohort)]), settings=tiny_settings(tiny_model_dir),
                           readers=0, shard=(i, SHARDS), **job))
        return out

    def copies(name: str) -> list[Path]:
        (tmp_path / name).mkdir()
        for part in parts:
            for suffix in (".csv", ".batch.json", "_errors.csv"):
                shutil.copy(part.with_name(part.stem + suffix), tmp_path / name / (part.stem + suffix))
        return [tmp_path / name / p.name for p in parts]

    merged = tmp_path / "m.csv"
    # Another cohort: shard 1 run with a filter that leaves one series out.
    filtered = shard("filtered", 1, filters=SeriesFilter(description="derived axial [0-5]$"))
    with pytest.raises(RaptorError, match=f"{filtered}: was planned from another cohort than {parts[0]}"):
        merge_parts([parts[0], filtered, parts[2]], merged)
    # A series added to the cohort after the other shards ran, then only shard 1 rerun: its plan is newer.
    grown = tmp_path / "grown"
    shutil.copytree(cohort, grown)
    write_cohort(grown, 8)  # the same 7 series (same UIDs) plus an eighth
    rerun = tmp_path / "rerun" / "part1.csv"
    run_batch(BatchJob(csv=rerun, sources=BatchSources(folders=[str(grown)]), settings=tiny_settings(tiny_model_dir),
                       readers=0, shard=(1, SHARDS)))
    with pytest.raises(RaptorError, match="was planned from another cohort"):
        merge_parts([parts[0], rerun, parts[2]], merged)
    # Another salt, or anonymized beside plain parts: named as such, not as another cohort.
    salted = [shard("salt-a", i, anonymizer=Anonymizer("the first salt, 16+")) for i in range(SHARDS)]
    other_salt = shard("salt-b", 1, anonymizer=Anonymizer("another salt, also 16+"))
    with pytest.raises(RaptorError, match=f"{other_salt}: anonymization \\(or its salt\\) differs from {salted[0]}"):
        merge_parts([salted[0], other_salt, salted[2]], merged)
    with pytest.raises(RaptorError, match="anonymization \\(or its salt\\) differs"):
        merge_parts([parts[0], salted[1], parts[2]], merged)
    # The same salt everywhere merges; with this salt shard 1 holds no series, and an empty shard must still
    # record the cohort's intensity preset (it once recorded minmax and the merge refused it).
    assert read_table(salted[1], require_settings=False).ids == [] and merge_parts(salted, merged).rows == 7
    merged.unlink()
    # A torn last row (the shard was killed mid-write and not rerun).
    torn = copies("torn")
    with open(torn[2], "ab") as handle:
        handle.write(b"1.2.3,half a row,0.1")
    with pytest.raises(RaptorError, match=f"{torn[2]}: line 4 is torn \\(the writer was killed mid-row\\); rerun"):
        merge_parts(torn, merged)
    # A series twice (a part's rows pasted onto it again).
    twice = copies("twice")
    lines = twice[0].read_text().splitlines(keepends=True)
    twice[0].write_text("".join(lines) + lines[1])
    row_id = lines[1].split(",", 1)[0]
    with pytest.raises(RaptorError, match=f"{twice[0]}: id '{row_id}' appears more than once"):
        merge_parts(twice, merged)
    # Stale or edited plans: a row its plan does not list, a plan listing another shard's series, plans short of the cohort.
    foreign = copies("foreign")
    extra = parts[1].read_text().splitlines(keepends=True)[1]
    with open(foreign[0], "a") as handle:
        handle.write(extra)
    with pytest.raises(RaptorError, match=f"{foreign[0]}: row '{extra.split(',', 1)[0]}' is not in its shard's plan"):
        merge_parts(foreign, merged)
    for name, edit, message in (
        ("listed", lambda r, other: r["assigned"].append(other), "its plan lists .*, which belongs to shard 1/3"),
        ("short", lambda r, other: r.update(assigned=[]), "do not add up to the planned cohort"),
    ):
        edited = copies(name)
        record_file = edited[0].with_name("part0.batch.json")
        record = json.loads(record_file.read_text())
        if name == "short":  # shard 0's rows and failures removed with its plan: only the cohort's sum can tell
            edited[0].write_text(edited[0].read_text().splitlines(keepends=True)[0])
        edit(record, read_table(parts[1]).ids[0])
        record_file.write_text(json.dumps(record))
        with pytest.raises(RaptorError, match=message):
            merge_parts(edited, merged)
    assert not merged.exists()
