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
