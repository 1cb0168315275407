"""RaptorEmbed: click Embed on an open scan and get its Raptor embedding on the node.

The widget only gathers inputs and shows results.  Everything testable lives
in the engine package (``RaptorExtension.slicerlogic.embed.EmbedLogic``, Qt-free and
tested headless against a real MRML scene and a real Raptor server);
:class:`RaptorEmbedLogic` adds the parameter node and Slicer's event
processing to it.  The model never runs in Slicer's process: jobs go to a
Raptor server (this computer's, started on first use, or a remote one; see the
Compute section), and a timer advances them one short step at a time.
"""

import logging
import os
import sys
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
from RaptorExtension.errors import Cancelled, RaptorError  # noqa: E402
from RaptorExtension.slicerlogic.embed_job import CANCELLED, DONE, FAILED  # noqa: E402
from RaptorExtension.slicerlogic.choices import (  # noqa: E402
    DEFAULT_MODEL_CHOICE,
    DEVICE_CHOICES,
    MODEL_CHOICES,
    OTHER_MODEL_CHOICE,
    PREPROCESS_CHOICES,
    PRESET_CHOICES,
    choice_for_model,
    describe_embedding,
    settings_from_choices,
)
from RaptorExtension.slicerlogic.embed import EmbedLogic  # noqa: E402
from RaptorExtension.slicerlogic.batch import BatchLogic  # noqa: E402
from RaptorExtension.slicerlogic.node_attributes import read_embedding  # noqa: E402
from RaptorEmbedLib.ComputeSection import ComputeSection  # noqa: E402

POLL_INTERVAL_MSEC = 100
CACHE_SETTINGS_KEY = "Raptor/ModelCacheFolder"
DOCUMENTATION_URL = "https://github.com/raptor-slicer/SlicerRaptor#readme"
SAMPLE_FILE = "ct_abdomen_sample.nrrd"
SAMPLE_SHA256 = "10fde76e9c13b568635d84227c4d05cd8d66de423c9fe2f6c39c7c66bc949e1f"


#
# RaptorEmbed
#


class RaptorEmbed(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Raptor Embed")
        self.parent.categories = ["Raptor"]
        self.parent.dependencies = []
        self.parent.contributors = ["Raptor for 3D Slicer developers (Raptor project)"]
        self.parent.helpText = _("""
Turns the selected CT or MR volume into a train-free Raptor embedding (ICML 2025, arXiv 2507.08254):
every axial, coronal and sagittal slice of the volume, resampled to an isotropic cube, goes through a
frozen DINOv2; the patch tokens are averaged per plane and projected to K values with a seeded random
matrix. The embedding is stored on the volume node (attributes <code>Raptor.Embedding</code> and
<code>Raptor.Metadata</code>), is saved with the scene, and can be exported to CSV for linear probes.
The model runs in a Raptor server (this computer's, or a GPU server: see Compute), never in Slicer itself.
""")
        self.parent.helpText += _('<p>See the <a href="{url}">documentation</a>.</p>').format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("""
Raptor: Ulzee An et al., "Raptor: Scalable Train-Free Embeddings for 3D Medical Volumes Leveraging
Pretrained 2D Foundation Models", ICML 2025. DINOv2 by Meta AI. The sample CT is derived from TCIA
Pancreatic-CT-CBCT-SEG (CC BY 4.0).
""")
        # The bundled CT in the Sample Data module, so a new user can try Embed in one click.
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataPath() -> str:
    """The bundled CT: installed beside the modules' resources, or in a checkout's top-level Resources/."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "Resources", "Samples", SAMPLE_FILE),
                      os.path.join(os.path.dirname(here), "Resources", "Samples", SAMPLE_FILE)):
        if os.path.isfile(candidate):
            return candidate
    return ""


def registerSampleData() -> None:
    """Register the bundled abdominal CT with the Sample Data module (category Raptor)."""
    import SampleData

    path = sampleDataPath()
    if not path:
        logging.warning("Raptor: the sample CT %s is missing from the installation", SAMPLE_FILE)
        return
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Raptor",
        sampleName="RaptorAbdomenCT",
        thumbnailFileName=os.path.join(iconsPath, "RaptorEmbed.png"),
        uris=qt.QUrl.fromLocalFile(path).toString(),
        fileNames=SAMPLE_FILE,
        nodeNames="RaptorAbdomenCT",
        checksums=f"SHA256:{SAMPLE_SHA256}",
        loadFileType="VolumeFile",
    )


#
# RaptorEmbedParameterNode
#


@parameterNodeWrapper
class RaptorEmbedParameterNode:
    """
    The parameters needed by module.

    inputVolume - The volume to embed.
    model - A model of the list, or "other" for the folder or hub id in otherModel.
    otherModel - A local model folder or a Hugging Face model id.
    k - Projected width K (100 = Raptor, 10 = Raptor-B).
    seed - Seed of the random projection.
    preset - Intensity preset; "auto" picks the CT window for DICOM CT, percentiles for MR.
    grid - Side of the isotropic cube in voxels.
    device - auto, cuda or cpu.
    keepCls - Also keep the mean CLS token of each plane.
    preprocess - How a slice becomes the model's image: direct (default) or reference (the paper's code).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice([*MODEL_CHOICES, OTHER_MODEL_CHOICE])] = DEFAULT_MODEL_CHOICE
    otherModel: str = ""
    k: Annotated[int, WithinRange(1, 4096)] = 100
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    preset: Annotated[str, Choice(list(PRESET_CHOICES))] = "auto"
    grid: Annotated[int, WithinRange(16, 1024)] = 256
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    keepCls: bool = False
    preprocess: Annotated[str, Choice(list(PREPROCESS_CHOICES))] = "direct"


#
# RaptorEmbedWidget
#


class RaptorEmbedWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
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

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RaptorEmbed.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. In Qt designer the top-level qMRMLWidget's
        # "mrmlSceneChanged(vtkMRMLScene*)" signal is connected to each MRML widget's
        # "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RaptorEmbedLogic()

        # Jobs run on the Raptor server; this timer advances them one short step at a time.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MSEC)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.embedButton.connect("clicked(bool)", self.onEmbedButton)
        self.ui.browseModelFolderButton.connect("clicked(bool)", self.onBrowseModelFolder)
        self.ui.refreshTableButton.connect("clicked(bool)", self.updateEmbeddingsTable)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.openCacheButton.connect("clicked(bool)", self.onOpenCache)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelCachePathLineEdit.connect("currentPathChanged(QString)", self.onModelCacheChanged)

        # Batch: every matching series of Slicer's DICOM database into one CSV (same server, same loaded model).
        self.batchLogic = BatchLogic(self.logic)
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRunButton)
        self.ui.batchProgressBar.setVisible(False)

        # Compute: this computer or a Raptor server, shared with the Raptor Probe module.
        self.computeSection = ComputeSection(self.ui, busy=self.isBusy)

        self.ui.progressBar.setVisible(False)
        self.restoreModelCacheFolder()
        self.updateDependencyInformation()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel("Slicer is closing")
        if getattr(self, "batchLogic", None) is not None and self.batchLogic.isRunning():
            self.batchLogic.cancel()  # finished rows are already on disk; a rerun resumes
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.computeSection.refresh()  # the other Raptor module may have changed where jobs run
        self.updateEmbeddingsTable()

    def exit(self) -> None:
        """Called each time the user opens a different module. A running embedding goes on."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanEmbed)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed (the logic cancels a running job itself)."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

        # Default input: the volume shown in the red slice view, else the first scalar volume.
        if not self._parameterNode.inputVolume:
            shownVolume = self._shownVolume() or slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if shownVolume:
                self._parameterNode.inputVolume = shownVolume

    @staticmethod
    def _shownVolume():
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is None:
            return None
        volumeId = sliceWidget.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        node = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None

    def setParameterNode(self, inputParameterNode: Optional[RaptorEmbedParameterNode]) -> None:
        """Set and observe parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanEmbed)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanEmbed)
            self._checkCanEmbed()

    def isBusy(self) -> bool:
        return bool(self.logic and self.logic.isRunning()) or bool(getattr(self, "batchLogic", None) and self.batchLogic.isRunning())

    def _checkCanEmbed(self, caller=None, event=None) -> None:
        running = self.logic.isRunning()
        batching = self.batchLogic.isRunning()
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        isOther = bool(self._parameterNode and self._parameterNode.model == OTHER_MODEL_CHOICE)
        self.ui.otherModelLineEdit.enabled = isOther
        self.ui.browseModelFolderButton.enabled = isOther
        if running:
            self.ui.embedButton.text = _("Cancel")
            self.ui.embedButton.toolTip = _("Stop the running embedding; nothing is written to the volume")
            self.ui.embedButton.enabled = True
        else:
            self.ui.embedButton.text = _("Embed")
            self.ui.embedButton.enabled = hasInput and not batching
            if batching:
                self.ui.embedButton.toolTip = _("A batch is running; embed single volumes once it ends")
            else:
                self.ui.embedButton.toolTip = (
                    _("Embed the selected volume (runs in the background)") if hasInput else _("Select a volume to embed")
                )
        self.ui.clearCacheButton.enabled = bool(self.logic.cachedModels()) and not (running or batching)
        self.ui.importModelButton.enabled = not (running or batching)
        if hasInput:
            self.showStoredEmbedding(self._parameterNode.inputVolume)

    # -- embedding -------------------------------------------------------------

    def onEmbedButton(self) -> None:
        """Embed, or cancel the running embedding (the button turns into Cancel while it runs)."""
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling (stops before the next batch of slices)...")
            return
        try:
            if not self.logic.ensureServerDependencies():
                self.ui.statusLabel.text = _("Installation cancelled: the local Raptor server needs PyTorch and its packages.")
                return
            settings = self.logic.settingsFromParameterNode(self._parameterNode)
            with slicer.util.WaitCursor():  # copies the voxels; the sending happens in the timer's steps
                EmbedLogic.embed(
                    self.logic,
                    self._parameterNode.inputVolume,
                    settings,
                    progressCallback=self.onProgress,
                    completionCallback=self.onCompleted,
                )
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        except Exception as exc:
            logging.exception("Raptor could not start")
            slicer.util.errorDisplay(_("Raptor could not start: {error}").format(error=exc))
            return
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first slice count arrives
        self.ui.statusLabel.text = _("Starting...")
        self._pollTimer.start()
        self._checkCanEmbed()

    def onPollTimer(self) -> None:
        embedding = self.logic.poll()
        batch = self.batchLogic.poll()
        if not (embedding or batch):
            self._pollTimer.stop()
            self._checkCanEmbed()

    # -- batch -----------------------------------------------------------------

    def onBatchRunButton(self) -> None:
        """Run the batch over Slicer's DICOM database, or cancel it (the button turns into Cancel)."""
        if self.batchLogic.isRunning():
            self.batchLogic.cancel()
            self.ui.batchStatusLabel.text = _("Cancelling; finished series stay in the CSV and a rerun resumes...")
            return
        csvPath = self.ui.batchOutputPathLineEdit.currentPath
        if not csvPath:
            slicer.util.errorDisplay(_("Choose the output CSV file first."))
            return
        if self.logic.isRunning():
            slicer.util.errorDisplay(_("An embedding is running; start the batch once it ends."))
            return
        try:
            if not self.logic.ensureServerDependencies():
                self.ui.batchStatusLabel.text = _("Installation cancelled.")
                return
            settings = self.logic.settingsFromParameterNode(self._parameterNode)
            modalities = [m for m in self.ui.batchModalitiesLineEdit.text.replace(" ", "").split(",") if m]
            database = getattr(slicer, "dicomDatabase", None)
            if database is None or not database.isOpen:
                raise RaptorError(_("Slicer's DICOM database is not open: open the DICOM module once, then run the batch."))
            # The server lists the database's series itself: nothing here walks a large database on the main thread.
            self.batchLogic.startDatabase(
                database.databaseFilename,
                csvPath,
                settings,
                modalities=modalities,
                minSlices=self.ui.batchMinSlicesSpinBox.value,
                description=self.ui.batchDescriptionLineEdit.text or None,
                anonymizeSalt=self.ui.batchSaltLineEdit.text or None,
                progressCallback=self.onBatchProgress,
                completionCallback=self.onBatchCompleted,
            )
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.batchProgressBar.setVisible(True)
        self.ui.batchProgressBar.setRange(0, 0)
        self.ui.batchRunButton.text = _("Cancel batch")
        self.ui.batchStatusLabel.text = _("Listing the DICOM database's series...")
        self._pollTimer.start()
        self._checkCanEmbed()

    def onBatchProgress(self, progress) -> None:
        if progress.total:
            self.ui.batchProgressBar.setRange(0, progress.total)
            self.ui.batchProgressBar.setValue(progress.finished + progress.skipped)
        eta = progress.eta_seconds
        self.ui.batchStatusLabel.text = _(
            "{phase}: {done} done, {skipped} already done, {failed} failed of {total}; {rate:.2f} volumes/s{eta}"
        ).format(phase=progress.phase, done=progress.done, skipped=progress.skipped, failed=progress.failed,
                 total=progress.total, rate=progress.volumes_per_second,
                 eta=(_(", about {m:.0f} min left").format(m=eta / 60) if eta else ""))

    def onBatchCompleted(self, run) -> None:
        self.ui.batchProgressBar.setVisible(False)
        self.ui.batchRunButton.text = _("Run batch")
        if run.error:
            self.ui.batchStatusLabel.text = _("Batch failed")
            slicer.util.errorDisplay(run.error)
        elif run.summary is not None:
            self.ui.batchStatusLabel.text = _("{status}: {line}. Errors, if any: {errors}").format(
                status=run.status.capitalize(), line=run.summary.line(), errors=run.summary.errors_csv)
        else:
            self.ui.batchStatusLabel.text = _("Batch {status}").format(status=run.status)
        self._checkCanEmbed()

    def onProgress(self, progress) -> None:
        if progress.total:
            self.ui.progressBar.format = f"%v / %m {progress.unit}"
            self.ui.progressBar.setRange(0, progress.total)
            self.ui.progressBar.setValue(progress.done)
        else:
            self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = progress.describe()

    def onCompleted(self, job) -> None:
        self.ui.progressBar.setVisible(False)
        if job.status == DONE:
            self.ui.statusLabel.text = _("Embedded {name} in {seconds:.1f} s").format(name=job.node_name, seconds=job.seconds)
            self.updateEmbeddingsTable()
        elif job.status == CANCELLED:
            self.ui.statusLabel.text = _("Cancelled ({reason}); nothing was written to {name}").format(
                reason=job.cancel_reason, name=job.node_name
            )
        elif job.status == FAILED:
            self.ui.statusLabel.text = _("Failed")
            slicer.util.errorDisplay(job.error)
        self.updateDependencyInformation()
        self._checkCanEmbed()

    def showStoredEmbedding(self, volumeNode) -> None:
        """The summary of the embedding stored on the selected volume (model, K, shape, time, device)."""
        try:
            embedding = read_embedding(volumeNode)
        except RaptorError as exc:
            self.ui.summaryLabel.text = str(exc)
            return
        self.ui.summaryLabel.text = describe_embedding(embedding) if embedding else _("Not embedded yet.")

    def onBrowseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Model folder (Hugging Face format)"), self._parameterNode.otherModel or ""
        )
        if folder:
            self._parameterNode.otherModel = folder

    # -- results ---------------------------------------------------------------

    def updateEmbeddingsTable(self) -> None:
        if self.logic is None:
            return
        tableNode = self.logic.updateEmbeddingsTable()
        self.ui.embeddingsTableView.setMRMLTableNode(tableNode)
        self.ui.exportCsvButton.enabled = tableNode.GetNumberOfRows() > 0

    def onExportCsv(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export embeddings to CSV"), "raptor_embeddings.csv", _("CSV files (*.csv)")
        )
        if not path:
            return
        try:
            with slicer.util.WaitCursor():
                written = self.logic.exportCSV(path)
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.statusLabel.text = _("Exported {count} volumes to {path}").format(
            count=len(self.logic.embeddedVolumeNodes()), path=written
        )

    # -- dependencies and model cache ------------------------------------------

    def updateDependencyInformation(self) -> None:
        try:
            self.ui.torchLabel.text = dependencies.torch_summary()
        except Exception as exc:  # a broken torch install must not break the panel
            self.ui.torchLabel.text = _("PyTorch cannot be loaded ({error})").format(error=exc)
        self.ui.installDependenciesButton.enabled = not dependencies.dependencies_ready()
        self.updateCachedModels()

    def onInstallDependencies(self) -> None:
        try:
            with slicer.util.WaitCursor():
                ready = dependencies.ensure_dependencies(askConfirmation=True)
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            ready = False
        if not ready:
            self.ui.statusLabel.text = _("Installation cancelled; Raptor's dependencies are not installed yet.")
        self.updateDependencyInformation()

    def restoreModelCacheFolder(self) -> None:
        folder = qt.QSettings().value(CACHE_SETTINGS_KEY, "")
        if folder:
            try:
                self.logic.setModelCacheFolder(folder)
            except RaptorError as exc:
                logging.warning("Raptor: %s; using the default model cache", exc)
        self.ui.modelCachePathLineEdit.currentPath = str(self.logic.modelCacheFolder())

    def onModelCacheChanged(self, path) -> None:
        if not path or os.path.normpath(path) == os.path.normpath(str(self.logic.modelCacheFolder())):
            return
        try:
            folder = self.logic.setModelCacheFolder(path)
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            self.ui.modelCachePathLineEdit.currentPath = str(self.logic.modelCacheFolder())
            return
        qt.QSettings().setValue(CACHE_SETTINGS_KEY, str(folder))
        self.updateCachedModels()

    def updateCachedModels(self) -> None:
        models = self.logic.cachedModels()
        if not models:
            self.ui.cachedModelsLabel.text = _("No models cached yet; the chosen model is downloaded on first use.")
        else:
            self.ui.cachedModelsLabel.text = "\n".join(
                f"{m.repo_id} ({m.size_bytes / 1024**3:.2f} GB)" for m in models
            )
        self.ui.clearCacheButton.enabled = bool(models)

    def onOpenCache(self) -> None:
        folder = self.logic.modelCacheFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCache(self) -> None:
        if self.isBusy():
            slicer.util.errorDisplay(_("A job is running; clear the model cache once it ends."))
            return
        models = self.logic.cachedModels()
        if not models:
            return
        listing = "\n".join(f"{m.repo_id} ({m.size_bytes / 1024**3:.2f} GB)" for m in models)
        if not slicer.util.confirmOkCancelDisplay(
            _("Delete these cached models? They are downloaded again when needed.\n\n{listing}").format(listing=listing),
            windowTitle=_("Clear model cache"),
        ):
            return
        try:
            removed = self.logic.clearModelCache()
        except (RaptorError, OSError) as exc:
            slicer.util.errorDisplay(_("Could not clear the model cache: {error}").format(error=exc))
            return
        self.ui.statusLabel.text = _("Removed {count} cached models").format(count=len(removed))
        self.updateCachedModels()

    def onImportModel(self) -> None:
        """Air-gapped sites: copy a model folder (downloaded elsewhere) into the cache."""
        from RaptorExtension.encoding.model_cache import default_repo_id
        from pathlib import Path

        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder to import"))
        if not folder:
            return
        repoId = qt.QInputDialog.getText(
            slicer.util.mainWindow(),
            _("Import model"),
            _("Model id to register it under (e.g. facebook/dinov2-large to use it as DINOv2-L offline):"),
            qt.QLineEdit.Normal,
            default_repo_id(Path(folder)),
        )
        if not repoId:
            return
        try:
            if not self.logic.ensureServerDependencies():
                return
            with slicer.util.WaitCursor():
                modelId = self.logic.importModelFolder(folder, repoId.strip())
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._parameterNode.model, otherModel = choice_for_model(modelId)
        if otherModel:
            self._parameterNode.otherModel = otherModel
        self.ui.statusLabel.text = _("Imported {model} into the model cache").format(model=modelId)
        self.updateCachedModels()


#
# RaptorEmbedLogic
#


class RaptorEmbedLogic(ScriptedLoadableModuleLogic, EmbedLogic):
    """Embed volumes from Slicer's Python console, scripts and the module panel.

    ``RaptorEmbedLogic().embed(volumeNode, waitForCompletion=True)`` returns the
    embedding (and stores it on the node); without ``waitForCompletion`` it
    returns the running job and reports through ``progressCallback`` and
    ``completionCallback`` while something calls ``poll()`` (the module panel
    does, from a timer).  All of it is :class:`RaptorExtension.slicerlogic.embed.EmbedLogic`.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        EmbedLogic.__init__(self)

    def getParameterNode(self):
        return RaptorEmbedParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFromParameterNode(parameterNode: RaptorEmbedParameterNode):
        return settings_from_choices(
            model=parameterNode.model,
            other_model=parameterNode.otherModel,
            k=parameterNode.k,
            seed=parameterNode.seed,
            preset=parameterNode.preset,
            grid=parameterNode.grid,
            device=parameterNode.device,
            keep_cls=parameterNode.keepCls,
            preprocess=parameterNode.preprocess,
        )

    def ensureServerDependencies(self) -> bool:
        """The local server runs in Slicer's Python: install PyTorch and the packages at first use (asking).

        A remote server needs nothing here.  False when the user declined.
        """
        return dependencies.ensure_server_dependencies(self.compute, askConfirmation=True)

    def embed(self, volumeNode, settings=None, **kwargs):
        """For scripts: install what the local server needs at first use (asking the user), then embed."""
        if not self.ensureServerDependencies():
            raise RaptorError("installation cancelled: the local Raptor server needs PyTorch and its Python packages")
        return EmbedLogic.embed(self, volumeNode, settings, **kwargs)

    def _idle(self) -> None:
        """Keep Slicer responsive while a script waits for an embedding."""
        slicer.app.processEvents()


#
# RaptorEmbedTest
#


class RaptorEmbedTest(ScriptedLoadableModuleTest):
    """The module's self-test (Reload and Test, and ctest on Slicer's build machines).

    Everything that needs no PyTorch always runs: the panel, the parameter
    node, embeddings stored on a node, the table and the CSV export.  The
    model part (a tiny random DINOv2 through the local Raptor server) runs
    when PyTorch and the server's packages are installed, and otherwise says
    that it was left out, without failing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RaptorEmbedPanelAndParameters()
        self.setUp()
        self.test_RaptorEmbedStoredEmbeddingsTableAndCsv()
        self.setUp()
        self.test_RaptorEmbedThroughTheLocalServer()

    @staticmethod
    def _syntheticVolume(name):
        import numpy as np

        k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 28, 32)], indexing="ij")
        voxels = (1000 * np.exp(-3 * ((k - 0.2) ** 2 + j**2 + (i + 0.1) ** 2)) - 500).astype(np.int16)
        node = slicer.util.addVolumeFromArray(voxels, name=name)
        node.SetSpacing(0.8, 0.8, 2.5)
        return node

    def test_RaptorEmbedPanelAndParameters(self):
        """The panel builds and its parameters go to the engine's settings unchanged."""
        self.delayDisplay("Panel and parameters")
        slicer.util.selectModule("RaptorEmbed")
        widget = slicer.modules.RaptorEmbedWidget
        self.assertTrue(widget.ui.embedButton is not None and widget.ui.computeStatusLabel is not None)
        logic = RaptorEmbedLogic()
        parameters = logic.getParameterNode()
        parameters.k, parameters.seed, parameters.grid, parameters.preset, parameters.keepCls = 10, 3, 128, "ct", True
        settings = logic.settingsFromParameterNode(parameters)
        self.assertEqual((settings.k, settings.seed, settings.grid, settings.preset, settings.keep_cls), (10, 3, 128, "ct", True))
        self.assertEqual(settings.model, DEFAULT_MODEL_CHOICE)
        self.delayDisplay("Test passed")

    def test_RaptorEmbedStoredEmbeddingsTableAndCsv(self):
        """Embeddings stored on nodes (written here without a model) reach the table and the CSV export."""
        import numpy as np

        from RaptorExtension.embeddings.embedding import Embedding, build_metadata
        from RaptorExtension.embeddings.table import read_table
        from RaptorExtension.slicerlogic.node_attributes import write_embedding

        self.delayDisplay("Stored embeddings, table and CSV")
        logic = RaptorEmbedLogic()
        vectors = {}
        for name in ("SelfTestA", "SelfTestB"):
            node = self._syntheticVolume(name)
            vector = np.random.default_rng(len(name) + len(vectors)).normal(size=12).astype(np.float32)
            meta = build_metadata(encoder="selftest", weight_sha256="0" * 64, k=2, seed=0, projection_sha256="1" * 64,
                                  planes=["axial", "coronal", "sagittal"], grid=32, image_size=56, preset="minmax",
                                  keep_cls=False, shape=[3, 2, 1, 2], n_features=12, id=name)
            write_embedding(node, Embedding(vector, meta))
            vectors[name] = vector
            self.assertEqual(read_embedding(node).vector.tobytes(), vector.tobytes())
        tableNode = logic.updateEmbeddingsTable()
        self.assertEqual(tableNode.GetNumberOfRows(), 2)
        csvPath = os.path.join(slicer.app.temporaryPath, "RaptorEmbedSelfTest.csv")
        logic.exportCSV(csvPath)
        table = read_table(csvPath)
        self.assertEqual(table.ids, ["SelfTestA", "SelfTestB"])
        self.assertEqual(table.features[1].tobytes(), vectors["SelfTestB"].tobytes())
        self.delayDisplay("Test passed")

    def test_RaptorEmbedThroughTheLocalServer(self):
        """Embed with a tiny random model on the local Raptor server; cancel a second run."""
        import time

        from RaptorExtension.encoding.settings import EmbedSettings
        from RaptorExtension.server.launcher import self_test_model
        from RaptorExtension.slicerlogic.node_attributes import has_embedding

        if not dependencies.dependencies_ready():
            self.delayDisplay("PyTorch and the server's packages are not installed: the model part of the self-test "
                              "was left out (everything else passed)")
            return
        self.delayDisplay("Embedding on the local Raptor server")
        folder = self_test_model(os.path.join(slicer.app.temporaryPath, "RaptorSelfTestModel"))
        settings = EmbedSettings(model=folder, k=8, seed=0, grid=32, device="cpu", batch_size=8)
        logic = RaptorEmbedLogic()
        volumeNode = self._syntheticVolume("RaptorSelfTest")
        embedding = logic.embed(volumeNode, settings, waitForCompletion=True)
        stored = read_embedding(volumeNode)
        self.assertEqual(stored.vector.tobytes(), embedding.vector.tobytes())
        self.assertEqual(stored.metadata["k"], 8)

        other = self._syntheticVolume("RaptorSelfTestCancel")
        finished = []
        job = logic.embed(other, settings, completionCallback=finished.append)
        logic.cancel()
        while logic.poll():
            slicer.app.processEvents()
            time.sleep(0.01)
        self.assertEqual(finished, [job])
        self.assertEqual(job.status, CANCELLED)
        self.assertFalse(has_embedding(other))
        with self.assertRaises(Cancelled):
            logic.embed(other, settings, waitForCompletion=True, cancel=_AlreadySet())
        self.assertFalse(has_embedding(other))
        self.delayDisplay("Test passed")


class _AlreadySet:
    """A cancel token that is set from the start (the run stops before its first batch)."""

    def is_set(self) -> bool:
        return True
