"""Slicer's own reader and the node <-> volume copy: the one place that touches MRML storage.

Files that Slicer opens (NRRD, NIfTI, MetaImage, DICOM series) are read by the
``slicer-core`` wheel's ``vtkMRMLVolumeArchetypeStorageNode``: the very class
Slicer uses, so the voxel array and the IJK-to-RAS matrix are identical to what
a user sees after loading the same file in Slicer.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..atomic import temp_file_beside
from ..errors import InputError, OutputError, write_failure
from .volume import Volume


@contextlib.contextmanager
def quiet_vtk() -> Iterator[None]:
    """Silence VTK's logger while reading or writing: failures become our own one-line errors."""
    import vtk

    cutoff = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    warn = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warn)
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.ConvertToVerbosity(int(cutoff)))


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Hold what native code (ITK, MetaIO, GDCM) prints on the process's standard error while reading.

    Why: ITK prints warnings such as "Non uniform sampling or missing slices
    detected" straight to file descriptor 2, past Python and past VTK's
    logger; a user would see them between progress bars.  The lines are
    collected (a failed read may use the last one as its reason) instead.
    Inside Slicer nothing is redirected: Slicer shows native output in its log.
    """
    lines: list[str] = []
    slicer = sys.modules.get("slicer")
    if hasattr(slicer, "app"):
        yield lines
        return
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        try:
            saved = os.dup(2)
            sink = tempfile.TemporaryFile()
        except OSError:
            yield lines
            return
        try:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                text = sink.read(1 << 16).decode("utf-8", errors="replace")
                for line in text.splitlines(keepends=True):
                    if line.startswith("raptor:"):  # another thread's own message, printed meanwhile: pass it on
                        os.write(2, line.encode("utf-8"))
                    elif line.strip():
                        lines.append(line.strip())
        finally:
            os.close(saved)
            sink.close()


_STDERR_LOCK = threading.Lock()


def matrix_to_numpy(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray):
    """A 4x4 array as a ``vtkMatrix4x4``."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def volume_from_node(node, *, id: str, source: str, modality: str | None = None, info: dict | None = None) -> Volume:
    """Copy a ``vtkMRMLScalarVolumeNode``'s voxels and geometry into a :class:`Volume`.

    The copy is deliberate: the encoder may run in a worker thread, and a
    Slicer node must only be touched from the main thread.
    """
    import slicer
    import vtk

    image = node.GetImageData()
    if image is None:
        raise InputError(f"{source}: the volume holds no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"{source}: has {components} values per voxel (a colour image or a 4D series); Raptor needs a scalar 3D volume"
        )
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = matrix_to_numpy(m)
    # A volume under a (linear) transform is embedded where Slicer shows it.
    parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{source}: is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = matrix_to_numpy(to_world) @ ijk_to_ras
    return Volume(array=array, ijk_to_ras=ijk_to_ras, id=id, source=source, modality=modality, info=dict(info or {}))


def read_with_storage_node(files: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one file, or an ordered list of DICOM slices, through Slicer's archetype reader."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(files[0])
    if len(files) > 1:
        storage.ResetFileNameList()
        for f in files:
            storage.AddFileName(f)
        storage.SetSingleFile(0)
    with quiet_vtk(), native_stderr_captured() as printed:
        ok = storage.ReadData(node)
    if not ok or node.GetImageData() is None:
        raise InputError(f"{source}: Slicer could not read it as a volume ({_storage_reason(storage, printed)})")
    vol = volume_from_node(node, id="", source=source)
    return vol.array, vol.ijk_to_ras


def _storage_reason(storage, printed: list[str] = ()) -> str:
    """The most specific line Slicer's storage node (or the native reader, on stderr) left about a failed read."""
    messages = storage.GetUserMessages()
    texts = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())] if messages else []
    for text in texts:
        m = re.search(r"Details: (.*)", text or "")
        if m:
            return f"corrupt or unsupported file: {m.group(1).strip().rstrip('.')}"
    detail = next((line for line in reversed(printed) if not line.startswith(("WARNING: In", "ERROR: In"))), "")
    return f"corrupt or unsupported file: {detail[:200]}" if detail else "corrupt or unsupported file"


def write_volume_file(array: np.ndarray, ijk_to_ras: np.ndarray, path: str | Path, *, what: str = "volume") -> Path:
    """Write a (K, J, I) array with its IJK-to-RAS through Slicer's volume writer, atomically (a heatmap, say)."""
    import slicer

    path = Path(path)
    name = path.name.lower()
    suffix = next((s for s in (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd") if name.endswith(s)), None)
    if suffix is None:
        raise InputError(f"{path}: a {what} must be written as .nrrd, .nii.gz, .nii or .mha")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", what)
    fill_volume_node(node, array, ijk_to_ras)
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    fd, tmp = temp_file_beside(path, suffix=f".tmp{suffix}")
    os.close(fd)
    # Only the unique name is needed: the writer makes the file (with the user's umask mode), and
    # finding one there it would print an "Info: ... removing old version of file" line.
    os.unlink(tmp)
    try:
        storage.SetFileName(tmp)
        storage.SetUseCompression(1)
        with quiet_vtk():
            written = storage.WriteData(node)
        if not written:
            raise OutputError(f"{path}: Slicer could not write the {what} (a full disk or a read-only folder?)")
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise write_failure(path, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def fill_volume_node(node, array: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    import slicer

    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.SetIJKToRASMatrix(numpy_to_matrix(np.asarray(ijk_to_ras, dtype=np.float64)))
