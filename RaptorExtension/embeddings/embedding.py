"""The embedding file format and the rules for mixing embeddings.

One ``.npz`` per volume, readable with ``numpy.load(path, allow_pickle=False)``:

``embedding``  float32, shape (n_features,): the patch block (planes, K, p, p)
               flattened in C order, i.e. feature index
               ``((plane * K + k) * p + row) * p + col``; with ``keep_cls`` the
               CLS block (planes, d) follows.
``metadata``   a 0-d unicode array holding JSON (see :func:`build_metadata`).

Anything that consumes embeddings (a CSV, a probe, the Slicer modules)
compares :data:`SETTINGS_KEYS` and refuses to mix embeddings that differ,
with a message naming each difference.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_write
from .errors import InputError, MetadataMismatch

FORMAT_NAME = "raptor-embedding"
FORMAT_VERSION = 1

SETTINGS_KEYS = (
    "format_version",
    "weight_sha256",
    "k",
    "seed",
    "projection_sha256",
    "planes",
    "grid",
    "image_size",
    "preset",
    "keep_cls",
)
"""Metadata that must be equal for two embeddings to be comparable."""


@dataclass
class Embedding:
    """An embedding vector with the metadata that says what made it."""

    vector: np.ndarray
    metadata: dict

    @property
    def id(self) -> str:
        return str(self.metadata.get("id", ""))

    @property
    def patch_block(self) -> np.ndarray:
        """The projected patch tokens as (planes, K, p, p)."""
        shape = tuple(self.metadata["shape"])
        return self.vector[: int(np.prod(shape))].reshape(shape)

    @property
    def cls_block(self) -> np.ndarray | None:
        """The mean CLS tokens as (planes, d), when ``keep_cls`` was on."""
        if not self.metadata.get("keep_cls"):
            return None
        n = int(np.prod(self.metadata["shape"]))
        return self.vector[n:].reshape(len(self.metadata["planes"]), -1)

    def settings(self) -> dict:
        return settings_of(self.metadata)

    def save(self, path: str | Path) -> Path:
        """Write atomically as ``.npz`` (no pickle)."""
        path = Path(path)
        buffer = io.BytesIO()
        np.savez(buffer, embedding=np.ascontiguousarray(self.vector, dtype="<f4"), metadata=np.array(json.dumps(self.metadata, sort_keys=True)))
        with atomic_write(path) as handle:
            handle.write(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embedding":
        """Read an embedding ``.npz`` written by :meth:`save`, validating it."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if "embedding" not in data.files or "metadata" not in data.files:
                    raise InputError(f"{path}: not a Raptor embedding (no 'embedding'/'metadata' arrays)")
                vector = np.asarray(data["embedding"], dtype=np.float32)
                metadata = json.loads(str(data["metadata"]))
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except Exception as exc:
            raise InputError(f"{path}: not a readable Raptor embedding ({type(exc).__name__})") from None
        if metadata.get("format") != FORMAT_NAME:
            raise InputError(f"{path}: not a Raptor embedding (format {metadata.get('format')!r})")
        if int(metadata.get("format_version", -1)) > FORMAT_VERSION:
            raise InputError(
                f"{path}: written by a newer Raptor (format {metadata['format_version']}); upgrade to read it"
            )
        if vector.ndim != 1 or vector.size != int(metadata.get("n_features", -1)):
            raise InputError(f"{path}: embedding has {vector.size} values, metadata says {metadata.get('n_features')}")
        return cls(vector=vector, metadata=metadata)


def settings_of(metadata: dict) -> dict:
    """The part of the metadata that decides whether embeddings are comparable."""
    return {key: metadata.get(key) for key in SETTINGS_KEYS}


def settings_hash(metadata: dict) -> str:
    """A short stable hash of the settings, used to key resumable batches."""
    canonical = json.dumps(settings_of(metadata), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_differences(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two settings dicts (empty when compatible)."""
    out = []
    for key in SETTINGS_KEYS:
        va, vb = a.get(key), b.get(key)
        if va != vb:
            if key == "weight_sha256":
                out.append(
                    f"encoder weights differ ({a.get('encoder', '?')} {str(va)[:12]} vs {b.get('encoder', '?')} {str(vb)[:12]})"
                )
            elif key.endswith("sha256"):
                out.append(f"{key} {str(va)[:12]} vs {str(vb)[:12]}")
            else:
                out.append(f"{key} {va!r} vs {vb!r}")
    return out


def check_compatible(expected: dict, actual: dict, what: str) -> None:
    """Raise :class:`MetadataMismatch` naming every setting that differs."""
    diffs = describe_differences(expected, actual)
    if diffs:
        raise MetadataMismatch(f"{what}: embedding settings differ: " + "; ".join(diffs))


def build_metadata(**fields) -> dict:
    """Complete metadata with the format header and software version."""
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "software": f"raptor {__version__}"}
    meta.update(fields)
    return meta
