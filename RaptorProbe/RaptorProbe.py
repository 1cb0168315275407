"""RaptorProbe: class scores for the selected volume, and where in the volume they come from.

Load probe files (``.raptorprobe``, from ``raptor probe fit`` or the Fit panel),
apply them to the selected volume (embedded first with RaptorEmbed when it has
no embedding) and see the scores in a table and a bar chart.  Explain shows the
exact decomposition of a linear probe's logit: a heatmap over the volume (the
foreground layer of the slice views) and the three slice curves in a plot;
clicking a point of a curve moves the slice views to that slice.

The widget only gathers inputs and shows results.  Everything testable lives
in the engine package (``RaptorExtension.slicerlogic.probe.ProbeLogic``, Qt-free and
tested headless against a real MRML scene and a real Raptor server).
Explaining and fitting run on the Raptor server (Compute section), never in
Slicer's process; a timer advances them one short step at a time.
"""

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import vtkMRMLScalarVolumeNode


def _makeEngineImportable() -> None:
    """A development checkout keeps RaptorExtension/ beside this module's folder; an installed extension
    puts it in the scripted-modules folder, which is already on the path."""
    try:
        import RaptorExtension  # noqa: F401
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(root, "RaptorExtension")) and root not in sys.path:
            sys.path.insert(0, root)


_makeEngineImportable()

from RaptorExtension.slicerlogic import dependencies  # noqa: E402  (no torch import: installed at first use)
from RaptorExtension.errors import RaptorError  # noqa: E402
from RaptorExtension.probes.probe import PAPER_C_GRID, parse_grid  # noqa: E402
from RaptorExtension.slicerlogic.probe import PLANE_ATTRIBUTE, ProbeLogic, path_or_none  # noqa: E402
from RaptorEmbedLib.ComputeSection import ComputeSection  # noqa: E402

POLL_INTERVAL_MSEC = 100
PROBE_FOLDER_SETTINGS_KEY = "Raptor/ProbeFolder"


#
# RaptorProbe
#


class RaptorProbe(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Raptor Probe")
        self.parent.categories = ["Raptor"]
        self.parent.dependencies = ["RaptorEmbed"]
        self.parent.contributors = ["Raptor for 3D Slicer developers (Raptor project)"]
        self.parent.helpText = _("""
Applies probes (small models fitted on Raptor embeddings) to the selected volume and shows class scores in a
table and a bar chart. <b>Explain</b> splits a linear probe's logit exactly into the contribution of every
slice of the three planes and every 16x16 patch: the heatmap (red adds to the class, blue takes away) is shown
over the volume, the three slice curves in a plot; click a curve point to move the slice views there.
A probe only accepts embeddings made with the settings it was fitted on (model weights, K, seed, grid, preset).
Explaining and fitting run in a Raptor server (this computer's, or a GPU server: see Compute), never in Slicer itself.
""")
        self.parent.helpText += _('<p>See the <a href="{url}">documentation</a>.</p>').format(
            url="https://github.com/raptor-slicer/SlicerRaptor#readme")
        self.parent.acknowledgementText = _("""
Raptor: Ulzee An et al., "Raptor: Scalable Train-Free Embeddings for 3D Medical Volumes Leveraging
Pretrained 2D Foundation Models", ICML 2025. DINOv2 by Meta AI.
""")


#
# RaptorProbeParameterNode
#


@parameterNodeWrapper
class RaptorProbeParameterNode:
    """
    The parameters needed by module.

    inputVolume - The volume to score and explain.
    modelOverride - A local model folder to load the probe's backbone from (weights must match).
    heatmapOpacity - Opacity of the heatmap foreground layer.
    fitEmbeddings - Embedding CSV, .npz or folder of .npz to fit on.
    fitLabels - Labels CSV (id, split, label columns).
    fitOutput - Probe file to write.
    fitModel - auto, logistic, ridge or mlp.
    fitSelect - val (paper) or cv (stratified k-fold on train+val).
    fitCGrid - C values for logistic regression, comma-separated (the paper's by default).
    explainBaseline - background (an empty slice: air and padding count 0) or mean (the average training volume).
    fitThreshold - operating threshold rule: youden, sensitivity:0.95, specificity:0.90, a probability, or none.
    fitClassWeight - none or balanced.
    fitCalibrate - none, sigmoid or isotonic.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelOverride: str = ""
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fitEmbeddings: Path
    fitLabels: Path
    fitOutput: Path
    fitModel: Annotated[str, Choice(["auto", "logistic", "ridge", "mlp"])] = "auto"
    fitSelect: Annotated[str, Choice(["val", "cv"])] = "val"
    fitCGrid: str = "0.01,0.1,1,10,100"
    explainBaseline: Annotated[str, Choice(["background", "mean"])] = "background"
    fitThreshold: str = "youden"
    fitClassWeight: Annotated[str, Choice(["none", "balanced"])] = "none"
    fitCalibrate: Annotated[str, Choice(["none", "sigmoid", "isotonic"])] = "none"


#
# RaptorProbeWidget
#


class RaptorProbeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._plotView = None
        self._heatmapNode = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RaptorProbe.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RaptorProbeLogic()

        # Explanations and fits run on the Raptor server; this timer advances them one short step at a time.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MSEC)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadProbeButton.connect("clicked(bool)", self.onLoadProbes)
        self.ui.removeProbeButton.connect("clicked(bool)", self.onRemoveProbe)
        self.ui.probesListWidget.connect("currentRowChanged(int)", self.onProbeSelected)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.explainProbeComboBox.connect("currentIndexChanged(int)", self.onExplainProbeChanged)
        self.ui.explainButton.connect("clicked(bool)", self.onExplainButton)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.fitButton.connect("clicked(bool)", self.onFitButton)
        self.ui.saveDicomButton.connect("clicked(bool)", self.onSaveDicomButton)

        self.ui.progressBar.setVisible(False)
        # Compute: this computer or a Raptor server, shared with the Raptor Embed module.
        self.computeSection = ComputeSection(self.ui, busy=self.isBusy)
        self.initializeParameterNode()
        self.updateProbeList()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cleanup()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._disconnectPlotView()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.computeSection.refresh()  # the other Raptor module may have changed where jobs run

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: a running explanation is dropped (a fit, which only uses
        files, goes on)."""
        if self.logic.job is not None and not self.logic.job.finished:
            self.logic.job.cancel()
        self._heatmapNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.GetAttribute("Raptor.HeatmapOf"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[RaptorProbeParameterNode]) -> None:
        """Set and observe parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
            self._checkCanRun()

    def isBusy(self) -> bool:
        jobs = (self.logic.job, self.logic.fitJob) if self.logic is not None else ()
        return any(job is not None and not job.finished for job in jobs)

    def _checkCanRun(self, caller=None, event=None) -> None:
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        hasProbes = bool(self.logic.probes)
        running = self.logic.job is not None and not self.logic.job.finished
        self.ui.applyButton.enabled = hasInput and hasProbes and not running
        self.ui.saveDicomButton.enabled = hasInput and not running and self.logic.canSaveToDicom(
            self._parameterNode.inputVolume)
        if running:
            self.ui.explainButton.text = _("Cancel")
            self.ui.explainButton.enabled = True
        else:
            self.ui.explainButton.text = _("Explain")
            self.ui.explainButton.enabled = hasInput and self.ui.explainProbeComboBox.count > 0
        fitting = self.logic.fitJob is not None and not self.logic.fitJob.finished
        p = self._parameterNode
        # An unset path parameter reads Path("."), which is truthy: path_or_none treats it as unset.
        ready = bool(p) and all(path_or_none(v) is not None for v in (p.fitEmbeddings, p.fitLabels, p.fitOutput))
        self.ui.fitButton.enabled = ready and not fitting
        self.ui.fitButton.text = _("Fitting...") if fitting else _("Fit")
        self.ui.removeProbeButton.enabled = self.ui.probesListWidget.currentRow >= 0

    # -- probes ------------------------------------------------------------------

    def onLoadProbes(self) -> None:
        folder = qt.QSettings().value(PROBE_FOLDER_SETTINGS_KEY, "")
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), _("Load Raptor probes"), folder, _("Raptor probes (*.raptorprobe)")
        )
        loaded = None
        for path in paths or []:
            try:
                loaded = self.logic.loadProbe(path)
            except RaptorError as exc:
                slicer.util.errorDisplay(str(exc))
        if paths:
            qt.QSettings().setValue(PROBE_FOLDER_SETTINGS_KEY, os.path.dirname(paths[-1]))
        self.updateProbeList(select=loaded)

    def onRemoveProbe(self) -> None:
        row = self.ui.probesListWidget.currentRow
        if 0 <= row < len(self.logic.probes):
            self.logic.removeProbe(self.logic.probes[row])
        self.updateProbeList()

    def updateProbeList(self, select=None) -> None:
        self.ui.probesListWidget.clear()
        self.ui.explainProbeComboBox.clear()
        for probe in self.logic.probes:
            label = f"{probe.name} ({probe.task}, {probe.model})"
            self.ui.probesListWidget.addItem(label)
            if probe.is_linear:
                self.ui.explainProbeComboBox.addItem(label, self.logic.probes.index(probe))
        if self.logic.probes:
            index = self.logic.probes.index(select) if select in self.logic.probes else 0
            self.ui.probesListWidget.setCurrentRow(index)
        else:
            self.ui.probeInfoLabel.text = _("No probe loaded.")
        self._checkCanRun()

    def onProbeSelected(self, row: int) -> None:
        if not 0 <= row < len(self.logic.probes):
            return
        self.ui.probeInfoLabel.text = self.logic.describeProbe(self.logic.probes[row])
        self._checkCanRun()

    # -- apply -----------------------------------------------------------------

    def onApplyButton(self) -> None:
        node = self._parameterNode.inputVolume
        self.logic.embedHook = self._embedWithRaptorEmbed
        try:
            with slicer.util.WaitCursor():
                results = self.logic.apply(node)
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        tableNode, chartNode = self.logic.scoresNodes
        self.ui.scoresTableView.setMRMLTableNode(tableNode)
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        self.ui.decisionLabel.text = self.logic.describeResults(results)
        self.ui.statusLabel.text = "; ".join(f"{r.probe.name}: {r.predicted}" for r in results)
        self._checkCanRun()

    def _embedWithRaptorEmbed(self, volumeNode, settings):
        """A volume without an embedding is embedded first, with the probe's settings (asks first)."""
        if not slicer.util.confirmOkCancelDisplay(
            _("{name} has no Raptor embedding yet. Embed it now with {model} (K={k}, grid {grid})?").format(
                name=volumeNode.GetName(), model=settings.model, k=settings.k, grid=settings.grid
            ),
            windowTitle=_("Embed first"),
        ):
            raise RaptorError(f"{volumeNode.GetName()}: not embedded")
        if self._parameterNode.modelOverride:
            import dataclasses

            settings = dataclasses.replace(settings, model=self._parameterNode.modelOverride)
        # The Raptor Embed module's own logic: its loaded model is reused (and stays loaded) instead of
        # reloading a multi-GB model for every volume.
        try:
            embedLogic = slicer.util.getModuleLogic("RaptorEmbed")  # creates the module's widget if needed
        except RuntimeError:
            import RaptorEmbed

            embedLogic = RaptorEmbed.RaptorEmbedLogic()
        return embedLogic.embed(volumeNode, settings, waitForCompletion=True)

    # -- explain ---------------------------------------------------------------

    def onExplainProbeChanged(self, index: int) -> None:
        self.ui.explainClassComboBox.clear()
        probe = self._explainProbe()
        if probe is not None:
            names = probe.classes if probe.task != "binary" else list(reversed(probe.classes))
            for name in names:
                self.ui.explainClassComboBox.addItem(name)
        self._checkCanRun()

    def _explainProbe(self):
        data = self.ui.explainProbeComboBox.currentData
        return self.logic.probes[int(data)] if data is not None and int(data) < len(self.logic.probes) else None

    def onExplainButton(self) -> None:
        if self.logic.job is not None and not self.logic.job.finished:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling (stops before the next batch of slices)...")
            return
        probe = self._explainProbe()
        if probe is None:
            return
        try:
            if not dependencies.ensure_server_dependencies(self.logic.compute):
                self.ui.statusLabel.text = _("Installation cancelled: the local Raptor server needs PyTorch and its packages.")
                return
            self.logic.explain(
                self._parameterNode.inputVolume,
                probe,
                self.ui.explainClassComboBox.currentText or None,
                waitForCompletion=False,
                progressCallback=self.onExplainProgress,
                completionCallback=self.onExplainCompleted,
                model=self._parameterNode.modelOverride or None,
                baseline=self._parameterNode.explainBaseline,
            )
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = _("Explaining (every slice goes through the model again)...")
        self._pollTimer.start()
        self._checkCanRun()

    def onExplainProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.format = "%v / %m slices"
        self.ui.progressBar.setRange(0, total)
        self.ui.progressBar.setValue(done)

    def onExplainCompleted(self, job) -> None:
        self.ui.progressBar.setVisible(False)
        if job.status == "done":
            ex = job.explanation
            self._heatmapNode = job.nodes["heatmap"]
            explained = slicer.mrmlScene.GetNodeByID(job.node_id)  # the volume explained, whatever is selected now
            self.logic.showHeatmap(explained, self._heatmapNode, self._parameterNode.heatmapOpacity)
            slicer.modules.plots.logic().ShowChartInLayout(job.nodes["chart"])
            self._connectPlotView()
            kind = "logit" if ex.task != "regression" else "value"
            self.ui.explainSummaryLabel.text = _(
                "{output}: score {score:.3f}; {kind} {decision:+.3f} = bias {bias:+.3f} + slices {total:+.3f}. "
                "Top slices: {tops}. Click a curve point to jump there."
            ).format(output=ex.output, score=ex.score, kind=kind, decision=ex.decision, bias=ex.bias, total=ex.total,
                     tops=", ".join(f"{p} {ex.top_slice(i)}" for i, p in enumerate(ex.planes)))
            self.ui.statusLabel.text = _("Explained {name}").format(name=job.node_name)
        elif job.status == "cancelled":
            self.ui.statusLabel.text = _("Explanation cancelled; nothing was added to the scene.")
        else:
            self.ui.statusLabel.text = _("Failed")
            slicer.util.errorDisplay(job.error)
        self._checkCanRun()

    def onOpacityChanged(self, value: float) -> None:
        if self._heatmapNode is not None:
            self.logic.setHeatmapOpacity(value)

    def _connectPlotView(self) -> None:
        """Clicking (selecting) a point of a slice curve jumps the slice views to that slice.

        qMRMLPlotView reports clicks through ``dataSelected(vtkStringArray*, vtkCollection*)``.
        """
        layoutManager = slicer.app.layoutManager()
        plotWidget = layoutManager.plotWidget(0) if layoutManager else None
        if plotWidget is None:
            return
        plotView = plotWidget.plotView()
        if plotView is self._plotView:
            return
        self._disconnectPlotView()
        # The default (pan) mode already reports a click as a selection; other plots keep their panning.
        plotView.connect("dataSelected(vtkStringArray*, vtkCollection*)", self.onDataSelected)
        self._plotView = plotView

    def _disconnectPlotView(self) -> None:
        if self._plotView is not None:
            self._plotView.disconnect("dataSelected(vtkStringArray*, vtkCollection*)", self.onDataSelected)
            self._plotView = None

    def onDataSelected(self, seriesIds, selections) -> None:
        for i in range(seriesIds.GetNumberOfValues()):
            series = slicer.mrmlScene.GetNodeByID(seriesIds.GetValue(i))
            points = selections.GetItemAsObject(i)
            if series is None or points is None or points.GetNumberOfTuples() == 0 or not series.GetAttribute(PLANE_ATTRIBUTE):
                continue
            try:
                ras = self.logic.jumpToSlice(series, int(points.GetValue(0)))
            except RaptorError as exc:
                self.ui.statusLabel.text = str(exc)
                return
            self.ui.statusLabel.text = _("{plane} slice {index} at R {r:.1f}, A {a:.1f}, S {s:.1f}").format(
                plane=series.GetAttribute(PLANE_ATTRIBUTE), index=int(points.GetValue(0)), r=ras[0], a=ras[1], s=ras[2]
            )
            return

    # -- fit -----------------------------------------------------------------

    def onFitButton(self) -> None:
        p = self._parameterNode
        try:
            grid = parse_grid(p.fitCGrid) if p.fitCGrid.strip() else PAPER_C_GRID
            if not dependencies.ensure_server_dependencies(self.logic.compute):
                self.ui.fitResultLabel.text = _("Installation cancelled.")
                return
            self.logic.fit(p.fitEmbeddings, p.fitLabels, p.fitOutput, model=p.fitModel, select=p.fitSelect, cGrid=grid,
                           threshold=p.fitThreshold.strip() or None,
                           classWeight=None if p.fitClassWeight == "none" else p.fitClassWeight,
                           calibrate=None if p.fitCalibrate == "none" else p.fitCalibrate,
                           completionCallback=self.onFitCompleted)
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.fitResultLabel.text = _("Fitting on the Raptor server...")
        self._pollTimer.start()
        self._checkCanRun()

    def onFitCompleted(self, job) -> None:
        if job.status == "done":
            self.ui.fitResultLabel.text = "<pre>{report}</pre>{files}".format(
                report=job.report, files=_("Written: {files}").format(files=", ".join(str(f) for f in job.files)))
            self.logic.probes = [q for q in self.logic.probes if q.path is None or str(q.path) != str(job.probe.path)]
            self.logic.probes.append(job.probe)
            self.updateProbeList(select=job.probe)
        elif job.status == "cancelled":
            self.ui.fitResultLabel.text = _("Fit cancelled; nothing was written.")
        else:
            self.ui.fitResultLabel.text = _("Failed")
            slicer.util.errorDisplay(job.error)
        self._checkCanRun()

    # -- DICOM -----------------------------------------------------------------

    def onSaveDicomButton(self) -> None:
        """The scores (and the last explanation) as DICOM SR and Parametric Map, imported beside the scan."""
        import tempfile

        from DICOMLib import DICOMUtils

        node = self._parameterNode.inputVolume
        with tempfile.TemporaryDirectory(prefix="raptor-dicom-") as folder:
            try:
                with slicer.util.WaitCursor():
                    paths = self.logic.saveToDicom(node, folder)
            except RaptorError as exc:
                slicer.util.errorDisplay(str(exc))
                return
            # copyFiles: the database keeps its own copies, so the temporary folder can go.
            if not DICOMUtils.importDicom(folder, slicer.dicomDatabase, copyFiles=True):
                slicer.util.errorDisplay(_("The DICOM results were written but could not be imported into the DICOM database."))
                return
        self.ui.statusLabel.text = _("Saved {count} DICOM object(s) to the DICOM database, beside {name}.").format(
            count=len(paths), name=node.GetName())

    def onPollTimer(self) -> None:
        if not self.logic.poll():
            self._pollTimer.stop()
            self._checkCanRun()


#
# RaptorProbeLogic
#


class RaptorProbeLogic(ScriptedLoadableModuleLogic, ProbeLogic):
    """Apply and explain probes from Slicer's Python console, scripts and the module panel.

    ``logic.loadProbe(path)``; ``logic.apply(volumeNode)`` returns the scores
    (and fills a table and a bar chart); ``logic.explain(volumeNode, probe,
    "className")`` returns the job with the heatmap volume, curve tables and
    chart.  All of it is :class:`RaptorExtension.slicerlogic.probe.ProbeLogic`.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ProbeLogic.__init__(self)

    def getParameterNode(self):
        return RaptorProbeParameterNode(super().getParameterNode())

    def _idle(self) -> None:
        """Keep Slicer responsive while a script waits for an explanation or a fit."""
        slicer.app.processEvents()

    @staticmethod
    def describeProbe(probe) -> str:
        e = probe.embedding
        test = probe.metrics.get("test") or probe.metrics.get("val") or {}
        metric = ", ".join(f"{k} {test[k]:.3f}" for k in ("auc", "accuracy", "r2") if test.get(k) is not None)
        text = _(
            "{task} ({model}): {classes}\nFitted on {encoder}, K={k}, seed {seed}, grid {grid}, preset {preset}"
            "{cls}.\n{metric}"
        ).format(task=probe.task, model=probe.model, classes=", ".join(probe.classes), encoder=e.get("encoder"),
                 k=e.get("k"), seed=e.get("seed"), grid=e.get("grid"), preset=e.get("preset"),
                 cls=", with CLS tokens" if e.get("keep_cls") else "", metric=f"Test: {metric}" if metric else "")
        return "\n".join([text, *ProbeLogic.describeDecisions(probe)])


#
# RaptorProbeTest
#


class RaptorProbeTest(ScriptedLoadableModuleTest):
    """The module's self-test (Reload and Test, and ctest on Slicer's build machines).

    Loading a probe and applying it to an embedding stored on a node need no
    PyTorch and always run; explaining (the model, on the local Raptor server)
    runs when PyTorch and the server's packages are installed, and otherwise
    says that it was left out, without failing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RaptorProbePanelAndApply()
        self.setUp()
        self.test_RaptorProbeExplainOnTheLocalServer()

    @staticmethod
    def _volumeWithStoredEmbedding():
        """A synthetic volume carrying an embedding written without a model, and a probe that fits it."""
        import numpy as np

        from RaptorExtension.embeddings.embedding import Embedding, build_metadata
        from RaptorExtension.probes.probe import Probe, embedding_description
        from RaptorExtension.slicerlogic.node_attributes import write_embedding

        k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 28)], indexing="ij")
        voxels = (1000 * np.exp(-3 * ((k - 0.2) ** 2 + j**2 + (i + 0.1) ** 2)) - 500).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(voxels, name="RaptorProbeSelfTest")
        meta = build_metadata(encoder="selftest", weight_sha256="0" * 64, k=2, seed=0, projection_sha256="1" * 64,
                              planes=["axial", "coronal", "sagittal"], grid=24, image_size=56, preset="minmax",
                              keep_cls=False, shape=[3, 2, 2, 2], n_features=24, id="self")
        write_embedding(volumeNode, Embedding(np.linspace(-1, 1, 24, dtype=np.float32), meta))
        rng = np.random.default_rng(0)
        probe = Probe(task="binary", model="logistic", classes=["normal", "finding"], label_columns=["y"],
                      feature_mean=np.zeros(24), feature_scale=np.ones(24), weight=rng.normal(size=(1, 24)),
                      bias=np.zeros(1), embedding=embedding_description(meta), name="selftest")
        path = os.path.join(slicer.app.temporaryPath, "RaptorProbeSelfTest.raptorprobe")
        probe.save(path)
        return volumeNode, path

    def test_RaptorProbePanelAndApply(self):
        """The panel builds; a probe file loads and applies to the stored embedding: table, chart, scores."""
        self.delayDisplay("Panel, probe file, apply")
        slicer.util.selectModule("RaptorProbe")
        widget = slicer.modules.RaptorProbeWidget
        self.assertFalse(widget.ui.fitButton.enabled)  # unset paths are unset, whatever the fields show
        volumeNode, path = self._volumeWithStoredEmbedding()
        logic = RaptorProbeLogic()
        logic.loadProbe(path)
        results = logic.apply(volumeNode)
        self.assertEqual(len(results), 1)
        self.assertAlmostEqual(float(results[0].scores.sum()), 1.0, places=6)
        table, chart = logic.scoresNodes
        self.assertEqual(table.GetNumberOfRows(), 2)
        self.assertFalse(chart.GetYAxisRangeAuto())
        self.delayDisplay("Test passed")

    def test_RaptorProbeExplainOnTheLocalServer(self):
        """Embed with a tiny random model on the local server, then explain a probe fitted to its settings."""
        import numpy as np

        from RaptorExtension.encoding.settings import EmbedSettings
        from RaptorExtension.probes.probe import Probe, embedding_description
        from RaptorExtension.server.launcher import self_test_model

        if not dependencies.dependencies_ready():
            self.delayDisplay("PyTorch and the server's packages are not installed: the explanation part of the "
                              "self-test was left out (everything else passed)")
            return
        self.delayDisplay("Explaining on the local Raptor server")
        folder = self_test_model(os.path.join(slicer.app.temporaryPath, "RaptorSelfTestModel"))
        import RaptorEmbed

        volumeNode, _path = self._volumeWithStoredEmbedding()
        volumeNode.RemoveAttribute("Raptor.Embedding")
        volumeNode.RemoveAttribute("Raptor.Metadata")
        settings = EmbedSettings(model=folder, k=8, seed=0, grid=24, preset="minmax", device="cpu", batch_size=8)
        embedding = RaptorEmbed.RaptorEmbedLogic().embed(volumeNode, settings, waitForCompletion=True)
        n = embedding.vector.size
        rng = np.random.default_rng(0)
        probe = Probe(task="binary", model="logistic", classes=["normal", "finding"], label_columns=["y"],
                      feature_mean=rng.normal(size=n), feature_scale=np.ones(n), weight=rng.normal(size=(1, n)),
                      bias=np.zeros(1), embedding=embedding_description(embedding.metadata), name="selftest")
        path = os.path.join(slicer.app.temporaryPath, "RaptorProbeSelfTestExplain.raptorprobe")
        probe.save(path)
        logic = RaptorProbeLogic()
        logic.loadProbe(path)
        job = logic.explain(volumeNode, logic.probes[0], "finding")
        ex = job.explanation
        self.assertLess(abs(ex.decision - (ex.bias + ex.total)), 1e-4)
        heatmap = job.nodes["heatmap"]
        self.assertEqual(slicer.util.arrayFromVolume(heatmap).shape, slicer.util.arrayFromVolume(volumeNode).shape)
        self.assertEqual(heatmap.GetAttribute("Raptor.HeatmapOf"), volumeNode.GetID())
        self.assertEqual(len(logic.jumpToSlice("axial", 3)), 3)
        self.delayDisplay("Test passed")
