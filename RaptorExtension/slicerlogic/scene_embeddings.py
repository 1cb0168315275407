"""The embedded volumes of a scene: the table the panel shows, the CSV export, the compatibility check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..embeddings.embedding import Embedding
from ..embeddings.settings import check_compatible, describe_differences
from ..embeddings.table import write_table
from ..errors import InputError, MetadataMismatch
from .node_attributes import embedded_nodes, node_label, read_embedding

TABLE_NODE_NAME = "Raptor embedded volumes"
TABLE_COLUMNS = (
    "Volume", "Model", "K", "Seed", "Grid", "Preset", "Features", "Settings", "Compatible",
    "Device", "Seconds", "Created", "SeriesInstanceUID",
)
DICOM_ID_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


class SceneEmbeddings:
    """Mixed into :class:`.embed.EmbedLogic`: reads the embeddings stored on the scene's nodes.

    Needs only ``self.scene``; nothing here runs a model.
    """

    def embeddedVolumeNodes(self) -> list:
        """Scalar volume nodes of the scene that carry an embedding, in scene order."""
        return embedded_nodes(self.scene)

    def updateEmbeddingsTable(self, tableNode=None):
        """Fill (or create) a table node listing every embedded volume of the scene.

        The ``Compatible`` column compares each node's settings with the first
        one's, so a volume embedded with another K or model stands out before
        an export refuses to mix them.
        """
        import vtk

        scene = self.scene
        if tableNode is None:
            tableNode = scene.GetFirstNodeByName(TABLE_NODE_NAME)
            if tableNode is None or not tableNode.IsA("vtkMRMLTableNode"):
                tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NODE_NAME)
        rows = self.embeddingsTableRows()
        table = tableNode.GetTable()
        was_modifying = tableNode.StartModify()
        try:
            table.Initialize()
            for name in TABLE_COLUMNS:
                column = vtk.vtkStringArray()
                column.SetName(name)
                table.AddColumn(column)
            table.SetNumberOfRows(len(rows))
            for r, row in enumerate(rows):
                for c, name in enumerate(TABLE_COLUMNS):
                    table.SetValue(r, c, vtk.vtkVariant(row[name]))
            tableNode.Modified()
        finally:
            tableNode.EndModify(was_modifying)
        return tableNode

    def embeddingsTableRows(self) -> list[dict]:
        """The rows :meth:`updateEmbeddingsTable` shows (strings), one per embedded volume."""
        rows = []
        reference = None
        for node in self.embeddedVolumeNodes():
            try:
                embedding = read_embedding(node)
            except InputError as exc:
                rows.append({c: "" for c in TABLE_COLUMNS} | {"Volume": node_label(node), "Compatible": str(exc)})
                continue
            meta = embedding.metadata
            if reference is None:
                reference = meta
                compatible = "reference"
            else:
                diffs = describe_differences(reference, meta)
                compatible = "yes" if not diffs else "no: " + "; ".join(diffs)
            rows.append({
                "Volume": node_label(node),
                "Model": str(meta.get("encoder", "")),
                "K": str(meta.get("k", "")),
                "Seed": str(meta.get("seed", "")),
                "Grid": str(meta.get("grid", "")),
                "Preset": str(meta.get("preset", "")),
                "Features": str(embedding.vector.size),
                "Settings": str(meta.get("settings_hash", "")),
                "Compatible": compatible,
                "Device": str(meta.get("device", "")),
                "Seconds": str(meta.get("seconds", "")),
                "Created": str(meta.get("created", "")),
                "SeriesInstanceUID": str((meta.get("dicom") or {}).get("SeriesInstanceUID", "")),
            })
        return rows

    def exportCSV(self, path: str | Path, nodes: Sequence | None = None) -> Path:
        """Write one CSV row per embedded volume (all of the scene's by default).

        Columns: ``id`` (the node name), ``node``, the DICOM ``PatientID``,
        ``StudyInstanceUID`` and ``SeriesInstanceUID`` when known, then the
        same metadata columns and ``e0..eN`` as ``raptor embed --csv``
        (:func:`tables.write_table`), so a row equals the engine's row for the
        same volume.  Volumes embedded with different settings are refused,
        naming the volume and what differs, and nothing is written.
        """
        nodes = list(nodes) if nodes is not None else self.embeddedVolumeNodes()
        if not nodes:
            raise InputError("no embedded volumes in the scene to export; embed a volume first")
        embeddings, extras = [], []
        ids = _unique_ids(nodes)
        for node, row_id in zip(nodes, ids):
            embedding = read_embedding(node)
            if embedding is None:
                raise InputError(f"{node_label(node)}: has no Raptor embedding; embed it first")
            embeddings.append(Embedding(embedding.vector, dict(embedding.metadata, id=row_id)))
            dicom = embedding.metadata.get("dicom") or {}
            extras.append({"node": node_label(node), **{c: dicom.get(c, "") for c in DICOM_ID_COLUMNS}})
        first = embeddings[0]
        for node, embedding in zip(nodes[1:], embeddings[1:]):
            diffs = describe_differences(first.metadata, embedding.metadata)
            if diffs:
                raise MetadataMismatch(
                    f"{path}: not written: volume '{node_label(node)}' was embedded with other settings than "
                    f"'{node_label(nodes[0])}' ({'; '.join(diffs)}); re-embed it or export the volumes separately"
                )
        return write_table(path, embeddings, extras)

    def checkCompatible(self, nodes: Sequence) -> None:
        """Raise :class:`MetadataMismatch` naming the first pair of nodes whose settings differ."""
        embeddings = [(node, read_embedding(node)) for node in nodes]
        embeddings = [(n, e) for n, e in embeddings if e is not None]
        for node, embedding in embeddings[1:]:
            check_compatible(embeddings[0][1].metadata, embedding.metadata, f"{node_label(node)} vs {node_label(embeddings[0][0])}")


def _unique_ids(nodes: Sequence) -> list[str]:
    """Node names as row ids; a name shared by several nodes gets the node ID appended."""
    names = [node_label(n) for n in nodes]
    return [f"{name} ({node.GetID()})" if names.count(name) > 1 else name for name, node in zip(names, nodes)]
