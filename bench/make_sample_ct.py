"""Derive the bundled sample CT from the shared TCIA series (run once; its output is committed).

Source: ../shared/data/dicom/pancreatic-ct-cbct-seg (134 x 512 x 512, 1.074 x 1.074 x 3 mm).
Output: Resources/Samples/ct_abdomen_sample.nrrd, block-averaged 4 x 4 in-plane and 2 x
through-plane (67 x 128 x 128 at 4.3 x 4.3 x 6 mm, int16 HU), with the same physical
extent and orientation, written by Slicer's own NRRD writer (gzip).
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RaptorExtension.volumes.readers import read_volume  # noqa: E402
from RaptorExtension.volumes.slicer_io import numpy_to_matrix


def main() -> None:
    import slicer

    src = ROOT.parent / "shared" / "data" / "dicom" / "pancreatic-ct-cbct-seg"
    vol = read_volume(str(src))
    a = vol.array.astype(np.float32)
    k, j, i = a.shape
    a = a[: k - k % 2, : j - j % 4, : i - i % 4]
    small = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 4, 4, a.shape[2] // 4, 4).mean(axis=(1, 3, 5))
    small = np.round(small).astype(np.int16)
    m = vol.ijk_to_ras.copy()
    # New voxel (0,0,0) is the centre of the old 4x4x2 block: old index (1.5, 1.5, 0.5).
    m_new = m.copy()
    m_new[:3, 0] *= 4
    m_new[:3, 1] *= 4
    m_new[:3, 2] *= 2
    m_new[:3, 3] = (m @ np.array([1.5, 1.5, 0.5, 1.0]))[:3]
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct_abdomen_sample")
    slicer.util.updateVolumeFromArray(node, small)
    node.SetIJKToRASMatrix(numpy_to_matrix(m_new))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    out = ROOT / "Resources" / "Samples" / "ct_abdomen_sample.nrrd"
    storage.SetFileName(str(out))
    storage.SetUseCompression(1)
    if not storage.WriteData(node):
        raise SystemExit(f"could not write {out}")
    print(out, small.shape, out.stat().st_size)


if __name__ == "__main__":
    main()
