"""Resume: a killed or cancelled batch loses at most the series in flight; a rerun adds exactly the rest."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import ROOT, small_ct, tiny_cli_args, tiny_settings
from derived_dicom import write_axial
from helpers import write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.cohort.job import BatchJob, BatchSources
from RaptorExtension.cohort.merge import merge_parts
from RaptorExtension.cohort.run import run_batch
from RaptorExtension.cohort.sources import shard_of
from RaptorExtension.embeddings.stream import index_table
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import MetadataMismatch, RaptorError


@pytest.fixture(scope="module")
def manifest_of_many(shared_data, tmp_path_factory) -> tuple[Path, int]:
    """A manifest listing one small series folder under many ids: a long job made of quick volumes."""
    root = tmp_path_factory.mktemp("many")
    series = write_axial(small_ct(0), root / "series", patient_id="RAPTOR-TEST-0001")
    count = 24
    manifest = root / "manifest.csv"
    manifest.write_text("path,id\n" + "".join(f"series,case-{i:03d}\n" for i in range(count)))
    return manifest, count


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_adds_exactly_the_missing_rows(manifest_of_many, tiny_model_dir, tmp_path, capsys):
    manifest, count = manifest_of_many
    out = tmp_path / "cohort.csv"
    args = ["batch", "--manifest", str(manifest), "--csv", str(out), "--readers", "0", "-q", *tiny_cli_args(tiny_model_dir)]
    process = subprocess.Popen([sys.executable, "-m", "RaptorExtension", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:  # the header and at least two rows
                break
            time.sleep(0.02)
        assert process.poll() is None, f"the batch ended before it could be killed: {process.stderr.read().decode()[-500:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    survived = index_table(out, allow_torn_tail=True)
    assert 2 <= len(survived.ids) < count
    after_kill = out.read_bytes()
    kept_rows = after_kill[: after_kill.rfind(b"\n") + 1]

    # Also simulate the worst moment: a row half written when the process died.
    with open(out, "ab") as handle:
        handle.write(b"case-999,RAPTOR-TEST-0001,1.2.3,4.5.6,torn row,0.1,0.2")

    assert main(args) == 0
    assert f"embedded {count - len(survived.ids)}, skipped {len(survived.ids)} already done, failed 0" in capsys.readouterr().out
    table = read_table(out)  # parses: no torn or duplicated row
    assert sorted(table.ids) == [f"case-{i:03d}" for i in range(count)]
    assert out.read_bytes().startswith(kept_rows)  # the rows written before the kill are untouched
    assert main(args) == 0  # a third run has nothing left to do
    assert "embedded 0, skipped 24 already done" in capsys.readouterr().out


@pytest.mark.slow
def test_cancel_keeps_finished_rows_and_resume_completes(manifest_of_many, tiny_model_dir, tmp_path):
    manifest, count = manifest_of_many
    out = tmp_path / "cohort.csv"
    job = BatchJob(csv=out, sources=BatchSources(manifests=[str(manifest)]), settings=tiny_settings(tiny_model_dir),
                   readers=1, loader="threads")
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append((p.phase, p.done, p.total))
        if p.done >= 3:
            cancel.set()

    summary = run_batch(job, progress=progress, cancel=cancel)
    # Rows embedded before the cancel took effect are written, not thrown away (at most the writer's short queue).
    kept = summary.done
    assert summary.cancelled and 3 <= kept <= 3 + 6 < count
    assert len(read_table(out).ids) == kept
    assert ("embedding", 0, count) in seen
    assert json.loads((tmp_path / "cohort.batch.json").read_text())["status"] == "cancelled"

    summary = run_batch(BatchJob(csv=out, sources=BatchSources(manifests=[str(manifest)]),
                                 settings=tiny_settings(tiny_model_dir), readers=0))
    assert (summary.done, summary.skipped, summary.failed, summary.cancelled) == (count - kept, kept, 0, False)
    assert len(read_table(out).ids) == count


def test_rerun_with_other_settings_or_shard_is_refused(manifest_of_many, tiny_model_dir, tmp_path):
    manifest, _ = manifest_of_many
    small = tmp_path / "one.csv"
    small_manifest = tmp_path / "one_manifest.csv"
    small_manifest.write_text(f"path,id\n{manifest.parent / 'series'},only\n")
    sources = BatchSources(manifests=[str(small_manifest)])
    run_batch(BatchJob(csv=small, sources=sources, settings=tiny_settings(tiny_model_dir), readers=0))
    with pytest.raises(MetadataMismatch, match="k 4 vs 8"):
        run_batch(BatchJob(csv=small, sources=sources, settings=tiny_settings(tiny_model_dir, k=8), readers=0))
    with pytest.raises(RaptorError, match="was written as shard 0/1, this run is shard 1/2"):
        run_batch(BatchJob(csv=small, sources=sources, settings=tiny_settings(tiny_model_dir), readers=0, shard=(1, 2)))
    # Without the record beside it, the table's own rows still refuse other settings.
    (tmp_path / "one.batch.json").unlink()
    with pytest.raises(MetadataMismatch, match="k 4 vs 8"):
        run_batch(BatchJob(csv=small, sources=sources, settings=tiny_settings(tiny_model_dir, k=8), readers=0))
    assert len(read_table(small).ids) == 1


@pytest.mark.slow
def test_files_added_between_runs_never_move_or_reembed_earlier_rows(tiny_model_dir, tmp_path):
    """Shards and resume keys are the ids: a second ct.nrrd in another folder must not rename the first."""
    root = tmp_path / "cohort"
    rng = np.random.default_rng(0)

    def scan(relative: str) -> None:
        write_nrrd(root / relative, rng.uniform(0, 100, (8, 9, 10)).astype(np.float32))

    for relative in ("p1/ct.nrrd", "p1/pet.nrrd", "p2/mr.nrrd", "c.nrrd", "p3/deep/x.nrrd"):
        scan(relative)
    shards = 3

    def run_all() -> list:
        return [run_batch(BatchJob(csv=tmp_path / f"part{i}.csv", sources=BatchSources(folders=[str(root)]),
                                   settings=tiny_settings(tiny_model_dir), readers=0, shard=(i, shards)))
                for i in range(shards)]

    first = run_all()
    before = {i: (tmp_path / f"part{i}.csv").read_bytes() for i in range(shards)}
    old_ids = {i: read_table(tmp_path / f"part{i}.csv").ids for i in range(shards) if first[i].done}
    assert sorted(sum(old_ids.values(), [])) == ["c", "p1__ct", "p1__pet", "p2__mr", "p3__deep__x"]
    for relative in ("p2/ct.nrrd", "p4/ct.nrrd", "new.nrrd", "p3/deep/y.nrrd"):  # a second and third ct.nrrd among them
        scan(relative)
    second = run_all()
    for i in range(shards):
        part = tmp_path / f"part{i}.csv"
        assert part.read_bytes().startswith(before[i])  # earlier rows untouched, in the same part
        ids = read_table(part).ids
        added = ids[len(old_ids.get(i, [])):]
        assert ids[: len(old_ids.get(i, []))] == old_ids.get(i, [])
        assert all(shard_of(row_id, shards) == i for row_id in ids)
        assert (second[i].skipped, second[i].done, second[i].failed) == (len(old_ids.get(i, [])), len(added), 0)
        assert second[i].foreign_rows == 0
    summary = merge_parts([tmp_path / f"part{i}.csv" for i in range(shards)], tmp_path / "merged.csv")
    assert summary.rows == 9 and read_table(tmp_path / "merged.csv").ids == sorted(
        ["c", "new", "p1__ct", "p1__pet", "p2__ct", "p2__mr", "p3__deep__x", "p3__deep__y", "p4__ct"])
