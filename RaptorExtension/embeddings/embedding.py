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

from ..arrayfiles import npz_names, open_npz
from ..atomic import atomic_write
from ..errors import InputError, RaptorError
from ..fields import BOOL, DICT, EITHER, INT, LIST, NULLABLE, NUMBER, ONE_OF, STR, check_fields, is_int
from ..names import PREPROCESS_CHOICES
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
        if not np.isfinite(self.vector).all():
            raise RaptorError(f"{path}: not written: the embedding of {self.id or 'this volume'} holds NaN or infinite values")
        buffer = io.BytesIO()
        np.savez(buffer, embedding=np.ascontiguousarray(self.vector, dtype="<f4"), metadata=np.array(json.dumps(self.metadata, sort_keys=True)))
        with atomic_write(path) as handle:
            handle.write(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embedding":
        """Read an embedding ``.npz`` written by :meth:`save`, validating it."""
        path = Path(path)
        with open_npz(path, max_member_bytes=MAX_EMBEDDING_BYTES, max_total_bytes=2 * MAX_EMBEDDING_BYTES) as archive:
            names = npz_names(archive)
            if "embedding" not in names or "metadata" not in names:
                raise InputError(f"{path}: not a Raptor embedding (no 'embedding'/'metadata' arrays)")
            vector = archive.read_npy("embedding.npy", kinds="f", max_bytes=MAX_EMBEDDING_BYTES)
            text = archive.read_npy("metadata.npy", kinds="U", max_bytes=MAX_METADATA_BYTES)
        if text.ndim != 0:
            raise InputError(f"{path}: the metadata must be one JSON text (found an array of shape {list(text.shape)})")
        metadata = parse_metadata(str(text[()]), str(path))
        return cls(vector=checked_vector(vector, metadata, str(path)), metadata=metadata)


MAX_EMBEDDING_BYTES = 1 << 30
MAX_METADATA_BYTES = 16 << 20

_MATRIX = LIST(LIST(NUMBER, min_len=4, max_len=4), min_len=4, max_len=4)
METADATA_SCHEMA = {
    "format": STR,
    "format_version": INT(0),
    "software": STR,
    "encoder": STR,
    "encoder_type": STR,
    "weight_sha256": STR,
    "hidden_size": INT(1),
    "patch_size": INT(1),
    "image_size": INT(1),
    "patch_grid": INT(1),
    "k": INT(1),
    "seed": NULLABLE(INT()),  # None: R came from a projector file
    "projection": STR,
    "projection_sha256": STR,
    "planes": LIST(ONE_OF("axial", "coronal", "sagittal"), min_len=1, max_len=3),
    "grid": EITHER(INT(2), ONE_OF("native"), problem="must be a whole number of voxels or 'native'"),
    "preset": STR,
    "keep_cls": BOOL,
    "preprocess": ONE_OF(*PREPROCESS_CHOICES),
    "shape": LIST(INT(1), min_len=4, max_len=4),
    "n_features": INT(1),
    "layout": STR,
    "settings_hash": STR,
    "id": STR,
    "source": NULLABLE(STR),
    "modality": NULLABLE(STR),
    "source_shape_kji": LIST(INT(0)),
    "source_ijk_to_ras": _MATRIX,
    "source_spacing": LIST(NUMBER),
    "source_has_geometry": BOOL,
    "cube_shape": LIST(INT(0)),
    "cube_ijk_to_ras": NULLABLE(_MATRIX),
    "slices_per_plane": LIST(INT(0)),
    "device": STR,
    "precision": STR,
    "seconds": NUMBER,
    "created": STR,
    "dicom": DICT(STR),
}
"""The type of every metadata field a reader uses (fields it does not know are kept as they are)."""
REQUIRED_FIELDS = ("format", "format_version", "n_features")
"""What every embedding has; the settings are compared by every consumer, so a missing one is a mismatch there."""


def parse_metadata(text: str, where: str) -> dict:
    """The metadata JSON of an embedding, checked field by field."""
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError(f"{where}: the embedding metadata is not valid JSON") from None
    return validate_metadata(metadata, where)


def validate_metadata(metadata, where: str) -> dict:
    """Raise one :class:`InputError` line unless ``metadata`` is this format's metadata with fields of the right types."""
    if not isinstance(metadata, dict):
        raise InputError(f"{where}: the embedding metadata must be a JSON object (found {type(metadata).__name__})")
    if metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{where}: not a Raptor embedding (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if is_int(version) and version > FORMAT_VERSION:
        raise InputError(f"{where}: written by a newer Raptor (format {version}); upgrade to read it")
    check_fields(metadata, METADATA_SCHEMA, where, required=REQUIRED_FIELDS, what="embedding metadata")
    n = metadata["n_features"]
    planes = metadata.get("planes")
    if planes is not None and len(set(planes)) != len(planes):
        raise InputError(f"{where}: the embedding metadata names a plane twice ({planes})")
    shape = metadata.get("shape")
    if shape is not None and planes is not None and "k" in metadata and "keep_cls" in metadata:
        cls = n - int(np.prod(shape))
        if shape[0] != len(planes) or shape[1] != metadata["k"] or cls < 0 or (cls > 0) != metadata["keep_cls"] or cls % len(planes):
            raise InputError(f"{where}: the embedding metadata's shape {shape} and {n} features do not fit planes "
                             f"{planes}, k {metadata['k']} and keep_cls {metadata['keep_cls']}")
    return metadata


def checked_vector(vector: np.ndarray, metadata: dict, where: str) -> np.ndarray:
    """The embedding vector as native float32, refused unless it is 1-D, finite and as long as the metadata says."""
    if vector.dtype.kind != "f" or vector.dtype.itemsize != 4:
        raise InputError(f"{where}: the embedding is {vector.dtype}, not float32")
    if vector.ndim != 1 or vector.size != metadata["n_features"]:
        raise InputError(f"{where}: embedding has {vector.size} values, metadata says {metadata['n_features']}")
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise InputError(f"{where}: the embedding holds NaN or infinite values (a damaged file)")
    return vector


def build_metadata(**fields) -> dict:
    """Complete metadata with the format header and software version."""
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "software": f"raptor {__version__}"}
    meta.update(fields)
    return meta
