"""Raptor: train-free 3D embeddings of CT and MR volumes from a frozen 2D foundation model.

The engine behind the Raptor 3D Slicer extension (Raptor, ICML 2025,
arXiv 2507.08254).  It has no Qt or GUI import, so it runs the same inside
Slicer, on the command line (``raptor``) and in a batch job.

Typical use::

    from RaptorExtension import Embedder, EmbedSettings, read_volume
    embedder = Embedder(EmbedSettings(model="facebook/dinov2-large", k=100))
    embedding = embedder.embed_volume(read_volume("ct.nii.gz"))
"""

__version__ = "0.1.0"

from .errors import Cancelled, InputError, MetadataMismatch, ModelError, RaptorError  # noqa: E402

__all__ = [
    "__version__",
    "Cancelled",
    "InputError",
    "MetadataMismatch",
    "ModelError",
    "RaptorError",
    "Embedder",
    "EmbedSettings",
    "Embedding",
    "read_volume",
    "expand_input",
]


def __getattr__(name):
    """Import the heavy parts (torch, transformers, VTK) only when used."""
    if name in ("Embedder", "EmbedSettings"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Embedding":
        from .embedding import Embedding

        return Embedding
    if name in ("read_volume", "expand_input"):
        from . import readers

        return getattr(readers, name)
    raise AttributeError(name)
