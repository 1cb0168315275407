"""The seeded Gaussian projection R (K x d) that compresses the token width.

R must be the same bits on every machine, device and library version, or
embeddings made on two computers would silently disagree.  Library samplers
(``torch.randn``, ``numpy.random.Generator.standard_normal``) promise no such
stability, so R is built from a stream that does: the raw 64-bit output of
NumPy's PCG64 bit generator (stream-stable by NEP 19) turned into standard
normals with the Box-Muller transform in float64 and rounded to float32.
Row-major: R[k, j] is element ``k * d + j`` of the stream's normals.  The
SHA-256 of R's float32 bytes is recorded in every embedding's metadata.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from ..errors import ModelError

GENERATOR_NAME = "pcg64-raw-boxmuller-float64-to-float32"


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


def gaussian_projection(k: int, d: int, seed: int) -> np.ndarray:
    """R with N(0, 1) entries, shape (k, d), float32, read-only."""
    if k < 1:
        raise ModelError(f"K must be at least 1 (got {k})")
    if k > d:
        raise ModelError(f"K={k} is larger than the encoder's token width d={d}; a projection cannot add information")
    if seed < 0:
        raise ModelError(f"seed must be non-negative (got {seed})")
    return _projection(int(k), int(d), int(seed))


def projection_sha256(r: np.ndarray) -> str:
    """SHA-256 of R's little-endian float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(r, dtype="<f4").tobytes()).hexdigest()
