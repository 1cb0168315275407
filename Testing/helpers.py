"""Small helpers shared by the engine tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reorient(array: np.ndarray, ijk_to_ras: np.ndarray, perm=(0, 1, 2), flips=(False, False, False)):
    """The same physical volume stored with permuted and/or flipped array axes.

    ``perm`` and ``flips`` act on the (K, J, I) array axes; the returned matrix
    maps the new voxel indices to the same RAS points as before.
    """
    a = np.asarray(array)
    m = np.asarray(ijk_to_ras, dtype=np.float64).copy()
    # Work in (i, j, k) column order of the matrix: array axis 0 is k (column 2).
    col_of_axis = {0: 2, 1: 1, 2: 0}
    for axis, flip in enumerate(flips):
        if flip:
            n = a.shape[axis]
            c = col_of_axis[axis]
            m[:3, 3] += m[:3, c] * (n - 1)
            m[:3, c] = -m[:3, c]
            a = np.flip(a, axis=axis)
    a = np.ascontiguousarray(np.transpose(a, perm))
    new = m.copy()
    for new_axis, old_axis in enumerate(perm):
        new[:3, col_of_axis[new_axis]] = m[:3, col_of_axis[old_axis]]
    return a, new


def write_volume(path: Path, array: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a volume with Slicer's own writer (NRRD, NIfTI, MetaImage by extension)."""
    import slicer

    from RaptorExtension.volumes.slicer_io import numpy_to_matrix

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(node), f"could not write {path}"
    return path


def oblique_matrix(spacing=(1.0, 1.2, 2.0), angles=(0.3, -0.2, 0.5), origin=(10.0, -5.0, 3.0)) -> np.ndarray:
    """An IJK-to-RAS with rotation about all three axes."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def random_probe(embedder, task="multiclass", classes=("a", "b", "c"), seed=1):
    """A probe with random weights for ``embedder``'s settings (explanations do not need a fitted one)."""
    from RaptorExtension.probes.probe import Probe, embedding_description

    rng = np.random.default_rng(seed)
    n = embedder.n_features
    outputs = 1 if task == "binary" else len(classes)
    return Probe(
        task=task, model="logistic", classes=list(classes), label_columns=["y"],
        feature_mean=rng.normal(size=n), feature_scale=rng.uniform(0.5, 2.0, size=n),
        weight=rng.normal(size=(outputs, n)), bias=rng.normal(size=outputs),
        embedding=embedding_description(embedder.settings_metadata("minmax")),
    )


def synthetic_embeddings(features: np.ndarray, ids=None):
    """An :class:`EmbeddingSet` of synthetic features with made-up (but complete) embedding settings."""
    from RaptorExtension.embeddings.embedding import build_metadata
    from RaptorExtension.probes.probe import EmbeddingSet

    n, f = features.shape
    meta = build_metadata(encoder="tiny", weight_sha256="a" * 64, k=4, seed=0, projection_sha256="b" * 64,
                          planes=["axial", "coronal", "sagittal"], grid=16, image_size=56, preset="minmax",
                          keep_cls=False, shape=[3, 4, 2, 2], n_features=f)
    return EmbeddingSet(ids=list(ids or [f"v{i}" for i in range(n)]), features=np.asarray(features, np.float32),
                        metadata=meta, sources=["synthetic"])


def imbalanced_task(n: int, prevalence: float = 0.1, shift: float = 2.0, noise_features: int = 9, seed: int = 0):
    """Features (n, 1 + noise) and 0/1 labels: feature 0 is N(0, 1) for negatives and N(shift, 1) for positives.

    With equal variances the class densities cross at shift / 2, where sensitivity + specificity is largest;
    there the true posterior probability equals the prevalence, so the best (Youden) threshold on a
    well-calibrated probability is ``prevalence``.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    x = rng.normal(size=(n, 1 + noise_features))
    x[:, 0] += shift * y
    return x.astype(np.float32), y


BLOB_SIDE = 20


def blob_volume(rng: np.random.Generator, with_blob: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Smooth random texture plus noise, in uint8 units; positives get a Gaussian blob at a random place."""
    k, j, i = np.meshgrid(*[np.arange(BLOB_SIDE)] * 3, indexing="ij")
    texture = 70 + 15 * np.sin(0.4 * k + rng.uniform(0, 6)) * np.cos(0.3 * j + rng.uniform(0, 6))
    volume = texture + rng.normal(0, 4, size=k.shape)
    centre = None
    if with_blob:
        centre = rng.integers(4, BLOB_SIDE - 4, size=3)
        volume = volume + 150 * np.exp(-((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) / (2 * 1.8**2))
    return np.clip(volume, 0, 255).astype(np.float32), centre


def write_nrrd(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    """A NRRD written by Slicer's own storage node."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(*spacing)
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert storage.WriteData(node)
    return path


_NRRD_TYPE = {"i2": "short", "f4": "float", "u1": "uchar"}


def write_raw_nrrd(path: Path, array: np.ndarray, *, extra: str = "", sizes: str | None = None, encoding: str = "raw",
                   data: bytes | None = None, detached: bool = False, dtype_name: str | None = None) -> Path:
    """A NRRD with a hand-written header, for inputs Slicer's writer would never make (lying sizes, NaN spacings,
    detached or cut data); ``extra`` is appended to the header.  Well-formed volumes: :func:`write_nrrd`."""
    import gzip

    kind = dtype_name or _NRRD_TYPE[array.dtype.str[1:]]
    sizes = sizes or " ".join(str(s) for s in reversed(array.shape))
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    payload = data if data is not None else (gzip.compress(raw) if encoding == "gzip" else raw)
    header = (f"NRRD0004\ntype: {kind}\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: {encoding}\n"
              f"endian: little\n{extra}")
    if detached:
        data_name = path.with_suffix(".raw").name
        path.write_text(header + f"data file: {data_name}\n")
        (path.parent / data_name).write_bytes(payload)
    else:
        path.write_bytes((header + "\n").encode() + payload)
    return path


class RunningServer:
    """A real ``raptor serve`` subprocess on 127.0.0.1 (see :func:`start_server`)."""

    def __init__(self, process, url: str, token: str | None, root: Path, log: Path) -> None:
        self.process, self.url, self.token, self.root, self.log = process, url, token, root, log

    def client(self, token: str | None = "default"):
        from RaptorExtension.server.client import RaptorClient

        return RaptorClient(self.url, self.token if token == "default" else token, timeout=60.0)

    def compute(self):
        from RaptorExtension.slicerlogic.compute import Compute

        return Compute("remote", self.url, self.token or "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=20)
            except Exception:
                self.process.kill()
                self.process.wait()


def start_server(root: Path, *args: str, token: str | None = "t" * 24, timeout: float = 120.0) -> RunningServer:
    """Start ``raptor serve --port 0`` with one torch thread; wait for its URL on the first stdout line."""
    import os
    import subprocess
    import sys
    import time

    root = Path(root)
    log = root / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ)  # the same BLAS threading as the tests, so results can be compared bit for bit
    env.pop("RAPTOR_TOKEN", None)
    if token:
        env["RAPTOR_TOKEN"] = token
    command = [sys.executable, "-m", "RaptorExtension", "serve", "--port", "0", "--threads", "1", "--exit-with-stdin",
               "--allow-root", str(root), *args]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
    line = process.stdout.readline().decode().strip()
    if not line.startswith("http"):
        process.kill()
        raise RuntimeError(f"raptor serve did not start: {log.read_text()[-2000:]}")
    return RunningServer(process, line, token, root, log)


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dicom3tools' ``dciodvfy`` for a DICOM file (warnings are left out); skips without it."""
    import shutil
    import subprocess

    import pytest

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed: needs dicom3tools (apt-get install dicom3tools; ./setup.sh does it as root)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=300)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
