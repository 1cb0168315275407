"""Header checks: what a volume file declares, checked before Slicer's reader runs.

Why: Slicer's readers believe the header and are silent about what does not
fit it.  Attacking them found:

- a 2D image or a 4D series refused by VTK with a message that does not say which;
- a NIfTI cut in half (``.nii.gz`` or ``.nii``) read with the missing voxels
  filled with zeros, and embedded as if whole;
- a header declaring 2000^3 voxels allocated (16 GB) before any error;
- a zero or NaN spacing replaced by 1 mm, a non-finite direction matrix or
  origin, without a word;
- NaN and infinite voxels of a NIfTI file turned into finite values (so an
  all-NaN volume looked "constant 0.0").

So the header of every NRRD, NIfTI and MetaImage file is parsed here: its
shape is checked against 3D and against the voxel limit
(:func:`.volume.max_voxels`); its spacing, directions and origin must be
finite (spacings positive, directions not degenerate), each problem naming the
header field; the voxel data the header implies is compared with what the
file holds, decompressing compressed data to its end (which also catches a
truncated or corrupt stream); and the voxels of a floating-point NIfTI are
scanned for NaN and infinity, which its reader would hide.
"""

from __future__ import annotations

import bz2
import gzip
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .volume import check_voxel_count

CHUNK = 1 << 20


@dataclass
class Declared:
    """What a header says about the voxels and the geometry."""

    shape: tuple[int, ...]
    """Array sizes, fastest axis first (I, J, K, ...)."""
    dtype: np.dtype | None = None
    """Voxel type with byte order; None when the header names a type this check does not know."""
    data_path: Path | None = None
    """The file holding the voxels; None when they cannot be located simply (lists of files, patterns)."""
    offset: int | None = 0
    """Where the voxels start in ``data_path`` (decompressed, for ``skip_decompressed``); None: at the end."""
    encoding: str = "raw"
    """``raw``, ``gzip``, ``zlib``, ``bzip2``, or ``other`` (not checked)."""
    skip_decompressed: int = 0
    """Bytes of header inside the decompressed stream (a ``.nii.gz`` compresses its header too)."""
    problems: list[str] = field(default_factory=list)
    """Geometry fields that are not finite and positive, each naming the field."""
    scan_non_finite: bool = False
    """Scan floating-point voxels for NaN and infinity (the NIfTI reader replaces them)."""

    @property
    def nbytes(self) -> int | None:
        return None if self.dtype is None else math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------------------
# Parsing


def declared(path: Path) -> Declared | None:
    """What ``path``'s header declares, or None for a file this module does not parse.

    A header that cannot be parsed returns None: Slicer's reader then gives
    its own reason.
    """
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd(path)
        if name.endswith((".nii", ".nii.gz")):
            return _nifti(path)
        if name.endswith((".mha", ".mhd")):
            return _metaimage(path)
    except (OSError, ValueError, struct.error, EOFError, zlib.error, OverflowError, IndexError):
        return None
    return None


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """The array shape a header declares (fastest axis first), or None if unknown."""
    found = declared(path)
    return found.shape if found is not None else None


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.split(r"[\s,()]+", text.strip()) if v]


_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t"), "i8"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4",
    "double": "f8",
}
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def _nrrd(path: Path) -> Declared | None:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline(64).startswith(b"NRRD"):
            return None
        header_end = None
        for raw in iter(lambda: f.readline(1 << 16), b""):
            line = raw.decode("latin-1").strip()
            if not line:
                header_end = f.tell()
                break
            if line.startswith("#") or (":=" in line and (": " not in line or line.index(":=") < line.index(": "))):
                continue  # a comment, or a key:=value pair (not a field)
            if ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.lstrip("=").strip()
    if "sizes" not in fields:
        return None
    shape = tuple(int(v) for v in fields["sizes"].split())
    result = Declared(shape=shape)
    dims = len(shape)
    if "space directions" in fields:
        tokens = fields["space directions"].split()
        if len(tokens) == dims:
            matrix = []
            for axis, token in enumerate(tokens):
                if token == "none":
                    continue
                try:
                    vector = _numbers(token)
                except ValueError:
                    vector = [math.nan]
                if not all(math.isfinite(v) for v in vector) or not any(v != 0 for v in vector):
                    result.problems.append(f"header field 'space directions' gives axis {axis} the vector {token}, "
                                           "not a finite non-zero direction")
                matrix.append(vector)
            if not result.problems and len(matrix) == 3 and all(len(v) == 3 for v in matrix):
                if abs(np.linalg.det(np.array(matrix))) < 1e-12:
                    result.problems.append("header field 'space directions' is degenerate (its axes are not independent)")
    elif "spacings" in fields:
        for axis, token in enumerate(fields["spacings"].split()):
            value = _float(token)
            if not (math.isfinite(value) and value > 0):
                result.problems.append(f"header field 'spacings' gives axis {axis} the spacing {token}, "
                                       "not a finite positive number")
    for key in ("space origin", "origin"):
        if key in fields:
            try:
                origin = _numbers(fields[key])
            except ValueError:
                origin = [math.nan]
            if not all(math.isfinite(v) for v in origin):
                result.problems.append(f"header field '{key}' is {fields[key]}, not finite")
    kind = _NRRD_TYPES.get(fields.get("type", "").lower())
    if kind is not None:
        big = fields.get("endian", "little").lower() == "big"
        result.dtype = np.dtype(kind).newbyteorder(">" if big else "<") if kind[1] != "1" else np.dtype(kind)
    result.encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "raw").lower(), "other")
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        parts = data_file.split()
        if len(parts) != 1 or parts[0] == "LIST" or "%" in parts[0]:
            result.data_path = None
        else:
            target = Path(parts[0])
            result.data_path = target if target.is_absolute() else path.parent / target
            result.offset = 0
    else:
        if header_end is None:
            result.data_path = None
        else:
            result.data_path = path
            result.offset = header_end
    skip = int(fields.get("byte skip", "0"))
    if int(fields.get("line skip", "0")) != 0:
        result.data_path = None  # lines are skipped by content, not by a size we know
    if skip == -1:
        if result.encoding != "raw":
            result.data_path = None
        result.offset = None
    elif skip > 0 and result.offset is not None:
        if result.encoding == "raw":
            result.offset += skip
        else:
            result.skip_decompressed = skip
    return result


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _nifti(path: Path) -> Declared | None:
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    with _open_maybe_gzip(path) as f:
        head = f.read(540)
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348 and len(head) >= 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            (vox_offset,) = struct.unpack(endian + "f", head[108:112])
            slope, inter = struct.unpack(endian + "2f", head[112:120])
            qform_code, sform_code = struct.unpack(endian + "2h", head[252:256])
            quatern = struct.unpack(endian + "6f", head[256:280])
            srow = struct.unpack(endian + "12f", head[280:328])
        elif size == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            (vox_offset,) = struct.unpack(endian + "q", head[168:176])
            slope, inter = struct.unpack(endian + "2d", head[176:192])
            qform_code, sform_code = struct.unpack(endian + "2i", head[344:352])
            quatern = struct.unpack(endian + "6d", head[352:400])
            srow = struct.unpack(endian + "12d", head[400:496])
        else:
            continue
        ndim = max(0, min(7, int(dims[0])))
        shape = tuple(int(d) for d in dims[1 : 1 + ndim])
        result = Declared(shape=shape, encoding="gzip" if compressed else "raw", data_path=path)
        kind = _NIFTI_TYPES.get(int(datatype))
        if kind is not None:
            result.dtype = np.dtype(kind).newbyteorder(endian) if kind[1] != "1" else np.dtype(kind)
            result.scan_non_finite = kind[0] == "f"
        if not math.isfinite(vox_offset) or vox_offset < size:
            result.problems.append(f"header field 'vox_offset' is {vox_offset:g}, not where voxel data can start")
            result.data_path = None
        elif compressed:
            result.offset, result.skip_decompressed = 0, int(vox_offset)
        else:
            result.offset = int(vox_offset)
        for axis in range(1, 1 + min(3, ndim)):
            value = pixdim[axis]
            if not (math.isfinite(value) and value > 0):
                result.problems.append(f"header field 'pixdim[{axis}]' (the spacing of axis {axis - 1}) is {value:g}, "
                                       "not a finite positive number")
        if not all(math.isfinite(v) for v in (slope, inter)):
            result.problems.append(f"header fields 'scl_slope', 'scl_inter' are {slope:g}, {inter:g}, not finite")
        if qform_code > 0:
            if not all(math.isfinite(v) for v in quatern):
                result.problems.append("header fields 'quatern_b/c/d', 'qoffset_x/y/z' (the qform) are not all finite")
            elif quatern[0] ** 2 + quatern[1] ** 2 + quatern[2] ** 2 > 1.0 + 1e-4:
                result.problems.append("header fields 'quatern_b/c/d' are not a rotation (b^2 + c^2 + d^2 > 1)")
        if sform_code > 0:
            if not all(math.isfinite(v) for v in srow):
                result.problems.append("header fields 'srow_x/y/z' (the sform) are not all finite")
            elif abs(np.linalg.det(np.array(srow).reshape(3, 4)[:, :3])) < 1e-12:
                result.problems.append("header fields 'srow_x/y/z' (the sform) are degenerate (zero volume per voxel)")
        return result
    return None


_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
              "MET_UINT": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _metaimage(path: Path) -> Declared | None:
    fields: dict[str, str] = {}
    data_start = None
    with open(path, "rb") as f:
        for raw in iter(lambda: f.readline(1 << 16), b""):
            line = raw.decode("latin-1").strip()
            key, sep, value = line.partition("=")
            if not sep:
                break
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                data_start = f.tell()
                break
    if "dimsize" not in fields:
        return None
    shape = tuple(int(v) for v in fields["dimsize"].split())
    channels = int(fields.get("elementnumberofchannels", "1"))
    result = Declared(shape=shape + ((channels,) if channels > 1 else ()))
    spacing_key = "elementspacing" if "elementspacing" in fields else ("elementsize" if "elementsize" in fields else None)
    if spacing_key:
        for axis, token in enumerate(fields[spacing_key].split()):
            value = _float(token)
            if not (math.isfinite(value) and value > 0):
                result.problems.append(f"header field '{spacing_key}' gives axis {axis} the spacing {token}, "
                                       "not a finite positive number")
    for key in ("offset", "origin", "position"):
        if key in fields and not all(math.isfinite(_float(t)) for t in fields[key].split()):
            result.problems.append(f"header field '{key}' is {fields[key]}, not finite")
    for key in ("transformmatrix", "rotation", "orientation"):
        if key in fields:
            values = [_float(t) for t in fields[key].split()]
            if not all(math.isfinite(v) for v in values):
                result.problems.append(f"header field '{key}' is {fields[key]}, not finite")
            elif len(values) == 9 and abs(np.linalg.det(np.array(values).reshape(3, 3))) < 1e-12:
                result.problems.append(f"header field '{key}' is degenerate (its axes are not independent)")
    kind = _MET_TYPES.get(fields.get("elementtype", "").upper())
    if kind is not None and channels == 1:
        big = (fields.get("binarydatabyteordermsb") or fields.get("elementbyteordermsb") or "False").lower() == "true"
        result.dtype = np.dtype(kind).newbyteorder(">" if big else "<") if kind[1] != "1" else np.dtype(kind)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    result.encoding = "zlib" if compressed else "raw"
    target = fields.get("elementdatafile", "")
    header_size = int(fields.get("headersize", "0"))
    if target.upper() == "LOCAL":
        result.data_path, result.offset = path, data_start
    elif not target or target.upper().startswith("LIST") or "%" in target or len(target.split()) > 1:
        result.data_path = None
    else:
        result.data_path = path.parent / target
        result.offset = None if header_size == -1 else max(0, header_size)
    if result.offset is None and compressed:
        result.data_path = None
    return result


# ---------------------------------------------------------------------------
# Checking


def check_volume_file(path: Path) -> None:
    """Refuse a volume file whose header does not describe a whole, finite 3D volume (see the module docstring)."""
    found = declared(path)
    if found is None:
        return
    _check_dimensions(path, found.shape)
    spatial = tuple(s for s in found.shape[:3])
    check_voxel_count(math.prod(spatial), str(path), spatial)
    if found.problems:
        raise InputError(f"{path}: {found.problems[0]}")
    if found.data_path is not None and found.nbytes is not None and found.encoding != "other":
        _check_data(path, found)


def check_declared_shape(path: Path) -> None:
    """The shape checks alone (2D, 4D); :func:`check_volume_file` does these and more."""
    shape = _header_shape(path)
    if shape is not None:
        _check_dimensions(path, shape)


def _check_dimensions(path: Path, shape: tuple[int, ...]) -> None:
    spatial = [s for s in shape if s > 1]
    if len(shape) <= 2 or (len(shape) == 3 and len(spatial) == 2 and 1 in shape):
        raise InputError(f"{path}: is a 2D image {shape}; Raptor needs a 3D volume")
    if len(spatial) >= 4:
        raise InputError(f"{path}: is a 4D series {shape}; Raptor embeds one 3D volume at a time")
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: its header declares an impossible size {shape}")


def _check_data(path: Path, found: Declared) -> None:
    data_path = found.data_path
    nbytes = found.nbytes
    what = f"{'x'.join(str(s) for s in found.shape)} {found.dtype.name} voxels ({nbytes:,} bytes)"
    try:
        size = data_path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: its voxel data file {data_path.name} is missing") from None
    except OSError as exc:
        raise InputError(f"{path}: its voxel data file {data_path.name} cannot be read ({exc.strerror})") from None
    if found.encoding == "raw":
        start = size - nbytes if found.offset is None else found.offset
        available = size - start
        if start < 0 or available < nbytes:
            raise InputError(f"{path}: is truncated: its header declares {what}, the file holds "
                             f"{max(0, available):,} bytes of them")
        if found.scan_non_finite:
            with open(data_path, "rb") as f:
                f.seek(start)
                _scan(path, _chunks_of(f, nbytes), found.dtype)
        return
    got = 0
    scanner = _Scanner(found.dtype) if found.scan_non_finite else None
    skip = found.skip_decompressed
    try:
        for chunk in _decompressed(data_path, found.offset or 0, found.encoding):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if scanner is not None and got < nbytes:
                scanner.feed(chunk[: nbytes - got])
            got += len(chunk)
    except EOFError:
        raise InputError(f"{path}: is truncated: its compressed voxel data ends early (a copy cut short?)") from None
    except (OSError, zlib.error, ValueError) as exc:
        raise InputError(f"{path}: its compressed voxel data is corrupt ({type(exc).__name__}: {exc})") from None
    if skip or got < nbytes:
        raise InputError(f"{path}: is truncated: its header declares {what}, the data decompresses to {max(0, got):,} bytes")
    if scanner is not None:
        scanner.report(path)


def _decompressed(path: Path, offset: int, encoding: str) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        raw.seek(offset)
        if encoding == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                while chunk := stream.read(CHUNK):
                    yield chunk
            return
        decompressor = zlib.decompressobj() if encoding == "zlib" else bz2.BZ2Decompressor()
        while True:
            block = raw.read(CHUNK)
            if not block:
                break
            chunk = decompressor.decompress(block)
            if chunk:
                yield chunk
            if decompressor.eof:
                return
        if encoding == "zlib":
            tail = decompressor.flush()
            if tail:
                yield tail
        if not decompressor.eof:
            raise EOFError("compressed stream ended early")


def _chunks_of(handle, nbytes: int) -> Iterator[bytes]:
    left = nbytes
    while left > 0:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


class _Scanner:
    """Counts NaN and infinite values in a stream of raw floating-point bytes."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.rest = b""
        self.nan = self.inf = self.count = 0

    def feed(self, chunk: bytes) -> None:
        data = self.rest + chunk
        usable = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:usable], dtype=self.dtype)
        self.rest = data[usable:]
        nan = np.isnan(values)
        self.nan += int(np.count_nonzero(nan))
        self.inf += int(np.count_nonzero(np.isinf(values)))
        self.count += values.size

    def report(self, path: Path) -> None:
        if self.count and self.nan == self.count:
            raise InputError(f"{path}: every voxel is NaN (no value at all), nothing to embed")
        if self.nan or self.inf:
            parts = [f"{self.nan} NaN" if self.nan else "", f"{self.inf} infinite" if self.inf else ""]
            raise InputError(f"{path}: contains {' and '.join(p for p in parts if p)} voxels (NaN or infinite values), "
                             "which its reader would silently replace")


def _scan(path: Path, chunks: Iterator[bytes], dtype: np.dtype) -> None:
    scanner = _Scanner(dtype)
    for chunk in chunks:
        scanner.feed(chunk)
    scanner.report(path)


__all__ = ["Declared", "declared", "check_volume_file", "check_declared_shape"]
