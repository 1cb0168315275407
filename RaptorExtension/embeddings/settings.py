"""The rules for mixing embeddings: which settings must agree, and how a difference is named.

Anything that consumes embeddings (a CSV, a probe, the Slicer modules)
compares :data:`SETTINGS_KEYS` and refuses to mix embeddings that differ,
with a message naming each difference.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import MetadataMismatch

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
