"""The streaming encoder equals an independent float64 reference, and is deterministic.

The reference (``reference_embedding.py``) is written from the README's
"How a volume becomes an embedding" in numpy and scipy and shares no code with
the product; only the vision transformer's forward pass is the same model.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import reference_embedding as ref
import torch
from conftest import synthetic_volume
from helpers import oblique_matrix

from RaptorExtension.encoding.model import encoder_from_model, random_dinov2
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.encoding.projection import gaussian_projection, projection_sha256
from RaptorExtension.volumes.volume import Volume, VolumeRef

RTOL = 1e-4  # README: "equals a naive per-slice float64 reference to 1e-4 relative"


@pytest.fixture()
def volume():
    return Volume(array=synthetic_volume((18, 22, 26)), ijk_to_ras=oblique_matrix(), id="synthetic", source="synthetic")


@pytest.fixture(scope="module")
def tiny_reference(tiny_model_dir):
    """The tiny model folder loaded by the reference itself (transformers, float32, CPU)."""
    return ref.ReferenceModel(tiny_model_dir)


def lps_matrix(spacing, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    m[:3, 3] = origin
    return m


def hu_volume(shape, seed=0) -> np.ndarray:
    """A synthetic volume in a CT's range: air, soft tissue and bone, so the ``ct`` window clips at both ends."""
    return (synthetic_volume(shape, seed) * 6.0 - 400.0).astype(np.float32)


# Each case exercises one branch of the README's recipe: (array, IJK-to-RAS, has geometry, grid, preset).
CASES = {
    # oblique CT, enlarged 20 -> 56 px, the HU window clipping both ends
    "oblique-ct-grid20": (lambda: hu_volume((18, 22, 26)), oblique_matrix, True, 20, "ct"),
    # LPS storage with thick slices: axial padding slices; a grid above the model's 56 px, so shrunk with antialiasing
    "lps-slab-minmax-grid64": (lambda: synthetic_volume((12, 30, 26), seed=1), lambda: lps_matrix((0.8, 0.9, 2.5), (10, -20, 5)),
                               True, 64, "minmax"),
    # an array without geometry at a numeric grid keeps its own axes; MR percentiles
    "array-mri-grid24": (lambda: synthetic_volume((14, 20, 17), seed=2), lambda: np.eye(4), False, 24, "mri"),
    # the native grid of a non-cubic array: three slice shapes, each stretched to the square
    "native-uint8": (lambda: np.clip(synthetic_volume((14, 20, 17), seed=3) + 60, 0, 255).round().astype(np.float32),
                     lambda: np.eye(4), False, "native", "uint8"),
}


def split_blocks(vector: np.ndarray, planes: int, k: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(planes, K, p, p) patch block and the CLS block that follows it (README "File formats")."""
    n = planes * k * p * p
    return vector[:n].reshape(planes, k, p, p), vector[n:].reshape(planes, -1)


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_independent_reference(tiny_encoder, tiny_reference, case):
    """Preset, cube, resize, normalization, mean over slices, projection and CLS: all to 1e-4 relative.

    The product streams slices across planes in batches of 7 and serves constant
    slices from its cache; the reference encodes every slice of every plane.
    """
    make_array, make_matrix, geometry, grid, preset = CASES[case]
    array, matrix = make_array(), make_matrix()
    vol = Volume(array=array, ijk_to_ras=matrix, id="v", source="v", has_geometry=geometry)
    settings = EmbedSettings(model="tiny", k=8, grid=grid, preset=preset, batch_size=7, keep_cls=True)
    got = Embedder(settings, encoder=tiny_encoder).embed_volume(vol)
    want = ref.reference_embedding(array, matrix, tiny_reference, k=8, grid=grid, preset=preset, keep_cls=True,
                                   has_geometry=geometry)
    p = tiny_reference.patch_grid
    got_patches, got_cls = split_blocks(got.vector, 3, 8, p)
    want_patches, want_cls = split_blocks(want["vector"], 3, 8, p)
    assert got.metadata["planes"] == list(ref.PLANES)
    for i, plane in enumerate(ref.PLANES):
        assert ref.relative_error(got_patches[i], want_patches[i]) <= RTOL, plane
        assert ref.relative_error(got_cls[i], want_cls[i]) <= RTOL, f"{plane} CLS"
        for j in range(3):  # planes differ far beyond the tolerance, so a swapped or mirrored plane would fail
            if j != i:
                assert ref.relative_error(want_patches[j], want_patches[i]) > 100 * RTOL
        mirrored = want_patches[i][:, ::-1, :]  # a slice read upside down
        assert ref.relative_error(mirrored, want_patches[i]) > 100 * RTOL


def test_batching_across_volumes_equals_one_at_a_time(tiny_encoder):
    vols = [
        Volume(array=synthetic_volume((12, 14, 16), seed=s), ijk_to_ras=oblique_matrix(), id=f"v{s}", source=f"v{s}")
        for s in range(3)
    ]
    embedder = Embedder(EmbedSettings(model="tiny", k=6, grid=16, batch_size=10), encoder=tiny_encoder)
    singles = [embedder.embed_volume(v).vector for v in vols]
    refs = [VolumeRef(id=v.id, source=v.source, loader=lambda v=v: v) for v in vols]
    streamed = {ref.id: e.vector for ref, e, err in embedder.embed_many(refs)}
    assert list(streamed) == [v.id for v in vols]
    for v, single in zip(vols, singles):
        np.testing.assert_allclose(streamed[v.id], single, rtol=1e-5, atol=1e-6)


def test_same_input_gives_identical_bits(tiny_encoder, volume):
    embedder = Embedder(EmbedSettings(model="tiny", k=8, grid=16), encoder=tiny_encoder)
    a = embedder.embed_volume(volume)
    b = embedder.embed_volume(volume)
    assert np.array_equal(a.vector, b.vector)
    assert a.metadata["settings_hash"] == b.metadata["settings_hash"]


def test_projection_is_identical_across_processes():
    code = (
        "from RaptorExtension.encoding.projection import gaussian_projection, projection_sha256;"
        "print(projection_sha256(gaussian_projection(100, 384, 0)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == projection_sha256(gaussian_projection(100, 384, 0))
    # Pinned: R must be the same bits on every machine and release, or old embeddings silently stop matching.
    assert other == "6d568b91aa195cee7f3f4b5106495a4107572cde700e5eceac3d0a8eb5784ca7"


def test_projection_statistics_and_seed():
    raw = gaussian_projection(100, 1024, 0)
    assert raw.shape == (100, 1024) and raw.dtype == np.float32
    r = raw.astype(np.float64)
    assert abs(r.mean()) < 0.01 and abs(r.std() - 1) < 0.01
    assert not np.array_equal(gaussian_projection(10, 64, 0), gaussian_projection(10, 64, 1))
    # The first rows do not depend on K: Raptor-B's R is the top of Raptor's.
    np.testing.assert_array_equal(gaussian_projection(10, 64, 3), gaussian_projection(20, 64, 3)[:10])


def test_constant_slices_are_encoded_once_and_give_the_same_embedding(tiny_encoder):
    """Bit for bit, on a synthetic slab (the real CT with real weights: ``test_encoding_golden.py``)."""
    array = synthetic_volume((10, 30, 30))  # thin slab: the cube has many all-padding slices
    vol = Volume(array=array, ijk_to_ras=np.diag([1.0, 1.0, 1.0, 1.0]), id="slab", source="slab")
    with_dedup = Embedder(EmbedSettings(model="tiny", k=8, grid=24), encoder=tiny_encoder)
    without = Embedder(EmbedSettings(model="tiny", k=8, grid=24, dedup_constant_slices=False), encoder=tiny_encoder)
    a = with_dedup.embed_volume(vol).vector
    b = without.embed_volume(vol).vector
    assert with_dedup.triaxial.reused_slices > 0
    assert with_dedup.triaxial.encoded_slices < without.triaxial.encoded_slices
    np.testing.assert_array_equal(a, b)
    assert np.array_equal(a, with_dedup.embed_volume(vol).vector)


def test_keep_cls_appends_plane_cls_block(tiny_encoder, tiny_reference, volume):
    plain = Embedder(EmbedSettings(model="tiny", k=8, grid=16), encoder=tiny_encoder).embed_volume(volume)
    with_cls = Embedder(EmbedSettings(model="tiny", k=8, grid=16, keep_cls=True), encoder=tiny_encoder).embed_volume(volume)
    d = tiny_encoder.hidden_size
    assert with_cls.vector.size == plain.vector.size + 3 * d
    np.testing.assert_array_equal(with_cls.patch_block.ravel(), plain.vector)
    assert with_cls.cls_block.shape == (3, d)
    want = ref.reference_embedding(volume.array, volume.ijk_to_ras, tiny_reference, k=8, grid=16, preset="minmax")
    for i, plane in enumerate(ref.PLANES):  # each plane's mean CLS token, unprojected, in the order of the planes
        assert ref.relative_error(with_cls.cls_block[i], want["cls_means"][i]) <= RTOL, plane


def test_register_tokens_are_dropped(tmp_path, volume):
    model = random_dinov2(image_size=56, registers=4)
    model.save_pretrained(tmp_path / "reg")
    enc = encoder_from_model(model, "reg", device="cpu", image_size=56)
    assert enc.num_prefix_tokens == 5
    e = Embedder(EmbedSettings(model="reg", k=4, grid=12), encoder=enc).embed_volume(volume)
    assert e.patch_block.shape == (3, 4, 4, 4)
    reference = ref.ReferenceModel(tmp_path / "reg", image_size=56)  # CLS, then 4 registers, then 16 patches
    want = ref.reference_embedding(volume.array, volume.ijk_to_ras, reference, k=4, grid=12, preset="minmax")
    assert ref.relative_error(e.vector, want["vector"]) <= RTOL


def test_plane_subset(tiny_encoder, tiny_reference, volume):
    """Planes come in the order asked for (and recorded); each block is that plane's, not another's."""
    planes = ("sagittal", "axial")
    e = Embedder(EmbedSettings(model="tiny", k=4, grid=12, planes=planes), encoder=tiny_encoder).embed_volume(volume)
    assert e.patch_block.shape == (2, 4, 4, 4) and e.metadata["planes"] == list(planes)
    want = ref.reference_embedding(volume.array, volume.ijk_to_ras, tiny_reference, k=4, grid=12, preset="minmax")
    blocks = want["vector"].reshape(3, 4, 4, 4)
    for got, plane in zip(e.patch_block, planes):
        assert ref.relative_error(got, blocks[ref.PLANES.index(plane)]) <= RTOL, plane
    assert ref.relative_error(e.patch_block[0], blocks[0]) > 100 * RTOL  # sagittal is not axial


def test_out_of_memory_halves_the_batch_then_reports(tiny_encoder, volume, monkeypatch):
    embedder = Embedder(EmbedSettings(model="tiny", k=8, grid=16, batch_size=16), encoder=tiny_encoder)
    want = embedder.embed_volume(volume).vector
    real = type(tiny_encoder).tokens

    def small_batches_only(self, slices, *recipe):
        if slices.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated")
        return real(self, slices, *recipe)

    monkeypatch.setattr(type(tiny_encoder), "tokens", small_batches_only)
    got = embedder.embed_volume(volume).vector
    assert embedder.triaxial.batch_size == 4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def always(self, slices, *recipe):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(type(tiny_encoder), "tokens", always)
    from RaptorExtension.errors import ModelError

    with pytest.raises(ModelError, match="out of memory even with a batch of 1"):
        embedder.embed_volume(volume)


def test_cancel_stops_before_the_next_batch(tiny_encoder, volume):
    import threading

    from RaptorExtension.errors import Cancelled

    cancel = threading.Event()
    seen = []

    def progress(vid, done, total):
        seen.append(done)
        cancel.set()

    embedder = Embedder(EmbedSettings(model="tiny", k=8, grid=16, batch_size=4, dedup_constant_slices=False),
                        encoder=tiny_encoder)
    with pytest.raises(Cancelled):
        embedder.embed_volume(volume, progress=progress, cancel=cancel)
    assert seen == [4]


def test_dinov3_with_registers_loads_from_a_folder_and_drops_registers(tmp_path, volume):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from RaptorExtension.encoding.model import load_encoder

    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=16, image_size=64, num_register_tokens=4)
    torch.manual_seed(0)
    DINOv3ViTModel(config).save_pretrained(tmp_path / "dinov3")
    enc = load_encoder(str(tmp_path / "dinov3"), device="cpu", image_size=64)
    assert (enc.model_type, enc.patch_size, enc.patch_grid, enc.num_prefix_tokens) == ("dinov3_vit", 16, 4, 5)
    e = Embedder(EmbedSettings(model=enc.name, k=8, grid=12, keep_cls=True), encoder=enc).embed_volume(volume)
    assert e.patch_block.shape == (3, 8, 4, 4) and e.metadata["encoder_type"] == "dinov3_vit"
    # No preprocessor_config.json in the folder: ImageNet's mean and std, 64 px as asked.
    reference = ref.ReferenceModel(tmp_path / "dinov3", image_size=64)
    want = ref.reference_embedding(volume.array, volume.ijk_to_ras, reference, k=8, grid=12, preset="minmax",
                                   keep_cls=True)
    got_patches, got_cls = split_blocks(e.vector, 3, 8, 4)
    want_patches, want_cls = split_blocks(want["vector"], 3, 8, 4)
    assert ref.relative_error(got_patches, want_patches) <= RTOL
    assert ref.relative_error(got_cls, want_cls) <= RTOL


def test_random_stand_in_of_a_real_size_loads_like_a_downloaded_model(tmp_path):
    """`bench/batch_pipeline.py --arch L` on a GPU with no hub: the folder must load as DINOv2 at 224 px."""
    from RaptorExtension.encoding.model import (
        DINOV2_SHAPES,
        load_encoder,
        save_random_dinov2,
    )

    folder = save_random_dinov2(tmp_path / "random-s", "S")
    encoder = load_encoder(str(folder), device="cpu")
    assert (encoder.hidden_size, encoder.patch_size, encoder.image_size, encoder.patch_grid) == (384, 14, 224, 16)
    assert sum(p.numel() for p in encoder.model.parameters()) > 20_000_000  # ViT-S/14 has about 22M
    assert encoder.model.config.num_hidden_layers == DINOV2_SHAPES["S"]["layers"]
    cls, patch = encoder.tokens(torch.rand(1, 20, 20))
    assert cls.shape == (1, 384) and patch.shape == (1, 256, 384)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_path_runs_and_stays_close_to_float32(tiny_model_dir, volume, dtype):
    """The GPU runs the model in bf16 (fp16 where bf16 is missing); the same code path, exercised on the CPU.

    Inputs are normalized in float32 and cast, tokens come back as float32 and are summed in float64,
    so the embedding stays within half-precision rounding of the float32 one and metadata is unchanged.
    """
    from RaptorExtension.encoding.model import load_encoder

    settings = EmbedSettings(model=str(tiny_model_dir), k=8, grid=16, batch_size=9)
    full = Embedder(settings, encoder=load_encoder(str(tiny_model_dir), device="cpu")).embed_volume(volume)
    half_encoder = load_encoder(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert next(half_encoder.model.parameters()).dtype == dtype
    half = Embedder(settings, encoder=half_encoder).embed_volume(volume)
    assert half.vector.dtype == np.float32 and np.isfinite(half.vector).all()
    scale = np.abs(full.vector).max()
    assert np.abs(half.vector - full.vector).max() < 0.05 * scale
    assert np.corrcoef(half.vector, full.vector)[0, 1] > 0.999
    assert half.metadata["weight_sha256"] == full.metadata["weight_sha256"]  # hashed before the cast
