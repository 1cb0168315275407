"""The RaptorProbe module's logic, without Qt: probes applied to volume nodes, explanations as MRML nodes.

Decision (as for RaptorEmbed): the logic lives in the engine package and runs
headless with ``slicer-core``; ``RaptorProbe/RaptorProbe.py`` only wires the
panel to it.  It is tested against a real ``vtkMRMLScene``.

What it makes in the scene
  * a table node ``Raptor scores: <volume>`` (probe, class, score, predicted,
    and for thresholded outputs the threshold, the decision, and the probe's
    sensitivity and specificity there) and a bar chart of it (Plots module);
  * for an explanation: a scalar volume ``<volume> <class> heatmap`` with the
    input's IJK-to-RAS (and parent transform), a diverging colour map centred
    on zero; one table per plane with the slice curve (slice index, RAS
    position, contribution) and a line chart of the three curves.  Clicking a
    curve point maps back to a slice through :meth:`ProbeLogic.jumpToSlice`.

Threading follows RaptorEmbed's rule: the explain worker thread gets a copy
of the voxels (a :class:`~RaptorExtension.volume.Volume`) and never touches
MRML; :meth:`ProbeLogic.poll` on the main thread turns its result into nodes.
Embedding a node that has no embedding yet is the panel's job (it calls the
RaptorEmbed logic); scripts can pass ``embedHook`` to do the same here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embeddings.embedding import Embedding
from ..errors import Cancelled, InputError, RaptorError
from ..probes.probe import Probe
from .node_attributes import node_label, read_embedding

SCORES_TABLE_PREFIX = "Raptor scores: "
HEATMAP_ATTRIBUTE = "Raptor.HeatmapOf"
PROBE_ATTRIBUTE = "Raptor.Probe"
OUTPUT_ATTRIBUTE = "Raptor.Output"
PLANE_ATTRIBUTE = "Raptor.Plane"
DIVERGING_COLOR_IDS = ("vtkMRMLColorTableNodeFileDivergingBlueRed.txt",)
"""Slicer's own perceptual diverging map (present in the application, absent headless)."""
OWN_COLOR_NAME = "Raptor diverging (cool-warm)"
PLANE_COLORS = {"axial": (0.95, 0.33, 0.27), "coronal": (0.43, 0.69, 0.31), "sagittal": (0.93, 0.84, 0.31)}
"""Slicer's slice-view colours: Red = axial, Green = coronal, Yellow = sagittal."""


# ---------------------------------------------------------------------------
# Files


# ---------------------------------------------------------------------------
# Results kept between apply/explain and the GUI


@dataclass
class ProbeResult:
    """One probe applied to one volume node: probabilities, the decision, and what the decision is worth."""

    probe: Probe
    names: list[str]
    scores: np.ndarray
    predicted: str
    thresholds: dict[str, float] = field(default_factory=dict)
    """Operating threshold on the probability of each thresholded output: the positive class of a binary probe,
    each label of a multi-label one (0.5 for probes made before thresholds); empty for multi-class and regression."""
    decisions: dict[str, bool] = field(default_factory=dict)
    """The decision per class (binary and multi-class: True for the decided class) or per label (multi-label)."""
    operating_points: dict[str, dict] = field(default_factory=dict)
    """Per thresholded output, the probe's ``sensitivity`` and ``specificity`` at its threshold with 95% bootstrap
    intervals (``sensitivity_ci95``, ``specificity_ci95``: ``[low, high]`` or None), the ``split`` they were measured
    on (test, else val or the out-of-fold predictions, else train), ``in_sample`` and ``n``
    (:meth:`Probe.operating_points`); values are None when the probe file holds no such metrics."""
    calibrated: bool = False
    """Whether the probabilities are calibrated (sigmoid or isotonic, fitted on out-of-fold predictions)."""
    notes: list[str] = field(default_factory=list)
    """Notes to show the user, e.g. that an old probe file decides at 0.5."""

    def describe(self) -> list[str]:
        """One line per thresholded output, e.g. ``lesion: p=0.312 >= 0.180: yes; sensitivity 0.87 (0.69-1.00),
        specificity 0.89 (0.81-0.96) on test (n=80)``; for a multi-class probe the decided class."""
        lines = []
        for name, threshold in self.thresholds.items():
            p = float(self.scores[self.names.index(name)])
            line = f"{name}: p={p:.3f} {'>=' if p >= threshold else '<'} {threshold:.3f}: " \
                   f"{'yes' if self.decisions.get(name) else 'no'}"
            point = self.operating_points.get(name) or {}
            if point.get("split"):
                rates = []
                for key in ("sensitivity", "specificity"):
                    ci = point.get(f"{key}_ci95")
                    if point.get(key) is not None:
                        rates.append(f"{key} {point[key]:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
                where = point["split"] + (", in-sample" if point.get("in_sample") else "")
                line += f"; {', '.join(rates)} on {where} (n={point.get('n')})"
            lines.append(line)
        if not self.thresholds and self.probe.task == "multiclass":
            lines.append(f"most likely: {self.predicted} (p={float(np.max(self.scores)):.3f})")
        return lines


@dataclass
class ExplainJob:
    """An explanation running in a worker thread."""

    node_id: str
    node_name: str
    probe: Probe
    output_name: str | None
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress_callback: Callable[[int, int], None] | None = None
    completion_callback: Callable[["ExplainJob"], None] | None = None
    status: str = "running"
    error: str | None = None
    explanation: Any = None
    nodes: dict = field(default_factory=dict)
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def cancel(self) -> None:
        self.cancel_event.set()


EmbedderProvider = Callable[[Any], Any]
"""``provider(EmbedSettings) -> Embedder``: lets Slicer share RaptorEmbed's loaded model."""
EmbedHook = Callable[[Any, Any], Embedding]
"""``hook(volumeNode, EmbedSettings) -> Embedding``: embeds a node that has no embedding yet."""


class ProbeLogic:
    """Load probes, apply them to embedded volume nodes, explain them as MRML nodes."""

    def __init__(self, scene=None, *, embedderProvider: EmbedderProvider | None = None,
                 embedHook: EmbedHook | None = None) -> None:
        self._scene = scene
        self.probes: list[Probe] = []
        self.embedderProvider = embedderProvider
        self.embedHook = embedHook
        self._embedders: dict[tuple, Any] = {}
        self.job: ExplainJob | None = None
        self.lastExplanation = None
        self.scoresNodes: tuple = (None, None)
        """(table, bar chart) of the last :meth:`apply`."""

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # -- probes ------------------------------------------------------------
    def loadProbe(self, path: str | Path) -> Probe:
        """Load a probe file (replacing an already loaded probe with the same path)."""
        probe = Probe.load(path)
        self.probes = [p for p in self.probes if p.path is None or Path(p.path).resolve() != Path(path).resolve()]
        self.probes.append(probe)
        return probe

    def removeProbe(self, probe: Probe) -> None:
        self.probes = [p for p in self.probes if p is not probe]

    # -- embeddings ----------------------------------------------------------
    def embeddingFor(self, volumeNode, probe: Probe) -> Embedding:
        """The node's embedding checked against the probe; embedded through ``embedHook`` if missing."""
        _check_volume(volumeNode)
        embedding = read_embedding(volumeNode)
        if embedding is None:
            if self.embedHook is None:
                raise RaptorError(f"{node_label(volumeNode)}: has no Raptor embedding yet; embed it with RaptorEmbed first")
            from ..probes.explain import embed_settings_for

            embedding = self.embedHook(volumeNode, embed_settings_for(probe))
        probe.check_embedding(dict(embedding.settings(), n_features=embedding.vector.size), node_label(volumeNode))
        return embedding

    def apply(self, volumeNode, probes: Sequence[Probe] | None = None, *, updateNodes: bool = True) -> list[ProbeResult]:
        """Apply probes (default: all loaded) to a node's embedding; optionally show a table and a bar chart."""
        probes = list(probes if probes is not None else self.probes)
        if not probes:
            raise RaptorError("load a probe file first")
        results = []
        for probe in probes:
            embedding = self.embeddingFor(volumeNode, probe)
            results.append(probeResult(probe, embedding.vector))
        if updateNodes:
            self.showScores(volumeNode, results)
        return results

    def showScores(self, volumeNode, results: Sequence[ProbeResult]):
        """A table node of the scores and a bar chart of it; returns (table, chart)."""
        import vtk

        scene = self.scene
        name = SCORES_TABLE_PREFIX + node_label(volumeNode)
        table_node = _node_named(scene, "vtkMRMLTableNode", name) or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        table = vtk.vtkTable()
        columns = {
            "Probe": vtk.vtkStringArray(), "Class": vtk.vtkStringArray(), "Label": vtk.vtkStringArray(),
            "Index": vtk.vtkDoubleArray(), "Score": vtk.vtkDoubleArray(), "Predicted": vtk.vtkStringArray(),
            "Threshold": vtk.vtkDoubleArray(), "Decision": vtk.vtkStringArray(),
            "Sensitivity": vtk.vtkDoubleArray(), "Specificity": vtk.vtkDoubleArray(),
        }
        for key, array in columns.items():
            array.SetName(key)
            table.AddColumn(array)
        row = 0
        for result in results:
            probe_name = result.probe.name or result.probe.label()
            for cls, score in zip(result.names, result.scores):
                columns["Probe"].InsertNextValue(probe_name)
                columns["Class"].InsertNextValue(cls)
                columns["Label"].InsertNextValue(f"{probe_name}: {cls}" if len(results) > 1 else cls)
                columns["Index"].InsertNextValue(float(row))
                columns["Score"].InsertNextValue(float(score))
                columns["Predicted"].InsertNextValue(result.predicted)
                point = result.operating_points.get(cls) or {}
                columns["Threshold"].InsertNextValue(float(result.thresholds.get(cls, np.nan)))
                decision = result.decisions.get(cls)
                columns["Decision"].InsertNextValue("" if decision is None else "yes" if decision else "no")
                for key in ("Sensitivity", "Specificity"):
                    value = point.get(key.lower())
                    columns[key].InsertNextValue(float(value) if value is not None else np.nan)
                row += 1
        table_node.SetAndObserveTable(table)
        table_node.SetAttribute(HEATMAP_ATTRIBUTE, volumeNode.GetID())
        series = _node_named(scene, "vtkMRMLPlotSeriesNode", name) or scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("Index")
        series.SetYColumnName("Score")
        series.SetLabelColumnName("Label")
        series.SetPlotType(series.PlotTypeBar)
        series.SetColor(0.20, 0.45, 0.75)
        chart = _node_named(scene, "vtkMRMLPlotChartNode", name) or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        chart.RemoveAllPlotSeriesNodeIDs()
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        regression = all(r.probe.task == "regression" for r in results)
        chart.SetTitle(f"Raptor probes on {node_label(volumeNode)}")
        chart.SetXAxisTitle("class")
        chart.SetYAxisTitle("predicted value" if regression else "probability")
        if not regression:
            chart.SetYAxisRange(0.0, 1.0)
        chart.SetLegendVisibility(False)
        self.scoresNodes = (table_node, chart)
        return table_node, chart

    # -- explanations ----------------------------------------------------------
    def embedderFor(self, settings):
        """An :class:`Embedder` for these settings, reusing a loaded model (or RaptorEmbed's, via the provider)."""
        if self.embedderProvider is not None:
            return self.embedderProvider(settings)
        from ..encoding.pipeline import Embedder

        key = (settings.model, settings.device, settings.image_size, settings.cache_dir)
        cached = self._embedders.get(key)
        if cached is not None and cached.settings == settings:
            return cached
        embedder = Embedder(settings, encoder=cached.encoder if cached is not None else None)
        self._embedders = {key: embedder}
        return embedder

    def explain(self, volumeNode, probe: Probe, outputName: str | None = None, *, waitForCompletion: bool = True,
                progressCallback=None, completionCallback=None, model: str | None = None, device: str = "auto"):
        """Explain a probe on a volume node in a worker thread; nodes are made by :meth:`poll`.

        With ``waitForCompletion`` this blocks and returns the :class:`ExplainJob`
        (its ``explanation`` and ``nodes`` filled in) or raises the error.
        """
        from ..probes.explain import embed_settings_for
        from ..volumes.slicer_io import volume_from_node

        if self.job is not None and not self.job.finished:
            raise RaptorError("an explanation is already running; cancel it or wait for it")
        _check_volume(volumeNode)
        if not probe.is_linear:
            raise RaptorError(f"probe {probe.label()} is an MLP; only linear probes can be explained exactly")
        settings = embed_settings_for(probe, model=model, device=device)
        volume = volume_from_node(volumeNode, id=node_label(volumeNode), source=node_label(volumeNode),
                                  modality=volumeNode.GetAttribute("DICOM.Modality"))
        job = ExplainJob(node_id=volumeNode.GetID(), node_name=node_label(volumeNode), probe=probe, output_name=outputName,
                         progress_callback=progressCallback, completion_callback=completionCallback)
        job.thread = threading.Thread(target=self._work, args=(job, volume, settings), name="raptor-explain", daemon=True)
        self.job = job
        job.thread.start()
        if not waitForCompletion:
            return job
        while not job.finished:
            job.thread.join(0.05)
            self.poll()
        if job.status == "failed":
            raise RaptorError(job.error or "the explanation failed")
        if job.status == "cancelled":
            raise Cancelled()
        return job

    def _work(self, job: ExplainJob, volume, settings) -> None:
        """Worker thread: no MRML here."""
        from ..probes.explain import explain_volume

        try:
            embedder = self.embedderFor(settings)
            explained = explain_volume(
                job.probe, embedder, volume, cancel=job.cancel_event,
                progress=lambda _id, done, total: job.events.put(("progress", done, total)),
            )
            job.events.put(("done", explained.explain(job.output_name, device=embedder.encoder.device)))
        except Cancelled:
            job.events.put(("cancelled",))
        except RaptorError as exc:
            job.events.put(("failed", str(exc)))
        except Exception as exc:  # a failure deep in torch/VTK becomes one line, never a crash
            job.events.put(("failed", f"{job.node_name}: explanation failed ({type(exc).__name__}: {exc})"))

    def poll(self) -> bool:
        """Main thread: handle worker events; returns True while the job runs."""
        job = self.job
        if job is None:
            return False
        while not job.finished:
            try:
                event = job.events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "progress" and job.progress_callback is not None:
                job.progress_callback(event[1], event[2])
            elif event[0] == "done":
                node = self.scene.GetNodeByID(job.node_id)
                if node is None or job.cancel_event.is_set():
                    job.status = "cancelled"
                else:
                    try:
                        job.explanation = event[1]
                        job.nodes = self.showExplanation(node, event[1])
                        self.lastExplanation = event[1]
                        job.status = "done"
                    except RaptorError as exc:
                        job.error, job.status = str(exc), "failed"
            elif event[0] == "cancelled":
                job.status = "cancelled"
            elif event[0] == "failed":
                job.error, job.status = event[1], "failed"
            if job.finished and job.completion_callback is not None:
                job.completion_callback(job)
        return not job.finished

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    # -- nodes ----------------------------------------------------------------
    def showExplanation(self, volumeNode, explanation) -> dict:
        """Heatmap volume, curve tables and chart for an :class:`~RaptorExtension.explain.Explanation`."""
        heatmap = self.createHeatmapNode(volumeNode, explanation)
        tables, chart = self.createCurveNodes(volumeNode, explanation)
        return {"heatmap": heatmap, "tables": tables, "chart": chart}

    def createHeatmapNode(self, volumeNode, explanation, name: str | None = None):
        """A scalar volume aligned with ``volumeNode`` holding the heatmap, with a diverging colour map."""
        import vtk

        scene = self.scene
        name = name or f"{node_label(volumeNode)} {explanation.output} heatmap"
        node = _node_named(scene, "vtkMRMLScalarVolumeNode", name) or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        import slicer

        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(explanation.heatmap, dtype=np.float32))
        node.SetIJKToRASMatrix(m)
        parent = volumeNode.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
        node.SetAttribute(HEATMAP_ATTRIBUTE, volumeNode.GetID())
        node.SetAttribute(PROBE_ATTRIBUTE, explanation.probe_name)
        node.SetAttribute(OUTPUT_ATTRIBUTE, explanation.output)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatmapColorNodeID())
        limit = float(np.abs(explanation.heatmap).max()) or 1.0
        display.AutoWindowLevelOff()
        display.SetWindowLevel(2.0 * limit, 0.0)
        display.SetInterpolate(1)
        return node

    def heatmapColorNodeID(self) -> str:
        """Slicer's DivergingBlueRed if loaded, else a cool-warm diverging map made once in the scene."""
        scene = self.scene
        for node_id in DIVERGING_COLOR_IDS:
            if scene.GetNodeByID(node_id) is not None:
                return node_id
        existing = _node_named(scene, "vtkMRMLProceduralColorNode", OWN_COLOR_NAME)
        if existing is not None:
            return existing.GetID()
        import slicer
        import vtk

        node = slicer.vtkMRMLProceduralColorNode()
        node.SetName(OWN_COLOR_NAME)
        node.SetAttribute("Category", "Raptor")
        ctf = vtk.vtkColorTransferFunction()
        ctf.SetColorSpaceToDiverging()  # Moreland's perceptually uniform diverging interpolation
        ctf.AddRGBPoint(0.0, 0.230, 0.299, 0.754)
        ctf.AddRGBPoint(1.0, 0.706, 0.016, 0.150)
        ctf.Build()
        node.SetAndObserveColorTransferFunction(ctf)
        scene.AddNode(node)
        return node.GetID()

    def createCurveNodes(self, volumeNode, explanation):
        """One table per plane (slice, RAS, contribution) and a chart of the three slice curves."""
        import vtk

        scene = self.scene
        base = f"{node_label(volumeNode)} {explanation.output} slice attention"
        chart = _node_named(scene, "vtkMRMLPlotChartNode", base) or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", base)
        chart.RemoveAllPlotSeriesNodeIDs()
        tables = []
        for i, plane in enumerate(explanation.planes):
            name = f"{base} ({plane})"
            table_node = _node_named(scene, "vtkMRMLTableNode", name) or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
            table = vtk.vtkTable()
            arrays = {key: vtk.vtkDoubleArray() for key in ("Slice", "R", "A", "S", "Contribution")}
            for key, array in arrays.items():
                array.SetName(key)
                table.AddColumn(array)
            for index, value in enumerate(explanation.slice_curves[i]):
                r, a, s = explanation.slice_ras(i, index)
                for key, v in zip(("Slice", "R", "A", "S", "Contribution"), (index, r, a, s, value)):
                    arrays[key].InsertNextValue(float(v))
            table_node.SetAndObserveTable(table)
            table_node.SetAttribute(PLANE_ATTRIBUTE, plane)
            table_node.SetAttribute(HEATMAP_ATTRIBUTE, volumeNode.GetID())
            series = _node_named(scene, "vtkMRMLPlotSeriesNode", name) or scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName("Slice")
            series.SetYColumnName("Contribution")
            series.SetPlotType(series.PlotTypeScatter)
            series.SetLineStyle(series.LineStyleSolid)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            series.SetMarkerSize(4)
            series.SetColor(*PLANE_COLORS.get(plane, (0.5, 0.5, 0.5)))
            series.SetAttribute(PLANE_ATTRIBUTE, plane)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
            tables.append(table_node)
        kind = "logit" if explanation.task != "regression" else "value"
        chart.SetTitle(f"{explanation.output}: {kind} {explanation.decision:+.3f} = bias {explanation.bias:+.3f} + slices")
        chart.SetXAxisTitle("slice")
        chart.SetYAxisTitle(f"contribution to the {kind}")
        chart.SetLegendVisibility(True)
        return tables, chart

    def slicePosition(self, seriesOrPlane, pointIndex: int, explanation=None) -> np.ndarray:
        """RAS of the slice behind a clicked curve point (series node, table node or plane name)."""
        explanation = explanation or self.lastExplanation
        if explanation is None:
            raise RaptorError("explain a volume first")
        plane = seriesOrPlane if isinstance(seriesOrPlane, str) else seriesOrPlane.GetAttribute(PLANE_ATTRIBUTE)
        if plane not in explanation.planes:
            raise RaptorError(f"no slice curve for plane {plane!r}")
        i = explanation.planes.index(plane)
        if not 0 <= pointIndex < len(explanation.slice_curves[i]):
            raise RaptorError(f"slice {pointIndex} is outside the {plane} curve")
        return explanation.slice_ras(i, int(pointIndex))

    def jumpToSlice(self, seriesOrPlane, pointIndex: int, explanation=None) -> np.ndarray:
        """Centre every slice view on the slice behind a clicked curve point; returns its RAS."""
        import slicer

        r, a, s = self.slicePosition(seriesOrPlane, pointIndex, explanation)
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, float(r), float(a), float(s),
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return np.array([r, a, s])

    def showHeatmap(self, backgroundNode, heatmapNode, opacity: float = 0.5) -> int:
        """Show the heatmap as the foreground layer over the volume in every slice view; returns the view count."""
        count = 0
        scene = self.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(backgroundNode.GetID() if backgroundNode is not None else None)
            composite.SetForegroundVolumeID(heatmapNode.GetID() if heatmapNode is not None else None)
            composite.SetForegroundOpacity(float(min(1.0, max(0.0, opacity))))
            count += 1
        return count

    def setHeatmapOpacity(self, opacity: float) -> None:
        scene = self.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(min(1.0, max(0.0, opacity))))


def probeResult(probe: Probe, vector: np.ndarray) -> ProbeResult:
    """A probe applied to one embedding vector, with its decision and operating point (no MRML needed)."""
    x = np.asarray(vector)[None]
    scores = probe.scores(x)[0]
    result = ProbeResult(probe=probe, names=list(probe.classes), scores=scores, predicted=probe.predict(x)[0],
                         calibrated=probe.calibration is not None, notes=list(probe.notes))
    if probe.task == "regression":
        return result
    decided = probe.decide(scores[None])[0]
    result.decisions = {name: bool(d) for name, d in zip(probe.classes, decided)}
    if probe.thresholds is not None:
        result.thresholds = dict(zip(probe.threshold_names, (float(t) for t in probe.thresholds)))
        result.operating_points = probe.operating_points()
    return result


def _check_volume(node) -> None:
    if node is None:
        raise InputError("choose a volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{node_label(node)}: is a {node.GetClassName()}, not a scalar volume")
    if node.GetImageData() is None:
        raise InputError(f"{node_label(node)}: holds no image data")


def _node_named(scene, class_name: str, name: str):
    """The first node of a class with this exact name (so re-running updates instead of piling up nodes)."""
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetName() == name:
            return node
    return None


__all__ = ["ProbeLogic", "ProbeResult", "ExplainJob", "probeResult"]
