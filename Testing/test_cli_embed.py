"""``raptor embed`` / ``raptor info`` end to end on the bundled sample CT and MedMNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE_CT

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.embeddings.stream import index_table
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.volumes.intensity import normalize, resolve_preset


def random_volumes(folder, n: int, stem: str = "v") -> list[str]:
    """``n`` random 8x9x10 ``.npy`` volumes ``{stem}0.npy``... in ``folder`` (seed = index); returns their paths."""
    paths = []
    for i in range(n):
        path = folder / f"{stem}{i}.npy"
        np.save(path, np.random.default_rng(i).normal(size=(8, 9, 10)).astype(np.float32))
        paths.append(str(path))
    return paths


def embed_args(model_dir, *extra):
    return ["embed", *extra, "--model", str(model_dir), "--k", "8", "--grid", "16", "-q"]


def test_embed_sample_ct_to_npz_and_csv(tiny_model_dir, tmp_path, capsys):
    out, csv_path = tmp_path / "emb", tmp_path / "emb.csv"
    assert main(embed_args(tiny_model_dir, str(SAMPLE_CT), "-o", str(out), "--csv", str(csv_path))) == 0
    stdout = capsys.readouterr().out
    assert "embedded 1" in stdout and str(out) in stdout
    e = Embedding.load(out / "ct_abdomen_sample.npz")
    assert e.patch_block.shape == (3, 8, 4, 4)
    assert e.metadata["preset"] == "minmax"  # NRRD carries no modality: auto falls back to minmax
    table = read_table(csv_path)
    assert table.ids == ["ct_abdomen_sample"]
    assert np.array_equal(table.features[0], e.vector)  # the CSV round-trips float32 exactly
    assert table.settings["k"] == 8 and table.settings["weight_sha256"] == e.metadata["weight_sha256"]
    # Loading the .npz needs no pickle.
    with np.load(out / "ct_abdomen_sample.npz", allow_pickle=False) as data:
        assert set(data.files) == {"embedding", "metadata"}


def test_info_prints_metadata(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "emb"
    main(embed_args(tiny_model_dir, str(SAMPLE_CT), "-o", str(out), "--preset", "ct"))
    capsys.readouterr()
    assert main(["info", str(out / "ct_abdomen_sample.npz"), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    for key in ("format_version", "encoder", "weight_sha256", "k", "seed", "planes", "grid", "preset", "software",
                "source", "source_ijk_to_ras", "projection_sha256"):
        assert key in meta, key
    assert meta["preset"] == "ct[-1000,1000]"


def test_skip_existing_resumes_and_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    vols = random_volumes(tmp_path, 3)
    out, csv_path = tmp_path / "emb", tmp_path / "emb.csv"
    args = embed_args(tiny_model_dir, *vols[:2], "-o", str(out), "--csv", str(csv_path))
    assert main(args) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    capsys.readouterr()
    assert main(embed_args(tiny_model_dir, *vols, "-o", str(out), "--csv", str(csv_path), "--skip-existing")) == 0
    assert "embedded 1, skipped 2" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in first} == first
    assert read_table(csv_path).ids == ["v0", "v1", "v2"]
    # Same folder, other K: refused with the difference named.
    code = main(["embed", *vols, "--model", str(tiny_model_dir), "--k", "4", "--grid", "16", "-q", "-o", str(out),
                 "--skip-existing"])
    assert code == 1 and "k 8 vs 4" in capsys.readouterr().err


def test_csv_refuses_rows_with_other_settings(tiny_model_dir, tmp_path, capsys):
    p = tmp_path / "v.npy"
    np.save(p, np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32))
    csv_path = tmp_path / "t.csv"
    assert main(embed_args(tiny_model_dir, str(p), "--csv", str(csv_path))) == 0
    q = tmp_path / "w.npy"
    np.save(q, np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32))
    code = main(["embed", str(q), "--model", str(tiny_model_dir), "--k", "8", "--seed", "3", "--grid", "16", "-q",
                 "--csv", str(csv_path)])
    assert code == 1 and "seed 0 vs 3" in capsys.readouterr().err
    assert read_table(csv_path).ids == ["v"]


def test_medmnist_npz_selectors(tiny_model_dir, tmp_path, adrenal28, capsys):
    out = tmp_path / "emb"
    assert main(["embed", f"{adrenal28}#test_3", f"{adrenal28}#val_0", "--model", str(tiny_model_dir), "--k", "8",
                 "--grid", "native", "--preset", "uint8", "-q", "-o", str(out)]) == 0
    e = Embedding.load(out / "test_3.npz")
    assert e.metadata["grid"] == "native" and e.metadata["slices_per_plane"] == [28, 28, 28]
    assert e.metadata["source_has_geometry"] is False
    assert sorted(p.name for p in out.glob("*.npz")) == ["test_3.npz", "val_0.npz"]


@pytest.mark.slow
def test_console_script_runs_as_a_module(tiny_model_dir, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-m", "RaptorExtension", *embed_args(tiny_model_dir, str(SAMPLE_CT), "-o", str(out))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "ct_abdomen_sample.npz").exists()


def test_intensity_presets():
    x = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    np.testing.assert_allclose(normalize(x, resolve_preset("ct", None)).numpy(), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(x, resolve_preset("auto", "CT", (-100, 100))).numpy(), [0, 0, 0.5, 1, 1])
    assert resolve_preset("auto", "MR").name == "mri" and resolve_preset("auto", None).name == "minmax"
    np.testing.assert_allclose(normalize(torch.tensor([0.0, 255.0, 510.0]), resolve_preset("uint8", None)).numpy(), [0, 1, 1])
    v = torch.arange(1000, dtype=torch.float32)
    mri = normalize(v, resolve_preset("mri", None)).numpy()
    assert mri[4] == 0 and mri[995] == 1 and 0.49 < mri[500] < 0.51
    np.testing.assert_allclose(normalize(torch.tensor([5.0, 7.0, 9.0]), resolve_preset("minmax", None)).numpy(), [0, 0.5, 1])


def test_embed_csv_resume_cuts_a_torn_last_row(tiny_model_dir, tmp_path, capsys):
    vols = random_volumes(tmp_path, 2)
    csv_path = tmp_path / "t.csv"
    assert main(embed_args(tiny_model_dir, vols[0], "--csv", str(csv_path))) == 0
    whole = csv_path.read_bytes()
    with open(csv_path, "ab") as handle:  # a job killed while writing v1's row
        handle.write(b"v1,/somewhere,,1,tiny,abc,8,0,-0.1234")
    assert main(embed_args(tiny_model_dir, *vols, "--csv", str(csv_path), "--skip-existing")) == 0
    assert "embedded 1, skipped 1" in capsys.readouterr().out
    assert csv_path.read_bytes().startswith(whole)
    assert read_table(csv_path).ids == ["v0", "v1"]


def test_every_input_kind_pickles_for_loader_processes(tmp_path, dicom_series):
    """`raptor embed` reads ahead in processes only if every VolumeRef pickles (no closures)."""
    import pickle

    from RaptorExtension.volumes.readers import expand_input

    np.save(tmp_path / "v.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    np.savez(tmp_path / "plain.npz", volume=np.ones((4, 4, 4), np.float32))
    np.savez(tmp_path / "mnist.npz", test_images=np.arange(128, dtype=np.uint8).reshape(2, 4, 4, 4), test_labels=np.zeros((2, 1)))
    specs = [str(SAMPLE_CT), str(tmp_path / "v.npy"), str(tmp_path / "plain.npz"), f"{tmp_path / 'mnist.npz'}#test_1",
             str(dicom_series), str(sorted(dicom_series.iterdir())[0])]
    for spec in specs:
        for ref in expand_input(spec):
            clone = pickle.loads(pickle.dumps(ref))
            assert (clone.id, clone.source) == (ref.id, ref.source)
    medmnist = pickle.loads(pickle.dumps(expand_input(f"{tmp_path / 'mnist.npz'}#test_1")[0])).load()
    assert medmnist.id == "test_1" and medmnist.array.shape == (4, 4, 4)


def test_process_read_ahead_gives_the_same_bits_as_threads(tiny_model_dir, tmp_path, capsys):
    inputs = random_volumes(tmp_path, 3, stem="vol")
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), np.float32))  # a 2D image fails in its loader process
    inputs.insert(1, str(tmp_path / "bad.npy"))
    tables = {}
    for loader in ("threads", "processes"):
        csv_path = tmp_path / f"{loader}.csv"
        code = main(embed_args(tiny_model_dir, *inputs, "--csv", str(csv_path), "--loader", loader, "--readers", "2",
                               "--continue-on-error"))
        err = capsys.readouterr().err
        assert code == 1 and "bad.npy" in err
        tables[loader] = read_table(csv_path)
    assert tables["threads"].ids == tables["processes"].ids == ["vol0", "vol1", "vol2"]
    assert np.array_equal(tables["threads"].features, tables["processes"].features)


def raptor_process(args: list[str], threads: int, **popen) -> subprocess.Popen:
    """``raptor ARGS`` in a fresh process whose PyTorch uses ``threads`` CPU threads (as on a machine with that many cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "RaptorExtension", *args], cwd=ROOT, env=env, **popen)


@pytest.mark.slow
def test_a_killed_embed_csv_run_resumes_with_exactly_the_missing_rows(slow_model_dir, tmp_path, capsys):
    """SIGKILL of `raptor embed --csv` mid-run, then --skip-existing: the rows written survive untouched, the rest are
    added once, and every row equals an uninterrupted embedding of its volume."""
    count = 12
    vols = random_volumes(tmp_path, count)
    csv_path = tmp_path / "t.csv"
    args = ["embed", *vols, "--model", str(slow_model_dir), "--k", "8", "--grid", "32", "-q", "--device", "cpu",
            "--csv", str(csv_path)]
    process = raptor_process(args, threads=1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # one thread, as here
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if csv_path.exists() and csv_path.read_bytes().count(b"\n") >= 3:  # the header and two rows
                break
            time.sleep(0.02)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-500:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    survived = index_table(csv_path, allow_torn_tail=True).ids
    assert 2 <= len(survived) < count
    after_kill = csv_path.read_bytes()
    kept = after_kill[: after_kill.rfind(b"\n") + 1]
    capsys.readouterr()
    assert main([*args, "--skip-existing"]) == 0  # the killed run's table lock died with it
    assert f"embedded {count - len(survived)}, skipped {len(survived)}" in capsys.readouterr().out
    assert csv_path.read_bytes().startswith(kept)
    table = read_table(csv_path)  # parses: no torn or duplicated row
    assert sorted(table.ids) == sorted(f"v{i}" for i in range(count))
    reference = tmp_path / "reference.csv"
    done_before = [vols[int(row_id[1:])] for row_id in survived]
    assert main(["embed", *done_before, *args[1 + count: -1], str(reference)]) == 0  # same options, another CSV
    expected = read_table(reference)
    for row_id, features in zip(expected.ids, expected.features):  # the killed process's rows, bit for bit
        np.testing.assert_array_equal(table.features[table.ids.index(row_id)], features)
    assert main([*args, "--skip-existing"]) == 0 and "embedded 0, skipped 12" in capsys.readouterr().out
