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

Where the work runs follows RaptorEmbed's rule: explaining and fitting run on
the Raptor server (:mod:`.compute`), never in Slicer's process.  The main
thread copies the voxels (a :class:`~RaptorExtension.volumes.volume.Volume`),
a :class:`~.remote_job.RemoteJob` sends them with the probe, and
:meth:`ProbeLogic.poll` (from a timer) advances the job one short step and
turns the returned explanation into nodes.  Applying a probe to a stored
embedding is a dot product and stays here.  A node that has no embedding yet
is embedded by the RaptorEmbed logic on the same server (``embedHook`` lets
scripts do the same).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embeddings.embedding import Embedding
from ..errors import InputError, RaptorError
from ..probes.probe import Probe
from .compute import Compute, ServerLogic
from .node_attributes import node_label, read_embedding
from .remote_job import RemoteJob

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
    """An explanation running on the Raptor server."""

    node_id: str
    node_name: str
    probe: Probe
    output_name: str | None
    remote: RemoteJob
    baseline: str = "background"
    """What contributions are measured against: an empty slice (background) or the training mean (mean)."""
    progress_callback: Callable[[int, int], None] | None = None
    completion_callback: Callable[["ExplainJob"], None] | None = None
    status: str = "running"
    error: str | None = None
    explanation: Any = None
    nodes: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def cancel(self) -> None:
        self.remote.cancel()


@dataclass
class FitJob:
    """A probe being fitted on the Raptor server; its files are written beside ``output`` when it ends."""

    output: Path
    remote: RemoteJob
    completion_callback: Callable[["FitJob"], None] | None = None
    status: str = "running"
    error: str | None = None
    probe: Probe | None = None
    report: str = ""
    files: list[Path] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def cancel(self) -> None:
        self.remote.cancel()


EmbedHook = Callable[[Any, Any], Embedding]
"""``hook(volumeNode, EmbedSettings) -> Embedding``: embeds a node that has no embedding yet."""


class ProbeLogic(ServerLogic):
    """Load probes, apply them to embedded volume nodes, explain them as MRML nodes."""

    def __init__(self, scene=None, *, compute: Compute | None = None, embedHook: EmbedHook | None = None) -> None:
        self._scene = scene
        self._compute = compute
        self.probes: list[Probe] = []
        self.embedHook = embedHook
        self.job: ExplainJob | None = None
        self.fitJob: FitJob | None = None
        self.lastExplanation = None
        self.lastExplained: tuple[str, Probe] | None = None
        """(node ID, probe) of :attr:`lastExplanation`."""
        self.lastResults: dict[str, list[ProbeResult]] = {}
        """The last :meth:`apply` results per volume node ID (what "Save to DICOM database" saves)."""
        self.scoresNodes: tuple = (None, None)
        self._scratch: tempfile.TemporaryDirectory | None = None
        """Where unsaved probes are written for the server; removed with the logic or when Python exits."""
        """(table, bar chart) of the last :meth:`apply`."""

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
            from ..probes.probe_settings import embed_settings_for

            _refuse_projector_file(probe)
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
        self.lastResults[volumeNode.GetID()] = results
        if updateNodes:
            self.showScores(volumeNode, results)
        return results

    @staticmethod
    def describeResults(results: Sequence[ProbeResult]) -> str:
        """What the panel prints under the scores: per probe, its decision at its threshold with the rates it was
        measured to have, whether its probabilities are calibrated, and its notes (e.g. an old file's 0.5)."""
        blocks = []
        for result in results:
            lines = result.describe()
            if result.probe.task == "regression":
                lines = [f"{name}: {float(v):.4g}" for name, v in zip(result.names, result.scores)]
            head = result.probe.name or "probe"
            if result.calibrated:
                head += " (calibrated probabilities)"
            blocks.append("\n".join([head + ":", *(f"  {line}" for line in lines),
                                      *(f"  note: {note}" for note in result.notes)]))
        return "\n".join(blocks)

    @staticmethod
    def describeDecisions(probe: Probe) -> list[str]:
        """How a probe decides (threshold and how it was chosen, weighting, calibration) and its notes."""
        from ..probes.fit_outputs import decision_lines

        return [*decision_lines(probe), *(f"Note: {note}" for note in probe.notes)]

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
            chart.SetYAxisRangeAuto(False)  # qMRMLPlotView ignores the range while the automatic one is on
            chart.SetYAxisRange(0.0, 1.0)
        chart.SetLegendVisibility(False)
        self.scoresNodes = (table_node, chart)
        return table_node, chart

    # -- explanations ----------------------------------------------------------
    def explain(self, volumeNode, probe: Probe, outputName: str | None = None, *, waitForCompletion: bool = True,
                progressCallback=None, completionCallback=None, model: str | None = None, device: str = "auto",
                baseline: str = "background"):
        """Explain a probe on a volume node on the Raptor server; nodes are made by :meth:`poll`.

        ``baseline``: contributions against an empty slice, so air and padding show 0 on the overlay
        (``background``, the default), or against the average training volume (``mean``).

        With ``waitForCompletion`` this blocks and returns the :class:`ExplainJob`
        (its ``explanation`` and ``nodes`` filled in) or raises the error.
        """
        from ..server.remote import volume_info, volume_sender
        from ..volumes.slicer_io import volume_from_node

        if self.job is not None and not self.job.finished:
            raise RaptorError("an explanation is already running; cancel it or wait for it")
        _check_volume(volumeNode)
        if not probe.is_linear:
            raise RaptorError(f"probe {probe.label()} is an MLP; only linear probes can be explained exactly")
        _refuse_projector_file(probe)
        volume = volume_from_node(volumeNode, id=node_label(volumeNode), source=node_label(volumeNode),
                                  modality=volumeNode.GetAttribute("DICOM.Modality"))
        from ..probes.explanation import BASELINES

        if baseline not in BASELINES:
            raise RaptorError(f"unknown explanation baseline {baseline!r} (choose from {', '.join(BASELINES)})")
        request = {"kind": "explain", "volume_info": volume_info(volume), "output": outputName, "model": model,
                   "device": device, "baseline": baseline}
        uploads = [("volume", volume_sender(volume))]
        self._probe_input(probe, request, uploads)
        job = ExplainJob(node_id=volumeNode.GetID(), node_name=node_label(volumeNode), probe=probe, output_name=outputName,
                         remote=RemoteJob(self.compute, request, uploads=uploads, fetch=["explanation"],
                                          label=f"explanation of {node_label(volumeNode)}"),
                         baseline=baseline, progress_callback=progressCallback, completion_callback=completionCallback)
        self.job = job
        return self._wait_for(job, "the explanation") if waitForCompletion else job

    def _probe_input(self, probe: Probe, request: dict, uploads: list) -> None:
        """The probe file by path for a local server, else uploaded (an unsaved probe is saved first)."""
        from ..server.remote import file_sender

        path = Path(probe.path) if probe.path else None
        if path is None or not path.is_file():
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="raptor-probes-")
            path = probe.save(Path(tempfile.mkdtemp(dir=self._scratch.name)) / "probe.raptorprobe")
        if self.compute.is_local:
            request["probe"] = {"path": str(path.resolve())}
        else:
            uploads.append(("probe", file_sender(path, "probe")))

    def poll(self) -> bool:
        """Main thread: advance the running explanation and fit by one step each; True while one runs."""
        running = False
        job = self.job
        if job is not None and not job.finished:
            job.remote.step()
            progress = job.remote.progress
            if job.progress_callback is not None and progress.unit == "slices" and progress.total:
                job.progress_callback(progress.done, progress.total)
            if job.remote.finished:
                self._conclude_explain(job)
            running = not job.finished
        fit = self.fitJob
        if fit is not None and not fit.finished:
            fit.remote.step()
            if fit.remote.finished:
                self._conclude_fit(fit)
            running = running or not fit.finished
        return running

    @staticmethod
    def _conclude(job, deliver) -> None:
        """A finished remote job: ``deliver(remote)`` its results when the server is done (a
        :class:`RaptorError` from it fails the job), else cancelled or failed; then the callback."""
        remote = job.remote
        if remote.state == "done":
            try:
                deliver(remote)
            except RaptorError as exc:
                job.error, job.status = str(exc), "failed"
        elif remote.state == "cancelled":
            job.status = "cancelled"
        else:
            job.error, job.status = remote.error, "failed"
        if job.completion_callback is not None:
            job.completion_callback(job)

    def _conclude_explain(self, job: ExplainJob) -> None:
        from ..probes.explanation import load_explanation

        def deliver(remote) -> None:
            node = self.scene.GetNodeByID(job.node_id)
            if node is None:  # deleted while the server worked
                job.status = "cancelled"
                return
            with tempfile.TemporaryDirectory() as folder:
                target = Path(folder) / "explanation.npz"
                target.write_bytes(remote.results["explanation"])
                explanation = load_explanation(target)
            job.explanation = explanation
            job.nodes = self.showExplanation(node, explanation)
            self.lastExplanation = explanation
            self.lastExplained = (job.node_id, job.probe)
            job.status = "done"

        self._conclude(job, deliver)

    def cancel(self) -> None:
        for job in (self.job, self.fitJob):
            if job is not None and not job.finished:
                job.cancel()

    def cleanup(self) -> None:
        """The module closes: cancel its jobs and remove the unsaved probes written for the server."""
        self.cancel()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    # -- fitting -----------------------------------------------------------------
    def fit(self, embeddings: str | Path, labels: str | Path, output: str | Path, *, model: str = "auto",
            select: str = "val", cGrid: Sequence[float] | None = None, threshold: str | None = None,
            classWeight: str | None = None, calibrate: str | None = None, waitForCompletion: bool = False,
            completionCallback=None) -> FitJob:
        """Fit a probe on the server from an embedding CSV (or ``.npz`` folder) and a labels CSV.

        The probe, ``<name>_metrics.json``, the ROC (or predicted-vs-true) PNG
        and a classification probe's reliability diagram are written beside
        ``output``, as ``raptor probe fit`` writes them.  ``threshold``,
        ``classWeight`` and ``calibrate`` are ``raptor probe fit``'s
        ``--threshold``, ``--class-weight`` and ``--calibrate``.
        """
        from ..server.remote import file_sender

        if self.fitJob is not None and not self.fitJob.finished:
            raise RaptorError("a fit is already running; cancel it or wait for it")
        embeddings, labels, output = (path_or_none(p) for p in (embeddings, labels, output))
        if embeddings is None or labels is None or output is None:
            raise InputError("choose an embedding CSV, a labels CSV and where to save the probe")
        for path, what in ((embeddings, "embeddings"), (labels, "labels")):
            if not path.exists():
                raise InputError(f"{path}: no such file ({what})")
        if not output.name.endswith(".raptorprobe"):
            output = output.with_name(output.name + ".raptorprobe")
        options = {"model": model, "select": select}
        if cGrid:
            options["c_grid"] = [float(c) for c in cGrid]
        for key, value in (("threshold", threshold), ("class_weight", classWeight), ("calibrate", calibrate)):
            if value:
                options[key] = str(value)
        request = {"kind": "fit", "options": options, "name": output.name, "embeddings": [None], "labels": None}
        uploads = []
        if self.compute.is_local:
            request["embeddings"] = [{"path": str(embeddings.resolve())}]
            request["labels"] = {"path": str(labels.resolve())}
        else:
            if embeddings.is_dir():
                raise InputError(f"{embeddings}: a remote server takes an embedding CSV, not a folder")
            uploads = [("embeddings.0", file_sender(embeddings, "table")), ("labels", file_sender(labels, "labels"))]
        job = FitJob(output=output, completion_callback=completionCallback,
                     remote=RemoteJob(self.compute, request, uploads=uploads, fetch=["probe", "metrics", "plot", "reliability"],
                                      optional=["reliability"],
                                      label=f"fit of {output.name}"))
        self.fitJob = job
        return self._wait_for(job, "the fit") if waitForCompletion else job

    def _conclude_fit(self, job: FitJob) -> None:
        from ..atomic import atomic_write
        from ..probes.fit_outputs import output_stem

        def deliver(remote) -> None:
            files = remote.snapshot["result"]["files"]
            stem = output_stem(job.output)
            plot_suffix = "_roc.png" if files["plot"].endswith("_roc.png") else "_pred.png"
            targets = {"probe": job.output, "metrics": Path(f"{stem}_metrics.json"), "plot": Path(f"{stem}{plot_suffix}")}
            if "reliability" in remote.results:
                targets["reliability"] = Path(f"{stem}_reliability.png")
            try:
                for name, target in targets.items():
                    with atomic_write(target) as handle:
                        handle.write(remote.results[name])
                    job.files.append(target)
                job.probe = Probe.load(job.output)
            except OSError as exc:
                raise RaptorError(f"{job.output}: cannot write ({exc.strerror or exc})") from None
            result = remote.snapshot["result"]
            job.report = "\n".join([result.get("table", ""), *(f"Warning: {w}" for w in result.get("warnings", []))])
            job.status = "done"

        self._conclude(job, deliver)

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

    # -- DICOM results -----------------------------------------------------------
    def canSaveToDicom(self, volumeNode) -> bool:
        """Whether there is something of this node's to save: applied scores or its last explanation."""
        if volumeNode is None:
            return False
        explained = self.lastExplained is not None and self.lastExplained[0] == volumeNode.GetID()
        return bool(self.lastResults.get(volumeNode.GetID())) or explained

    def saveToDicom(self, volumeNode, outputDir: str | Path, filesForInstance=None) -> list[Path]:
        """Write this node's last scores (one SR per probe, with the slice curves of the explained probe) and its
        last heatmap (a Parametric Map) as DICOM into ``outputDir``; returns the files, ready to import into
        Slicer's DICOM database.  A node not loaded from DICOM is refused with one sentence saying why."""
        from .dicom_export import saveResultsToDicom

        if volumeNode is None:
            raise InputError("choose a volume")
        results = self.lastResults.get(volumeNode.GetID(), [])
        explained = self.lastExplained is not None and self.lastExplained[0] == volumeNode.GetID()
        return saveResultsToDicom(volumeNode, outputDir, results=results,
                                  explanation=self.lastExplanation if explained else None,
                                  explanationProbe=self.lastExplained[1] if explained else None,
                                  filesForInstance=filesForInstance)

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


def _refuse_projector_file(probe: Probe) -> None:
    """The panels cannot send a projector file yet: say so in Slicer's terms, and what does work."""
    from ..encoding.projection import FILE_PROJECTION

    if probe.embedding.get("projection") == FILE_PROJECTION:
        raise RaptorError(
            f"probe {probe.label()} was fitted on embeddings made with a projector file (raptor embed "
            "--projection-file); the Slicer modules cannot embed with one yet: use `raptor explain PROBE VOLUME "
            "--projection-file R.npy` on the command line"
        )


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


__all__ = ["ProbeLogic", "ProbeResult", "ExplainJob", "FitJob", "path_or_none", "probeResult"]


def path_or_none(value) -> Path | None:
    """A path from a panel field; empty and ``.`` (what an unset path parameter shows) mean none."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()
