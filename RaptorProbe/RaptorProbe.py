"""RaptorProbe: class scores for the selected volume, and where in the volume they come from.

Load probe files (``.raptorprobe``, from ``raptor probe fit`` or the Fit panel),
apply them to the selected volume (embedded first with RaptorEmbed when it has
no embedding) and see the scores in a table and a bar chart.  Explain shows the
exact decomposition of a linear probe's logit: a heatmap over the volume (the
foreground layer of the slice views) and the three slice curves in a plot;
clicking a point of a curve moves the slice views to that slice.

The widget only gathers inputs and shows results.  Everything testable lives
in the engine package (``RaptorExtension.slicerlogic.probe.ProbeLogic``, Qt-free and
tested headless against a real MRML scene).
"""

import concurrent.futures
import logging
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
from RaptorExtension.slicerlogic.probe import PLANE_ATTRIBUTE, ProbeLogic  # noqa: E402

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
        self.parent.dependencies = []
        self.parent.contributors = ["Raptor contributors"]
        self.parent.helpText = _("""
Applies probes (small models fitted on Raptor embeddings) to the selected volume and shows class scores in a
table and a bar chart. <b>Explain</b> splits a linear probe's logit exactly into the contribution of every
slice of the three planes and every 16x16 patch: the heatmap (red adds to the class, blue takes away) is shown
over the volume, the three slice curves in a plot; click a curve point to move the slice views there.
A probe only accepts embeddings made with the settings it was fitted on (model weights, K, seed, grid, preset).
""")
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
        self._fitExecutor = None
        self._fitFuture = None
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

        # The explain worker and the fit worker report through queues/futures; this timer checks them.
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

        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()
        self.updateProbeList()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._disconnectPlotView()
        if self._fitExecutor is not None:
            self._fitExecutor.shutdown(wait=False)
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: a running explanation is dropped."""
        self.logic.cancel()
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

    def _checkCanRun(self, caller=None, event=None) -> None:
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        hasProbes = bool(self.logic.probes)
        running = self.logic.job is not None and not self.logic.job.finished
        self.ui.applyButton.enabled = hasInput and hasProbes and not running
        if running:
            self.ui.explainButton.text = _("Cancel")
            self.ui.explainButton.enabled = True
        else:
            self.ui.explainButton.text = _("Explain")
            self.ui.explainButton.enabled = hasInput and self.ui.explainProbeComboBox.count > 0
        fitting = self._fitFuture is not None and not self._fitFuture.done()
        p = self._parameterNode
        self.ui.fitButton.enabled = bool(p and p.fitEmbeddings and p.fitLabels and p.fitOutput) and not fitting
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
        self.ui.statusLabel.text = "; ".join(f"{r.probe.name}: {r.predicted}" for r in results)

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
            if not dependencies.ensure_dependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Raptor needs PyTorch and its Python packages; they were not installed.")
                return
            self.logic.explain(
                self._parameterNode.inputVolume,
                probe,
                self.ui.explainClassComboBox.currentText or None,
                waitForCompletion=False,
                progressCallback=self.onExplainProgress,
                completionCallback=self.onExplainCompleted,
                model=self._parameterNode.modelOverride or None,
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
            self.logic.showHeatmap(self._parameterNode.inputVolume, self._heatmapNode, self._parameterNode.heatmapOpacity)
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

        qMRMLPlotView reports clicks through ``dataSelected(vtkStringArray*, vtkCollection*)``
        when the plot view is in point-selection mode.
        """
        layoutManager = slicer.app.layoutManager()
        plotWidget = layoutManager.plotWidget(0) if layoutManager else None
        if plotWidget is None:
            return
        plotView = plotWidget.plotView()
        if plotView is self._plotView:
            return
        self._disconnectPlotView()
        plotWidget.mrmlPlotViewNode().SetInteractionMode(slicer.vtkMRMLPlotViewNode.InteractionModeSelectPoints)
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
            if not dependencies.ensure_dependencies(askConfirmation=True):
                return
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if self._fitExecutor is None:
            self._fitExecutor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="raptor-fit")
        self._fitFuture = self._fitExecutor.submit(
            self.logic.fitAndSave, str(p.fitEmbeddings), str(p.fitLabels), str(p.fitOutput), p.fitModel, p.fitSelect,
            p.fitCGrid
        )
        self.ui.fitResultLabel.text = _("Fitting...")
        self._pollTimer.start()
        self._checkCanRun()

    def _checkFit(self) -> bool:
        """Main thread: show the finished fit; True while it runs."""
        if self._fitFuture is None:
            return False
        if not self._fitFuture.done():
            return True
        future, self._fitFuture = self._fitFuture, None
        try:
            probe, table = future.result()
        except RaptorError as exc:
            self.ui.fitResultLabel.text = _("Failed")
            slicer.util.errorDisplay(str(exc))
        except Exception as exc:
            logging.exception("Raptor probe fit failed")
            slicer.util.errorDisplay(_("Fitting failed: {error}").format(error=exc))
        else:
            self.ui.fitResultLabel.text = f"<pre>{table}</pre>"
            self.logic.probes = [q for q in self.logic.probes if q.path is None or str(q.path) != str(probe.path)]
            self.logic.probes.append(probe)
            self.updateProbeList(select=probe)
        self._checkCanRun()
        return False

    def onPollTimer(self) -> None:
        explaining = self.logic.poll()
        fitting = self._checkFit()
        if not explaining and not fitting:
            self._pollTimer.stop()


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

    @staticmethod
    def describeProbe(probe) -> str:
        e = probe.embedding
        test = probe.metrics.get("test") or probe.metrics.get("val") or {}
        metric = ", ".join(f"{k} {test[k]:.3f}" for k in ("auc", "accuracy", "r2") if test.get(k) is not None)
        return _(
            "{task} ({model}): {classes}\nFitted on {encoder}, K={k}, seed {seed}, grid {grid}, preset {preset}"
            "{cls}.\n{metric}"
        ).format(task=probe.task, model=probe.model, classes=", ".join(probe.classes), encoder=e.get("encoder"),
                 k=e.get("k"), seed=e.get("seed"), grid=e.get("grid"), preset=e.get("preset"),
                 cls=", with CLS tokens" if e.get("keep_cls") else "", metric=f"Test: {metric}" if metric else "")

    @staticmethod
    def fitAndSave(embeddings: str, labels: str, output: str, model: str = "auto", select: str = "val",
                   cGrid: str = ""):
        """Fit a probe with the engine (worker thread: no MRML), save it; returns (probe, metrics table + warnings)."""
        from RaptorExtension.probes.metrics import metrics_table
        from RaptorExtension.probes.probe import (
            PAPER_C_GRID,
            FitOptions,
            fit_probe,
            load_embeddings,
            parse_grid,
            read_labels,
        )

        grid = parse_grid(cGrid) if cGrid.strip() else PAPER_C_GRID
        result = fit_probe(load_embeddings([embeddings]), read_labels(labels),
                           FitOptions(model=model, select=select, c_grid=grid))
        result.probe.name = Path(output).name.removesuffix(".raptorprobe")
        result.probe.save(output)
        table = metrics_table(result.probe.metrics, result.probe.task)
        return result.probe, "\n".join([table, *(f"Warning: {w}" for w in result.warnings)])


#
# RaptorProbeTest
#


class RaptorProbeTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_RaptorProbeApplyAndExplain()

    def test_RaptorProbeApplyAndExplain(self):
        """Embed a synthetic volume with a tiny random model, fit-free random probe, apply and explain it."""
        import numpy as np

        if not dependencies.dependencies_ready():
            self.skipTest("PyTorch or Raptor's Python packages are not installed")
        self.delayDisplay("Starting the test")
        from RaptorExtension.encoding.model import encoder_from_model, random_dinov2
        from RaptorExtension.slicerlogic.node_attributes import write_embedding
        from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
        from RaptorExtension.probes.probe import Probe, embedding_description
        from RaptorExtension.volumes.slicer_io import volume_from_node

        model = random_dinov2(hidden_size=32, layers=2, heads=2, image_size=56, seed=0)
        encoder = encoder_from_model(model, "raptor-selftest/random-dinov2", device="cpu", image_size=56)
        settings = EmbedSettings(model=encoder.name, k=8, seed=0, grid=24, preset="minmax", device="cpu", batch_size=8)
        embedder = Embedder(settings, encoder=encoder)

        k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 28)], indexing="ij")
        voxels = (1000 * np.exp(-3 * ((k - 0.2) ** 2 + j**2 + (i + 0.1) ** 2)) - 500).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(voxels, name="RaptorProbeSelfTest")
        write_embedding(volumeNode, embedder.embed_volume(volume_from_node(volumeNode, id="self", source="self")))

        rng = np.random.default_rng(0)
        n = embedder.n_features
        probe = Probe(task="binary", model="logistic", classes=["normal", "finding"], label_columns=["y"],
                      feature_mean=rng.normal(size=n), feature_scale=np.ones(n), weight=rng.normal(size=(1, n)),
                      bias=np.zeros(1), embedding=embedding_description(embedder.settings_metadata("minmax")),
                      name="selftest")
        path = os.path.join(slicer.app.temporaryPath, "RaptorProbeSelfTest.raptorprobe")
        probe.save(path)

        logic = RaptorProbeLogic()
        logic.embedderProvider = lambda wanted: Embedder(wanted, encoder=encoder)
        logic.loadProbe(path)
        results = logic.apply(volumeNode)
        self.assertEqual(len(results), 1)
        self.assertAlmostEqual(float(results[0].scores.sum()), 1.0, places=6)
        job = logic.explain(volumeNode, logic.probes[0], "finding")
        ex = job.explanation
        self.assertLess(abs(ex.decision - (ex.bias + ex.total)), 1e-4)
        heatmap = job.nodes["heatmap"]
        self.assertEqual(slicer.util.arrayFromVolume(heatmap).shape, voxels.shape)
        self.assertEqual(heatmap.GetAttribute("Raptor.HeatmapOf"), volumeNode.GetID())
        ras = logic.jumpToSlice("axial", 3)
        self.assertEqual(len(ras), 3)
        self.delayDisplay("Test passed")
