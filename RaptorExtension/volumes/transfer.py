"""A volume as one self-contained file, to hand it to a Raptor server: written here, checked there.

Why NRRD: Slicer writes and reads it natively, it carries the geometry, and
an attached raw NRRD is a short text header followed by the voxels exactly as
they sit in memory, so writing one costs a copy and nothing else.  The
numbers in the header are written with Python's shortest round-trip ``repr``,
so the receiver parses the client's geometry exactly.

Why the receiver checks files before reading them: an uploaded file is a
stranger's file.  A *detached* NRRD header (``data file: /etc/...``), a
MetaImage ``.mhd`` or a NIfTI ``.hdr``/``.img`` pair names other files, and
Slicer's reader would follow the name onto the server's own disk.  Only
files that hold their own voxels are accepted (:func:`self_contained_kind`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

from ..errors import InputError

NRRD_TYPES = {
    np.dtype("int8"): "signed char",
    np.dtype("uint8"): "unsigned char",
    np.dtype("int16"): "short",
    np.dtype("uint16"): "unsigned short",
    np.dtype("int32"): "int",
    np.dtype("uint32"): "unsigned int",
    np.dtype("int64"): "long long int",
    np.dtype("uint64"): "unsigned long long int",
    np.dtype("float32"): "float",
    np.dtype("float64"): "double",
}
SUFFIXES = {"nrrd": ".nrrd", "nifti": ".nii", "nifti-gz": ".nii.gz", "metaimage": ".mha"}
"""The file name suffix a checked upload is stored under, by kind."""


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(array: np.ndarray, ijk_to_ras: np.ndarray) -> bytes:
    """The attached, raw, little-endian NRRD header for a (K, J, I) array with this IJK-to-RAS."""
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in NRRD_TYPES:
        raise InputError(f"voxel type {array.dtype} cannot be sent as NRRD")
    if array.ndim != 3:
        raise InputError(f"a volume to send must be 3D (got shape {array.shape})")
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0])
    directions = [lps @ m[:3, c] for c in range(3)]
    origin = lps @ m[:3, 3]
    k, j, i = array.shape
    lines = [
        "NRRD0004",
        "# Written by Raptor to hand a volume to a Raptor server",
        f"type: {NRRD_TYPES[dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        "space directions: " + " ".join(_vector(d) for d in directions),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: raw",
        f"space origin: {_vector(origin)}",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def nrrd_chunks(array: np.ndarray, ijk_to_ras: np.ndarray, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
    """The NRRD file as a stream of pieces of at most ``chunk_bytes``: header first, then the voxels.

    A caller on a GUI thread writes or sends one piece per timer tick, so a
    large volume never blocks the interface for long.
    """
    yield nrrd_header(array, ijk_to_ras)
    data = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
    flat = memoryview(data.reshape(-1).view(np.uint8))
    for start in range(0, len(flat), chunk_bytes):
        yield bytes(flat[start : start + chunk_bytes])


def nrrd_size(array: np.ndarray, ijk_to_ras: np.ndarray) -> int:
    return len(nrrd_header(array, ijk_to_ras)) + int(array.nbytes)


# ---------------------------------------------------------------------------
# The receiving side


def self_contained_kind(head: bytes, what: str) -> str:
    """``nrrd``, ``nifti``, ``nifti-gz`` or ``metaimage`` for a volume file that holds its own voxels.

    ``head`` is the start of the file (64 KiB is plenty).  Anything else, and
    any header that points at another file, is refused with one line.
    """
    if head.startswith(b"NRRD"):
        if b"\n\n" not in head.replace(b"\r\n", b"\n"):
            # A header that does not end within the peek could name another file further on.
            raise InputError(f"{what}: its NRRD header does not end within its first {len(head) // 1024} KiB; "
                             "send a .nrrd with a plain header and its data attached")
        header = head.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        for raw in header.split(b"\n")[1:]:
            key = raw.split(b":", 1)[0].strip().lower()
            if key in (b"data file", b"datafile"):
                raise InputError(f"{what}: is a detached NRRD header that names other files; send one .nrrd with its data attached")
        return "nrrd"
    if head[:2] == b"\x1f\x8b":
        try:
            inner = _gunzip_head(head)
        except (OSError, EOFError, ValueError):
            raise InputError(f"{what}: a gzip file that does not decompress") from None
        if _nifti_magic(inner) in (b"n+1", b"n+2"):
            return "nifti-gz"
        raise InputError(f"{what}: a gzip file that is not a single-file NIfTI (.nii.gz)")
    magic = _nifti_magic(head)
    if magic in (b"n+1", b"n+2"):
        return "nifti"
    if magic in (b"ni1", b"ni2"):
        raise InputError(f"{what}: is a NIfTI header whose voxels are in a separate .img file; send a single .nii or .nii.gz")
    text = head[:4096].decode("latin-1", errors="replace")
    if "ElementDataFile" in text or text.lstrip().startswith(("ObjectType", "NDims")):
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ElementDataFile":
                if value.strip().upper() == "LOCAL":
                    return "metaimage"
                raise InputError(f"{what}: is a MetaImage header that names another file; send a .mha with its data inside")
        raise InputError(f"{what}: a MetaImage header without its data")
    raise InputError(f"{what}: is not a NRRD, NIfTI or MetaImage volume file")


def _gunzip_head(head: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1024)


def _nifti_magic(head: bytes) -> bytes | None:
    if len(head) < 348:
        return None
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348:
            return head[344:347]
        if size == 540 and len(head) >= 12:
            return head[4:7]
    return None


__all__ = ["nrrd_chunks", "nrrd_header", "nrrd_size", "self_contained_kind", "SUFFIXES"]
