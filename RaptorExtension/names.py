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

PRESETS = ("auto", "ct", "mri", "minmax", "uint8")
"""Intensity presets (see :mod:`.intensity`)."""

PLANES = ("axial", "coronal", "sagittal")
"""The three planes, in embedding order: slices along cube axes 0, 1, 2 (see :mod:`.resample`)."""

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
"""Devices Raptor runs on: ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""


def device_problem(device: str) -> str | None:
    """Why ``device`` is not a device Raptor can use, or None (no torch needed to tell)."""
    if isinstance(device, str) and DEVICE_PATTERN.fullmatch(device.strip()):
        return None
    return f"device {device!r} is not one of auto, cpu, cuda, cuda:N (a GPU index) or mps"
