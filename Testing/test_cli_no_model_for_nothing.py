"""No command loads a model for nothing: settings known up front are checked first, and finished work is not redone.

Loading DINOv2-L takes tens of seconds (minutes on a network file system), and embedding a volume only to be
refused by the CSV it goes to wastes more (29 s in a trial).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_model_dir
from helpers import write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.encoding import pipeline


@pytest.fixture
def scans(tmp_path):
    return [write_nrrd(tmp_path / "scans" / f"s{i}.nrrd", np.random.default_rng(i).uniform(0, 50, (8, 10, 12)).astype(np.float32))
            for i in range(2)]


@pytest.fixture
def no_model(monkeypatch):
    """Makes loading a model fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    def arm():
        monkeypatch.setattr(pipeline, "load_encoder", refuse)

    return arm


def tiny(model_dir, k=2):
    return ["--model", str(model_dir), "--k", str(k), "--grid", "12", "--device", "cpu"]


def test_embed_refuses_a_csv_with_other_settings_before_loading_the_model(scans, tmp_path, tiny_model_dir, no_model, capsys):
    csv_path = tmp_path / "cohort.csv"
    assert main(["embed", str(scans[0]), "--csv", str(csv_path), "-q", *tiny(tiny_model_dir, k=4)]) == 0
    capsys.readouterr()
    no_model()
    assert main(["embed", str(scans[1]), "--csv", str(csv_path), *tiny(tiny_model_dir, k=2), "--grid", "native"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loading model" not in err
    assert err.startswith(f"raptor: error: {csv_path} (existing rows) vs this run: embedding settings differ: k 4 vs 2; ")
    assert "grid 12 vs 'native'" in err
    assert read_table(csv_path).ids == ["s0"]


def test_embed_refuses_other_weights_before_embedding_anything(scans, tmp_path, tiny_model_dir, monkeypatch, capsys):
    csv_path = tmp_path / "cohort.csv"
    assert main(["embed", str(scans[0]), "--csv", str(csv_path), "-q", *tiny(tiny_model_dir)]) == 0
    other = make_tiny_model_dir(tmp_path / "other-model", seed=7)  # same shape, other weights: only loading tells
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("a volume was embedded")

    monkeypatch.setattr(pipeline.Embedder, "embed_many", refuse)
    assert main(["embed", str(scans[1]), "--csv", str(csv_path), "-q", *tiny(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(existing rows) vs this run: embedding settings differ: encoder weights differ" in err


@pytest.mark.slow
def test_embed_skip_existing_with_everything_done_loads_no_model(scans, tmp_path, tiny_model_dir, no_model, capsys):
    out, csv_path = tmp_path / "emb", tmp_path / "cohort.csv"
    args = ["embed", *map(str, scans), "-o", str(out), "--csv", str(csv_path), "--skip-existing", *tiny(tiny_model_dir)]
    assert main(args) == 0
    capsys.readouterr()
    no_model()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == f"raptor: embedded 0, skipped 2 already done, failed 0 -> {out}, {csv_path}\n"
    assert "loading model" not in captured.err
    # Outputs made with other settings are still refused, and still before loading.
    assert main(["embed", *map(str, scans), "-o", str(out), "--skip-existing", *tiny(tiny_model_dir, k=3)]) == 1
    err = capsys.readouterr().err
    assert "s0.npz: exists with other settings (existing vs this run: k 2 vs 3" in err and "loading model" not in err


def test_batch_rerun_with_nothing_left_loads_no_model(scans, tmp_path, tiny_model_dir, no_model, capsys):
    csv_path = tmp_path / "cohort.csv"
    args = ["batch", "--folder", str(scans[0].parent), "--csv", str(csv_path), "--readers", "0", *tiny(tiny_model_dir)]
    assert main(args) == 0
    capsys.readouterr()
    no_model()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("raptor: embedded 0, skipped 2 already done, failed 0") and "loading" not in captured.err
    record = (tmp_path / "cohort.batch.json").read_text()
    assert '"status": "complete"' in record and '"skipped": 2' in record
    # Another K is refused before any model is loaded too, whether or not series are left to embed.
    (scans[0].parent / "s9.nrrd").write_bytes(scans[0].read_bytes())
    assert main([*args[:-8], *tiny(tiny_model_dir, k=3)]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("raptor: error:")] == [
        f"raptor: error: {csv_path} (earlier run) vs this run: embedding settings differ: k 2 vs 3"]
    (scans[0].parent / "s9.nrrd").unlink()
    assert main(["merge", str(csv_path), "-o", str(tmp_path / "merged.csv")]) == 0  # the record still adds up
