"""Geometry is kept all the way: the planes are anatomical whatever the storage order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import synthetic_volume
from helpers import oblique_matrix, reorient, write_volume

from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.volumes.readers import read_volume
from RaptorExtension.volumes.resample import cube_geometry, resample_to_cube
from RaptorExtension.volumes.volume import Volume


def embed(encoder, volume, **kw):
    settings = dict(model="tiny", k=8, grid=20)
    settings.update(kw)
    return Embedder(EmbedSettings(**settings), encoder=encoder).embed_volume(volume).vector


def close(a, b, rtol=1e-4):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def test_cube_of_a_cube_in_cube_orientation_is_the_input():
    """A volume already stored like the cube (S->I, A->P, R->L, isotropic) comes back unchanged."""
    n = 12
    array = synthetic_volume((n, n, n))
    m = np.diag([-2.0, -2.0, -2.0, 1.0])
    m[:3, 3] = [5.0, 7.0, 9.0]
    cube, cube_to_ras = resample_to_cube(torch.from_numpy(array), m, n)
    np.testing.assert_allclose(cube_to_ras, m, atol=1e-9)
    np.testing.assert_allclose(cube.numpy(), array, rtol=1e-5, atol=1e-3)


def test_cube_keeps_aspect_ratio_and_pads_with_zero():
    array = np.ones((4, 16, 16), dtype=np.float32)  # 4 mm slab, 16 mm wide, 1 mm voxels
    cube, cube_to_ras = resample_to_cube(torch.from_numpy(array), np.eye(4), 16)
    assert abs(cube_to_ras[0, 0]) == pytest.approx(1.0)  # side 16 mm over 16 voxels
    axial_sums = cube.sum(dim=(1, 2)).numpy()
    assert (axial_sums > 0).sum() == 4 and (axial_sums == 0).sum() == 12  # 4 slices of data, 12 of padding
    assert cube.max() == 1.0 and cube.min() == 0.0


def test_cube_axes_are_anatomical():
    """Superior data lands at low a0, anterior at low a1, patient right at low a2."""
    array = np.zeros((10, 10, 10), dtype=np.float32)
    array[9, :, :] = 1  # highest k = most superior in an RAS-aligned (identity) volume
    cube, _ = resample_to_cube(torch.from_numpy(array), np.eye(4), 10)
    assert cube[0].mean() > 0.9 and cube[9].mean() == 0
    array = np.zeros((10, 10, 10), dtype=np.float32)
    array[:, 9, :] = 1  # highest j = most anterior
    cube, _ = resample_to_cube(torch.from_numpy(array), np.eye(4), 10)
    assert cube[:, 0].mean() > 0.9
    array = np.zeros((10, 10, 10), dtype=np.float32)
    array[:, :, 9] = 1  # highest i = most right
    cube, _ = resample_to_cube(torch.from_numpy(array), np.eye(4), 10)
    assert cube[:, :, 0].mean() > 0.9


@pytest.mark.parametrize(
    "perm,flips",
    [((0, 1, 2), (True, False, False)), ((2, 1, 0), (False, True, False)), ((1, 2, 0), (True, True, True))],
)
def test_permuted_and_flipped_copies_give_the_same_embedding(tiny_encoder, perm, flips):
    array = synthetic_volume((14, 16, 18))
    m = oblique_matrix()
    ref = embed(tiny_encoder, Volume(array=array, ijk_to_ras=m, id="a", source="a"))
    a2, m2 = reorient(array, m, perm, flips)
    assert not np.array_equal(a2.shape, array.shape) or flips != (False, False, False)
    got = embed(tiny_encoder, Volume(array=a2, ijk_to_ras=m2, id="b", source="b"))
    close(got, ref)


def test_cubes_of_reoriented_copies_match_voxelwise():
    array = synthetic_volume((9, 11, 13))
    m = oblique_matrix(spacing=(0.8, 1.1, 2.5))
    ref, geom = resample_to_cube(torch.from_numpy(array), m, 16)
    for perm in itertools.permutations(range(3)):
        a2, m2 = reorient(array, m, perm, (True, False, True))
        got, geom2 = resample_to_cube(torch.from_numpy(a2), m2, 16)
        np.testing.assert_allclose(geom2, geom, atol=1e-9)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-3)


def test_volume_written_and_read_by_slicer_keeps_geometry(tmp_path, tiny_encoder):
    array = synthetic_volume((10, 12, 14)).astype(np.int16)
    m = oblique_matrix()
    ref = embed(tiny_encoder, Volume(array=array, ijk_to_ras=m, id="a", source="a"))
    for ext in ("nrrd", "nii.gz", "mha"):
        vol = read_volume(str(write_volume(tmp_path / f"v.{ext}", array, m)))
        np.testing.assert_allclose(vol.ijk_to_ras, m, atol=1e-4)
        close(embed(tiny_encoder, vol), ref)


@pytest.mark.slow
def test_dicom_series_and_its_nifti_copy_give_the_same_embedding(tmp_path, tiny_encoder, dicom_series):
    dicom = read_volume(str(dicom_series))
    assert dicom.array.shape == (134, 512, 512)
    assert dicom.spacing == pytest.approx((1.07421875, 1.07421875, 3.0), rel=1e-6)
    assert dicom.modality == "CT"
    # Slicer's DICOM reader maps LPS to RAS: the first two axes are negated.
    assert dicom.ijk_to_ras[0, 0] < 0 and dicom.ijk_to_ras[1, 1] < 0 and dicom.ijk_to_ras[2, 2] > 0
    nifti = read_volume(str(write_volume(tmp_path / "ct.nii.gz", dicom.array, dicom.ijk_to_ras)))
    np.testing.assert_array_equal(nifti.array, dicom.array)
    np.testing.assert_allclose(nifti.ijk_to_ras, dicom.ijk_to_ras, atol=1e-4)
    # Same preset on both (the NIfTI has no Modality); a flipped RAS-ordered copy too.
    flipped_array, flipped_m = reorient(dicom.array, dicom.ijk_to_ras, (0, 1, 2), (True, True, True))
    flipped = Volume(array=flipped_array, ijk_to_ras=flipped_m, id="f", source="f")
    a = embed(tiny_encoder, dicom, grid=24, preset="ct")
    b = embed(tiny_encoder, nifti, grid=24, preset="ct")
    c = embed(tiny_encoder, flipped, grid=24, preset="ct")
    close(b, a)
    close(c, a)


def test_cube_geometry_centres_the_volume():
    m = oblique_matrix()
    shape = (10, 20, 30)
    cube = cube_geometry(m, shape, 32)
    centre_in = (m @ np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2, 1.0]))[:3]
    centre_cube = (cube @ np.array([15.5, 15.5, 15.5, 1.0]))[:3]
    np.testing.assert_allclose(centre_cube, centre_in, atol=1e-9)


def geometryless(array: np.ndarray) -> Volume:
    """An array as a .npy or MedMNIST .npz arrives: no geometry (identity matrix)."""
    return Volume(array=array, ijk_to_ras=np.eye(4), id="a", source="a.npy", has_geometry=False)


def test_array_without_geometry_at_its_own_grid_equals_native(tiny_encoder, tmp_path):
    """--grid 28 on a 28^3 .npy is --grid native: the array's own axes, no flip, no interpolation."""
    from RaptorExtension.volumes.arrays import read_npy

    path = tmp_path / "a.npy"
    np.save(path, synthetic_volume((28, 28, 28), seed=2))
    volume = read_npy(path)
    assert volume.has_geometry is False
    gridded = Embedder(EmbedSettings(model="tiny", k=8, grid=28), encoder=tiny_encoder)
    assert torch.equal(gridded.prepare(volume).cube,
                       Embedder(EmbedSettings(model="tiny", k=8, grid="native"), encoder=tiny_encoder).prepare(volume).cube)
    assert np.array_equal(embed(tiny_encoder, volume, grid=28), embed(tiny_encoder, volume, grid="native"))


def test_array_without_geometry_is_resampled_in_its_own_axes(tiny_encoder):
    """Other grids differ from native only by resampling: the cube is the array interpolated, not mirrored."""
    import torch.nn.functional as F

    array = synthetic_volume((16, 16, 16), seed=4)
    embedder = Embedder(EmbedSettings(model="tiny", k=8, grid=24, preset="minmax"), encoder=tiny_encoder)
    prepared = embedder.prepare(geometryless(array))
    normalized = (array - array.min()) / (array.max() - array.min())
    want = F.interpolate(torch.from_numpy(normalized)[None, None], size=(24, 24, 24), mode="trilinear",
                         align_corners=False)[0, 0]
    np.testing.assert_allclose(prepared.cube.numpy(), want.numpy(), atol=1e-5)

    # A non-cubic array: padded, never flipped (a blob near index 0 stays near index 0 on every axis).
    blob = np.zeros((20, 24, 28), dtype=np.float32)
    blob[1:4, 2:5, 3:6] = 1.0
    cube = Embedder(EmbedSettings(model="tiny", k=8, grid=28, preset="minmax"),
                    encoder=tiny_encoder).prepare(geometryless(blob)).cube.numpy()
    centre = [float((np.indices(cube.shape)[a] * cube).sum() / cube.sum()) for a in range(3)]
    assert all(c < 10 for c in centre), centre


def test_explanation_heatmap_of_an_array_maps_back_to_its_voxels(tiny_encoder):
    from RaptorExtension.probes.explain import heatmap_to_input

    array = np.zeros((16, 18, 20), dtype=np.float32)
    array[2:5, 3:7, 12:16] = 1.0
    volume = geometryless(array)
    prepared = Embedder(EmbedSettings(model="tiny", k=8, grid=32, preset="minmax"), encoder=tiny_encoder).prepare(volume)
    back = heatmap_to_input(prepared.cube.numpy(), prepared.cube_to_ras, volume.ijk_to_ras, array.shape)

    def centre(a):
        return np.array([(np.indices(a.shape)[i] * a).sum() / a.sum() for i in range(3)])

    np.testing.assert_allclose(centre(back), centre(array), atol=0.5)
    assert np.corrcoef(back.ravel(), array.ravel())[0, 1] > 0.95
