"""Loader processes: same volumes as reading in place, in order, and a crashing reader costs one series only."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from batch_fixtures import small_ct
from derived_dicom import write_axial

from RaptorExtension.cohort.sources import discover_folder
from RaptorExtension.volumes.prefetch import (
    HANDOFF_PREFIX,
    prefetch_in_processes,
    remove_stale_handoffs,
)
from RaptorExtension.volumes.volume import VolumeRef


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_process_loaders_match_direct_reads_and_survive_a_crashing_reader(tmp_path):
    for i in range(3):
        write_axial(small_ct(i), tmp_path / f"s{i}", patient_id=f"P{i}")
    items = sorted(discover_folder(tmp_path).items, key=lambda it: it.paths[0])
    good = [item.ref(f"good{i}") for i, item in enumerate(items)]
    crash = VolumeRef(id="crash", source="crashing-reader", loader=functools.partial(os._exit, 3))
    refs = [good[0], crash, good[1], good[2]]
    results = list(prefetch_in_processes(refs, workers=2, depth=3))
    assert [ref.id for ref, _ in results] == ["good0", "crash", "good1", "good2"]
    assert "crashed its process" in str(results[1][1]) and "crashing-reader" in str(results[1][1])
    for ref, loaded in (results[0], results[2], results[3]):
        direct = ref.load()
        np.testing.assert_array_equal(loaded.array, direct.array)
        np.testing.assert_array_equal(loaded.ijk_to_ras, direct.ijk_to_ras)
        assert (loaded.id, loaded.modality, loaded.info) == (direct.id, direct.modality, direct.info)
    assert not [n for n in os.listdir(_base()) if n.startswith(f"{HANDOFF_PREFIX}{os.getpid()}-")]  # cleaned up


def _base() -> str:
    from RaptorExtension.volumes.prefetch import handoff_base

    return handoff_base()


@pytest.mark.slow
def test_stale_handoff_folders_of_dead_jobs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{HANDOFF_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{HANDOFF_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"0")
    remove_stale_handoffs(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
