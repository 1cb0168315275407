"""Every file a command writes gets the mode the user's umask gives (as `open()` would), never a private 0600.

Colleagues on a shared cohort folder must be able to read embeddings, probes, tables and figures made
under umask 022; under umask 077 the same files stay private.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import blob_volume, write_nrrd

from RaptorExtension.cli import main


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _labelled_npz(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    arrays, lines = {}, ["id,split,blob"]
    for split, count in (("train", 6), ("val", 4)):
        images = []
        for i in range(count):
            images.append(blob_volume(rng, with_blob=i % 2 == 1)[0][:12, :12, :12].astype(np.uint8))
            lines.append(f"{split}_{i},{split},{i % 2}")
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array([[i % 2] for i in range(count)])
    np.savez(folder / "cohort.npz", **arrays)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "cohort.npz", folder / "labels.csv"


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["umask022", "umask077"])
def test_every_output_gets_the_umask_mode(umask, tmp_path, tiny_model_dir, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    npz, labels = _labelled_npz(inputs)
    for i in range(2):
        write_nrrd(inputs / "scans" / f"scan{i}.nrrd", np.random.default_rng(i).uniform(0, 100, (10, 12, 14)).astype(np.float32))
    tiny = ["--model", str(tiny_model_dir), "--k", "4", "--device", "cpu"]
    runs = [
        ["embed", str(npz), "--grid", "native", "--preset", "uint8", "-o", str(out / "npz"), "--csv", str(out / "emb.csv"), "-q", *tiny],
        ["batch", "--folder", str(inputs / "scans"), "--csv", str(out / "batch.csv"), "--parquet", str(out / "batch.parquet"),
         "--grid", "16", "--readers", "0", "-q", *tiny],
        ["merge", str(out / "batch.csv"), "-o", str(out / "merged.csv")],
        ["probe", "fit", str(out / "emb.csv"), str(labels), "-o", str(out / "blob.raptorprobe"), "-q"],
        ["probe", "apply", str(out / "blob.raptorprobe"), str(out / "emb.csv"), "-o", str(out / "scores.csv")],
        ["explain", str(out / "blob.raptorprobe"), f"{npz}#val_1", "-o", str(out / "why.png"), "--heatmap",
         str(out / "why.nrrd"), "--curves", str(out / "why.csv"), "--device", "cpu"],
    ]
    for args in runs:
        assert main(args) == 0, (args[0], capsys.readouterr().err)
    written = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    expected_files = {"npz/train_0.npz", "emb.csv", "batch.csv", "batch.batch.json", "batch_errors.csv", "batch.parquet",
                      "merged.csv", "blob.raptorprobe", "blob_metrics.json", "blob_roc.png", "scores.csv", "why.png",
                      "why.nrrd", "why.csv"}
    assert expected_files <= set(written), sorted(expected_files - set(written))
    wrong = {name: oct(mode) for name, mode in written.items() if mode != 0o666 & ~umask}
    assert not wrong, f"not {oct(0o666 & ~umask)}: {wrong}"
