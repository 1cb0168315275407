"""User-facing errors.

Everything a user can cause (a bad file, an unknown model, a K larger than the
model width, a settings mismatch) is raised as a :class:`RaptorError` whose
message is one sentence naming the input and the reason.  The command line and
the Slicer modules print that sentence and nothing else, so a radiologist never
sees a traceback from deep inside VTK or PyTorch.
"""

from __future__ import annotations


class RaptorError(Exception):
    """A problem the user can act on; ``str(err)`` is a complete one-line message."""


class InputError(RaptorError):
    """An input volume cannot be read or is not a usable 3D volume."""


class ModelError(RaptorError):
    """The encoder cannot be loaded or does not fit the requested settings."""


class MetadataMismatch(RaptorError):
    """Embeddings (or an embedding and a probe) were made with different settings."""


class OutputError(RaptorError):
    """An output cannot be written: a read-only folder, a full disk, a folder where a file should go."""


def write_failure(path, exc: OSError) -> OutputError:
    """The one line for a failed write, naming the user's path (not a temporary file beside it)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{path}: cannot write ({reason})")


class Cancelled(RaptorError):
    """The user cancelled a running job; nothing partial was written."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
