"""The embedding file format: one ``.npz`` per volume, and the metadata that says what made it.

One ``.npz`` per volume, readable with ``numpy.load(path, allow_pickle=False)``:

``embedding``  float32, shape (n_features,): the patch block (planes, K, p, p)
               flattened in C order, i.e. feature index
               ``((plane * K + k) * p + row) * p + col``; with ``keep_cls`` the
               CLS block (planes, d) follows.
``metadata``   a 0-d unicode array holding JSON (see :func:`build_metadata`).

Which metadata must agree for two embeddings to be mixed is :mod:`.settings`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import InputError
from ..version import __version__
from .settings import settings_of

FORMAT_NAME = "raptor-embedding"
FORMAT_VERSION = 1


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


def build_metadata(**fields) -> dict:
    """Complete metadata with the format header and software version."""
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "software": f"raptor {__version__}"}
    meta.update(fields)
    return meta
