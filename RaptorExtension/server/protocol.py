"""What both ends of the Raptor API agree on: version, paths, headers, job kinds and states.

Kept free of any heavy import: the Slicer modules load it before PyTorch is installed.
"""

from __future__ import annotations

API_VERSION = "v1"
PREFIX = f"/{API_VERSION}"
TOKEN_ENV = "RAPTOR_TOKEN"
"""Environment variable holding the bearer token (never pass a token on a command line: ``ps`` shows it)."""
UPLOAD_SIZE_HEADER = "X-Raptor-Upload-Size"
UPLOAD_PURPOSES = ("volume", "probe", "table", "labels", "projection")

KINDS = ("embed", "explain", "fit", "batch", "describe", "import_model")
LANES = {"embed": "interactive", "explain": "interactive", "fit": "interactive", "describe": "interactive",
         "import_model": "interactive", "batch": "batch"}
"""Jobs queue per lane: an Embed clicked in Slicer never waits behind an overnight batch."""

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

DEFAULT_MAX_UPLOAD_MB = 4096


def compatible_versions(server: str, client: str) -> bool:
    """Same major.minor: the recipe and the formats change only with a minor version."""
    return server.split(".")[:2] == client.split(".")[:2]


__all__ = [
    "API_VERSION", "PREFIX", "TOKEN_ENV", "UPLOAD_SIZE_HEADER", "UPLOAD_PURPOSES", "KINDS", "LANES",
    "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "FINISHED", "DEFAULT_MAX_UPLOAD_MB", "compatible_versions",
]
