"""``raptor embed|explain|batch --server URL``: the same outputs as without ``--server``, the model elsewhere."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from conftest import synthetic_volume  # noqa: E402
from helpers import oblique_matrix, random_probe, write_volume  # noqa: E402

from RaptorExtension.cli import main  # noqa: E402
from RaptorExtension.embeddings.embedding import Embedding  # noqa: E402
from RaptorExtension.encoding.pipeline import Embedder  # noqa: E402
from RaptorExtension.encoding.settings import EmbedSettings  # noqa: E402


def token_file(server, folder):
    path = folder / "token"
    path.write_text(server.token + "\n")
    return str(path)


def common(tiny_model_dir) -> list[str]:
    return ["--model", str(tiny_model_dir), "--k", "8", "--grid", "16", "--device", "cpu", "-q"]


def test_embed_on_a_server_writes_the_same_files_as_in_process(raptor_server, tiny_model_dir, tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd", synthetic_volume(seed=1), oblique_matrix())
    b = tmp_path / "b.npy"
    np.save(b, synthetic_volume(seed=2))
    args = [str(a), str(b), *common(tiny_model_dir)]
    assert main(["embed", *args, "-o", str(tmp_path / "local"), "--csv", str(tmp_path / "local.csv"), "--readers", "0"]) == 0
    loud = [a for a in args if a != "-q"]
    assert main(["embed", *loud, "-o", str(tmp_path / "remote"), "--csv", str(tmp_path / "remote.csv"),
                 "--server", raptor_server.url, "--token-file", token_file(raptor_server, tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"sending the work to {raptor_server.url}" in err
    for name in ("a", "b"):
        local, remote = Embedding.load(tmp_path / "local" / f"{name}.npz"), Embedding.load(tmp_path / "remote" / f"{name}.npz")
        assert local.vector.tobytes() == remote.vector.tobytes() and local.settings() == remote.settings()
        assert remote.metadata["source"] == local.metadata["source"]  # the client's names, not the server's paths
    with open(tmp_path / "local.csv") as x, open(tmp_path / "remote.csv") as y:
        assert [r[:2] + r[15:] for r in csv.reader(x)] == [r[:2] + r[15:] for r in csv.reader(y)]
    # --skip-existing asks the server what its settings make, and skips both.
    assert main(["embed", *args, "-o", str(tmp_path / "remote"), "--skip-existing", "--server", raptor_server.url,
                 "--token-file", token_file(raptor_server, tmp_path)]) == 0
    assert "embedded 0, skipped 2" in capsys.readouterr().out


def test_a_bad_volume_on_the_server_is_one_line_and_the_others_go_on(raptor_server, tiny_model_dir, tmp_path, capsys):
    good = write_volume(tmp_path / "good.nrrd", synthetic_volume(seed=1), np.eye(4))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.full((8, 9, 10), 3.0, dtype=np.float32))
    code = main(["embed", str(flat), str(good), *common(tiny_model_dir), "-o", str(tmp_path / "out"),
                 "--continue-on-error", "--server", raptor_server.url, "--token-file", token_file(raptor_server, tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "raptor: failed: " in err and "is constant" in err and "Traceback" not in err
    assert (tmp_path / "out" / "good.npz").exists() and not (tmp_path / "out" / "flat.npz").exists()


def test_explain_on_a_server_matches_in_process(raptor_server, tiny_model_dir, tmp_path, capsys):
    settings = EmbedSettings(model=str(tiny_model_dir), k=8, grid=16, device="cpu")
    probe = random_probe(Embedder(settings), task="binary", classes=("normal", "finding"))
    probe_path = probe.save(tmp_path / "p.raptorprobe")
    volume = write_volume(tmp_path / "v.nrrd", synthetic_volume(seed=5), oblique_matrix())
    assert main(["explain", str(probe_path), str(volume), "-o", str(tmp_path / "local.png"),
                 "--heatmap", str(tmp_path / "local.nrrd"), "--device", "cpu"]) == 0
    local_out = capsys.readouterr().out
    assert main(["explain", str(probe_path), str(volume), "-o", str(tmp_path / "remote.png"),
                 "--heatmap", str(tmp_path / "remote.nrrd"), "--device", "cpu",
                 "--server", raptor_server.url, "--token-file", token_file(raptor_server, tmp_path)]) == 0
    remote_out = capsys.readouterr().out
    assert remote_out.splitlines()[0] == local_out.splitlines()[0]  # score, logit, bias, contributions to 4 decimals
    from RaptorExtension.volumes.readers import read_volume

    assert np.array_equal(read_volume(str(tmp_path / "local.nrrd")).array, read_volume(str(tmp_path / "remote.nrrd")).array)
    assert (tmp_path / "remote.png").read_bytes().startswith(b"\x89PNG")


def test_batch_on_a_server_reads_and_writes_the_servers_disk(raptor_server, tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "cohort"
    for seed in range(3):
        write_volume(folder / f"scan{seed}.nrrd", synthetic_volume(seed=seed), np.eye(4))
    out = tmp_path / "cohort.csv"
    args = ["batch", "--folder", str(folder), "--csv", str(out), *common(tiny_model_dir)]
    assert main([*args, "--server", raptor_server.url, "--token-file", token_file(raptor_server, tmp_path)]) == 0
    assert "embedded 3, skipped 0 already done, failed 0" in capsys.readouterr().out
    local = tmp_path / "local.csv"
    assert main(["batch", "--folder", str(folder), "--csv", str(local), *common(tiny_model_dir), "--readers", "0"]) == 0
    with open(out) as x, open(local) as y:
        assert list(csv.reader(x)) == list(csv.reader(y))
    # A path the server may not use: one line, exit 1.
    code = main(["batch", "--folder", "/etc", "--csv", str(out), *common(tiny_model_dir), "--server", raptor_server.url,
                 "--token-file", token_file(raptor_server, tmp_path)])
    assert code == 1 and "outside the folders this server may use" in capsys.readouterr().err


def test_an_unreachable_server_or_a_wrong_token_is_one_line(raptor_server, tiny_model_dir, tmp_path):
    volume = write_volume(tmp_path / "v.nrrd", synthetic_volume(), np.eye(4))
    for server, token in (("http://127.0.0.1:9", raptor_server.token), (raptor_server.url, "wrong" * 5)):
        (tmp_path / "t").write_text(token)
        done = subprocess.run([sys.executable, "-m", "RaptorExtension", "embed", str(volume), *common(tiny_model_dir),
                               "-o", str(tmp_path / "o"), "--server", server, "--token-file", str(tmp_path / "t")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("raptor: error:")]
        assert len(errors) == 1 and ("cannot reach" in errors[0] or "refused the token" in errors[0]), done.stderr
    assert not (tmp_path / "o").exists()


def test_a_projector_file_travels_to_the_server(raptor_server, tiny_model_dir, tmp_path, capsys):
    """The server never sees the client's disk: --projection-file is uploaded, and embed and explain use it."""
    from RaptorExtension.encoding.model import load_encoder

    d = load_encoder(str(tiny_model_dir), device="cpu").hidden_size
    projector = tmp_path / "R.npy"
    np.save(projector, np.random.default_rng(3).standard_normal((d, 5)))
    volume = write_volume(tmp_path / "v.nrrd", synthetic_volume(seed=4), oblique_matrix())
    args = [str(volume), "--model", str(tiny_model_dir), "--grid", "16", "--device", "cpu", "-q",
            "--projection-file", str(projector)]
    assert main(["embed", *args, "-o", str(tmp_path / "local")]) == 0
    server = ["--server", raptor_server.url, "--token-file", token_file(raptor_server, tmp_path)]
    assert main(["embed", *args, "-o", str(tmp_path / "remote"), *server]) == 0
    local, remote = Embedding.load(tmp_path / "local" / "v.npz"), Embedding.load(tmp_path / "remote" / "v.npz")
    assert local.metadata["k"] == remote.metadata["k"] == 5
    assert local.metadata["projection_file"] == remote.metadata["projection_file"] == "R.npy"  # never a server path
    assert local.vector.tobytes() == remote.vector.tobytes() and local.settings() == remote.settings()
    probe_path = random_probe(Embedder(EmbedSettings(model=str(tiny_model_dir), k=None, grid=16, device="cpu",
                                                     projection_file=str(projector))),
                              task="binary", classes=("normal", "finding")).save(tmp_path / "p.raptorprobe")
    explain = ["explain", str(probe_path), str(volume), "--device", "cpu", *server]
    assert main([*explain, "-o", str(tmp_path / "no.png")]) == 1  # the probe's R is not on the server
    assert "pass that file with --projection-file" in capsys.readouterr().err
    assert main([*explain, "-o", str(tmp_path / "yes.png"), "--projection-file", str(projector)]) == 0
    # A file that is not a .npy never reaches the model.
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(["embed", str(volume), "--model", str(tiny_model_dir), "--grid", "16", "-q", "-o", str(tmp_path / "x"),
                 "--projection-file", str(tmp_path / "bad.npy"), *server]) == 1
    assert "is not a projector file" in capsys.readouterr().err
