"""The models a server keeps loaded, shared by every job that asks for the same weights.

Loading DINOv2-L takes seconds and gigabytes; K, the seed and the slicing
options only change the projection, which takes milliseconds.  So an encoder
is keyed by what needs a reload (model, device, image size, cache folder),
and each job gets its own :class:`~..encoding.pipeline.Embedder` around the
shared encoder (forward passes in inference mode may run from two lanes at
once).  Only one encoder is kept: a job that needs another one replaces it,
which bounds GPU memory to one model.
"""

from __future__ import annotations

import gc
import threading

from ..encoding.settings import EmbedSettings


def reload_key(settings: EmbedSettings) -> tuple:
    return (settings.model, settings.device, settings.image_size, settings.cache_dir)


class ModelPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._encoder = None
        self._users = 0

    def embedder_for(self, settings: EmbedSettings):
        """An :class:`Embedder` for these settings, loading the encoder only when its key changed."""
        from ..encoding.pipeline import Embedder

        key = reload_key(settings)
        with self._lock:
            if self._key != key:
                self._encoder, self._key = None, None
                _release_memory()
                embedder = Embedder(settings)
                self._encoder, self._key = embedder.encoder, key
                return embedder
            return Embedder(settings, encoder=self._encoder)

    def loaded(self) -> list[dict]:
        """What is loaded now; never waits for a load in progress (``/health`` must answer at once)."""
        encoder = self._encoder
        if encoder is None:
            return []
        return [{
            "model": encoder.name,
            "device": str(encoder.device),
            "precision": str(encoder.dtype).replace("torch.", ""),
            "hidden_size": encoder.hidden_size,
            "image_size": encoder.image_size,
            "weight_sha256": encoder.weight_sha256,
        }]

    def unload(self) -> bool:
        with self._lock:
            had = self._encoder is not None
            self._encoder, self._key = None, None
        _release_memory()
        return had


def _release_memory() -> None:
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def devices() -> list[dict]:
    """What this server can compute on (only the CPU, and a note, when PyTorch is not installed yet)."""
    try:
        import torch
    except ImportError:
        return [{"name": "cpu", "kind": "cpu", "note": "PyTorch is not installed on the server"}]

    found = [{"name": "cpu", "kind": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append({"name": f"cuda:{i}", "kind": "cuda", "model": props.name,
                          "memory_gb": round(props.total_memory / 2**30, 1)})
    return found


__all__ = ["ModelPool", "devices", "reload_key"]
