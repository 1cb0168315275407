"""The "Compute" section both Raptor modules show: where jobs run, a Test button, Unload.

Both panels drive one shared :class:`RaptorExtension.slicerlogic.compute.Compute`,
so an Embed, an Explain and a Batch share one Raptor server and its loaded
model.  The choice is kept in Slicer's application settings for this user.
Everything that can be tested without Qt lives in the engine
(``slicerlogic/compute.py``); this class only connects the widgets.
"""

import qt

import slicer
from slicer.i18n import tr as _

from RaptorExtension.errors import RaptorError
from RaptorExtension.slicerlogic.compute import LOCAL, REMOTE, describe_health, shared_compute

MODE_KEY = "Raptor/ComputeMode"
URL_KEY = "Raptor/ServerURL"
TOKEN_KEY = "Raptor/ServerToken"


class ComputeSection:
    """Connects a panel's Compute widgets to the shared compute; ``busy()`` says whether a job of the panel runs."""

    def __init__(self, ui, busy) -> None:
        self.ui = ui
        self.busy = busy
        self._testTimer = None  # polls a Test while the local server starts
        settings = qt.QSettings()
        remote = settings.value(MODE_KEY, LOCAL) == REMOTE
        self.ui.remoteComputeRadioButton.checked = remote
        self.ui.localComputeRadioButton.checked = not remote
        self.ui.serverUrlLineEdit.text = settings.value(URL_KEY, "")
        self.ui.serverTokenLineEdit.text = settings.value(TOKEN_KEY, "")
        self.apply(quiet=True)
        self.ui.localComputeRadioButton.connect("toggled(bool)", lambda _checked: self.apply())
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.apply)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.apply)
        self.ui.testServerButton.connect("clicked(bool)", self.onTest)
        self.ui.unloadModelButton.connect("clicked(bool)", self.onUnload)

    def refresh(self) -> None:
        """Show the shared choice, which the other Raptor module may have changed (called from ``enter``).

        Without this, a panel opened after the other module switched servers would
        still show the old choice, and editing one of its fields would switch back.
        """
        compute = shared_compute()
        remote = not compute.is_local
        widgets = (self.ui.remoteComputeRadioButton, self.ui.localComputeRadioButton,
                   self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit)
        for widget in widgets:
            widget.blockSignals(True)
        try:
            self.ui.remoteComputeRadioButton.checked = remote
            self.ui.localComputeRadioButton.checked = not remote
            if remote:
                self.ui.serverUrlLineEdit.text = compute.url
                self.ui.serverTokenLineEdit.text = compute.token or ""
            self.ui.serverUrlLineEdit.enabled = remote
            self.ui.serverTokenLineEdit.enabled = remote
        finally:
            for widget in widgets:
                widget.blockSignals(False)
        if self._testTimer is None:
            self.showWhere()

    @property
    def isLocal(self) -> bool:
        return shared_compute().is_local

    def apply(self, quiet: bool = False) -> None:
        """Use what the widgets say (refused while a job runs: it keeps its server)."""
        remote = bool(self.ui.remoteComputeRadioButton.checked)
        self.ui.serverUrlLineEdit.enabled = remote
        self.ui.serverTokenLineEdit.enabled = remote
        mode, url, token = (REMOTE if remote else LOCAL), self.ui.serverUrlLineEdit.text, self.ui.serverTokenLineEdit.text
        compute = shared_compute()
        if (compute.mode, compute.url, compute.token or "") == (mode, url.strip(), token.strip()):
            self.showWhere()
            return
        if self.busy():
            self.ui.computeStatusLabel.text = _("A job is running; the new choice applies once it ends.")
            return
        if remote and not url.strip():
            self.ui.computeStatusLabel.text = _("Enter the Raptor server's address, e.g. https://gpu-host:8765.")
            return
        try:
            compute.configure(mode, url, token)
        except RaptorError as exc:
            self.ui.computeStatusLabel.text = str(exc)
            if not quiet:
                slicer.util.errorDisplay(str(exc))
            return
        settings = qt.QSettings()
        settings.setValue(MODE_KEY, mode)
        settings.setValue(URL_KEY, url.strip())
        settings.setValue(TOKEN_KEY, token.strip())
        self.showWhere()

    def showWhere(self) -> None:
        compute = shared_compute()
        if compute.is_local:
            self.ui.computeStatusLabel.text = _("Jobs run on this computer (a Raptor server is started on first use).")
        else:
            self.ui.computeStatusLabel.text = _("Jobs run on the Raptor server at {url}.").format(url=compute.url)

    def onTest(self) -> None:
        """Connect (starting the local server if needed) and show version, devices and the loaded model.

        A local server takes seconds to start: the answer is polled from a timer
        rather than waited for, so the interface stays responsive meanwhile.
        """
        self.apply()
        self.ui.testServerButton.enabled = False
        self.ui.computeStatusLabel.text = _("Connecting to the Raptor server...")
        self._testTimer = qt.QTimer()
        self._testTimer.setInterval(250)
        self._testTimer.connect("timeout()", self._pollTest)
        self._testTimer.start()
        self._pollTest()

    def _pollTest(self) -> None:
        compute = shared_compute()
        try:
            info = compute.try_health()
        except RaptorError as exc:
            self._endTest()
            self.ui.computeStatusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc))
            return
        if info is None:
            self.ui.computeStatusLabel.text = _("Starting the Raptor server on this computer...")
            return
        self._endTest()
        self.ui.computeStatusLabel.text = describe_health(info, compute.where())

    def _endTest(self) -> None:
        timer, self._testTimer = getattr(self, "_testTimer", None), None
        if timer is not None:
            timer.stop()
        self.ui.testServerButton.enabled = True

    def onUnload(self) -> None:
        if self.busy():
            slicer.util.errorDisplay(_("A job is running; unload the model once it ends."))
            return
        try:
            with slicer.util.WaitCursor():
                unloaded = shared_compute().unload()
        except RaptorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.computeStatusLabel.text = _("Model unloaded; the next job loads it again.") if unloaded else _(
            "No model was loaded.")
