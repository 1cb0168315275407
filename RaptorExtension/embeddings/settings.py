"""The rules for mixing embeddings: which settings must agree, and how a difference is named.

Anything that consumes embeddings (a CSV, a probe, the Slicer modules)
compares :data:`SETTINGS_KEYS` and refuses to mix embeddings that differ,
with a message naming each difference.

Keys added after the first release (:data:`ADDED_SETTINGS`) have a default,
the value every older embedding was made with; a file, probe or record that
lacks such a key is read as having the default, and the settings hash leaves
out a key at its default, so older hashes (resumable batches) stay valid.
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
    "preprocess",
    "projection",
)
"""Metadata that must be equal for two embeddings to be comparable."""

ADDED_SETTINGS = {
    "preprocess": "direct",
    "projection": "pcg64-raw-boxmuller-float64-to-float32",
}
"""Settings keys added later, with the value that embeddings made before them have."""

REQUIRED_SETTINGS_KEYS = tuple(k for k in SETTINGS_KEYS if k not in ADDED_SETTINGS)
"""The keys every embedding table, probe and record has, old or new."""


def with_defaults(settings: dict) -> dict:
    """``settings`` with every missing (or empty) added key set to its default."""
    out = dict(settings)
    for key, default in ADDED_SETTINGS.items():
        if out.get(key) in (None, ""):
            out[key] = default
    return out


def settings_of(metadata: dict) -> dict:
    """The part of the metadata that decides whether embeddings are comparable."""
    return with_defaults({key: metadata.get(key) for key in SETTINGS_KEYS})


def settings_hash(metadata: dict) -> str:
    """A short stable hash of the settings, used to key resumable batches.

    Added keys at their defaults are left out, so an embedding made with the
    defaults hashes as it did before those keys existed.
    """
    settings = settings_of(metadata)
    for key, default in ADDED_SETTINGS.items():
        if settings[key] == default:
            del settings[key]
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_differences(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two settings dicts (empty when compatible)."""
    out = []
    a, b = with_defaults(a), with_defaults(b)
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
