""""Save to DICOM database" without Qt, against a real MRML scene: SR and Parametric Map of a node from DICOM."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from batch_fixtures import small_ct
from derived_dicom import write_axial
from helpers import blob_volume, random_probe
from pydicom.uid import generate_uid

from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.errors import RaptorError
from RaptorExtension.probes.dicom_results import frames_for_source, read_source_folder
from RaptorExtension.slicerlogic.dicom_export import INSTANCE_UIDS_ATTRIBUTE, saveResultsToDicom
from RaptorExtension.slicerlogic.node_attributes import write_embedding
from RaptorExtension.slicerlogic.probe import ProbeLogic
from RaptorExtension.volumes.readers import read_volume
from RaptorExtension.volumes.slicer_io import numpy_to_matrix, volume_from_node

hd = pytest.importorskip("highdicom")


def node_from_dicom(scene, folder, name="CT"):
    """A volume node as Slicer's DICOM loader leaves it: voxels, geometry and the instance UIDs."""
    import slicer

    volume = read_volume(str(folder))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    uids = {}
    for path in sorted(folder.iterdir()):
        uids[pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID] = str(path)
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, " ".join(uids))
    node.SetAttribute("DICOM.Modality", "CT")
    return node, uids


@pytest.mark.needs_shared_data
def test_scores_and_heatmap_of_a_dicom_node_are_saved_for_the_database(scene, tiny_model_dir, tiny_encoder, tmp_path,
                                                                      raptor_server):
    written = write_axial(small_ct(2), tmp_path / "ct", patient_id="RAPTOR-SLICER-1",
                          frame_of_reference_uid=generate_uid(entropy_srcs=["raptor-slicer", "frame"]))
    node, uids = node_from_dicom(scene, written.folder)
    settings = EmbedSettings(model=str(tiny_model_dir), k=4, grid=16, preset="minmax", device="cpu")
    embedder = Embedder(settings, encoder=tiny_encoder)
    write_embedding(node, embedder.embed_volume(volume_from_node(node, id="CT", source="CT")))
    probe = random_probe(embedder, classes=("liver", "pancreas", "spleen"))
    probe.name = "organ"
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    probe = logic.loadProbe(probe.save(tmp_path / "organ.raptorprobe"))
    results = logic.apply(node)
    job = logic.explain(node, probe, "pancreas", device="cpu")

    paths = saveResultsToDicom(node, tmp_path / "export", results=results, explanation=job.explanation,
                               explanationProbe=probe, filesForInstance=uids.get)
    assert sorted(p.name for p in paths) == ["CT_organ_pancreas_pm.dcm", "CT_organ_sr.dcm"]
    sr = hd.sr.srread(str(tmp_path / "export" / "CT_organ_sr.dcm"))
    assert (sr.PatientID, sr.StudyInstanceUID) == (written.patient_id, written.study_uid)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == written.series_uid
    groups = sr.content.get_image_measurement_groups()
    probabilities = [g.get_measurements()[0].value for g in groups if g.get_measurements()[0].name.value == "122157"]
    assert probabilities == pytest.approx(list(results[0].scores), rel=1e-6)
    assert sum("slice curve" in str(g.tracking_identifier) for g in groups) == 3
    pm = pydicom.dcmread(str(tmp_path / "export" / "CT_organ_pancreas_pm.dcm"))
    heatmap_node = job.nodes["heatmap"]
    import slicer

    shown = slicer.util.arrayFromVolume(heatmap_node)
    expected = frames_for_source(shown, job.explanation.input_ijk_to_ras, read_source_folder(written.folder))
    by_position = sorted(range(int(pm.NumberOfFrames)),
                         key=lambda n: float(pm.PerFrameFunctionalGroupsSequence[n].PlanePositionSequence[0].ImagePositionPatient[2]))
    assert np.array_equal(pm.pixel_array[by_position], expected)  # what the panel shows is what the PACS gets
    # The panel's button: the logic remembers this node's last scores and explanation and saves the same files.
    assert logic.canSaveToDicom(node) and not logic.canSaveToDicom(None)
    again = logic.saveToDicom(node, tmp_path / "panel", filesForInstance=uids.get)
    assert sorted(p.name for p in again) == ["CT_organ_pancreas_pm.dcm", "CT_organ_sr.dcm"]
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    assert not logic.canSaveToDicom(other)
    with pytest.raises(RaptorError, match="nothing to save"):
        logic.saveToDicom(other, tmp_path / "none")


def test_a_node_not_from_dicom_gets_a_clear_message_and_nothing_is_written(scene, tiny_model_dir, tiny_encoder, tmp_path):
    import slicer

    array, _ = blob_volume(np.random.default_rng(0), with_blob=True)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "drawn")
    slicer.util.updateVolumeFromArray(node, array)
    settings = EmbedSettings(model=str(tiny_model_dir), k=4, grid=16, preset="minmax", device="cpu")
    embedder = Embedder(settings, encoder=tiny_encoder)
    write_embedding(node, embedder.embed_volume(volume_from_node(node, id="drawn", source="drawn")))
    logic = ProbeLogic(scene)
    logic.probes.append(random_probe(embedder))
    results = logic.apply(node, updateNodes=False)
    with pytest.raises(RaptorError, match="drawn: was not loaded from DICOM, so there is no series to reference"):
        saveResultsToDicom(node, tmp_path / "export", results=results)
    assert not (tmp_path / "export").exists()
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, "1.2.3 1.2.4")
    with pytest.raises(RaptorError, match="2 of its 2 DICOM instances are not in the DICOM database"):
        saveResultsToDicom(node, tmp_path / "export", results=results, filesForInstance=lambda uid: "")
    with pytest.raises(RaptorError, match="nothing to save"):
        saveResultsToDicom(node, tmp_path / "export")
