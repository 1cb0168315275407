""""Save to DICOM database": a volume node's scores as a DICOM SR and its heatmap as a Parametric Map (no Qt).

The RaptorProbe panel calls :func:`saveResultsToDicom` with the node, the
results of :meth:`.probe.ProbeLogic.apply` and/or the explanation of
:meth:`.probe.ProbeLogic.explain`; it writes the DICOM files and returns their
paths, which the panel imports into Slicer's DICOM database (for instance
``DICOMLib.DICOMUtils.importDicom(folder)``), so the DICOM module lists them
under the patient beside the scan and QuantitativeReporting opens the SR.

The results must refer to the scan's own DICOM instances.  A node loaded from
Slicer's DICOM database carries their SOP Instance UIDs (the attribute
``DICOM.instanceUIDs`` that Slicer's DICOM loader sets); the database, asked
through ``filesForInstance`` (by default ``slicer.dicomDatabase.fileForInstance``),
says where their files are.  A node read from DICOM files by path (its storage
node lists them) works too.  Any other node (a NRRD, a NIfTI, a volume made in
Slicer) is refused with a sentence that says why: there is no series to
reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import RaptorError
from ..probes.dicom_results import (
    SourceSeries,
    parametric_map,
    read_source_files,
    result_file_name,
    score_report,
    write_dicom,
)
from .node_attributes import node_label, read_embedding
from .provenance import storage_files

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"

FilesForInstance = Callable[[str], str]
"""``filesForInstance(sop_instance_uid) -> path`` ('' or None when the database does not hold it)."""


def dicomSourceOf(volumeNode, filesForInstance: FilesForInstance | None = None) -> SourceSeries:
    """The DICOM series a volume node was loaded from (headers only), or a :class:`RaptorError` saying why not."""
    label = node_label(volumeNode)
    uids = (volumeNode.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if uids:
        resolve = filesForInstance or _database_resolver(label)
        files = [resolve(uid) for uid in uids]
        missing = sum(1 for f in files if not f or not Path(f).is_file())
        if missing:
            raise RaptorError(f"{label}: {missing} of its {len(uids)} DICOM instances are not in the DICOM database "
                              "any more; there is no complete series to reference")
        return read_source_files(files, label)
    files = [f for f in storage_files(volumeNode) if Path(f).is_file()]
    if files and all(_is_dicom(Path(f)) for f in files):
        return read_source_files(files, label)
    raise RaptorError(f"{label}: was not loaded from DICOM, so there is no series to reference; load the scan from "
                      "the DICOM database to save results as DICOM (or export the scores as CSV)")


def _is_dicom(path: Path) -> bool:
    from ..volumes.dicom import is_dicom_file

    return path.suffix.lower() == ".dcm" or is_dicom_file(path)


def _database_resolver(label: str) -> FilesForInstance:
    try:
        import slicer

        database = slicer.dicomDatabase
    except (ImportError, AttributeError):
        database = None
    if database is None:
        raise RaptorError(f"{label}: Slicer's DICOM database is not open; cannot find the files of its instances")
    return database.fileForInstance


def saveResultsToDicom(
    volumeNode,
    outputDir: str | Path,
    *,
    results: Sequence = (),
    explanation=None,
    explanationProbe=None,
    filesForInstance: FilesForInstance | None = None,
) -> list[Path]:
    """Write one SR per probe result (with the slice curves when it is the explained probe) and the heatmap's PM.

    ``results``: :class:`.probe.ProbeResult` objects of this node.  ``explanation``:
    an :class:`~RaptorExtension.probes.explain.Explanation` of this node made with
    ``explanationProbe``; when no result of that probe is given, its scores are
    computed from the node's embedding.  Returns the files written (into
    ``outputDir``), ready to import into the DICOM database.  Nothing is
    written when the node is not from DICOM.
    """
    if not results and explanation is None:
        raise RaptorError("nothing to save: apply a probe or explain one first")
    if explanation is not None and explanationProbe is None:
        raise RaptorError("saving a heatmap needs the probe that explained it")
    source = dicomSourceOf(volumeNode, filesForInstance)
    out = Path(outputDir)
    label = node_label(volumeNode)
    objects: list[tuple[str, object]] = []
    explained_done = False
    for result in results:
        curves = explanation if (explanation is not None and result.probe is explanationProbe) else None
        explained_done = explained_done or curves is not None
        sr = score_report(source, result.probe, result.scores, explanation=curves)
        objects.append((f"{label} {result.probe.name or 'probe'}", sr))
    if explanation is not None:
        if not explained_done:
            embedding = read_embedding(volumeNode)
            if embedding is not None:
                explanationProbe.check_embedding(dict(embedding.settings(), n_features=embedding.vector.size), label)
                scores = explanationProbe.scores(embedding.vector[None])[0]
                objects.append((f"{label} {explanationProbe.name or 'probe'}",
                                score_report(source, explanationProbe, scores, explanation=explanation)))
        pm = parametric_map(source, explanationProbe, explanation)
        objects.append((f"{label} {explanationProbe.name or 'probe'} {explanation.output}", pm))
    paths = []
    for name, dataset in objects:
        kind = "pm" if getattr(dataset, "Modality", "") != "SR" else "sr"
        paths.append(write_dicom(dataset, out / result_file_name(name, kind)))
    return paths


__all__ = ["saveResultsToDicom", "dicomSourceOf", "INSTANCE_UIDS_ATTRIBUTE"]
