"""Where R comes from: Raptor's own stream (default), the reference code's ``numpy-legacy`` draw, or a file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import synthetic_volume

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.embeddings.stream import TableAppender
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.encoding.projection import (
    GENERATOR_NAME,
    LEGACY_GENERATOR_NAME,
    gaussian_projection,
    legacy_projection,
    load_projection_file,
    projection_sha256,
)
from RaptorExtension.errors import InputError, MetadataMismatch, RaptorError
from RaptorExtension.volumes.volume import Volume

D = 32  # the tiny model's token width


@pytest.fixture()
def volume():
    return Volume(array=synthetic_volume((10, 12, 14)), ijk_to_ras=np.eye(4), id="v", source="v")


@pytest.fixture()
def volume_file(tmp_path):
    path = tmp_path / "vol.npy"
    np.save(path, synthetic_volume((10, 12, 14)))
    return path


def reference_projector(path, d: int, k: int, seed: int = 0):
    """A projector exactly as the reference code's create_projector.py writes one."""
    np.random.seed(seed)
    np.save(path, np.random.randn(d, k))
    return path


def save_npz_as(path, **arrays) -> None:
    """An .npz archive under a .npy name (numpy.savez would append .npz to the name)."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_numpy_legacy_equals_a_reference_projector_file_bit_for_bit(tiny_encoder, volume, tmp_path):
    path = reference_projector(tmp_path / "proj_k8.npy", D, 8, seed=0)
    legacy = Embedder(EmbedSettings(model="tiny", k=8, seed=0, grid=12, projection="numpy-legacy"), encoder=tiny_encoder)
    filed = Embedder(EmbedSettings(model="tiny", k=None, grid=12, projection_file=str(path)), encoder=tiny_encoder)
    a, b = legacy.embed_volume(volume), filed.embed_volume(volume)
    assert np.array_equal(a.vector, b.vector)
    assert a.metadata["projection_sha256"] == b.metadata["projection_sha256"]
    assert a.metadata["projection"] == LEGACY_GENERATOR_NAME and b.metadata["projection"] == "file"
    assert b.metadata["k"] == 8 and b.metadata["seed"] is None
    assert b.metadata["projection_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert b.metadata["projection_file_layout"] == "d x K"
    # R is applied as the reference applies it: R.T @ mean tokens, in float64.
    np.random.seed(0)
    assert np.array_equal(legacy.projection, np.random.randn(D, 8).T)
    assert legacy.projection.dtype == np.float64


def test_numpy_legacy_k10_is_not_part_of_k100():
    r100, r10 = legacy_projection(20, D, 0), legacy_projection(10, D, 0)
    assert not np.array_equal(r100[:10], r10)
    assert np.array_equal(gaussian_projection(20, D, 0)[:10], gaussian_projection(10, D, 0))  # ours is


def test_our_k_by_d_file_gives_the_default_bits(tiny_encoder, volume, tmp_path):
    path = tmp_path / "r.npy"
    np.save(path, np.asarray(gaussian_projection(8, D, 0)))  # K x d float32
    default = Embedder(EmbedSettings(model="tiny", k=8, grid=12), encoder=tiny_encoder).embed_volume(volume)
    filed = Embedder(EmbedSettings(model="tiny", k=8, grid=12, projection_file=str(path)),
                     encoder=tiny_encoder).embed_volume(volume)
    assert np.array_equal(default.vector, filed.vector)
    assert default.metadata["projection_sha256"] == filed.metadata["projection_sha256"]
    assert filed.metadata["projection_file_layout"] == "K x d"
    assert default.metadata["projection"] == GENERATOR_NAME


def test_default_projection_is_unchanged():
    assert projection_sha256(gaussian_projection(100, 384, 0)).startswith("6d568b91")
    assert gaussian_projection(100, 384, 0).dtype == np.float32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p, np.ones((7, 5))), "does not fit the encoder's token width d=32"),
        (lambda p: np.save(p, np.ones((D, 40))), "K=40 projections, more than the token width"),
        (lambda p: np.save(p, np.full((D, 4), np.nan)), "128 NaN or infinite values"),
        (lambda p: np.save(p, np.array([[1.0, np.inf]] * D)), "32 NaN or infinite"),
        (lambda p: np.save(p, np.ones((D, 4), dtype=np.int64)), "holds int64 values"),
        (lambda p: np.save(p, np.ones(D)), "a projector is a 2-D"),
        (lambda p: np.save(p, np.array([{"r": 1}], dtype=object), allow_pickle=True), "never unpickles"),
        (lambda p: p.write_bytes(b"not an array"), "not a .npy array"),
        (lambda p: save_npz_as(p, r=np.ones((D, 4))), "is an .npz archive"),
    ],
)
def test_bad_projector_files_are_refused(tmp_path, make, message):
    path = tmp_path / "R.npy"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        load_projection_file(path, D)
    assert str(info.value).startswith(str(path))


def test_projector_k_must_match_and_file_must_exist(tmp_path):
    path = reference_projector(tmp_path / "R.npy", D, 4)
    with pytest.raises(InputError, match=r"holds K=4 projections \(d x K\), but K=8 was asked"):
        load_projection_file(path, D, 8)
    with pytest.raises(InputError, match="no such projector file"):
        load_projection_file(tmp_path / "missing.npy", D)
    with pytest.raises(RaptorError, match="not both"):
        EmbedSettings(projection="numpy-legacy", projection_file=str(path))


def test_cli_projection_file_and_legacy_agree_and_refuse_mixing(tiny_model_dir, volume_file, tmp_path, capsys):
    proj = reference_projector(tmp_path / "proj.npy", D, 6, seed=3)
    base = ["embed", str(volume_file), "--model", str(tiny_model_dir), "--grid", "12", "-q"]
    assert main([*base, "--projection-file", str(proj), "-o", str(tmp_path / "a")]) == 0
    assert main([*base, "--projection", "numpy-legacy", "--seed", "3", "--k", "6", "-o", str(tmp_path / "b")]) == 0
    a, b = Embedding.load(tmp_path / "a" / "vol.npz"), Embedding.load(tmp_path / "b" / "vol.npz")
    assert np.array_equal(a.vector, b.vector) and a.metadata["k"] == 6
    # A K that contradicts the file is one clear line.
    assert main([*base, "--projection-file", str(proj), "--k", "8", "-o", str(tmp_path / "c")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raptor: error")]
    assert err == [f"raptor: error: {proj}: holds K=6 projections (d x K), but K=8 was asked; leave out --k or make them agree"]
    # A table of default embeddings refuses a numpy-legacy one, naming the projection.
    csv_path = tmp_path / "t.csv"
    assert main([*base, "--k", "6", "--csv", str(csv_path)]) == 0
    assert main([*base, "--k", "6", "--seed", "3", "--projection", "numpy-legacy", "--csv", str(csv_path)]) == 1
    err = capsys.readouterr().err
    assert f"projection '{GENERATOR_NAME}' vs '{LEGACY_GENERATOR_NAME}'" in err and "seed 0 vs 3" in err


def test_info_shows_the_projector_file(tiny_model_dir, volume_file, tmp_path, capsys):
    proj = reference_projector(tmp_path / "proj.npy", D, 4)
    assert main(["embed", str(volume_file), "--model", str(tiny_model_dir), "--grid", "12", "-q",
                 "--projection-file", str(proj), "-o", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "e" / "vol.npz"), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["projection"] == "file" and meta["projection_file"] == proj.name
    assert meta["projection_file_sha256"] == hashlib.sha256(proj.read_bytes()).hexdigest()


def test_table_refuses_embeddings_with_another_projector(tiny_encoder, volume, tmp_path):
    one = reference_projector(tmp_path / "one.npy", D, 4, seed=1)
    two = reference_projector(tmp_path / "two.npy", D, 4, seed=2)
    table = TableAppender(tmp_path / "t.csv")
    table.append(Embedder(EmbedSettings(model="tiny", k=None, grid=12, projection_file=str(one)),
                          encoder=tiny_encoder).embed_volume(volume))
    other = Embedder(EmbedSettings(model="tiny", k=None, grid=12, projection_file=str(two)),
                     encoder=tiny_encoder).embed_volume(volume)
    with pytest.raises(MetadataMismatch, match="projection_sha256"):
        table.append(other)
