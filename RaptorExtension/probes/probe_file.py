"""The probe file: one portable, pickle-free ``.raptorprobe`` file.

Why this format
---------------
A probe travels between a research workstation, a hospital's Slicer and a
batch job.  It must be one file (easy to e-mail, version and attach to a
paper), readable without Raptor, and safe to open: loading it can never run
code.  So it is an ordinary ZIP archive (stored, not compressed) holding

``probe.json``          UTF-8 JSON: format header, task, class names, the
                        embedding settings the probe was fitted on, metrics,
                        hyper-parameters, the operating threshold(s) and the
                        calibration method (checked field by field when the
                        probe is rebuilt, :mod:`.probe`), and for every array
                        its dtype, shape and SHA-256;
``arrays/NAME.npy``     NumPy ``.npy`` arrays (little-endian float64), read
                        with ``allow_pickle=False``.

``unzip -p probe.raptorprobe probe.json`` shows the metadata; any language
with a ZIP and an ``.npy`` reader can use the weights.

Integrity
---------
``probe.json`` records ``content_sha256``, the SHA-256 of its own canonical
JSON without that field; since the JSON lists every array's SHA-256, the one
hash covers the whole probe.  Loading checks the ZIP structure (a truncated
file has no central directory), the CRC of every member, the JSON, the
checksums, the array shapes, and that no unexpected member is present; any
failure is one :class:`~RaptorExtension.errors.InputError` line naming the
file.  The checksums catch corruption and hand edits, not a forger who
recomputes them; a forged probe can only give wrong scores, never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from ..arrayfiles import ZipArchive
from ..atomic import atomic_write
from ..errors import InputError
from ..fields import DICT, HEX, INT, LIST, ONE_OF, SCHEMA, STR, check_fields, is_int
from ..version import __version__

PROBE_FORMAT = "raptor-probe"
PROBE_FORMAT_VERSION = 2
"""2 added the operating threshold (``threshold``) and calibration (``calibration`` and its arrays): a Raptor that
knows only version 1 would ignore them and give other decisions and probabilities, so it refuses such files.
Version 1 files still load (they decide at 0.5, with a note)."""
PROBE_SUFFIX = ".raptorprobe"
METADATA_MEMBER = "probe.json"
ARRAY_PREFIX = "arrays/"
MAX_MEMBER_BYTES = 4 << 30  # one array of 4 GiB (an MLP on 76,800 features with 6,900 hidden units) is the limit
MAX_TOTAL_BYTES = 8 << 30  # all members together, decompressed
MAX_METADATA_BYTES = 16 << 20  # probe.json is a few KiB; 16 MiB is a broken or hostile file


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def content_digest(metadata: dict) -> str:
    """SHA-256 of the canonical JSON of ``metadata`` without ``content_sha256``."""
    body = {k: v for k, v in metadata.items() if k != "content_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def write_probe_file(path: str | Path, metadata: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write metadata and arrays atomically as a ``.raptorprobe`` ZIP."""
    path = Path(path)
    meta = dict(metadata)
    meta.update(format=PROBE_FORMAT, format_version=PROBE_FORMAT_VERSION, software=f"raptor {__version__}")
    stored: dict[str, np.ndarray] = {}
    table = {}
    for name, array in sorted(arrays.items()):
        if not name.replace("_", "").isalnum():
            raise ValueError(f"array name {name!r} must be alphanumeric")
        a = np.ascontiguousarray(array, dtype="<f8")
        stored[name] = a
        table[name] = {"dtype": "<f8", "shape": list(a.shape), "sha256": _array_digest(a)}
    meta["arrays"] = table
    meta["content_sha256"] = content_digest(meta)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(METADATA_MEMBER, json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=True) + "\n")
        for name, a in stored.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, a, allow_pickle=False)
            archive.writestr(f"{ARRAY_PREFIX}{name}.npy", member.getvalue())
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


ARRAY_SPEC = SCHEMA({"dtype": ONE_OF("<f8"), "shape": LIST(INT(0), max_len=2), "sha256": HEX(64)},
                    required=("dtype", "shape", "sha256"))
FILE_SCHEMA = {
    "format": STR,
    "format_version": INT(0),
    "software": STR,
    "content_sha256": HEX(64),
    "arrays": DICT(ARRAY_SPEC),
}
"""The file-level fields of ``probe.json``; what the probe means is checked by :mod:`.probe`."""


def read_probe_file(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a ``.raptorprobe`` file; every problem is one clear line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such probe file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a probe file")
    with ZipArchive(path, what="Raptor probe", max_member_bytes=MAX_MEMBER_BYTES, max_total_bytes=MAX_TOTAL_BYTES) as archive:
        names = archive.names
        if METADATA_MEMBER not in names:
            raise InputError(f"{path}: not a Raptor probe (no {METADATA_MEMBER} inside)")
        raw = archive.read_bytes(METADATA_MEMBER, max_bytes=MAX_METADATA_BYTES)
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise InputError(f"{path}: {METADATA_MEMBER} is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
            raise InputError(f"{path}: not a Raptor probe (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        version = meta.get("format_version")
        if not is_int(version):
            raise InputError(f"{path}: {METADATA_MEMBER} field 'format_version' must be a whole number (found {version!r})")
        if version > PROBE_FORMAT_VERSION:
            raise InputError(f"{path}: written by a newer Raptor (probe format {version}); upgrade to read it")
        check_fields(meta, FILE_SCHEMA, str(path), required=("content_sha256", "arrays"), what=METADATA_MEMBER)
        if meta["content_sha256"] != content_digest(meta):
            raise InputError(f"{path}: probe metadata checksum does not match (the file was edited or corrupted)")
        table = meta["arrays"]
        odd = next((n for n in table if not n.replace("_", "").isalnum()), None)
        if odd is not None:
            raise InputError(f"{path}: array name {odd!r} in {METADATA_MEMBER} is not a plain name")
        expected_members = {METADATA_MEMBER} | {f"{ARRAY_PREFIX}{n}.npy" for n in table}
        extra = sorted(set(names) - expected_members)
        if extra:
            raise InputError(f"{path}: unexpected member {extra[0]!r} in the probe file")
        arrays: dict[str, np.ndarray] = {}
        for name, spec in table.items():
            member = f"{ARRAY_PREFIX}{name}.npy"
            if member not in names:
                raise InputError(f"{path}: array {name!r} is missing (truncated or edited file)")
            declared = 8 * math.prod(spec["shape"])
            if declared > MAX_MEMBER_BYTES:
                raise InputError(f"{path}: array {name!r} declares shape {spec['shape']}, far larger than a probe needs")
            array = archive.read_npy(member, kinds="f", max_bytes=declared)
            if array.dtype != np.dtype(spec["dtype"]) or list(array.shape) != list(spec["shape"]):
                raise InputError(
                    f"{path}: array {name!r} is {array.dtype}{list(array.shape)}, the metadata says "
                    f"{spec['dtype']}{spec['shape']}"
                )
            if _array_digest(array) != spec["sha256"]:
                raise InputError(f"{path}: array {name!r} checksum does not match (the file was edited or corrupted)")
            if not np.isfinite(array).all():
                raise InputError(f"{path}: array {name!r} holds NaN or infinite values")
            arrays[name] = array
    return meta, arrays


__all__ = ["PROBE_FORMAT", "PROBE_FORMAT_VERSION", "PROBE_SUFFIX", "write_probe_file", "read_probe_file", "content_digest"]
