"""How a slice becomes the model's input image: the two recipes, on the device.

``direct`` (the default, ours)
    The slice (values in [0, 1]) is resized straight to the model's input size
    S x S with bilinear interpolation in float32 (antialiased only when it
    shrinks), with no crop, so no anatomy at the slice's edges is lost.
``reference`` (the authors' code, sriramlab/raptor ``embed.py``)
    1. bicubic stretch of the slice to S x S (PyTorch's bicubic, a = -0.75,
       half-pixel centres), skipped when the slice is already S x S;
    2. clip to [0, 1] and quantize to 8 bits by truncation (``x * 255`` cast to
       uint8), as a PIL greyscale image;
    3. the Hugging Face DINOv2 image processor: bicubic resize of the shorter
       side to R (256 for S = 224), rounded to 8 bits, then a centre crop to S,
       which drops (R - S) / 2 pixels at each edge (6.25% of the slice for 224).
    Step 3's resize is PIL's bicubic (a = -0.5, a horizontal then a vertical
    pass, each rounded to 8 bits); it is computed here with PyTorch's
    antialiased bicubic in float32, rounded after each pass, which equals PIL
    bit for bit when it enlarges a square 8-bit image, the only resize this
    recipe makes (tested on 224 -> 256 and smaller sizes).

Both end as values in [0, 1] (``reference``: multiples of 1/255); the caller
repeats them to three channels and applies the model's mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..names import PREPROCESS_CHOICES

REFERENCE_RESIZE_RATIO = 256 / 224
"""The DINOv2 processor's resize (256) over its crop (224), for models whose processor does not say."""


def check_preprocess(name: str) -> str:
    if name not in PREPROCESS_CHOICES:
        raise ModelError(f"unknown slice preprocessing {name!r} (choose from {', '.join(PREPROCESS_CHOICES)})")
    return name


def direct_slices(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) float32 in [0, 1] -> (B, 1, S, S): bilinear, antialiased only when shrinking."""
    target = (size, size)
    if tuple(x.shape[-2:]) == target:
        return x
    downsampling = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=downsampling)


def _round_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a resampled value: half up, then clipped to 0..255."""
    return torch.floor(x + 0.5).clamp_(0.0, 255.0)


def pil_bicubic_8bit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's ``Image.resize(..., BICUBIC)`` enlarging 8-bit images held as float32 (B, 1, H, W) values 0..255.

    PIL resamples rows first, rounds to 8 bits, then columns, and rounds again;
    PyTorch's antialiased bicubic uses PIL's kernel (a = -0.5) and support.
    When PIL shrinks one axis it may take the axes in the other order, so this
    is PIL's result for enlargements only, which is all the recipe needs.
    """
    h, w = size
    if x.shape[-1] != w:
        x = _round_to_8bit(F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", align_corners=False, antialias=True))
    if x.shape[-2] != h:
        x = _round_to_8bit(F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True))
    return x


def reference_stretch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Step 1: (B, 1, H, W) -> (B, 1, S, S) with PyTorch's bicubic (a = -0.75), skipped when already S x S."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def reference_slices(x: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """(B, 1, H, W) float32 in [0, 1] -> (B, 1, S, S) as the reference code prepares them (see the module).

    A value that lands exactly on a quantizer step k / 255 (a flat region at
    1.0, say) can fall to either level by float rounding in the bicubic, in the
    reference code as well; on the CPU this runs the same PyTorch kernel as the
    reference does.
    """
    if resize < size:
        raise ModelError(f"the reference recipe resizes to {resize} px before its {size} px centre crop; "
                         f"{resize} is smaller than the crop")
    x = reference_stretch(x, size)
    x = torch.floor(x.clamp(0.0, 1.0) * 255.0)  # numpy's float -> uint8 cast truncates
    x = pil_bicubic_8bit(x, (resize, resize))
    top = (resize - size) // 2
    return x[..., top : top + size, top : top + size] / 255.0


def reference_resize(image_size: int, preprocessor: dict | None) -> int:
    """The shorter side the model's image processor resizes to before its centre crop to ``image_size``.

    From the model's ``preprocessor_config.json`` when it describes a crop of
    this size (DINOv2: 256 for a 224 crop); otherwise the DINOv2 ratio 256/224.
    """
    pre = preprocessor or {}
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    crop = pre.get("crop_size") if isinstance(pre.get("crop_size"), dict) else {}
    cropping = bool(pre.get("do_center_crop", True))
    crop_side = crop.get("height") if cropping else None
    if "shortest_edge" in size and (crop_side == image_size or (not cropping and size["shortest_edge"] == image_size)):
        return int(size["shortest_edge"])
    if size.get("height") == image_size and size.get("width") == image_size and not cropping:
        return image_size
    return round(image_size * REFERENCE_RESIZE_RATIO)


__all__ = ["direct_slices", "reference_slices", "reference_stretch", "pil_bicubic_8bit", "reference_resize", "check_preprocess"]
