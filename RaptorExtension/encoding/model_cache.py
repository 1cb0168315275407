"""The folder where model weights are cached, and what is in it.

Raptor loads models through Hugging Face's cache layout
(``models--ORG--NAME/snapshots/REVISION/...``), so a model downloaded by the
``raptor`` command line is reused by Slicer and the other way round.  The
folder is ``$RAPTOR_MODEL_CACHE`` when set (the Slicer module sets it from
its settings), else the hub's own cache.

For hospitals without internet, :func:`import_model_folder` copies a model
folder (as saved by ``save_pretrained`` or downloaded on another machine)
into that layout under a hub id, after checking that it loads, so that
choosing ``dinov2-l`` works offline exactly as if it had been downloaded.

Nothing here imports Qt; torch and transformers are imported only by the
functions that load a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import ModelError
from .cache_index import (  # re-exported: the listing lives where the model loader may import it
    CACHE_ENV,
    CachedModel,
    _snapshot_config,
    cached_models,
    hub_default_cache,
    hub_endpoint,
    hub_offline,
    hub_unreachable_reason,
    local_model_choices,
    model_cache_dir,
)

MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".md")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def set_model_cache_dir(folder: str | os.PathLike | None) -> Path:
    """Use ``folder`` for models from now on (empty or None: back to the hub's cache).

    Sets ``$RAPTOR_MODEL_CACHE`` so the engine, and any ``raptor`` process
    started from here, use the same folder.  The folder must be writable,
    because a model not yet cached is downloaded into it.
    """
    if not folder:
        os.environ.pop(CACHE_ENV, None)
        return model_cache_dir()
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".raptor-write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise ModelError(f"{path}: cannot be used as the model cache ({exc.strerror or type(exc).__name__})") from None
    os.environ[CACHE_ENV] = str(path)
    return path


def clear_model_cache(cache_dir: str | os.PathLike | None = None, repo_ids: list[str] | None = None) -> list[str]:
    """Delete cached Raptor-usable models (all of them, or those in ``repo_ids``); returns the ids removed."""
    removed = []
    for model in cached_models(cache_dir):
        if repo_ids is not None and model.repo_id not in repo_ids:
            continue
        shutil.rmtree(model.path)
        removed.append(model.repo_id)
    return removed


def default_repo_id(folder: Path) -> str:
    """The hub id a model folder was saved from (config ``_name_or_path``), else ``local/<folder name>``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    name = str(config.get("_name_or_path", ""))
    if REPO_ID_RE.match(name) and not Path(name).exists():
        return name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-.") or "model"
    return f"local/{slug}"


def import_model_folder(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
) -> str:
    """Copy a local model folder into the cache under a hub id and return that id.

    The folder must load as a Raptor encoder (checked first, on the CPU);
    after copying, the id is loaded back from the cache offline and its weight
    hash compared, so a successful import is one that will work without
    internet.  The snapshot is written beside its final place and renamed,
    so an interrupted import leaves no half-copied model behind.
    """
    from .model import load_encoder

    source = Path(folder).expanduser()
    if not source.is_dir():
        raise ModelError(f"{source}: no such model folder")
    if not (source / "config.json").is_file():
        raise ModelError(f"{source}: is not a Hugging Face model folder (no config.json)")
    repo_id = repo_id or default_repo_id(source)
    if not REPO_ID_RE.match(repo_id):
        raise ModelError(f"{repo_id!r} is not a model id of the form ORGANIZATION/NAME")
    encoder = load_encoder(str(source), device="cpu")
    weight_sha = encoder.weight_sha256
    del encoder

    root = Path(cache_dir) if cache_dir else model_cache_dir()
    model_dir = root / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(weight_sha.encode()).hexdigest()  # a 40-hex "commit" the hub layout expects
    snapshot = model_dir / "snapshots" / revision
    files = [p for p in sorted(source.iterdir()) if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES)]
    try:
        (model_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=model_dir / "snapshots"))
        try:
            for f in files:
                shutil.copy2(f, staging / f.name)
            if snapshot.exists():
                shutil.rmtree(snapshot)
            os.replace(staging, snapshot)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write_text(model_dir / "refs" / "main", revision)
    except OSError as exc:
        raise ModelError(f"{root}: could not copy the model into the cache ({exc.strerror or type(exc).__name__})") from None

    if verify:
        reloaded = _load_offline(repo_id, root)
        if reloaded.weight_sha256 != weight_sha:
            raise ModelError(f"{repo_id}: the imported copy in {root} does not load the same weights as {source}")
    return repo_id


def _load_offline(repo_id: str, root: Path):
    """Load ``repo_id`` from ``root`` without touching the network (the check an air-gapped site relies on)."""
    from .model import load_encoder

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return load_encoder(repo_id, device="cpu", cache_dir=str(root))
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


DOWNLOAD_PATTERNS = ("*.json", "*.safetensors")
"""What :func:`download_model` fetches: configs and safetensors weights (not the duplicate .bin/.onnx copies)."""


def download_model(model: str, cache_dir: str | os.PathLike | None, report) -> str:
    """Download a hub model into the cache, calling ``report(bytes_done, bytes_total)`` as it goes.

    ``report`` runs in the hub's download threads; raising from it (e.g.
    :class:`~RaptorExtension.errors.Cancelled`) stops the download, and the
    hub resumes the partial files next time.  Returns the snapshot folder.
    """
    from huggingface_hub import snapshot_download

    from .model import KNOWN_MODELS

    repo_id = KNOWN_MODELS.get(model, model)
    return snapshot_download(
        repo_id,
        cache_dir=str(cache_dir) if cache_dir else None,
        allow_patterns=list(DOWNLOAD_PATTERNS),
        tqdm_class=progress_bar_class(report),
    )


def progress_bar_class(report):
    """A tqdm class for ``snapshot_download`` that forwards its byte totals to ``report``.

    The hub drives one aggregated byte bar ("Reconstructing ...") for all
    files; the file-count bar and the raw-transfer bar are ignored, so the
    numbers reported only grow.  Nothing is printed.
    """
    import io

    from tqdm.auto import tqdm

    class ForwardingBar(tqdm):
        def __init__(self, *args, **kwargs):
            desc = str(kwargs.get("desc") or "")
            self._forward = kwargs.get("unit") == "B" and desc.startswith("Reconstruct")
            kwargs.pop("name", None)
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            result = super().update(n)
            if self._forward:
                report(int(self.n), int(self.total or 0))
            return result

    return ForwardingBar


def is_cached(model: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when a hub id (or short name) already has a config in the cache, or is a local folder."""
    from .model import KNOWN_MODELS

    name = KNOWN_MODELS.get(model, model)
    if Path(name).expanduser().exists():
        return True
    root = Path(cache_dir) if cache_dir else model_cache_dir()
    return _snapshot_config(root / ("models--" + name.replace("/", "--"))) is not None


__all__ = [
    "CACHE_ENV",
    "CachedModel",
    "model_cache_dir",
    "set_model_cache_dir",
    "hub_default_cache",
    "cached_models",
    "clear_model_cache",
    "import_model_folder",
    "default_repo_id",
    "is_cached",
    "hub_offline",
    "hub_endpoint",
    "hub_unreachable_reason",
    "local_model_choices",
    "download_model",
]
