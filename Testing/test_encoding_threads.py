"""More than one CPU thread: the same input still gives the same bits every time.

The tests run PyTorch on one thread (conftest); ``raptor`` outside them uses
one per core, so this checks the setting users get, with a model large enough
(224-pixel slices, width 64) for PyTorch to split its work between threads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_volume

from RaptorExtension.encoding.model import load_encoder
from RaptorExtension.encoding.pipeline import Embedder
from RaptorExtension.encoding.settings import EmbedSettings
from RaptorExtension.volumes.volume import Volume


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def embed_twice(model_dir, volume) -> tuple[np.ndarray, np.ndarray]:
    encoder = load_encoder(str(model_dir), device="cpu")
    settings = EmbedSettings(model=str(model_dir), k=8, grid=16, device="cpu", batch_size=8)
    return tuple(Embedder(settings, encoder=encoder).embed_volume(volume).vector for _ in range(2))


def test_two_threads_give_identical_bits_twice_and_match_one_thread(slow_model_dir, two_threads):
    volume = Volume(array=synthetic_volume((20, 24, 28)), ijk_to_ras=np.diag([0.9, 1.1, 2.0, 1.0]), id="v", source="v")
    assert torch.get_num_threads() == 2
    first, second = embed_twice(slow_model_dir, volume)
    assert first.tobytes() == second.tobytes()
    torch.set_num_threads(1)
    one, _ = embed_twice(slow_model_dir, volume)
    # Another thread count may sum in another order: equal to float rounding, not necessarily bit for bit.
    np.testing.assert_allclose(first, one, rtol=1e-4, atol=1e-6)
