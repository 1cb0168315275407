"""Header peeks: what a volume file declares, read before Slicer's reader runs.

Why: VTK refuses a 2D image or a 4D series with a message that does not say
which; reading the header first names the problem precisely.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from ..errors import InputError


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """The array shape a header declares (fastest axis first), or None if unknown."""
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd_shape(path)
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_shape(path)
        if name.endswith((".mha", ".mhd")):
            return _metaimage_shape(path)
    except (OSError, ValueError, struct.error, EOFError):
        return None
    return None


def _nrrd_shape(path: Path) -> tuple[int, ...] | None:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline().startswith(b"NRRD"):
            return None
        for raw in f:
            line = raw.decode("latin-1").strip()
            if not line:
                break
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.lstrip("=").strip()
    if "sizes" not in fields:
        return None
    return tuple(int(v) for v in fields["sizes"].split())


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    with _open_maybe_gzip(path) as f:
        head = f.read(540)
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            return tuple(int(d) for d in dims[1 : 1 + max(0, min(7, dims[0]))])
        if size == 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            return tuple(int(d) for d in dims[1 : 1 + max(0, min(7, dims[0]))])
    return None


def _metaimage_shape(path: Path) -> tuple[int, ...] | None:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").strip()
            key, sep, value = line.partition("=")
            if not sep:
                break
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
    if "dimsize" not in fields:
        return None
    shape = tuple(int(v) for v in fields["dimsize"].split())
    channels = int(fields.get("elementnumberofchannels", "1"))
    return shape + ((channels,) if channels > 1 else ())


def check_declared_shape(path: Path) -> None:
    shape = _header_shape(path)
    if shape is None:
        return
    spatial = [s for s in shape if s > 1]
    if len(shape) <= 2 or (len(shape) == 3 and len(spatial) == 2 and 1 in shape):
        raise InputError(f"{path}: is a 2D image {shape}; Raptor needs a 3D volume")
    if len(spatial) >= 4:
        raise InputError(f"{path}: is a 4D series {shape}; Raptor embeds one 3D volume at a time")
