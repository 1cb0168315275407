"""Where a volume node's voxels came from: its files, its modality, its DICOM identifiers (main thread)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .node_attributes import node_label


def node_provenance(node) -> dict:
    """Where a node's voxels came from: ``source``, ``modality``, DICOM ``info`` (main thread only).

    DICOM header fields come from the first file of the node's storage node
    when it was read from a DICOM series (what Slicer's DICOM loader and
    ``raptor embed FOLDER`` both record), else from the subject hierarchy's
    DICOM attributes, which Slicer sets when loading from its database.
    """
    from ..volumes.dicom import DICOM_INFO_TAGS, is_dicom_file

    files = storage_files(node)
    info: dict = {}
    modality = None
    if files:
        first = Path(files[0])
        is_dicom = first.is_file() and (is_dicom_file(first) or first.suffix.lower() == ".dcm")
        source = str(first.parent) if is_dicom else str(first)
        if is_dicom:
            modality, info = _dicom_header(first, DICOM_INFO_TAGS)
    else:
        source = f"slicer:{node_label(node)}"
    sh_modality, sh_info = _subject_hierarchy_dicom(node)
    for key, value in sh_info.items():
        info.setdefault(key, value)
    return {"source": source, "modality": modality or sh_modality, "info": info}


def storage_files(node) -> list[str]:
    """The files a node was read from (all slices of a DICOM series), or []."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is None:
        return []
    files = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())]
    files = [f for f in files if f]
    if not files and storage.GetFileName():
        files = [storage.GetFileName()]
    return files


def _dicom_header(path: Path, tags: Sequence[str]) -> tuple[str | None, dict]:
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # an unreadable header only loses provenance, not the embedding
        return None, {}
    info = {tag: str(ds.get(tag, "")) for tag in tags}
    return (str(ds.get("Modality", "")) or None), {k: v for k, v in info.items() if v}


def _subject_hierarchy_dicom(node) -> tuple[str | None, dict]:
    """DICOM UIDs that Slicer's DICOM loader put in the subject hierarchy (series, study, patient)."""
    import slicer

    scene = node.GetScene()
    if scene is None:
        return None, {}
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return None, {}
    item = sh.GetItemByDataNode(node)
    if not item:
        return None, {}
    info = {}
    series_uid = sh.GetItemUID(item, "DICOM")
    if series_uid:
        info["SeriesInstanceUID"] = series_uid
    modality = sh.GetItemAttribute(item, "DICOM.Modality") or None
    study = sh.GetItemParent(item)
    if study and study != sh.GetSceneItemID():
        study_uid = sh.GetItemUID(study, "DICOM")
        if study_uid:
            info["StudyInstanceUID"] = study_uid
        patient = sh.GetItemParent(study)
        if patient and patient != sh.GetSceneItemID():
            patient_id = sh.GetItemAttribute(patient, "DICOM.PatientID")
            if patient_id:
                info["PatientID"] = patient_id
    return modality, info
