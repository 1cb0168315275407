"""Reading ``.npy`` arrays and ``.npz`` / ZIP archives someone else wrote, without trusting them.

NumPy's own loader believes what a file declares: a 100-byte ``.npy`` whose
header says (1000000, 1000000) float64 makes it try to allocate 7 TiB; a ZIP
member may use a compression NumPy cannot read, be encrypted, or fail its CRC
half-way; a header may ask for Python objects.  Every one of those used to
escape as a traceback.  Here a file is checked before anything is allocated:

- the ``.npy`` header is parsed (NumPy's parser, which evaluates literals only)
  and the array's declared size is compared with the bytes that are there;
- only plain numeric (and, where asked, text) types are accepted: no objects,
  no records, no sub-arrays;
- ZIP members must be stored or deflated, unencrypted, within a size limit,
  with a plausible compression ratio, and are read to their end so that the
  CRC is checked;

and every problem is one :class:`~.errors.InputError` that names the file.
Arrays keep the byte order they were written in; callers convert.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError

NUMERIC_KINDS = "biuf"
"""bool, signed and unsigned integers, floats."""
MAX_HEADER_BYTES = 1 << 16
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than about 1032 : 1; a member that claims more lies
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
            ValueError, struct.error, OverflowError)


def _describe(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    return f"{dtype.str}{list(shape)}"


def read_npy_header(stream: BinaryIO, where: str, *, kinds: str = NUMERIC_KINDS) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header_bytes)`` of a ``.npy`` stream positioned at its start."""
    fmt = np.lib.format
    stream = _Counting(stream)
    try:
        version = fmt.read_magic(stream)
    except (ValueError, EOFError):
        raise InputError(f"{where}: not a NumPy .npy array (no .npy header)") from None
    except _CORRUPT as exc:  # a ZIP member's CRC is checked as soon as its last byte is buffered
        raise InputError(f"{where}: the data is corrupt ({_reason(exc)})") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            raise InputError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    except InputError:
        raise
    except zipfile.BadZipFile as exc:
        raise InputError(f"{where}: the data is corrupt ({_reason(exc)})") from None
    except (*_CORRUPT, SyntaxError, TypeError, KeyError) as exc:
        raise InputError(f"{where}: the .npy header is corrupt ({type(exc).__name__})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InputError(f"{where}: holds Python objects, which Raptor never unpickles")
    if dtype.names is not None or dtype.subdtype is not None:
        raise InputError(f"{where}: is a structured array ({dtype}); Raptor reads plain arrays of numbers")
    if dtype.kind not in kinds or dtype.itemsize == 0:
        raise InputError(f"{where}: has element type {dtype} ({dtype.name}), not one Raptor reads here")
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise InputError(f"{where}: the .npy header declares an impossible shape {list(shape)}")
    return tuple(shape), bool(fortran), dtype, stream.count


class _Counting:
    """Counts the bytes NumPy's header parser reads (it reads exactly the header)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data


def read_npy(stream: BinaryIO, available: int | None, where: str, *, kinds: str = NUMERIC_KINDS,
             max_bytes: int | None = None) -> np.ndarray:
    """Read one ``.npy`` array from ``stream`` whose total size is ``available`` bytes (None: unknown).

    The declared size is checked against ``available`` and ``max_bytes``
    before the array is allocated; a stream that ends early or runs on is
    refused.
    """
    shape, fortran, dtype, header_bytes = read_npy_header(stream, where, kinds=kinds)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise InputError(f"{where}: declares an array {_describe(dtype, shape)} of {_size(nbytes)}, "
                         f"more than the {_size(max_bytes)} allowed here")
    if available is not None:
        data_bytes = available - header_bytes
        if data_bytes < nbytes:
            raise InputError(f"{where}: declares an array {_describe(dtype, shape)} of {nbytes} bytes but holds "
                             f"{max(data_bytes, 0)} (truncated, or its header lies)")
        if data_bytes > nbytes:
            raise InputError(f"{where}: holds {data_bytes} bytes after its header where {_describe(dtype, shape)} "
                             f"takes {nbytes} (a damaged file)")
    array = np.empty(count, dtype=dtype)
    view = memoryview(array.view(np.uint8)) if count else memoryview(b"")
    filled = 0
    try:
        while filled < nbytes:
            n = stream.readinto(view[filled:])
            if not n:
                break
            filled += n
        extra = stream.read(1)  # reaching the end makes a ZIP member check its CRC
    except _CORRUPT as exc:
        raise InputError(f"{where}: the data is corrupt ({_reason(exc)})") from None
    if filled < nbytes:
        raise InputError(f"{where}: the array data ends after {filled} of {nbytes} bytes (truncated)")
    if extra:
        raise InputError(f"{where}: holds more data than its header declares (a damaged file)")
    return array.reshape(shape, order="F" if fortran else "C")


def read_npy_file(path: str | os.PathLike, *, kinds: str = NUMERIC_KINDS, max_bytes: int | None = None) -> np.ndarray:
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    with handle:
        return read_npy(handle, os.fstat(handle.fileno()).st_size, str(path), kinds=kinds, max_bytes=max_bytes)


def npy_file_header(path: str | os.PathLike, *, kinds: str = NUMERIC_KINDS) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and type a ``.npy`` file declares (header only)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            shape, _, dtype, _ = read_npy_header(handle, str(path), kinds=kinds)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return shape, dtype


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ZipArchive:
    """A ZIP archive (``.npz``, ``.raptorprobe``) opened for careful reading.

    Opening checks every member: no duplicates, no encryption, stored or
    deflated only, declared sizes within ``max_member_bytes`` each and
    ``max_total_bytes`` together, and a compression ratio deflate can reach.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "ZIP archive", max_member_bytes: int,
                 max_total_bytes: int) -> None:
        self.path = Path(path)
        where = str(self.path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise InputError(f"{where}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{where}: is a folder, not a {what}") from None
        except OSError as exc:
            raise InputError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        except _CORRUPT:
            raise InputError(f"{where}: not a {what} (not a ZIP archive, or truncated)") from None
        try:
            self.infos = {}
            total = 0
            for info in self.zip.infolist():
                name = info.filename
                if name in self.infos:
                    raise InputError(f"{where}: member {name!r} appears twice (a damaged or crafted file)")
                if info.flag_bits & 0x1:
                    raise InputError(f"{where}: member {name!r} is encrypted; Raptor reads plain archives only")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise InputError(f"{where}: member {name!r} uses ZIP compression method {info.compress_type}; "
                                     "Raptor reads stored or deflated members only")
                if info.file_size > max_member_bytes:
                    raise InputError(f"{where}: member {name!r} declares {_size(info.file_size)}, more than the "
                                     f"{_size(max_member_bytes)} allowed")
                ratio_limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else (
                    info.compress_size * MAX_DEFLATE_RATIO + 1024)
                if info.file_size > ratio_limit:
                    raise InputError(f"{where}: member {name!r} declares {info.file_size} bytes from "
                                     f"{info.compress_size} stored (a damaged or crafted file)")
                total += info.file_size
                self.infos[name] = info
            if total > max_total_bytes:
                raise InputError(f"{where}: its members declare {_size(total)} together, more than the "
                                 f"{_size(max_total_bytes)} allowed")
        except BaseException:
            self.zip.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        info = self.infos[name]
        where = f"{self.path}: member {name!r}"
        if max_bytes is not None and info.file_size > max_bytes:
            raise InputError(f"{where} is {_size(info.file_size)}, more than the {_size(max_bytes)} allowed")
        try:
            with self.zip.open(info) as stream:
                data = stream.read(info.file_size + 1)
        except _CORRUPT as exc:
            raise InputError(f"{where} is corrupt ({_reason(exc)})") from None
        if len(data) != info.file_size:
            raise InputError(f"{where} holds {len(data)} bytes where the archive says {info.file_size} (a damaged file)")
        return data

    def npy_header(self, name: str, *, kinds: str = NUMERIC_KINDS) -> tuple[tuple[int, ...], np.dtype]:
        where = f"{self.path}: array {name.rsplit('/', 1)[-1].removesuffix('.npy')!r}"
        try:
            with self.zip.open(self.infos[name]) as stream:
                shape, _, dtype, _ = read_npy_header(stream, where, kinds=kinds)
        except InputError:
            raise
        except _CORRUPT as exc:
            raise InputError(f"{where} is corrupt ({_reason(exc)})") from None
        return shape, dtype

    def read_npy(self, name: str, *, kinds: str = NUMERIC_KINDS, max_bytes: int | None = None) -> np.ndarray:
        info = self.infos[name]
        where = f"{self.path}: array {name.rsplit('/', 1)[-1].removesuffix('.npy')!r}"
        try:
            with self.zip.open(info) as stream:
                return read_npy(stream, info.file_size, where, kinds=kinds, max_bytes=max_bytes)
        except InputError:
            raise
        except _CORRUPT as exc:
            raise InputError(f"{where} is corrupt ({_reason(exc)})") from None

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> "ZipArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_npz(path: str | os.PathLike, *, max_member_bytes: int, max_total_bytes: int) -> ZipArchive:
    """An ``.npz`` archive whose arrays are its ``*.npy`` members (other members are refused)."""
    archive = ZipArchive(path, what=".npz file", max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes)
    odd = [n for n in archive.names if not n.endswith(".npy")]
    if odd:
        archive.close()
        raise InputError(f"{path}: not a NumPy .npz archive (member {odd[0]!r} is not an .npy array)")
    return archive


def npz_names(archive: ZipArchive) -> list[str]:
    """The array names of an ``.npz`` (member names without ``.npy``)."""
    return [n.removesuffix(".npy") for n in archive.names]


__all__ = ["read_npy", "read_npy_file", "read_npy_header", "npy_file_header", "ZipArchive", "open_npz", "npz_names",
           "NUMERIC_KINDS"]
