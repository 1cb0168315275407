"""Names shared by the engine and the Slicer panels, importable without torch.

The modules' panels are built before PyTorch is installed (it is installed at
first use), so the lists they offer live here rather than in ``model.py`` or
``intensity.py``, which import torch.  One list, used by both.
"""

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

PRESETS = ("auto", "ct", "mri", "minmax", "uint8", "uint8-256")
"""Intensity presets (see :mod:`.intensity`)."""

PREPROCESS_CHOICES = ("direct", "reference")
"""How a slice becomes the model's input image (see :mod:`.encoding.slices`); ``direct`` is the default."""

PROJECTIONS = ("pcg64", "numpy-legacy")
"""How R is drawn from the seed (see :mod:`.encoding.projection`); ``pcg64`` is the default."""

PLANES = ("axial", "coronal", "sagittal")
"""The three planes, in embedding order: slices along cube axes 0, 1, 2 (see :mod:`.resample`)."""
