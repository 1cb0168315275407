"""Embeddings stored on MRML nodes as two namespaced attributes.

``Raptor.Embedding``  the vector as base64 of its little-endian float32 bytes
``Raptor.Metadata``   the embedding's metadata as JSON (what made it)

Why attributes: they are saved in the scene file itself (``.mrml`` and
``.mrb``), so an embedding travels with the scene, survives reloading and
needs no side files; and they work on any node, so the RaptorProbe module and
scripts read embeddings the same way RaptorEmbed writes them.  Base64 of
float32 is exact (no decimal rounding) and about a third the size of text.

This module touches nodes only through ``GetAttribute``/``SetAttribute`` and
imports neither Qt nor torch, so it runs in Slicer, in tests with
``slicer-core``, and in any script.  Call it from the main thread only.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from ..embeddings.embedding import FORMAT_NAME, FORMAT_VERSION, Embedding, validate_metadata
from ..errors import InputError
from ..fields import is_int

EMBEDDING_ATTRIBUTE = "Raptor.Embedding"
METADATA_ATTRIBUTE = "Raptor.Metadata"
ATTRIBUTES = (EMBEDDING_ATTRIBUTE, METADATA_ATTRIBUTE)


def encode_vector(vector: np.ndarray) -> str:
    """Base64 text of the vector as little-endian float32 (exact round trip)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, where: str = "embedding") -> np.ndarray:
    """The float32 vector from :func:`encode_vector` text; a clear error if it is not one."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InputError(f"{where}: {EMBEDDING_ATTRIBUTE} is not valid base64") from None
    if len(raw) % 4:
        raise InputError(f"{where}: {EMBEDDING_ATTRIBUTE} holds {len(raw)} bytes, not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def node_label(node) -> str:
    """How a node is named in messages: its name, or its ID if unnamed."""
    name = node.GetName() if node is not None else None
    return name or (node.GetID() if node is not None else "<no node>") or "<unnamed node>"


def has_embedding(node) -> bool:
    """True when the node carries a Raptor embedding attribute (valid or not)."""
    return node is not None and node.GetAttribute(EMBEDDING_ATTRIBUTE) is not None


def write_embedding(node, embedding: Embedding) -> None:
    """Store an embedding on a node, both attributes in one modification.

    ``StartModify``/``EndModify`` make observers see one change with both
    attributes set, never the vector without its metadata.
    """
    vector = np.ascontiguousarray(embedding.vector, dtype=np.float32).ravel()
    expected = embedding.metadata.get("n_features")
    if expected is not None and int(expected) != vector.size:
        raise InputError(f"{node_label(node)}: embedding has {vector.size} values, its metadata says {expected}")
    metadata_text = json.dumps(embedding.metadata, sort_keys=True)
    vector_text = encode_vector(vector)
    was_modifying = node.StartModify()
    try:
        node.SetAttribute(METADATA_ATTRIBUTE, metadata_text)
        node.SetAttribute(EMBEDDING_ATTRIBUTE, vector_text)
    finally:
        node.EndModify(was_modifying)


def read_embedding(node) -> Embedding | None:
    """The embedding stored on a node, or None when it has none.

    A node whose attributes were damaged (edited by hand, truncated) raises
    :class:`InputError` naming the node, rather than returning a wrong vector.
    """
    if node is None:
        return None
    vector_text = node.GetAttribute(EMBEDDING_ATTRIBUTE)
    metadata_text = node.GetAttribute(METADATA_ATTRIBUTE)
    if vector_text is None and metadata_text is None:
        return None
    where = node_label(node)
    if vector_text is None or metadata_text is None:
        missing = EMBEDDING_ATTRIBUTE if vector_text is None else METADATA_ATTRIBUTE
        raise InputError(f"{where}: has a Raptor embedding without its {missing} attribute; embed it again")
    try:
        metadata = json.loads(metadata_text)
    except ValueError:
        raise InputError(f"{where}: {METADATA_ATTRIBUTE} is not valid JSON; embed it again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{where}: {METADATA_ATTRIBUTE} is not Raptor embedding metadata; embed it again")
    if is_int(metadata.get("format_version")) and metadata["format_version"] > FORMAT_VERSION:
        raise InputError(f"{where}: embedded by a newer Raptor (format {metadata['format_version']}); upgrade to read it")
    validate_metadata(metadata, f"{where} ({METADATA_ATTRIBUTE})")
    vector = decode_vector(vector_text, where)
    if vector.size != metadata["n_features"]:
        raise InputError(
            f"{where}: {EMBEDDING_ATTRIBUTE} has {vector.size} values, its metadata says {metadata.get('n_features')}; embed it again"
        )
    if not np.isfinite(vector).all():
        raise InputError(f"{where}: {EMBEDDING_ATTRIBUTE} holds NaN or infinite values; embed it again")
    return Embedding(vector=vector, metadata=metadata)


def embedding_of(node) -> Embedding | None:
    """The node's embedding, or None when it has none or it is unreadable.

    For display code that lists nodes and must not fail on one damaged node;
    use :func:`read_embedding` where the reason matters.
    """
    try:
        return read_embedding(node)
    except InputError:
        return None


def clear_embedding(node) -> None:
    """Remove both attributes (a node re-embedded with other settings starts clean)."""
    was_modifying = node.StartModify()
    try:
        for name in ATTRIBUTES:
            node.RemoveAttribute(name)
    finally:
        node.EndModify(was_modifying)


def embedded_nodes(scene, class_name: str = "vtkMRMLScalarVolumeNode") -> list:
    """Every node of ``class_name`` in the scene that carries an embedding, in scene order."""
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if has_embedding(node):
            nodes.append(node)
    return nodes


__all__ = [
    "EMBEDDING_ATTRIBUTE",
    "METADATA_ATTRIBUTE",
    "encode_vector",
    "decode_vector",
    "has_embedding",
    "write_embedding",
    "read_embedding",
    "embedding_of",
    "clear_embedding",
    "embedded_nodes",
    "node_label",
]
