"""``--preprocess reference`` prepares slices as the authors' reference code does.

The check is against an independent implementation written here from the
recipe's description, with numpy and PIL only: bicubic stretch of each slice to
S x S (PyTorch's kernel, a = -0.75, half-pixel centres, edge pixels repeated),
clip to [0, 1], ``x * 255`` truncated to uint8, PIL's bicubic resize of the
shorter side to R, centre crop to S, / 255, the model's mean and std, three
equal channels.  The model itself is the same on both sides, so what is
compared is the per-plane mean of the patch tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ADRENAL_28, require, synthetic_volume
from PIL import Image

from RaptorExtension.encoding.model import load_encoder
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.encoding.slices import (
    pil_bicubic_8bit,
    reference_resize,
    reference_slices,
    reference_stretch,
)
from RaptorExtension.encoding.triaxial import TriaxialEncoder
from RaptorExtension.errors import RaptorError
from RaptorExtension.volumes.intensity import normalize, resolve_preset
from RaptorExtension.volumes.volume import Volume

A = -0.75  # PyTorch's bicubic coefficient (PIL uses -0.5)


def cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 neighbours at offsets -1, 0, 1, 2 for fractions t."""

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Resize one axis with half-pixel centres, clamping neighbour indices to the edge."""
    n = image.shape[axis]
    src = (np.arange(size) + 0.5) * (n / size) - 0.5
    base = np.floor(src).astype(int)
    w = cubic_weights(src - base)  # (size, 4)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)  # (size, 4)
    moved = np.moveaxis(image, axis, 0)
    out = np.einsum("sk,sk...->s...", w, moved[idx])
    return np.moveaxis(out, 0, axis)


def reference_image(slice_2d: np.ndarray, size: int, resize: int, mean, std) -> np.ndarray:
    """One slice as the reference code feeds it to the model: (3, S, S) float32."""
    x = slice_2d.astype(np.float64)
    if x.shape != (size, size):
        x = bicubic_axis(bicubic_axis(x, size, 0), size, 1)
    pixels = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(pixels, mode="L").resize((resize, resize), Image.BICUBIC), dtype=np.float64)
    top = (resize - size) // 2
    crop = big[top : top + size, top : top + size] / 255.0
    return np.stack([(crop - m) / s for m, s in zip(mean, std)]).astype(np.float32)


def independent_plane_means(encoder, cube: np.ndarray, axes=(0, 1, 2)) -> list[np.ndarray]:
    """Mean patch tokens per plane (slices along ``axes``), every slice prepared by :func:`reference_image`."""
    means = []
    for axis in axes:
        images = [
            reference_image(np.take(cube, i, axis=axis), encoder.image_size, encoder.reference_resize,
                            encoder.mean, encoder.std)
            for i in range(cube.shape[axis])
        ]
        total = np.zeros((encoder.patch_grid**2, encoder.hidden_size))
        for start in range(0, len(images), 16):
            batch = torch.from_numpy(np.stack(images[start : start + 16])).to(encoder.device, encoder.dtype)
            with torch.inference_mode():
                seq = encoder.model(pixel_values=batch).last_hidden_state
            total += seq[:, encoder.num_prefix_tokens :].double().sum(0).cpu().numpy()
        means.append(total / len(images))
    return means


def ours_plane_means(encoder, cube: np.ndarray, planes=("axial", "coronal", "sagittal")) -> list[np.ndarray]:
    triaxial = TriaxialEncoder(encoder, planes=planes, batch_size=7, preprocess="reference")
    result = next(triaxial.encode([("v", torch.from_numpy(cube))]))
    return [m.cpu().numpy() for m in result.patch_mean]


def assert_close_relative(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rtol, f"max |ours - independent| / max |independent| = {err:.2e} > {rtol}"


def test_resize_equals_pil_bit_for_bit():
    """The recipe's resize: a square 8-bit image enlarged (224 -> 256, or 56 -> 64 for the tiny model)."""
    rng = np.random.default_rng(0)
    for shape, size in (((224, 224), (256, 256)), ((224, 224), (256, 256)), ((56, 56), (64, 64)), ((98, 98), (112, 112))):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        want = np.asarray(Image.fromarray(pixels, mode="L").resize(size[::-1], Image.BICUBIC))
        got = pil_bicubic_8bit(torch.from_numpy(pixels.astype(np.float32))[None, None], size)[0, 0].numpy()
        assert np.array_equal(got.astype(np.uint8), want)


def test_reference_sizes_follow_the_model_processor(tiny_encoder):
    dinov2 = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True}
    assert reference_resize(224, dinov2) == 256
    assert reference_resize(448, dinov2) == 512  # another input size: the processor's ratio
    assert reference_resize(224, {"size": {"height": 224, "width": 224}, "do_center_crop": False}) == 224
    assert reference_resize(224, {}) == 256
    assert tiny_encoder.reference_resize == 64  # 56 px crop: 56 * 256 / 224


def test_stretch_equals_numpy_bicubic():
    rng = np.random.default_rng(1)
    for shape, size in (((18, 22), 56), ((28, 28), 224), ((26, 20), 56), ((60, 60), 56)):
        image = rng.random(shape).astype(np.float32)
        got = reference_stretch(torch.from_numpy(image)[None, None], size)[0, 0].numpy()
        want = bicubic_axis(bicubic_axis(image.astype(np.float64), size, 0), size, 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 rounding; a wrong kernel is off by 1e-2


def non_cubic_cube() -> np.ndarray:
    """Slices of three shapes, constant slices at 0 and 0.5, values below 0 after the bicubic overshoot.

    Values are kept off the quantizer's exact steps (k / 255), where float
    rounding picks either level, in the reference code too (a flat region at
    exactly 1.0 comes out of a float32 bicubic as 0.9999992 to 1.000001, so as
    254 or 255).
    """
    cube = synthetic_volume((18, 22, 26), seed=3)
    cube = 0.01 + 0.96 * (cube - cube.min()) / (cube.max() - cube.min())
    cube[0] = 0.0
    cube[:, -1] = 0.5
    return cube.astype(np.float32)


def test_stretched_slices_equal_independent_images(tiny_encoder):
    """Every slice of a non-cubic volume, stretched 18-26 -> 56 px: the model's input images agree.

    PyTorch's float32 bicubic and the float64 one here can put a value a few
    ulps from a quantizer step on different sides; that may change one pixel
    by one grey level in a few hundred thousand.
    """
    cube = non_cubic_cube()
    size, resize = tiny_encoder.image_size, tiny_encoder.reference_resize
    pixels = differing = 0
    for axis in range(3):
        for i in range(cube.shape[axis]):
            image = np.ascontiguousarray(np.take(cube, i, axis=axis))
            ours = reference_slices(torch.from_numpy(image)[None, None], size, resize)[0, 0].numpy() * 255
            want = reference_image(image, size, resize, (0, 0, 0), (1, 1, 1))[0] * 255
            assert np.abs(ours - want).max() <= 1.0 + 1e-3
            differing += int((np.abs(ours - want) > 1e-3).sum())
            pixels += ours.size
    assert differing <= pixels * 1e-4, f"{differing} of {pixels} pixels differ"


def test_tiny_model_equals_independent_reference(tiny_encoder):
    """The whole recipe and the mean over slices, on slices the model's size (no stretch)."""
    side = tiny_encoder.image_size
    cube = synthetic_volume((side, side, side), seed=5)
    cube = 0.01 + 0.96 * (cube - cube.min()) / (cube.max() - cube.min())
    cube[:, :, :3] = 0.0  # constant sagittal slices, encoded once by the encoder
    cube = cube.astype(np.float32)
    got = ours_plane_means(tiny_encoder, cube)
    want = independent_plane_means(tiny_encoder, cube)
    for g, w in zip(got, want):
        assert_close_relative(g, w)


def test_reference_differs_from_direct(tiny_encoder):
    cube = synthetic_volume((16, 16, 16), seed=4)
    cube = ((cube - cube.min()) / (cube.max() - cube.min())).astype(np.float32)
    ref = ours_plane_means(tiny_encoder, cube)
    direct = TriaxialEncoder(tiny_encoder, preprocess="direct")
    plain = next(direct.encode([("v", torch.from_numpy(cube))])).patch_mean.cpu().numpy()
    assert np.abs(plain - np.stack(ref)).max() > 1e-3 * np.abs(plain).max()


def test_imgfocus_dinov2_equals_independent_reference(imgfocus_model_dir):
    """The real DINOv2-S/14 on a real AdrenalMNIST3D volume, scaled as the reference scales MedMNIST (/256)."""
    path = require(ADRENAL_28)
    try:
        encoder = load_encoder(str(imgfocus_model_dir), device="cpu")
    except RaptorError as exc:  # pragma: no cover - the offline rebuild failed on this machine
        pytest.skip(f"the offline DINOv2-S/14 could not be built: {exc}")
    assert encoder.reference_resize == 256 and encoder.image_size == 224
    with np.load(path, allow_pickle=False) as data:
        array = data["test_images"][0]
    cube = normalize(torch.from_numpy(array.astype(np.float32)), resolve_preset("uint8-256", None)).numpy()
    assert np.array_equal(cube, np.clip(array.astype(np.float32) / 256, 0, 1))  # the reference's MedMNIST scaling
    # The axial plane only (28 slices at 224 px) keeps this test to seconds; the tiny model covers all three.
    got = ours_plane_means(encoder, cube, planes=("axial",))
    want = independent_plane_means(encoder, cube, axes=(0,))[0]
    assert_close_relative(got[0], want)


def test_embedder_records_the_recipe(tiny_encoder):
    volume = Volume(array=synthetic_volume((12, 12, 12)), ijk_to_ras=np.eye(4), id="v", source="v")
    ref = Embedder(EmbedSettings(model="tiny", k=4, grid=12, preprocess="reference"), encoder=tiny_encoder)
    direct = Embedder(EmbedSettings(model="tiny", k=4, grid=12), encoder=tiny_encoder)
    a, b = ref.embed_volume(volume), direct.embed_volume(volume)
    assert a.metadata["preprocess"] == "reference" and b.metadata["preprocess"] == "direct"
    assert a.metadata["reference_sizes"] == [56, 64, 56]
    assert a.metadata["settings_hash"] != b.metadata["settings_hash"]
    with pytest.raises(RaptorError, match="unknown slice preprocessing"):
        EmbedSettings(preprocess="paper")


def test_cli_records_the_recipe_and_refuses_mixing(tiny_model_dir, tmp_path, capsys):
    from RaptorExtension.cli import main
    from RaptorExtension.embeddings.table import read_table

    path = tmp_path / "vol.npy"
    np.save(path, synthetic_volume((10, 12, 14)))
    csv_path = tmp_path / "t.csv"
    base = ["embed", str(path), "--model", str(tiny_model_dir), "--k", "4", "--grid", "12", "-q", "--csv", str(csv_path)]
    assert main([*base, "--preprocess", "reference"]) == 0
    assert read_table(csv_path).settings["preprocess"] == "reference"
    assert main(base) == 1  # the default recipe into a table of reference embeddings
    assert "preprocess 'reference' vs 'direct'" in capsys.readouterr().err


def test_explain_embeds_with_the_probe_recipe_and_projection(tiny_encoder, tmp_path):
    from helpers import random_probe

    from RaptorExtension.probes.explain import embed_settings_for

    reference = Embedder(EmbedSettings(model="tiny", k=4, grid=12, preprocess="reference", projection="numpy-legacy",
                                       seed=7), encoder=tiny_encoder)
    settings = embed_settings_for(random_probe(reference))
    assert (settings.preprocess, settings.projection, settings.seed) == ("reference", "numpy-legacy", 7)
    np.random.seed(0)
    np.save(tmp_path / "r.npy", np.random.randn(tiny_encoder.hidden_size, 4))
    filed = Embedder(EmbedSettings(model="tiny", k=None, grid=12, projection_file=str(tmp_path / "r.npy")),
                     encoder=tiny_encoder)
    probe = random_probe(filed)
    with pytest.raises(RaptorError, match="made with a projector file .*pass that file with --projection-file"):
        embed_settings_for(probe)
    settings = embed_settings_for(probe, projection_file=str(tmp_path / "r.npy"))
    again = Embedder(dataclasses.replace(settings, model="tiny"), encoder=tiny_encoder)
    probe.check_embedding(dict(again.embed_volume(Volume(array=synthetic_volume((10, 12, 14)), ijk_to_ras=np.eye(4),
                                                         id="v", source="v")).settings(),
                               n_features=again.n_features), "v")
