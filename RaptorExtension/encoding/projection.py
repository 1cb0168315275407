"""The seeded Gaussian projection R (K x d) that compresses the token width.

R must be the same bits on every machine, device and library version, or
embeddings made on two computers would silently disagree.  Library samplers
(``torch.randn``, ``numpy.random.Generator.standard_normal``) promise no such
stability, so R is built from a stream that does: the raw 64-bit output of
NumPy's PCG64 bit generator (stream-stable by NEP 19) turned into standard
normals with the Box-Muller transform in float64 and rounded to float32.
Row-major: R[k, j] is element ``k * d + j`` of the stream's normals.  The
SHA-256 of R's float32 bytes is recorded in every embedding's metadata.

Two other sources of R, for reproducing the authors' reference code
(sriramlab/raptor):

``numpy-legacy``  R drawn as its ``create_projector.py`` draws it:
                  ``np.random.seed(seed); np.random.randn(d, K)`` (legacy
                  MT19937, float64, d x K), applied as ``R.T @ tokens``.  Its
                  K=10 is not a part of its K=100.
a projector file  a ``.npy`` holding the reference's d x K matrix or our K x d
                  one (:func:`load_projection_file`), checked and hashed.
Both keep float64 (a file keeps its own precision); R is applied in float64.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelError

GENERATOR_NAME = "pcg64-raw-boxmuller-float64-to-float32"
LEGACY_GENERATOR_NAME = "numpy-legacy-mt19937-randn-float64"
FILE_PROJECTION = "file"
PROJECTION_NAMES = {"pcg64": GENERATOR_NAME, "numpy-legacy": LEGACY_GENERATOR_NAME}
"""``--projection`` choices and the name each records in the metadata's ``projection``."""


@functools.lru_cache(maxsize=8)
def _projection(k: int, d: int, seed: int) -> np.ndarray:
    n = k * d
    pairs = (n + 1) // 2
    raw = np.random.PCG64(seed).random_raw(2 * pairs)
    # 53-bit uniforms in (0, 1]: never 0, so log() is finite.
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)
    u1, u2 = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    normals = np.empty(2 * pairs, dtype=np.float64)
    normals[0::2] = radius * np.cos(angle)
    normals[1::2] = radius * np.sin(angle)
    r = normals[:n].astype(np.float32).reshape(k, d)
    r.setflags(write=False)
    return r


def _check_k(k: int, d: int) -> None:
    if k < 1:
        raise ModelError(f"K must be at least 1 (got {k})")
    if k > d:
        raise ModelError(f"K={k} is larger than the encoder's token width d={d}; a projection cannot add information")


def gaussian_projection(k: int, d: int, seed: int) -> np.ndarray:
    """R with N(0, 1) entries, shape (k, d), float32, read-only."""
    _check_k(k, d)
    if seed < 0:
        raise ModelError(f"seed must be non-negative (got {seed})")
    return _projection(int(k), int(d), int(seed))


@functools.lru_cache(maxsize=8)
def _legacy_projection(k: int, d: int, seed: int) -> np.ndarray:
    # A private RandomState draws the same stream as np.random.seed(seed); np.random.randn(d, k),
    # without touching NumPy's global generator.
    r = np.ascontiguousarray(np.random.RandomState(seed).randn(d, k).T)
    r.setflags(write=False)
    return r


def legacy_projection(k: int, d: int, seed: int) -> np.ndarray:
    """The reference code's R, ``np.random.seed(seed); np.random.randn(d, k)``, as (k, d) float64, read-only."""
    _check_k(k, d)
    if not 0 <= seed < 2**32:
        raise ModelError(f"the numpy-legacy projection takes a seed from 0 to 2**32 - 1 (got {seed})")
    return _legacy_projection(int(k), int(d), int(seed))


def projection_sha256(r: np.ndarray) -> str:
    """SHA-256 of R's (K x d, row-major) little-endian bytes: float32, or float64 for a float64 R."""
    dtype = "<f8" if np.asarray(r).dtype == np.float64 else "<f4"
    return hashlib.sha256(np.ascontiguousarray(r, dtype=dtype).tobytes()).hexdigest()


@dataclass(frozen=True)
class Projection:
    """R (K x d) with what its metadata records."""

    matrix: np.ndarray
    name: str  # the metadata's ``projection``
    seed: int | None  # None for a file
    file: str | None = None
    file_sha256: str | None = None
    file_layout: str | None = None

    @property
    def k(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def sha256(self) -> str:
        return projection_sha256(self.matrix)

    def metadata(self) -> dict:
        meta = {"projection": self.name, "projection_sha256": self.sha256}
        if self.file is not None:
            # The file's name, not its path: its SHA-256 identifies it, and a path would tell where it lay
            # (a server's upload folder, a user's home), which differs between two runs that agree.
            meta.update(projection_file=Path(self.file).name, projection_file_sha256=self.file_sha256,
                        projection_file_layout=self.file_layout)
        return meta


def make_projection(method: str, k: int, d: int, seed: int, file: str | Path | None = None) -> Projection:
    """R from ``--projection METHOD`` (``pcg64`` or ``numpy-legacy``) or from a projector file.

    With a file, ``k`` may be None (K comes from the file); a K that differs
    from the file's is refused.
    """
    if file is not None:
        return load_projection_file(file, d, k)
    if method not in PROJECTION_NAMES:
        raise ModelError(f"unknown projection {method!r} (choose from {', '.join(PROJECTION_NAMES)})")
    k = 100 if k is None else int(k)
    r = gaussian_projection(k, d, seed) if method == "pcg64" else legacy_projection(k, d, seed)
    return Projection(matrix=r, name=PROJECTION_NAMES[method], seed=int(seed))


def load_projection_file(path: str | Path, d: int, k: int | None = None) -> Projection:
    """A user's projector ``.npy``: the reference's d x K or our K x d, finite, K <= d.

    Read with ``allow_pickle=False``; the file's SHA-256 is recorded.  A
    square d x d matrix is taken in the reference's layout (d x K).
    """
    path = Path(path)
    limit = d * d * 8 + (1 << 20)  # a float64 d x d matrix and a generous header
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"{path}: is not a file (a projector is one .npy array)")
        if size > limit:
            raise InputError(f"{path}: is {size} bytes, too large for a projector of a d={d} encoder")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such projector file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if data.startswith(b"PK"):
        raise InputError(f"{path}: is an .npz archive; a projector is one array saved with numpy.save (.npy)")
    if not data.startswith(b"\x93NUMPY"):
        raise InputError(f"{path}: not a .npy array (save R with numpy.save)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(f"{path}: holds Python objects, which Raptor never unpickles") from None
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{path}: holds {array.dtype} values; a projector holds float32 or float64 numbers")
    if array.ndim != 2:
        raise InputError(f"{path}: has shape {array.shape}; a projector is a 2-D d x K (reference) or K x d matrix")
    if array.shape[0] == d:
        matrix, layout = array.T, "d x K"
    elif array.shape[1] == d:
        matrix, layout = array, "K x d"
    else:
        raise InputError(f"{path}: has shape {array.shape}, which does not fit the encoder's token width d={d} "
                         f"(expected {d} x K as the reference writes it, or K x {d})")
    file_k = int(matrix.shape[0])
    if file_k > d:
        raise InputError(f"{path}: holds K={file_k} projections, more than the token width d={d}")
    if k is not None and int(k) != file_k:
        raise InputError(f"{path}: holds K={file_k} projections ({layout}), but K={k} was asked; "
                         f"leave out --k or make them agree")
    finite = np.isfinite(matrix)
    if not finite.all():
        raise InputError(f"{path}: holds {int(matrix.size - finite.sum())} NaN or infinite values")
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    matrix.setflags(write=False)
    return Projection(matrix=matrix, name=FILE_PROJECTION, seed=None, file=str(path),
                      file_sha256=hashlib.sha256(data).hexdigest(), file_layout=layout)
