"""What is in the model cache, and whether the model hub answers, without loading any model.

Split from :mod:`.model_cache` (which imports the model loader to check what it
imports) so that the loader itself can use it: when a model is neither cached
nor reachable, :func:`.model.load_encoder` names what *is* available here.
Nothing here imports torch, transformers or Qt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "RAPTOR_MODEL_CACHE"


def hub_default_cache() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # huggingface_hub not installed yet (first use in Slicer)
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def model_cache_dir() -> Path:
    """The folder models are cached in: ``$RAPTOR_MODEL_CACHE`` or the hub's cache."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else hub_default_cache()


@dataclass
class CachedModel:
    """One model in the cache."""

    repo_id: str
    path: Path
    size_bytes: int
    model_type: str


def _folder_size(path: Path) -> int:
    """Bytes on disk: hub snapshots are symlinks into ``blobs/``, so count each file once."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                try:
                    total += os.stat(full).st_size
                except OSError:
                    pass
    return total


def _snapshot_config(model_dir: Path) -> dict | None:
    """The config.json of the snapshot ``refs/main`` points to (or any snapshot)."""
    snapshots = model_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = []
    ref = model_dir / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    candidates.extend(sorted(p for p in snapshots.iterdir() if p.is_dir()))
    for snap in candidates:
        config = snap / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text())
            except (OSError, ValueError):
                return None
    return None


def cached_models(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """The vision transformers in the cache that Raptor can use (patch tokens and a width).

    Other models the user keeps in a shared hub cache (language models, ...)
    are not listed, so :func:`clear_model_cache` never deletes them.
    """
    root = Path(cache_dir) if cache_dir else model_cache_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not entry.name.startswith("models--"):
            continue
        config = _snapshot_config(entry)
        if not config or not isinstance(config.get("patch_size"), int) or not isinstance(config.get("hidden_size"), int):
            continue
        repo_id = entry.name[len("models--"):].replace("--", "/", 1)
        found.append(CachedModel(repo_id, entry, _folder_size(entry), str(config.get("model_type", "unknown"))))
    return found


def hub_endpoint() -> str:
    """The hub's address: ``$HF_ENDPOINT``, else the hub client's default (https://huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except Exception:  # huggingface_hub not installed yet (first use in Slicer)
            endpoint = "https://huggingface.co"
    return endpoint.rstrip("/")


HUB_CHECK_SECONDS = 3.0


def hub_unreachable_reason(timeout: float = HUB_CHECK_SECONDS) -> str | None:
    """None when the hub answers one HTTP request (any status) within ``timeout`` seconds, else why not.

    Why: offline, the hub client retries with back-off for about half a
    minute and prints a "Retrying in 8s" line each time before giving up.
    The request honours the usual proxy variables; it runs in a thread so a
    slow name lookup cannot stretch it either.
    """
    import threading
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # it answered
            outcome.append(None)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome.append(str(reason) or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="raptor-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


def local_model_choices(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """What ``--model`` can name on this machine without the hub: (the name to pass, what it is)."""
    from ..names import KNOWN_MODELS, OFFLINE_MODEL, OFFLINE_MODEL_DESCRIPTION
    from .offline_weights import built_model_dir

    choices = []
    if built_model_dir() is not None:
        choices.append((OFFLINE_MODEL, OFFLINE_MODEL_DESCRIPTION))
    short = {hub_id: name for name, hub_id in KNOWN_MODELS.items()}
    for m in cached_models(cache_dir):
        choices.append((short.get(m.repo_id, m.repo_id), f"{m.repo_id}, cached"))
    return choices


def hub_offline() -> bool:
    """True when the hub must not be contacted (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
