"""Raptor: train-free 3D embeddings of CT and MR volumes from a frozen 2D foundation model.

The engine behind the Raptor 3D Slicer extension (Raptor, ICML 2025,
arXiv 2507.08254).  It has no Qt or GUI import, so it runs the same inside
Slicer, on the command line (``raptor``) and in a batch job.

Where the code lives (dependencies run down this list, never up):

- ``cli/``, ``slicerlogic/``: the ``raptor`` command, and the Slicer modules' Qt-free logic;
- ``cohort/``: batch jobs over DICOM databases, folder trees and manifests;
  ``probes/``: probes, their files, metrics and explanations;
- ``encoding/``: models, the triaxial encoder, the projection, the embedding pipeline;
- ``volumes/``: reading volumes, intensity presets, resampling, read-ahead;
  ``embeddings/``: the embedding formats (``.npz``, CSV, Parquet) and the mixing rules;
- top level: ``errors``, ``names``, ``atomic`` (file writes), ``version``.

Typical use::

    from RaptorExtension import Embedder, EmbedSettings, read_volume
    embedder = Embedder(EmbedSettings(model="facebook/dinov2-large", k=100))
    embedding = embedder.embed_volume(read_volume("ct.nii.gz"))
"""

from .errors import Cancelled, InputError, MetadataMismatch, ModelError, RaptorError
from .version import __version__

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
        from .encoding import pipeline

        return getattr(pipeline, name)
    if name == "Embedding":
        from .embeddings.embedding import Embedding

        return Embedding
    if name in ("read_volume", "expand_input"):
        from .volumes import readers

        return getattr(readers, name)
    raise AttributeError(name)
