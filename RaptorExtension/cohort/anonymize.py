"""Pseudonymize what a cohort table would otherwise reveal about patients.

What counts as identifying here follows DICOM PS3.15's Basic Application
Level Confidentiality Profile, applied to the few fields a Raptor table
carries:

``PatientID``          replaced by ``anon-`` + 16 hex digits of a keyed hash.
``StudyInstanceUID``,  replaced by a new valid UID ``2.25.<128-bit hash>``
``SeriesInstanceUID``  (the profile's "U" action), so they still join tables.
row ``id``             the anonymized SeriesInstanceUID for a DICOM series,
                       ``anon-`` + hash for anything else (a manifest id or a
                       file name can contain a patient's name or number).
``source``             dropped: folder and file names often carry the
                       PatientID (``/data/PAT001/CT/...``).
``SeriesDescription``  dropped (the profile removes it), unless the user keeps
                       descriptions, and then any PatientID inside is masked.
``Modality``           kept: not identifying, and needed to read the table.

The hash is HMAC-SHA-256 keyed with a secret salt.  A plain hash of a
PatientID could be reversed by hashing every plausible ID, so the salt is
required and must be kept secret and reused across shards and reruns (the
same series must get the same id).  A fingerprint of the salt (an HMAC of a
fixed string, which reveals nothing about it) is stored with every output so
a rerun or a merge with another salt is refused instead of silently
producing ids that do not match.

Error messages and progress lines go through :meth:`Anonymizer.redact`,
which replaces every path and identifier of the series with its anonymized
id, so logs of cluster jobs hold no PatientID either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from ..errors import RaptorError

SALT_ENV = "RAPTOR_ANON_SALT"
MIN_SALT_LENGTH = 16


class Anonymizer:
    """Keyed pseudonyms for identifiers, and redaction of free text."""

    def __init__(self, salt: str) -> None:
        if not salt or len(salt) < MIN_SALT_LENGTH:
            raise RaptorError(
                f"--anonymize needs a secret salt of at least {MIN_SALT_LENGTH} characters "
                f"(--salt or the environment variable {SALT_ENV}); without one, hashed IDs can be reversed"
            )
        self._key = salt.encode("utf-8")

    @property
    def salt(self) -> str:
        """The secret itself (to hand the same job to a Raptor server; never printed or logged)."""
        return self._key.decode("utf-8")

    @classmethod
    def from_options(cls, salt: str | None) -> "Anonymizer":
        return cls(salt if salt is not None else os.environ.get(SALT_ENV, ""))

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{value}".encode("utf-8"), hashlib.sha256).digest()

    @property
    def salt_check(self) -> str:
        """A fingerprint that tells salts apart without revealing them."""
        return self._digest("salt-check", "raptor").hex()[:16]

    def patient_id(self, value: str) -> str:
        return f"anon-{self._digest('PatientID', value).hex()[:16]}" if value else ""

    def uid(self, value: str) -> str:
        """A valid DICOM UID (``2.25.`` + a 128-bit number) standing for ``value``."""
        return f"2.25.{int.from_bytes(self._digest('UID', value)[:16], 'big')}" if value else ""

    def row_id(self, raw_id: str, series_uid: str = "") -> str:
        if series_uid and raw_id == series_uid:
            return self.uid(series_uid)
        return f"anon-{self._digest('id', raw_id).hex()[:20]}"

    @staticmethod
    def redact(text: str, secrets: dict[str, str]) -> str:
        """Replace every secret by its stand-in in one pass (longest first, so a path goes before its parts)."""
        keys = sorted((s for s in secrets if s), key=len, reverse=True)
        if not keys:
            return text
        pattern = re.compile("|".join(re.escape(k) for k in keys))
        return pattern.sub(lambda m: secrets[m.group(0)], text)


__all__ = ["Anonymizer", "SALT_ENV", "MIN_SALT_LENGTH"]
