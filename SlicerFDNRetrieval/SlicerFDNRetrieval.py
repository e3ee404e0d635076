"""FDN Retrieval: content-based retrieval of brain MR slices by normal and abnormal anatomy (Slicer module).

The panel encodes the four sequences of a study with a feature decomposing network (FDN, Kobayashi et al.
2021), shows the predicted abnormal segmentation and the normal-appearing reconstruction, and finds the most
similar slices of a reference database by normal anatomy, abnormal anatomy or both.

This file is the thin Slicer shell: all computing and all scene changes live in the Qt-free library
``FDNRetrievalLib`` (next to this file), which takes the scene as an argument and is tested without Slicer.
Third-party packages (numpy, torch, fdn_core) are imported inside functions, after the first-use install,
and heavy work (package checks, hashing, resampling, the first ``import torch``, encoding, searching,
building the demo database) runs in a worker thread (``FDNRetrievalLib.tasks``).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

log = logging.getLogger(__name__)

MODULE_DIR = pathlib.Path(__file__).resolve().parent
SEQUENCES = ("t1", "t1ce", "t2", "flair")
STANDARD_VIEWS = ("Red", "Green", "Yellow")
TITLE = "FDN Retrieval"
SAMPLE_CATEGORY = "FDN Retrieval"
#: The search's lesion filter: parameter value -> the panel's item text (fdn_core.labels.LESION_FILTER_LABELS;
#: a test keeps them equal: this file cannot import fdn_core at load time).
LESION_CHOICES = {"any": "any slice", "without": "without lesion", "with": "with lesion"}


def versionProblem() -> str | None:
    """Why this Slicer cannot run the module (older than 5.10, Python older than 3.11), or None."""
    from FDNRetrievalLib.compat import version_problem

    return version_problem((int(slicer.app.majorVersion), int(slicer.app.minorVersion)))


def demoRoot() -> pathlib.Path:
    """Where the demo cohort and database are built: a folder in Slicer's cache (removable from the panel)."""
    return pathlib.Path(slicer.app.cachePath) / "FDNRetrieval"


#
# Module
#


class SlicerFDNRetrieval(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = TITLE
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerFDNRetrieval developers"]
        self.parent.helpText = (
            "Find brain MR slices that look alike in their normal anatomy, their abnormal anatomy (tumour), "
            "or both. Pick the four sequences of a study, press Encode, scroll the query view (or the red "
            "view) to a slice and press Search ('References' limits the results to slices without, or with, "
            "a lesion). No database yet? Press 'Build demo database'. See the "
            '<a href="https://github.com/SlicerFDNRetrieval/SlicerFDNRetrieval#use-in-3d-slicer">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Implements the feature decomposing network of Kobayashi K. et al., 'Decomposing Normal and "
            "Abnormal Features of Medical Images into Discrete Latent Codes for Content-Based Image "
            "Retrieval' (2021), arXiv:2103.12328. Research use only: not a medical device."
        )
        problem = versionProblem()
        if problem:
            log.error(problem)
            self.parent.helpText = f"<b>{problem}</b><br><br>{self.parent.helpText}"
            return
        # The demo cases built on this computer are offered as Sample Data once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the demo's phantom cases in the Sample Data module (reads ``demo.json`` only)."""
    import SampleData

    from FDNRetrievalLib import demo

    for study in demo.demo_sample_studies(demoRoot()):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=f"FDN phantom {study.case_id}",
            uris=study.uris,
            fileNames=study.file_names,
            nodeNames=study.node_names,
            checksums=study.checksums,
            thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "SlicerFDNRetrieval.png"),
        )


def unregisterSampleData() -> None:
    """Forget the demo's Sample Data entries (after the demo was removed)."""
    sources = getattr(slicer.modules, "sampleDataSources", None)
    if isinstance(sources, dict):
        sources.pop(SAMPLE_CATEGORY, None)


#
# Parameter node
#


@parameterNodeWrapper
class SlicerFDNRetrievalParameterNode:
    """Everything the panel's widgets show; saved with the scene."""

    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    databasePath: pathlib.Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    minLesionMl: Annotated[float, WithinRange(0.0, 100.0)] = 2.0  # fdn_core.labels.MIN_LESION_ML (tested)
    querySlice: Annotated[int, Minimum(0)] = 0
    followView: bool = True
    mode: Annotated[str, Choice(["both", "normal", "abnormal"])] = "both"
    distance: Annotated[str, Choice(["euclidean", "angular", "hamming", "learned"])] = "euclidean"
    topK: Annotated[int, WithinRange(1, 20)] = 10
    volumeWise: bool = True
    axialContext: bool = False
    lesion: Annotated[str, Choice(["any", "without", "with"])] = "any"  # LESION_CHOICES' keys (tested)
    useCompositeQuery: bool = False
    abnormalSlice: Annotated[int, Minimum(0)] = 0
    displaySequence: Annotated[str, Choice(["flair", "t1ce", "t2", "t1"])] = "flair"
    wheelhousePath: pathlib.Path


#
# Widget
#


class SlicerFDNRetrievalWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Long work runs in a worker thread (``TaskPoller``); a fast QTimer ticks it on this thread.

    Each tick waits briefly on the worker, which releases Python's GIL that Slicer's main thread otherwise
    holds while idle (see ``FDNRetrievalLib/tasks.py`` for the measurements behind this choice).
    """

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SlicerFDNRetrievalLogic | None = None
        self._parameterNode: SlicerFDNRetrievalParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._poller: Any = None
        self._pendingHits: list[Any] = []
        self._hitSequence = "flair"
        self._follower: Any = None
        self._followingView = False
        self._timer = qt.QTimer()
        self._timer.timeout.connect(self._onTimer)
        self._demoOffered = False
        #: The last error shown to the user (read by the self-test).
        self.lastError: str | None = None
        self._detailRow: int | None = None

    # ---------------------------------------------------------------- setup and lifecycle
    def setup(self) -> None:
        """Build the panel from its .ui file and connect the widgets."""
        ScriptedLoadableModuleWidget.setup(self)
        problem = versionProblem()
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        from FDNRetrievalLib import tasks

        self._poller = tasks.TaskPoller(on_progress=self._showProgress)
        self._timer.setInterval(tasks.POLL_INTERVAL_MS)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerFDNRetrieval.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerFDNRetrievalLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.autoFillButton.clicked.connect(self.onAutoFill)
        self.ui.useDemoButton.clicked.connect(self.onUseDemo)
        self.ui.buildDemoButton.clicked.connect(self.onBuildDemo)
        self.ui.removeDemoButton.clicked.connect(self.onRemoveDemo)
        self.ui.encodeButton.clicked.connect(self.onEncode)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.fromViewButton.clicked.connect(self.onQuerySliceFromView)
        self.ui.querySliceSpinBox.valueChanged.connect(self.onQuerySliceTyped)
        self.ui.searchButton.clicked.connect(self.onSearch)
        self.ui.resultsTableView.clicked.connect(self.onResultClicked)
        self.ui.backToResultsButton.clicked.connect(self.onBackToResults)
        self.ui.installButton.clicked.connect(self.onInstall)
        self.ui.uninstallButton.clicked.connect(self.onUninstall)
        self.ui.resultsTableView.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        # "Explain" (RELAX overlay on the query slice for the result shown large): FDNRetrievalLib/explain.py
        self.explainButton = qt.QPushButton("Explain")
        self.explainButton.toolTip = (
            "Overlay on the query slice the pixels that drive its similarity to the result shown large "
            "(RELAX, 1000 masks; about 10 s on a CPU)"
        )
        self.explainButton.enabled = False
        self.explainButton.clicked.connect(self.onExplain)
        self.ui.backToResultsButton.parentWidget().layout().addWidget(self.explainButton)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()
        self._updateDemoStatus()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopWork()
        self.removeObservers()
        if self._follower is not None:
            self._follower.remove()
            self._follower = None
        if self.logic is not None:
            self.logic.clearResults()

    def enter(self) -> None:
        """Make sure the parameter node exists when the module is shown."""
        if self.logic is None:
            return
        self.initializeParameterNode()
        self._updateDemoStatus()
        self._offerDemoOnce()

    def exit(self) -> None:
        """Stop observing the parameter node when the module is hidden."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        """Forget the parameter node before the scene closes."""
        self._stopWork()
        if self._follower is not None:
            self._follower.remove()
            self._follower = None
        if self.logic is not None:
            self.logic.clearResults()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        """Make a fresh parameter node after the scene closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller: Any, event: Any, node: Any) -> None:
        """Offer a volume loaded into the scene as a sequence of the study."""
        # Volumes loaded after the module was opened pre-fill empty sequence selectors (once loading is done).
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            qt.QTimer.singleShot(0, self._autoFillEmpty)

    def initializeParameterNode(self) -> None:
        """Make (or find) the parameter node and fill in default model and database."""
        self.setParameterNode(self.logic.getParameterNode())
        self._autoFillEmpty()
        pn = self._parameterNode
        if pn is not None:
            model, database = self.logic.defaultResourcePaths()
            if model is not None and not _pathSet(pn.modelPath):
                pn.modelPath = model
            if database is not None and not _pathSet(pn.databasePath):
                pn.databasePath = database

    def setParameterNode(self, inputParameterNode: SlicerFDNRetrievalParameterNode | None) -> None:
        """Observe ``inputParameterNode`` and show its values in the panel."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            # connectGui lists the lesion filter's values ("any", ...): show their names, in the same order
            for index, label in enumerate(LESION_CHOICES.values()):
                self.ui.lesionComboBox.setItemText(index, label)
        # connectGui resets the spin boxes to 0..2^31-1 (Minimum(0) has no maximum): restore the study's range
        self._applySliceRange()
        self._updateButtons()

    def _applySliceRange(self) -> None:
        """The query and composite-slice spin boxes span the study's slices (0..Z-1), on re-entry too."""
        study = None if self.logic is None else self.logic.study
        top = int(study.shape[2]) - 1 if study is not None else 0
        for spinBox in (self.ui.querySliceSpinBox, self.ui.abnormalSliceSpinBox):
            spinBox.setRange(0, max(0, top))
            spinBox.suffix = f"  (of 0-{top})" if study is not None else ""

    @property
    def busy(self) -> bool:
        """Work is running or retrieved cases are still being loaded (read by the self-test)."""
        return bool(self._pendingHits) or (self._poller is not None and self._poller.busy)

    def _updateButtons(self, caller: Any = None, event: Any = None) -> None:
        pn = self._parameterNode
        busy = self.busy
        ready = pn is not None and all(getattr(pn, f"{s}Volume") for s in SEQUENCES)
        self.ui.encodeButton.enabled = bool(ready and not busy)
        self.ui.encodeButton.toolTip = (
            "Encode every axial slice of the study"
            if ready
            else "Pick the T1, T1ce, T2 and FLAIR volumes first"
        )
        encoded = self.logic is not None and self.logic.encoded is not None
        self.ui.searchButton.enabled = bool(encoded and not busy)
        self.ui.searchButton.toolTip = "Search the database" if encoded else "Encode the study first"
        self.ui.fromViewButton.enabled = bool(encoded)
        self.ui.cancelButton.enabled = busy
        if hasattr(self, "explainButton"):
            self.explainButton.enabled = self._detailRow is not None and not busy
        self.ui.buildDemoButton.enabled = not busy
        self.ui.removeDemoButton.enabled = not busy
        self.ui.abnormalSliceSpinBox.enabled = bool(pn is not None and pn.useCompositeQuery)

    # ---------------------------------------------------------------- messages
    @contextlib.contextmanager
    def _userErrors(self, title: str, waitCursor: bool = False) -> Iterator[None]:
        """Show an exception as a message (expected problems without a traceback) instead of raising it."""
        if waitCursor:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            yield
        except Exception as exc:
            self._reportError(title, exc)
        finally:
            if waitCursor:
                slicer.app.restoreOverrideCursor()

    def _reportError(self, title: str, exc: BaseException) -> None:
        from FDNRetrievalLib.tasks import describe_failure

        text, expected = describe_failure(exc)
        self.lastError = f"{title} {text}"
        details = {} if expected else {"detailedText": "".join(traceback.format_exception(exc))}
        slicer.util.errorDisplay(f"{title}\n\n{text}", windowTitle=TITLE, **details)

    @staticmethod
    def _setStatus(label: Any, text: str, warning: bool) -> None:
        label.text = text
        label.setStyleSheet("color: #b35900;" if warning and text else "")

    # ---------------------------------------------------------------- inputs
    def _autoFillEmpty(self) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        from FDNRetrievalLib.naming import match_sequence_nodes

        found = match_sequence_nodes(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        for key in SEQUENCES:
            if getattr(pn, f"{key}Volume") is None and found[key] is not None:
                setattr(pn, f"{key}Volume", found[key])

    def onAutoFill(self) -> None:
        """Assign the scene's volumes to the four sequences by their names."""
        from FDNRetrievalLib.naming import describe_missing, match_sequence_nodes

        found = match_sequence_nodes(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        for key in SEQUENCES:
            setattr(self._parameterNode, f"{key}Volume", found[key])
        missing = describe_missing(found)
        self._setStatus(
            self.ui.studyStatusLabel,
            f"No volume named like {', '.join(missing)} was found; pick it by hand." if missing else "",
            warning=bool(missing),
        )

    # ---------------------------------------------------------------- demo model and database
    def _updateDemoStatus(self) -> None:
        status = self.logic.demoStatus()
        pn = self._parameterNode
        text = status.message
        if pn is not None and not _pathSet(pn.databasePath) and not status.ready:
            text = (
                "No database is selected. Build the demo database: "
                + self.logic.demoPlan().describe()
                + " Or pick a database folder made with the fdn command line."
            )
        self._setStatus(self.ui.demoStatusLabel, text, warning=not status.ready)
        self.ui.removeDemoButton.enabled = (demoRoot() / "demo").exists() and not self.busy

    def _offerDemoOnce(self) -> None:
        """The first time the panel opens without a database, offer to build the demo database."""
        pn = self._parameterNode
        if self._demoOffered or pn is None or _pathSet(pn.databasePath) or slicer.app.testingEnabled():
            return
        self._demoOffered = True
        if self.logic.demoStatus().ready:
            return
        self.ui.modelCollapsibleButton.collapsed = False
        if slicer.util.confirmYesNoDisplay(
            "No code database is selected, so there is nothing to search yet.\n\nBuild the demo database "
            f"now? {self.logic.demoPlan().describe()}\n\nIt goes into {demoRoot()} and can be removed with "
            "'Remove demo data'. You can also do this later with 'Build demo database'.",
            windowTitle=TITLE,
        ):
            self._buildDemo(confirm=False)

    def onUseDemo(self) -> None:
        """Select the demo model and database."""
        model, _database = self.logic.defaultResourcePaths()
        if model is None:
            slicer.util.warningDisplay(
                "The demo model is not installed with this extension yet: press 'Install or update Python "
                "packages' (Python packages section) first, or pick a model folder (bundle.json).",
                windowTitle=TITLE,
            )
            return
        self._parameterNode.modelPath = model
        status = self.logic.demoStatus()
        if status.ready:
            self._parameterNode.databasePath = status.database
        else:
            self._buildDemo(confirm=True)

    def onBuildDemo(self) -> None:
        """Build the demo database in the worker, with progress and Cancel."""
        self._buildDemo(confirm=True)

    def _buildDemo(self, confirm: bool) -> None:
        plan = self.logic.demoPlan()
        if confirm and not slicer.util.confirmOkCancelDisplay(
            f"Build the demo database? {plan.describe()}\n\nFolder: {demoRoot() / 'demo'} (an existing demo "
            "there is replaced once the new one is complete). Progress is shown below; Cancel stops it and "
            "leaves nothing behind.",
            windowTitle=TITLE,
        ):
            return
        with self._userErrors("Could not build the demo database."):
            # a rebuilt demo replaces the folder: let go of the open (memory-mapped) database first
            self.logic.forgetResources()
            task = self.logic.demoTask(plan, self._parameterNode.wheelhousePath)
            self._startTask(
                "build the demo database", task, self._onDemoBuilt, retry=lambda: self._buildDemo(False)
            )

    def _onDemoBuilt(self, status: Any) -> None:
        pn = self._parameterNode
        model, _database = self.logic.defaultResourcePaths()
        if model is not None:
            pn.modelPath = model
        pn.databasePath = status.database
        registerSampleData()
        seconds = status.record.get("seconds", 0)
        self._setStatus(
            self.ui.encodeStatusLabel,
            f"Demo database ready ({status.record.get('n_cases')} cases, built in {seconds:.0f} s). Its "
            f"cases are in the Sample Data module under '{SAMPLE_CATEGORY}'.",
            warning=False,
        )
        self._updateDemoStatus()

    def onRemoveDemo(self) -> None:
        """Delete what the demo build made, after asking."""
        from FDNRetrievalLib import demo

        folder = demoRoot() / "demo"
        size = demo.folder_bytes(folder) / 1e6
        if not slicer.util.confirmOkCancelDisplay(
            f"Delete the demo cohort and database ({size:.0f} MB in {folder})? Loaded volumes stay in the "
            "scene; you can build the demo again at any time.",
            windowTitle=TITLE,
        ):
            return
        with self._userErrors("Could not remove the demo data.", waitCursor=True):
            pn = self._parameterNode
            if _pathSet(pn.databasePath) and _isInside(pn.databasePath, folder):
                pn.databasePath = pathlib.Path()
                self.logic.forgetResources()
            freed = self.logic.removeDemo()
            unregisterSampleData()
            self._setStatus(
                self.ui.encodeStatusLabel, f"Removed the demo data ({freed / 1e6:.0f} MB).", False
            )
        self._updateDemoStatus()

    # ---------------------------------------------------------------- dependencies
    def onInstall(self) -> None:
        """Install the Python packages the module needs, after asking."""
        with self._userErrors("Installing the Python packages failed.", waitCursor=True):
            installed = self.logic.ensureDependencies(self._parameterNode.wheelhousePath)
            slicer.util.infoDisplay(
                "Installed: " + ", ".join(installed)
                if installed
                else "Everything needed is already installed.",
                windowTitle=TITLE,
            )

    def onUninstall(self) -> None:
        """Uninstall fdn-retrieval from Slicer's Python, after asking."""
        if not slicer.util.confirmOkCancelDisplay(
            "Remove the fdn-retrieval Python package (fdn_core) from Slicer's Python? Its dependencies and "
            "PyTorch stay installed. The module installs it again on next use.",
            windowTitle=TITLE,
        ):
            return
        with self._userErrors("Removing the package failed.", waitCursor=True):
            self.logic.uninstallPackage()
            slicer.util.infoDisplay(
                "Removed. Restart Slicer before using the module again.", windowTitle=TITLE
            )

    def _installThen(self, report: Any, extra: Any, retry: Callable[[], None]) -> None:
        """Main thread: install what the worker found missing (asks first), then run the step again."""
        with self._userErrors("The Python packages FDN Retrieval needs are not installed.", waitCursor=True):
            self.logic.ensureDependencies(self._parameterNode.wheelhousePath, extra)
            retry()

    # ---------------------------------------------------------------- background work
    def _startTask(
        self, kind: str, task: Any, onDone: Callable[[Any], None], retry: Callable[[], None] | None = None
    ) -> None:
        """Run ``task`` in the worker; ``onDone(result)`` on this thread when it ends well. A result that is a
        not-ready environment report means packages are missing: they are installed, then ``retry()``."""

        def finished(kind: str, task: Any, status: Any) -> None:
            self._updateButtons()
            if status.cancelled:
                self.ui.progressBar.setValue(0)
                self.ui.progressBar.setFormat("%p%")
                self._setStatus(self.ui.encodeStatusLabel, "Cancelled. Nothing was changed.", warning=True)
                return
            if status.error is not None:
                self.ui.progressBar.setFormat("%p%")
                self._reportError(f"Could not {kind}.", status.error)
                self._setStatus(
                    self.ui.encodeStatusLabel, f"Could not {kind}: see the message.", warning=True
                )
                return
            result = task.result()
            needs = getattr(result, "environment", None)
            if needs is not None:
                if retry is not None:
                    self._installThen(needs, result.extra, retry)
                return
            with self._userErrors(f"Could not {kind}."):
                onDone(result)
            self._updateButtons()

        self.lastError = None
        self._poller.start(task, kind, finished)
        self.ui.progressBar.setValue(0)
        self._setStatus(self.ui.encodeStatusLabel, f"Working: {kind}...", warning=False)
        self._updateButtons()
        self._timer.start()

    def _showProgress(self, status: Any) -> None:
        self.ui.progressBar.setValue(round(100 * status.fraction))
        self.ui.progressBar.setFormat(f"{status.message} %p%" if status.message else "%p%")

    def _onTimer(self) -> None:
        """Timer slot: load the next retrieved case, or give the worker a short, GIL-free wait."""
        if self._pendingHits:
            self._showNextHit()
        elif self._poller is not None and self._poller.busy:
            self._poller.tick()
        else:
            self._timer.stop()
            self._updateButtons()

    def onCancel(self) -> None:
        """Ask the running task to stop."""
        if self._poller is not None and self._poller.busy:
            self._poller.cancel()
            self.ui.cancelButton.enabled = False
            self._setStatus(self.ui.encodeStatusLabel, "Cancelling...", warning=False)
        elif self._pendingHits:
            self._pendingHits = []
            self._setStatus(self.ui.encodeStatusLabel, "Stopped loading the retrieved cases.", warning=True)
            self._updateButtons()

    def _stopWork(self) -> None:
        if self._poller is not None:
            self._poller.stop(timeout=30)
        self._pendingHits = []
        self._timer.stop()

    # ---------------------------------------------------------------- encode
    def onEncode(self) -> None:
        """Encode the study's slices in the worker; segmentation and reconstruction on completion."""
        pn = self._parameterNode
        if (
            not _pathSet(pn.databasePath)
            and not slicer.app.testingEnabled()
            and slicer.util.confirmYesNoDisplay(
                "No code database is selected: the study can be encoded, but there is nothing to search. "
                f"Build the demo database first? {self.logic.demoPlan().describe()}",
                windowTitle=TITLE,
            )
        ):
            self._buildDemo(confirm=False)
            return
        with self._userErrors("Could not encode the study.", waitCursor=True):
            captured = self.logic.captureStudy({key: getattr(pn, f"{key}Volume") for key in SEQUENCES})
            task = self.logic.encodeTask(
                captured, pn.modelPath, pn.databasePath, pn.device, minLesionMl=pn.minLesionMl
            )
            self._startTask("encode the study", task, self._onEncoded, retry=self.onEncode)

    def _onEncoded(self, result: Any) -> None:
        nodes = self.logic.publishEncoding(result)
        study = self.logic.study
        self._setStatus(self.ui.studyStatusLabel, "\n".join(study.warnings), warning=bool(study.warnings))
        self._setStatus(self.ui.resourcesStatusLabel, self.logic.resourcesSummary(), warning=False)
        self._applySliceRange()
        if self._follower is None:
            self._follower = self.logic.makeQueryFollower(self.onQueryViewScrolled)
        self._follower.set_study(study.affine, study.shape)
        inputNode = getattr(self._parameterNode, f"{self._parameterNode.displaySequence}Volume")
        slicer.util.setSliceViewerLayers(background=inputNode, fit=True)
        message = (
            f"Encoded {study.shape[2]} axial slices; results are in the folder '{nodes['folder']}'. "
            f"Segmentation: {self.logic.encoded.lesions.describe()}."
        )
        if self.logic.indexedCase:
            case = self.logic.indexedCase
            message += f" This study is case {case} of the database: it is left out of the results."
        warning = self.logic.deviceWarning()
        self._setStatus(
            self.ui.encodeStatusLabel, message + (f"\n{warning}" if warning else ""), bool(warning)
        )
        self.ui.progressBar.setValue(100)
        with contextlib.suppress(Exception):
            self._parameterNode.querySlice = self._follower.current_index()

    # ---------------------------------------------------------------- query slice
    def onQueryViewScrolled(self, index: int) -> None:
        """The user scrolled the query view (or the red view): the spin box follows when asked to."""
        pn = self._parameterNode
        if pn is None or not pn.followView or self._followingView:
            return
        self._followingView = True
        try:
            pn.querySlice = int(index)
        finally:
            self._followingView = False

    def onQuerySliceTyped(self, value: int) -> None:
        """A number typed in the spin box scrolls the followed view there (when following)."""
        pn = self._parameterNode
        if pn is None or not pn.followView or self._followingView or self._follower is None:
            return
        if self.logic.study is None or not 0 <= int(value) < self.logic.study.shape[2]:
            return
        with contextlib.suppress(Exception):
            if self._follower.current_index() == int(value):
                return
        self._followingView = True
        try:
            self._follower.show_slice(int(value))
        finally:
            self._followingView = False

    def onQuerySliceFromView(self) -> None:
        """Take the query slice from the query view's current position."""
        with self._userErrors("Could not read the viewed slice."):
            if self._follower is None:
                from fdn_core.errors import DataError

                raise DataError("Encode a study first.")
            self._parameterNode.querySlice = self._follower.current_index()

    # ---------------------------------------------------------------- search
    def onSearch(self) -> None:
        """Search the database with the query slice and show the results layout."""
        with self._userErrors("Could not search the database.", waitCursor=True):
            pn = self._parameterNode
            if pn.followView and self._follower is not None:
                with contextlib.suppress(Exception):  # no view, or outside the study: keep the typed number
                    pn.querySlice = self._follower.current_index()
            settings = self.logic.searchSettings(
                querySlice=pn.querySlice,
                mode=pn.mode,
                distance=pn.distance,
                topK=pn.topK,
                volumeWise=pn.volumeWise,
                abnormalSlice=pn.abnormalSlice if pn.useCompositeQuery else None,
                axialContext=pn.axialContext,
                lesion=pn.lesion,
            )
            self._startTask("search the database", self.logic.searchTask(settings), self._onSearched)

    def _onSearched(self, hits: Any) -> None:
        pn = self._parameterNode
        table = self.logic.publishHits(hits)
        self.ui.resultsTableView.setMRMLTableNode(table)
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(
            self.logic.registerLayout(layoutManager.layoutLogic().GetLayoutNode(), len(hits))
        )
        self.logic.showTable()
        self.logic.showQuery(getattr(pn, f"{pn.displaySequence}Volume"), pn.querySlice, self._fitView)
        self.ui.backToResultsButton.enabled = False
        self.ui.resultDetailLabel.text = ""
        self._pendingHits = list(hits)
        self._hitSequence = pn.displaySequence
        if not hits:
            from FDNRetrievalLib import workflow

            self._setStatus(self.ui.encodeStatusLabel, workflow.no_result_message(pn.lesion), warning=True)
        self._timer.start()  # reference cases load one per tick, so the GUI stays responsive

    def _showNextHit(self) -> None:
        hit = self._pendingHits.pop(0)
        with self._userErrors(f"Could not show case {hit.case_id}.", waitCursor=True):
            self.logic.showHit(hit, self._hitSequence, self._fitView)
        done = self.logic.numHits() - len(self._pendingHits)
        self.ui.progressBar.setValue(int(100 * done / max(1, self.logic.numHits())))
        self.ui.progressBar.setFormat("Loading retrieved cases %p%")
        if not self._pendingHits:
            self.logic.linkResultViews()
            self._setStatus(
                self.ui.encodeStatusLabel,
                f"Showing the top {self.logic.numHits()} results. Click a row to see one large.",
                warning=False,
            )
            self._updateButtons()

    def onResultClicked(self, index: Any) -> None:
        """Show the clicked result large, at its slice."""
        with self._userErrors("Could not show this result.", waitCursor=True):
            proxy = self.ui.resultsTableView.sortFilterProxyModel()
            row = int(proxy.mapToSource(index).row()) if proxy is not None else int(index.row())
            caption = self.logic.showDetail(row, self._parameterNode.displaySequence, self._fitView)
            self.ui.resultDetailLabel.text = caption
            self.ui.backToResultsButton.enabled = True
            self._detailRow = row
            self.explainButton.enabled = not self.busy
            slicer.util.showStatusMessage(caption, 5000)

    def onBackToResults(self) -> None:
        """Return from one result to the results layout."""
        with self._userErrors("Could not show the results."):
            layoutManager = slicer.app.layoutManager()
            layoutNode = layoutManager.layoutLogic().GetLayoutNode()
            layoutManager.setLayout(self.logic.registerLayout(layoutNode, max(1, self.logic.numHits())))
            self.logic.showTable()
            self.ui.backToResultsButton.enabled = False
            self.ui.resultDetailLabel.text = ""
            self._detailRow = None
            self.explainButton.enabled = False

    def onExplain(self) -> None:
        """Compute a RELAX explanation of the result shown large and overlay it."""
        with self._userErrors("Could not explain this result."):
            if self._detailRow is None:
                from fdn_core.errors import DataError

                raise DataError("Click a result row first: the result shown large is explained.")
            self._startTask("explain the result", self.logic.explainTask(self._detailRow), self._onExplained)

    def _onExplained(self, explanation: Any) -> None:
        nodes = self.logic.publishExplanation(explanation)
        self._setStatus(
            self.ui.encodeStatusLabel,
            f"Explanation overlaid on the query ({', '.join(n.GetName() for n in nodes)}; "
            f"{explanation.seconds:.0f} s).",
            warning=False,
        )

    @staticmethod
    def _fitView(layoutName: str) -> None:
        widget = slicer.app.layoutManager().sliceWidget(layoutName)
        if widget is not None:
            widget.sliceLogic().FitSliceToAll()


def _pathSet(path: Any) -> bool:
    return path is not None and str(path).strip() not in ("", ".")


def _isInside(path: Any, folder: pathlib.Path) -> bool:
    try:
        return pathlib.Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


#
# Logic
#


class _NeedsInstall:
    """What a worker returns when packages are missing: the main thread installs them (with consent)."""

    def __init__(self, environment: Any, extra: tuple[str, ...] = ()) -> None:
        self.environment = environment
        self.extra = extra


class SlicerFDNRetrievalLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer-side logic: gathers Slicer's objects and delegates every step to ``FDNRetrievalLib``.

    Methods marked "worker" run in the background thread and touch neither MRML nor Qt.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._resources = None
        self._resourcesKey: tuple[str, str, str] | None = None
        self._engine = None
        self._environmentReady = False
        self.study = None
        self.encoded = None
        self.indexedCase: str | None = None
        self._hits: list[Any] = []
        self._table = None
        self._viewLink = None
        self._inputs: dict[str, Any] = {}
        self._segmentation = None
        self._searchSettings: Any = None

    def getParameterNode(self) -> SlicerFDNRetrievalParameterNode:
        """The module's parameter node (made on first use)."""
        return SlicerFDNRetrievalParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- resources and demo
    @staticmethod
    def defaultResourcePaths() -> tuple[pathlib.Path | None, pathlib.Path | None]:
        """The shipped model folder and the demo database, where they exist."""
        from FDNRetrievalLib.deps import default_resource_paths

        return default_resource_paths(MODULE_DIR, demoRoot())

    @staticmethod
    def demoPlan() -> Any:
        """What building the demo will cost (cases, size, time), before it starts."""
        from FDNRetrievalLib.demo import DemoPlan

        return DemoPlan()

    @staticmethod
    def demoStatus() -> Any:
        """Is the demo database built (reads demo.json only)?"""
        from FDNRetrievalLib.demo import demo_status

        return demo_status(demoRoot())

    def demoTask(self, plan: Any, wheelhouse: Any = None) -> Any:
        """A not-yet-started task building the demo cohort and database (worker: phantom + indexing)."""
        from FDNRetrievalLib import tasks

        def work(progress: Any) -> Any:
            need = self.environmentProblem(wheelhouse, demo=True)
            if need is not None:
                return need
            from FDNRetrievalLib import demo

            return demo.build_demo(demoRoot(), plan=plan, progress=progress)

        return tasks.BackgroundTask(work, name="FDN demo database")

    def removeDemo(self) -> int:
        """Delete the demo folder's cohort and database; the number of files removed."""
        from FDNRetrievalLib.demo import remove_demo

        return remove_demo(demoRoot())

    def forgetResources(self) -> None:
        """Drop the cached model and database (their files are about to change or go): the database's
        memory-mapped arrays are closed, so that its folder can be replaced or deleted (Windows)."""
        import gc

        self._resources, self._resourcesKey, self._engine = None, None, None
        gc.collect()

    # ---------------------------------------------------------------- dependencies
    def environmentProblem(self, wheelhouse: Any = None, demo: bool = False) -> _NeedsInstall | None:
        """Worker: None when every package is installed, else what to install (package metadata only)."""
        if self._environmentReady and not demo:
            return None
        from FDNRetrievalLib import deps

        plan = deps.make_plan(MODULE_DIR, wheelhouse if _pathSet(wheelhouse) else None)
        extra = plan.demo_requirements if demo else ()
        report = deps.check_environment(plan, extra)
        if not report.ready:
            return _NeedsInstall(report, tuple(extra))
        self._environmentReady = self._environmentReady or not demo
        return None

    def ensureDependencies(self, wheelhouse: Any = None, extra: Any = ()) -> list[str]:
        """Main thread: install the other requirements and fdn_core if missing, with consent. torch comes from
        PyTorch Utils when missing; a torch outside the required range is explained, not replaced. Nothing is
        installed in testing mode unless FDNRETRIEVAL_TEST_INSTALL=1."""
        import importlib

        from FDNRetrievalLib import deps

        plan = deps.make_plan(MODULE_DIR, wheelhouse if _pathSet(wheelhouse) else None)
        allowed = deps.install_allowed(slicer.app.testingEnabled())

        def installTorch(versionSpec: str) -> bool:
            try:
                import PyTorchUtils
            except ImportError as exc:
                raise deps.DependencyError(
                    "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager, "
                    "restart Slicer, and try again."
                ) from exc
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=versionSpec
            )
            return torch is not None

        def confirm(title: str, text: str) -> bool:
            return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle=title))

        def pipInstall(args: list[str]) -> None:
            slicer.util.pip_install(args)

        pipEnsure = None
        for moduleName in ("slicer.packaging", "slicer.pydeps"):
            try:
                packaging = importlib.import_module(moduleName)
            except ImportError:
                continue
            if hasattr(packaging, "pip_ensure"):

                def pipEnsure(requirements: list[str], _module: Any = packaging) -> None:
                    from packaging.requirements import Requirement

                    _module.pip_ensure(
                        [Requirement(r) for r in requirements],
                        skip_packages=list(plan.skip_packages),
                        prompt_install=False,  # consent was asked once for everything
                        requester=deps.REQUESTER,
                        skip_in_testing=not allowed,
                    )

                break
        installed = deps.ensure_installed(
            plan,
            install_torch=installTorch,
            confirm=confirm,
            pip_install=pipInstall,
            pip_ensure=pipEnsure,
            extra=tuple(extra),
            allowed=allowed,
        )
        importlib.invalidate_caches()
        if installed:
            log.info("FDN Retrieval installed: %s", ", ".join(installed))
        return installed

    @staticmethod
    def uninstallPackage() -> None:
        """Uninstall fdn-retrieval from Slicer's Python."""
        from FDNRetrievalLib.deps import DISTRIBUTION

        slicer.util.pip_uninstall(DISTRIBUTION)

    # ---------------------------------------------------------------- encode
    def captureStudy(self, selection: dict[str, Any]) -> Any:
        """Main thread: copy the four volumes out of the scene (checks and resampling come in the worker)."""
        from FDNRetrievalLib.capture import capture_study

        captured = capture_study(selection)
        self._inputs = dict(selection)
        return captured

    def openResources(self, modelPath: Any, databasePath: Any, device: str) -> Any:
        """Worker: load the model and database (hash-verified, matched by fingerprint); cached until the
        paths change."""
        from FDNRetrievalLib import workflow

        key = (str(modelPath), str(databasePath), str(device))
        if self._resources is None or self._resourcesKey != key:
            self._resources, self._engine = None, None
            self._resources = workflow.open_resources(
                modelPath if _pathSet(modelPath) else None,
                databasePath if _pathSet(databasePath) else None,
                device,
            )
            self._resourcesKey = key
        return self._resources

    def encodeTask(
        self, captured: Any, modelPath: Any, databasePath: Any, device: str, minLesionMl: float | None = None
    ) -> Any:
        """A not-yet-started task: package check, first torch import, model + database (sha256), the study's
        checks and resampling, then encoding, all in the worker thread. Predicted lesions under
        ``minLesionMl`` mL (default ``labels.MIN_LESION_ML``) are left out of the segmentation."""
        from FDNRetrievalLib import tasks

        def work(progress: Any) -> Any:
            need = self.environmentProblem()
            if need is not None:
                return need
            progress.update(0, 1, "Loading the model and database")
            from fdn_core.labels import MIN_LESION_ML
            from FDNRetrievalLib import scene, workflow  # the first import of torch happens here

            resources = self.openResources(modelPath, databasePath, device)
            progress.update(0, 1, "Checking the study")
            study = scene.assemble_study(captured)
            batch = workflow.choose_batch_size(resources.bundle)
            encoded = workflow.encode_study(
                resources.bundle,
                study.image,
                study.affine,
                batch_size=batch,
                progress=progress,
                min_lesion_ml=MIN_LESION_ML if minLesionMl is None else float(minLesionMl),
            )
            indexed = workflow.find_indexed_case(resources.database, encoded)
            return study, encoded, indexed

        return tasks.BackgroundTask(work, name="FDN encode")

    def resourcesSummary(self) -> str:
        """One line on the model, the database and the device in use."""
        r = self._resources
        return (
            f"Model {r.model_path.name} ({r.bundle.fingerprint[:12]}), database with {len(r.database.cases)} "
            f"cases / {len(r.database)} slices, on {r.bundle.device.type.upper()}."
        )

    def deviceWarning(self) -> str | None:
        """A warning when encoding will run slowly (no GPU), else None."""
        from FDNRetrievalLib import workflow

        return workflow.device_warning(self._resources.bundle, self.study.shape[2])

    def publishEncoding(self, result: Any) -> dict[str, Any]:
        """Main thread: segmentation + reconstruction nodes in a subject-hierarchy folder."""
        from FDNRetrievalLib import scene

        self.study, encoded, self.indexedCase = result
        self.encoded = encoded
        base = self.study.reference_name
        folderName = f"FDN results - {base}"
        segmentation = scene.add_abnormal_segmentation(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            encoded.seg,
            self.study,
            f"{base} predicted abnormal",
        )
        recon = scene.add_reconstruction(slicer.mrmlScene, encoded.recon_normal, self.study, base)
        for key, node in zip(SEQUENCES, recon):
            source = self._inputs.get(key)
            sourceDisplay = source.GetDisplayNode() if source is not None else None
            display = node.GetDisplayNode()
            if sourceDisplay is not None and display is not None:
                display.SetAutoWindowLevel(False)
                display.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())
        scene.put_in_folder(slicer.mrmlScene, folderName, [segmentation, *recon])
        scene.show_only_in_views(slicer.mrmlScene, segmentation, STANDARD_VIEWS)
        self._segmentation = segmentation
        return {"folder": folderName, "segmentation": segmentation, "reconstruction": recon}

    # ---------------------------------------------------------------- search
    @staticmethod
    def makeQueryFollower(onChange: Callable[[int], None]) -> Any:
        """Follow the query view's slice and call ``onChange`` with its index."""
        from FDNRetrievalLib.views import QueryFollower

        return QueryFollower(slicer.mrmlScene, onChange)

    @staticmethod
    def searchSettings(
        querySlice: int,
        mode: str,
        distance: str,
        topK: int,
        volumeWise: bool,
        abnormalSlice: Any,
        axialContext: bool = False,
        lesion: str = "any",
    ) -> Any:
        """The panel's search settings as the library's ``SearchSettings``."""
        from FDNRetrievalLib import workflow

        return workflow.SearchSettings(
            query_slice=int(querySlice),
            mode=mode,
            distance=distance,
            top_k=int(topK),
            volume_wise=bool(volumeWise),
            abnormal_slice=None if abnormalSlice is None else int(abnormalSlice),
            axial_context=bool(axialContext),
            lesion=str(lesion),
        )

    def searchTask(self, settings: Any) -> Any:
        """A not-yet-started task: the search engine (made once per database) and the search (worker)."""
        from dataclasses import replace

        from FDNRetrievalLib import tasks, workflow

        if self.encoded is None:
            from fdn_core.errors import DataError

            raise DataError("Encode a study first.")
        encoded, database = self.encoded, self._database()
        assert self._resources is not None
        bundle = self._resources.bundle
        settings = replace(settings, exclude_case=self.indexedCase)
        self._searchSettings = settings

        def work(progress: Any) -> Any:
            progress.update(0, 1, "Searching")
            if self._engine is None:
                self._engine = workflow.make_search_engine(database, bundle)
            hits = workflow.search_study(self._engine, encoded, settings)
            progress.update(1, 1, "Searching")
            return hits

        return tasks.BackgroundTask(work, name="FDN search")

    def publishHits(self, hits: list[Any]) -> Any:
        """Put the hits in the scene's results table node and return it."""
        from FDNRetrievalLib import scene

        self._hits = list(hits)
        self._table = scene.write_results_table(slicer.mrmlScene, hits, "FDN retrieval results", self._table)
        return self._table

    def showTable(self) -> None:
        """Show the results table in the layout's table view."""
        from FDNRetrievalLib import scene

        if self._table is not None:
            scene.show_table_in_view(slicer.mrmlScene, self._table)

    def numHits(self) -> int:
        """Number of hits of the last search."""
        return len(self._hits)

    @staticmethod
    def registerLayout(layoutNode: Any, topK: int) -> int:
        """Register the results layout for ``topK`` hits; its layout id."""
        from FDNRetrievalLib import scene

        return scene.register_results_layout(layoutNode, max(1, topK))

    def showQuery(self, volume: Any, querySlice: int, fitView: Any) -> None:
        """Show the query volume at ``querySlice`` in the query view."""
        from FDNRetrievalLib import scene

        scene.assign_view_volumes(slicer.mrmlScene, scene.QUERY_VIEW, volume)
        fitView(scene.QUERY_VIEW)
        scene.jump_to_study_slice(slicer.mrmlScene, scene.QUERY_VIEW, self.study, querySlice)
        if self._segmentation is not None and slicer.mrmlScene.IsNodePresent(self._segmentation):
            scene.show_only_in_views(
                slicer.mrmlScene, self._segmentation, [*STANDARD_VIEWS, scene.QUERY_VIEW]
            )

    def _database(self) -> Any:
        if self._resources is None:
            from fdn_core.errors import DataError

            raise DataError("The database was closed (the demo was rebuilt or removed): press Encode again.")
        return self._resources.database

    def _caseFiles(self, hit: Any) -> Any:
        from fdn_core.data.readers import CaseFiles

        return CaseFiles.from_database(self._database(), hit.case_id)

    def showHit(self, hit: Any, sequence: str, fitView: Any) -> None:
        """Show a hit's case at its slice (``sequence`` as background, labels overlaid)."""
        from FDNRetrievalLib import scene

        case = scene.load_reference_case(
            slicer.mrmlScene, slicer.modules.volumes.logic(), self._caseFiles(hit), sequence
        )
        view = scene.result_view_names(hit.rank)[-1]
        scene.assign_view_volumes(slicer.mrmlScene, view, case.volume, case.labels)
        fitView(view)
        scene.jump_to_axial_slice(slicer.mrmlScene, view, case.volume, hit.slice_index)
        scene.put_in_folder(
            slicer.mrmlScene, "FDN retrieved cases", [n for n in (case.volume, case.labels) if n is not None]
        )

    def hitForRow(self, row: int) -> Any:
        """The hit in row ``row`` of the results table node (matched by case and slice, not by position)."""
        from FDNRetrievalLib import views

        if self._table is None:
            from fdn_core.errors import DataError

            raise DataError("Search first.")
        return views.hit_for_table_row(self._hits, self._table, row)

    def showDetail(self, row: int, sequence: str, fitView: Any) -> str:
        """Show the result in table row ``row`` large, beside the query (one-result layout); returns its
        caption."""
        from FDNRetrievalLib import scene, views

        hit = self.hitForRow(row)
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(views.register_detail_layout(layoutManager.layoutLogic().GetLayoutNode()))
        self.showTable()
        case = views.show_result_detail(
            slicer.mrmlScene, slicer.modules.volumes.logic(), hit, self._caseFiles(hit), sequence
        )
        fitView(views.DETAIL_VIEW)
        scene.jump_to_axial_slice(slicer.mrmlScene, views.DETAIL_VIEW, case.volume, hit.slice_index)
        scene.put_in_folder(
            slicer.mrmlScene, "FDN retrieved cases", [n for n in (case.volume, case.labels) if n is not None]
        )
        return views.hit_caption(hit, sequence)

    def explainTask(self, row: int) -> Any:
        """A not-yet-started task: RELAX maps of the searched query slice against the result in ``row``."""
        from FDNRetrievalLib import explain, tasks

        hit = self.hitForRow(row)
        settings, files = self._searchSettings, self._caseFiles(hit)
        bundle, study = self._resources.bundle, self.study

        def work(progress: Any) -> Any:
            image = explain.reference_slice(bundle, files, hit.slice_index)
            against = (hit.case_id, hit.slice_index, image)
            return explain.compute_explanation(
                bundle, study, settings.query_slice, settings.mode, against, progress=progress
            )

        return tasks.BackgroundTask(work, name="FDN explain")

    def publishExplanation(self, explanation: Any) -> list[Any]:
        """Main thread: the explanation overlay nodes, shown over the query view, in a folder."""
        from FDNRetrievalLib import explain, scene

        nodes = explain.add_explanation_overlay(
            slicer.mrmlScene, self.study, explanation, self.study.reference_name, [scene.QUERY_VIEW]
        )
        scene.put_in_folder(slicer.mrmlScene, "FDN explanations", nodes)
        return nodes

    def linkResultViews(self) -> None:
        """Link zoom and pan of the result views."""
        from FDNRetrievalLib import scene, views

        if self._viewLink is not None:
            self._viewLink.remove()
        names = [scene.QUERY_VIEW, *scene.result_view_names(len(self._hits)), views.DETAIL_VIEW]
        self._viewLink = scene.FieldOfViewLink(slicer.mrmlScene, names)

    def clearResults(self) -> None:
        """Forget the encoded study and results (scene close); the loaded model stays cached."""
        if self._viewLink is not None:
            self._viewLink.remove()
        self._viewLink = None
        self.study, self.encoded, self.indexedCase = None, None, None
        self._segmentation = None
        self._hits, self._table = [], None


#
# Test
#


class SlicerFDNRetrievalTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the shared scenario (the same body as Testing/test_slicer_logic.py) and the panel
    itself, on a tiny synthetic model, cohort and database. Skipped when the Python packages are missing:
    in testing mode nothing is installed unless FDNRETRIEVAL_TEST_INSTALL=1 is set."""

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run the module's self-tests."""
        self.setUp()
        self.test_SlicerFDNRetrievalScenario()
        self.setUp()
        self.test_SlicerFDNRetrievalWidget()

    def _requirePackages(self) -> None:
        from FDNRetrievalLib import deps

        try:
            SlicerFDNRetrievalLogic().ensureDependencies()
        except deps.DependencyError as exc:
            self.skipTest(f"FDN Retrieval's Python packages are not installed ({exc})")

    def test_SlicerFDNRetrievalScenario(self) -> None:
        """Encode a tiny study, search a tiny database and check the results on real MRML."""
        self.delayDisplay("Checking the Python packages")
        self._requirePackages()
        from FDNRetrievalLib import scenario

        with tempfile.TemporaryDirectory(prefix="FDNRetrievalTest") as tmp:
            self.delayDisplay("Building a tiny model, cohort and database")
            fixture = scenario.build_fixture(pathlib.Path(tmp))
            context = scenario.SceneContext(
                scene=slicer.mrmlScene,
                volumes_logic=slicer.modules.volumes.logic(),
                segmentations_logic=slicer.modules.segmentations.logic(),
                layout_node=slicer.app.layoutManager().layoutLogic().GetLayoutNode(),
            )
            self.delayDisplay("Encode, search and show the results")
            report = scenario.run_scenario(context, fixture)
            self.delayDisplay(
                "Bad input: missing sequence, mismatched grid, 2D image, empty volume, wrong database"
            )
            scenario.run_bad_input_checks(context, fixture)
        self.delayDisplay(f"Scenario passed ({report['num_hits']} hits, {report['num_slices']} slices)")

    @staticmethod
    def _pumpUntil(done: Callable[[], bool], timeout: float = 300.0) -> None:
        """Process events (the panel's timer ticks among them) until ``done()`` or ``timeout`` seconds."""
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the panel did not finish within {timeout:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.005)  # like Qt idling, but releasing the GIL: the panel must not depend on this

    def test_SlicerFDNRetrievalWidget(self) -> None:
        """The panel as a user drives it: pick the volumes, Encode, Search, click a row, go back."""
        self._requirePackages()
        from fdn_core.data.readers import find_cases
        from FDNRetrievalLib import scenario, scene, views

        widget = slicer.util.getModuleWidget("SlicerFDNRetrieval")
        slicer.util.selectModule("SlicerFDNRetrieval")
        with tempfile.TemporaryDirectory(prefix="FDNRetrievalWidgetTest") as tmp:
            self.delayDisplay("Building a tiny model, cohort and database")
            fixture = scenario.build_fixture(pathlib.Path(tmp))
            case = next(c for c in find_cases(fixture.cohort_dir) if c.case_id == fixture.query_case)
            nodes = {key: slicer.util.loadVolume(str(case.images[key])) for key in SEQUENCES}
            pn = widget._parameterNode
            for key in SEQUENCES:
                setattr(pn, f"{key}Volume", nodes[key])
            pn.modelPath = fixture.bundle_dir
            pn.databasePath = fixture.db_dir
            pn.device = "cpu"
            pn.topK = 2
            self.delayDisplay("Encode")
            widget.ui.encodeButton.click()
            self._pumpUntil(lambda: not widget.busy)
            self.assertIsNone(widget.lastError, widget.lastError)
            self.assertIsNotNone(widget.logic.encoded)
            folder = f"FDN results - {nodes['t1ce'].GetName()}"
            segmentations = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
            self.assertEqual(len(segmentations), 1)
            self.assertEqual(segmentations[0].GetSegmentation().GetNumberOfSegments(), 3)
            self.assertIn(folder, widget.ui.encodeStatusLabel.text)
            depth = widget.logic.study.shape[2]
            self.assertEqual(widget.ui.querySliceSpinBox.maximum, depth - 1)
            self.delayDisplay("Search")
            widget.ui.searchButton.click()
            self._pumpUntil(lambda: not widget.busy)
            self.assertIsNone(widget.lastError, widget.lastError)
            table = widget.logic._table
            self.assertEqual(table.GetTable().GetNumberOfRows(), 2)
            self.assertTrue(table.GetLocked())
            for name in scene.result_view_names(2):
                composite = scene.composite_node(slicer.mrmlScene, name)
                self.assertTrue(composite.GetBackgroundVolumeID(), f"view {name} shows nothing")
            # the query follows the query view: scroll it, the spin box follows
            query = scene.slice_node_by_layout_name(slicer.mrmlScene, scene.QUERY_VIEW)
            target = max(0, min(depth - 1, pn.querySlice + 2))
            query.JumpSliceByCentering(
                *scene.ras_of_axial_slice(widget.logic.study.affine, widget.logic.study.shape, target)
            )
            slicer.app.processEvents()
            self.assertEqual(pn.querySlice, target)
            self.delayDisplay("Open one result large, then go back")
            widget.onResultClicked(widget.ui.resultsTableView.model().index(1, 0))
            self.assertIsNone(widget.lastError, widget.lastError)
            detail = scene.composite_node(slicer.mrmlScene, views.DETAIL_VIEW)
            self.assertTrue(detail.GetBackgroundVolumeID())
            self.assertTrue(widget.ui.backToResultsButton.enabled)
            self.delayDisplay("Explain the result shown large")
            self.assertTrue(widget.explainButton.enabled)
            widget.explainButton.click()
            self._pumpUntil(lambda: not widget.busy)
            self.assertIsNone(widget.lastError, widget.lastError)
            overlays = [
                n
                for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if n.GetAttribute(scene.ROLE_ATTRIBUTE) == "explanation"
            ]
            self.assertTrue(overlays, "no explanation overlay was added")
            widget.ui.backToResultsButton.click()
            self.assertFalse(widget.ui.backToResultsButton.enabled)
        self.delayDisplay("Panel test passed")
