"""Resample a volume onto the isotropic cube whose slices the ViT sees.

Why physical space: the three planes must be the anatomical axial, coronal
and sagittal planes whatever the acquisition (an LPS DICOM, its RAS NIfTI copy
and an oblique scan of the same patient all give the same cube).  The cube is
axis-aligned in RAS, centred on the volume's bounding box, and its side is the
longest extent of that box, so the aspect ratio is kept and the shorter
extents are padded rather than stretched.

Cube layout (array index ``[a0, a1, a2]``, Slicer K, J, I order):
  a0 runs superior -> inferior, a1 anterior -> posterior, a2 right -> left.
So ``cube[a0]`` is an axial slice seen as radiologists do (anterior up,
patient right on the image left), ``cube[:, a1]`` a coronal and
``cube[:, :, a2]`` a sagittal slice, both with superior up.

Padding: voxels outside the input are filled with 0 *after* intensity
normalization, i.e. the bottom of the window (air for the ``ct`` preset,
black for the others).

Arrays without geometry (``.npy``, MedMNIST ``.npz``): their axes are not
anatomical directions, so the cube keeps the array's own axis order and
direction, as ``--grid native`` does (cube axis 0 = array axis 0, in the same
direction).  Reading the identity matrix as RAS would flip all three axes,
because the cube's axes run towards inferior, posterior and left.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cube_geometry(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int], grid: int) -> np.ndarray:
    """IJK-to-RAS of the cube that holds the volume (4x4 float64)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    nk, nj, ni = shape_kji
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)]
    )
    ras = (m @ corners.T).T[:, :3]
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    side = float((hi - lo).max())
    spacing = side / grid
    centre = (lo + hi) / 2
    cube = np.eye(4)
    cube[:3, :3] = np.diag([-spacing, -spacing, -spacing])  # i -> left, j -> posterior, k -> inferior
    cube[:3, 3] = centre + side / 2 - spacing / 2
    return cube


ARRAY_AXES = np.diag([-1.0, -1.0, -1.0, 1.0])
"""Where an array without geometry is placed for resampling: its i, j, k run along the cube's own axes."""


def resample_array_to_cube(volume: torch.Tensor, ijk_to_ras: np.ndarray, grid: int,
                           has_geometry: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`resample_to_cube`, keeping the axes of an array without geometry (see the module).

    The cube's matrix is returned in the volume's own frame either way, so
    mapping back (``inv(cube) @ ijk_to_ras``) goes to the voxels it came from.
    """
    if has_geometry:
        return resample_to_cube(volume, ijk_to_ras, grid)
    placed = ARRAY_AXES @ np.asarray(ijk_to_ras, dtype=np.float64)
    cube, cube_to_placed = resample_to_cube(volume, placed, grid)
    return cube, np.linalg.inv(ARRAY_AXES) @ cube_to_placed


def resample_to_cube(volume: torch.Tensor, ijk_to_ras: np.ndarray, grid: int) -> tuple[torch.Tensor, np.ndarray]:
    """Trilinear resampling of a (K, J, I) tensor onto the RAS-aligned ``grid``^3 cube.

    Runs on the tensor's device (the GPU in production) and returns the cube
    and its IJK-to-RAS matrix.  Sampling points closer than half a voxel to
    the input's border take the border value; points further out are 0.
    """
    shape = tuple(int(s) for s in volume.shape)
    cube_to_ras = cube_geometry(ijk_to_ras, shape, grid)
    # Voxel index of the input at each cube index: a 4x4 affine, composed in float64.
    t = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)) @ cube_to_ras
    if shape == (grid, grid, grid) and np.array_equal(t, np.eye(4)):
        # The cube is the input's own grid (e.g. a 28^3 array at --grid 28): nothing to interpolate.
        return volume.to(torch.float32), cube_to_ras
    dev = volume.device
    idx = torch.arange(grid, device=dev, dtype=torch.float64)
    # ijk_input[c] = t[c,0]*i + t[c,1]*j + t[c,2]*k + t[c,3]; cube array order is [k, j, i].
    coords = []
    for c in range(3):
        along_k = (t[c, 2] * idx + t[c, 3]).view(grid, 1, 1)
        along_j = (t[c, 1] * idx).view(1, grid, 1)
        along_i = (t[c, 0] * idx).view(1, 1, grid)
        coords.append((along_k + along_j + along_i))
    ci, cj, ck = coords  # input i, j, k at every cube voxel
    sizes = (shape[2], shape[1], shape[0])
    inside = torch.ones((grid, grid, grid), dtype=torch.bool, device=dev)
    normalized = []
    for c, n in zip((ci, cj, ck), sizes):
        inside &= (c >= -0.5) & (c <= n - 0.5)
        normalized.append((2.0 * c / (n - 1) - 1.0).to(torch.float32))
    del coords, ci, cj, ck
    sample_grid = torch.stack(normalized, dim=-1).unsqueeze(0)  # (1, D, H, W, 3) as (x=i, y=j, z=k)
    del normalized
    out = F.grid_sample(
        volume.to(torch.float32)[None, None],
        sample_grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )[0, 0]
    del sample_grid
    out.mul_(inside)
    return out, cube_to_ras
