"""The independent reference (``reference_embedding.py``) itself checked against the README and against PIL.

The pipeline and golden tests compare the product with this reference, so the
reference must be right on its own: its cube is anatomical as the README
describes, its resize is PIL's bilinear, its R is the pinned one, and its NRRD
reading gives the geometry Slicer gives.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import reference_embedding as ref
from conftest import SAMPLE_CT
from PIL import Image

PINNED_R_SHA256 = "6d568b91aa195cee7f3f4b5106495a4107572cde700e5eceac3d0a8eb5784ca7"  # K=100, d=384, seed 0 (README)


def lps_matrix(spacing, origin) -> np.ndarray:
    """IJK-to-RAS of a volume stored as DICOM stores it: i towards the patient's left, j posterior, k superior."""
    m = np.eye(4)
    m[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    m[:3, 3] = origin
    return m


@pytest.mark.parametrize("stored", ["LPS", "RAS"])
def test_reference_cube_runs_superior_to_inferior_anterior_to_posterior_right_to_left(stored):
    """A marker in the patient's right-anterior-superior corner lands at cube [0, 0, 0], whatever the storage."""
    n = 12
    array = np.zeros((n, n, n))
    if stored == "LPS":  # i grows to the left, j to posterior, k to superior
        matrix = lps_matrix((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        right_anterior_superior = (n - 1, 0, 0)  # (k, j, i)
    else:  # i grows to the right, j to anterior, k to superior
        matrix = np.eye(4)
        right_anterior_superior = (n - 1, n - 1, n - 1)
    array[right_anterior_superior] = 1.0
    cube = ref.resample_to_cube(array, matrix, n)
    assert np.unravel_index(np.argmax(cube), cube.shape) == (0, 0, 0)
    assert cube[0, 0, 0] == pytest.approx(1.0)  # same grid, same centres: no interpolation
    axial = ref.plane_slice(cube, "axial", 0)  # anterior up (row 0), patient right on the image left (column 0)
    assert axial[0, 0] == pytest.approx(1.0)


def test_reference_cube_pads_the_short_extents_with_zero():
    """A flat slab (10 x 40 x 40 mm) in a 40 mm cube: 30 of 40 axial slices are padding, the rest border-filled."""
    array = np.full((10, 40, 40), 0.5)  # k: 10 slices of 1 mm
    cube = ref.resample_to_cube(array, np.eye(4), 40)
    filled = [i for i in range(40) if cube[i].any()]
    assert filled == list(range(15, 25))  # centred on the slab
    assert np.allclose(cube[15:25], 0.5) and not cube[:15].any() and not cube[25:].any()


def test_reference_resize_equals_pil_bilinear():
    """Enlarging (64 -> 224), shrinking (256 -> 224: the filter widened), non-square and unchanged slices."""
    rng = np.random.default_rng(0)
    for shape, size in (((64, 64), 224), ((256, 256), 224), ((20, 31), 56), ((300, 250), 224), ((17, 17), 17)):
        image = rng.random(shape).astype(np.float32)
        pil = np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)
        assert np.abs(ref.resize(image.astype(np.float64), size) - pil).max() < 1e-6, (shape, size)


def test_reference_projection_is_the_pinned_r():
    r = ref.projection_matrix(100, 384, 0)
    assert hashlib.sha256(r.astype("<f4").tobytes()).hexdigest() == PINNED_R_SHA256
    np.testing.assert_array_equal(ref.projection_matrix(10, 384, 0), r[:10])  # Raptor-B's R: the first 10 rows


def test_reference_presets():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    np.testing.assert_allclose(ref.apply_preset(hu, "ct"), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(ref.apply_preset(hu, "ct", (-160, 240)), [0, 0, 0.4, 1, 1, 1])
    np.testing.assert_allclose(ref.apply_preset(np.array([0.0, 255.0]), "uint8"), [0, 1])
    np.testing.assert_allclose(ref.apply_preset(np.array([0.0, 255.0]), "uint8-256"), [0, 255 / 256])
    np.testing.assert_allclose(ref.apply_preset(np.array([2.0, 4.0, 6.0]), "minmax"), [0, 0.5, 1])
    mr = np.arange(1001.0)
    np.testing.assert_allclose(ref.apply_preset(mr, "mri")[[5, 500, 995]], [0, 0.5, 1])


def test_reference_reads_the_sample_ct_as_slicer_does():
    """The hand-parsed NRRD equals the product's reader (Slicer's): voxels and IJK-to-RAS."""
    from RaptorExtension.volumes.readers import expand_input

    array, matrix = ref.read_nrrd(SAMPLE_CT)
    (volume_ref,) = expand_input(str(SAMPLE_CT))
    volume = volume_ref.loader()
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.ijk_to_ras, matrix, atol=1e-9)
    assert array.shape == (67, 128, 128) and matrix[0, 0] < 0 < matrix[2, 2]  # LPS on disk: i runs to the left
