"""FDN Retrieval: content-based retrieval of brain MR slices by normal and abnormal anatomy (Slicer module).

The panel encodes the four sequences of a study with a feature decomposing network (FDN, Kobayashi et al.
2021), shows the predicted abnormal segmentation and the normal-appearing reconstruction, and finds the most
similar slices of a reference database by normal anatomy, abnormal anatomy or both.

This file is the thin Slicer shell: all computing and all scene changes live in the Qt-free library
``FDNRetrievalLib`` (next to this file), which takes the scene as an argument and is tested without Slicer.
Third-party packages (numpy, torch, fdn_core) are imported inside functions, after the first-use install.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
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
SETTINGS_PREFIX = "FDNRetrieval/"
POLL_MS = 100
STANDARD_VIEWS = ("Red", "Green", "Yellow")


#
# Module
#


class SlicerFDNRetrieval(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FDN Retrieval"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerFDNRetrieval developers"]
        self.parent.helpText = (
            "Find brain MR slices that look alike in their normal anatomy, their abnormal anatomy "
            "(tumour), or "
            "both. Pick the four sequences of a study, press Encode, choose the query slice (the red view's "
            "slice by default) and press Search. See the "
            '<a href="https://github.com/SlicerFDNRetrieval/SlicerFDNRetrieval#use-in-3d-slicer">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Implements the feature decomposing network of Kobayashi K. et al., 'Decomposing Normal and "
            "Abnormal Features of Medical Images into Discrete Latent Codes for Content-Based Image "
            "Retrieval' (2021), arXiv:2103.12328. Research use only: not a medical device."
        )
        # Sample data (the demo's phantom cohort) is registered once the application has started.
        slicer.app.connect("startupCompleted()", _register_sample_data)


def _register_sample_data() -> None:
    """Offer the phantom cases written by ``make demo`` in the Sample Data module (category FDN Retrieval)."""
    import SampleData

    from FDNRetrievalLib import deps

    for study in deps.demo_sample_studies(MODULE_DIR):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="FDN Retrieval",
            sampleName=f"FDN phantom {study.case_id}",
            uris=study.uris,
            fileNames=study.file_names,
            nodeNames=study.node_names,
            checksums=study.checksums,
            thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "SlicerFDNRetrieval.png"),
        )


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
    querySlice: Annotated[int, Minimum(0)] = 0
    followRedView: bool = True
    mode: Annotated[str, Choice(["both", "normal", "abnormal"])] = "both"
    distance: Annotated[str, Choice(["euclidean", "angular", "hamming"])] = "euclidean"
    topK: Annotated[int, WithinRange(1, 20)] = 10
    volumeWise: bool = True
    useCompositeQuery: bool = False
    abnormalSlice: Annotated[int, Minimum(0)] = 0
    displaySequence: Annotated[str, Choice(["flair", "t1ce", "t2", "t1"])] = "flair"
    wheelhousePath: pathlib.Path


#
# Widget
#


class SlicerFDNRetrievalWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Long work runs in a worker thread; a QTimer polls it and applies results on this thread."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SlicerFDNRetrievalLogic | None = None
        self._parameterNode: SlicerFDNRetrievalParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._taskKind = ""
        self._pendingHits: list[Any] = []
        self._hitSequence = "flair"
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    # ---------------------------------------------------------------- setup and lifecycle
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
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
        self.ui.encodeButton.clicked.connect(self.onEncode)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.fromRedViewButton.clicked.connect(self.onQuerySliceFromRedView)
        self.ui.searchButton.clicked.connect(self.onSearch)
        self.ui.resultsTableView.clicked.connect(self.onResultClicked)
        self.ui.installButton.clicked.connect(self.onInstall)
        self.ui.uninstallButton.clicked.connect(self.onUninstall)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopTask()
        self.removeObservers()
        if self.logic is not None:
            self.logic.clearResults()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self._stopTask()
        if self.logic is not None:
            self.logic.clearResults()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller: Any, event: Any, node: Any) -> None:
        # Volumes loaded after the module was opened pre-fill empty sequence selectors (once loading is done).
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            qt.QTimer.singleShot(0, self._autoFillEmpty)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self._autoFillEmpty()
        pn = self._parameterNode
        if pn is not None and not _pathSet(pn.modelPath):
            model, database = self.logic.defaultResourcePaths()
            if model is not None:
                pn.modelPath = model
            if database is not None and not _pathSet(pn.databasePath):
                pn.databasePath = database

    def setParameterNode(self, inputParameterNode: SlicerFDNRetrievalParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller: Any = None, event: Any = None) -> None:
        pn = self._parameterNode
        busy = self._task is not None
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
        self.ui.cancelButton.enabled = busy
        self.ui.abnormalSliceSpinBox.enabled = bool(pn is not None and pn.useCompositeQuery)

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

    def onUseDemo(self) -> None:
        model, database = self.logic.defaultResourcePaths()
        if model is None:
            slicer.util.warningDisplay(
                "The demo model is not installed with this extension. Pick a model folder (bundle.json) "
                "and a database folder (manifest.json) made with the fdn command line.",
                windowTitle="FDN Retrieval",
            )
            return
        self._parameterNode.modelPath = model
        if database is not None:
            self._parameterNode.databasePath = database

    # ---------------------------------------------------------------- dependencies
    def _ensureDependencies(self) -> None:
        self.logic.ensureDependencies(self._parameterNode.wheelhousePath)

    def onInstall(self) -> None:
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            installed = self.logic.ensureDependencies(self._parameterNode.wheelhousePath)
            slicer.util.infoDisplay(
                "Installed: " + ", ".join(installed)
                if installed
                else "Everything needed is already installed.",
                windowTitle="FDN Retrieval",
            )

    def onUninstall(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
            "Remove the fdn-retrieval Python package (fdn_core) from Slicer's Python? Its dependencies and "
            "PyTorch stay installed. The module installs it again on next use.",
            windowTitle="FDN Retrieval",
        ):
            return
        with slicer.util.tryWithErrorDisplay("Removing the package failed.", waitCursor=True):
            self.logic.uninstallPackage()
            slicer.util.infoDisplay(
                "Removed. Restart Slicer before using the module again.", windowTitle="FDN Retrieval"
            )

    # ---------------------------------------------------------------- encode
    def onEncode(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not encode the study.", waitCursor=True):
            self._ensureDependencies()
            pn = self._parameterNode
            study = self.logic.readStudy({key: getattr(pn, f"{key}Volume") for key in SEQUENCES})
            self._setStatus(self.ui.studyStatusLabel, "\n".join(study.warnings), warning=bool(study.warnings))
            resources = self.logic.openResources(pn.modelPath, pn.databasePath, pn.device)
            self._setStatus(self.ui.resourcesStatusLabel, self.logic.resourcesSummary(), warning=False)
            warning = self.logic.deviceWarning(study)
            self._setStatus(self.ui.encodeStatusLabel, warning or "", warning=bool(warning))
            self._startTask("encode", self.logic.encodeTask(study, resources))

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.cancelButton.enabled = False
            self._setStatus(self.ui.encodeStatusLabel, "Cancelling...", warning=False)

    def _startTask(self, kind: str, task: Any) -> None:
        self._task, self._taskKind = task, kind
        self.ui.progressBar.setValue(0)
        self._updateButtons()
        task.start()
        self._timer.start()

    def _stopTask(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task.wait(timeout=30)
        self._task = None
        self._pendingHits = []
        self._timer.stop()

    def _poll(self) -> None:
        """Main-thread step: show progress; when the work ends, apply its result to the scene."""
        if self._pendingHits:
            self._showNextHit()
            return
        if self._task is None:
            self._timer.stop()
            return
        status = self._task.status()
        self.ui.progressBar.setValue(round(100 * status.fraction))
        self.ui.progressBar.setFormat(f"{status.message} %p%" if status.message else "%p%")
        if not status.finished:
            return
        task, kind = self._task, self._taskKind
        self._task = None
        self._timer.stop()
        self._updateButtons()
        if status.cancelled:
            self.ui.progressBar.setValue(0)
            self._setStatus(self.ui.encodeStatusLabel, "Cancelled. Nothing was changed.", warning=True)
            return
        with slicer.util.tryWithErrorDisplay(f"The {kind} step failed.", waitCursor=True):
            result = task.result()
            if kind == "encode":
                self._onEncoded(result)
            else:
                self._onSearched(result)

    def _onEncoded(self, encoded: Any) -> None:
        nodes = self.logic.publishEncoding(encoded)
        self.ui.querySliceSpinBox.maximum = encoded.num_slices - 1
        self.ui.abnormalSliceSpinBox.maximum = encoded.num_slices - 1
        inputNode = getattr(self._parameterNode, f"{self._parameterNode.displaySequence}Volume")
        slicer.util.setSliceViewerLayers(background=inputNode, fit=True)
        message = f"Encoded {encoded.num_slices} axial slices; results are in the folder '{nodes['folder']}'."
        if self.logic.indexedCase:
            case = self.logic.indexedCase
            message += f" This study is case {case} of the database: it is left out of the results."
        log.info(message)
        self._setStatus(self.ui.encodeStatusLabel, message, warning=False)
        self.ui.progressBar.setValue(100)
        self._updateButtons()

    # ---------------------------------------------------------------- search
    def onQuerySliceFromRedView(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not read the red view's slice.", waitCursor=False):
            self._parameterNode.querySlice = self.logic.querySliceFromRedView()

    def onSearch(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not search the database.", waitCursor=True):
            pn = self._parameterNode
            if pn.followRedView:
                pn.querySlice = self.logic.querySliceFromRedView()
            settings = self.logic.searchSettings(
                querySlice=pn.querySlice,
                mode=pn.mode,
                distance=pn.distance,
                topK=pn.topK,
                volumeWise=pn.volumeWise,
                abnormalSlice=pn.abnormalSlice if pn.useCompositeQuery else None,
            )
            self._startTask("search", self.logic.searchTask(settings))

    def _onSearched(self, hits: Any) -> None:
        pn = self._parameterNode
        table = self.logic.publishHits(hits)
        self.ui.resultsTableView.setMRMLTableNode(table)
        layoutManager = slicer.app.layoutManager()
        layoutId = self.logic.registerLayout(layoutManager.layoutLogic().GetLayoutNode(), len(hits))
        layoutManager.setLayout(layoutId)
        self.logic.showTable()
        self.logic.showQuery(getattr(pn, f"{pn.displaySequence}Volume"), pn.querySlice, self._fitView)
        self._pendingHits = list(hits)
        self._hitSequence = pn.displaySequence
        if not hits:
            self._setStatus(
                self.ui.encodeStatusLabel, "No result: the database has no other case.", warning=True
            )
        self._timer.start()  # reference cases load one per tick, so the GUI stays responsive

    def _showNextHit(self) -> None:
        hit = self._pendingHits.pop(0)
        with slicer.util.tryWithErrorDisplay(f"Could not show case {hit.case_id}.", waitCursor=True):
            self.logic.showHit(hit, self._hitSequence, self._fitView)
        done = self.logic.numHits() - len(self._pendingHits)
        self.ui.progressBar.setValue(int(100 * done / max(1, self.logic.numHits())))
        self.ui.progressBar.setFormat("Loading retrieved cases %p%")
        if not self._pendingHits:
            self._timer.stop()
            self.logic.linkResultViews()
            self._setStatus(
                self.ui.encodeStatusLabel, f"Showing the top {self.logic.numHits()} results.", warning=False
            )

    def onResultClicked(self, index: Any) -> None:
        with slicer.util.tryWithErrorDisplay("Could not show this result.", waitCursor=True):
            self.logic.showRow(int(index.row()), self._parameterNode.displaySequence, self._fitView)

    @staticmethod
    def _fitView(layoutName: str) -> None:
        widget = slicer.app.layoutManager().sliceWidget(layoutName)
        if widget is not None:
            widget.sliceLogic().FitSliceToAll()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _setStatus(label: Any, text: str, warning: bool) -> None:
        label.text = text
        label.setStyleSheet("color: #b35900;" if warning and text else "")


def _pathSet(path: Any) -> bool:
    return path is not None and str(path).strip() not in ("", ".")


#
# Logic
#


class SlicerFDNRetrievalLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer-side logic: gathers Slicer's objects and delegates every step to ``FDNRetrievalLib``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._resources = None
        self._resourcesKey: tuple[str, str, str] | None = None
        self._engine = None
        self.study = None
        self.encoded = None
        self.indexedCase: str | None = None
        self._hits: list[Any] = []
        self._table = None
        self._viewLink = None
        self._inputs: dict[str, Any] = {}
        self._segmentation = None

    def getParameterNode(self) -> SlicerFDNRetrievalParameterNode:
        return SlicerFDNRetrievalParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- dependencies
    @staticmethod
    def defaultResourcePaths() -> tuple[pathlib.Path | None, pathlib.Path | None]:
        from FDNRetrievalLib.deps import default_resource_paths

        return default_resource_paths(MODULE_DIR)

    def ensureDependencies(self, wheelhouse: Any = None) -> list[str]:
        """Install torch (PyTorch extension), the other requirements and fdn_core if missing, with consent."""
        import importlib

        from FDNRetrievalLib import deps

        plan = deps.make_plan(MODULE_DIR, wheelhouse if _pathSet(wheelhouse) else None)

        def installTorch(versionSpec: str) -> bool:
            try:
                import PyTorchUtils
            except ImportError as exc:
                raise deps.DependencyError(
                    "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager, "
                    "restart Slicer, and try again."
                ) from exc
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.torchInstalled():
                return True
            return (
                torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=versionSpec) is not None
            )

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
                        requester="FDN Retrieval",
                        skip_in_testing=False,
                    )

                break
        installed = deps.ensure_installed(
            plan, install_torch=installTorch, confirm=confirm, pip_install=pipInstall, pip_ensure=pipEnsure
        )
        importlib.invalidate_caches()
        if installed:
            log.info("FDN Retrieval installed: %s", ", ".join(installed))
        return installed

    @staticmethod
    def uninstallPackage() -> None:
        from FDNRetrievalLib.deps import DISTRIBUTION

        slicer.util.pip_uninstall(DISTRIBUTION)

    # ---------------------------------------------------------------- encode
    def readStudy(self, selection: dict[str, Any]) -> Any:
        from FDNRetrievalLib import scene

        self.study = scene.read_study(selection)
        self._inputs = dict(selection)
        return self.study

    def openResources(self, modelPath: Any, databasePath: Any, device: str) -> Any:
        """Load the model and database (hash-verified, matched by fingerprint); cached until paths change."""
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

    def resourcesSummary(self) -> str:
        r = self._resources
        return (
            f"Model {r.model_path.name} ({r.bundle.fingerprint[:12]}), database with "
            f"{len(r.database.cases)} cases "
            f"/ {len(r.database)} slices, on {r.bundle.device.type.upper()}."
        )

    def deviceWarning(self, study: Any) -> str | None:
        from FDNRetrievalLib import workflow

        return workflow.device_warning(self._resources.bundle, study.shape[2])

    def encodeTask(self, study: Any, resources: Any) -> Any:
        """A not-yet-started background task encoding ``study`` (numpy/torch only in the worker)."""
        from FDNRetrievalLib import workflow

        bundle = resources.bundle
        batch = workflow.choose_batch_size(bundle)

        def work(progress: Any) -> Any:
            return workflow.encode_study(
                bundle, study.image, study.affine, batch_size=batch, progress=progress
            )

        return workflow.BackgroundTask(work, name="FDN encode")

    def publishEncoding(self, encoded: Any) -> dict[str, Any]:
        """Main thread: segmentation + reconstruction nodes in a subject-hierarchy folder."""
        from FDNRetrievalLib import scene, workflow

        self.encoded = encoded
        self.indexedCase = workflow.find_indexed_case(self._resources.database, encoded)
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
        for node in recon:
            source = self._inputs[SEQUENCES[recon.index(node)]]
            sourceDisplay, display = source.GetDisplayNode(), node.GetDisplayNode()
            if sourceDisplay is not None and display is not None:
                display.SetAutoWindowLevel(False)
                display.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())
        scene.put_in_folder(slicer.mrmlScene, folderName, [segmentation, *recon])
        scene.show_only_in_views(slicer.mrmlScene, segmentation, STANDARD_VIEWS)
        self._segmentation = segmentation
        return {"folder": folderName, "segmentation": segmentation, "reconstruction": recon}

    # ---------------------------------------------------------------- search
    def querySliceFromRedView(self) -> int:
        from FDNRetrievalLib import scene

        if self.study is None:
            raise ValueError("Encode a study first.")
        centre = scene.slice_view_center(slicer.mrmlScene, "Red")
        return scene.axial_index_from_ras(self.study.affine, self.study.shape, centre)

    @staticmethod
    def searchSettings(
        querySlice: int, mode: str, distance: str, topK: int, volumeWise: bool, abnormalSlice: Any
    ) -> Any:
        from FDNRetrievalLib import workflow

        return workflow.SearchSettings(
            query_slice=int(querySlice),
            mode=mode,
            distance=distance,
            top_k=int(topK),
            volume_wise=bool(volumeWise),
            abnormal_slice=None if abnormalSlice is None else int(abnormalSlice),
        )

    def searchTask(self, settings: Any) -> Any:
        from dataclasses import replace

        from FDNRetrievalLib import workflow

        if self.encoded is None:
            raise ValueError("Encode a study first.")
        if self._engine is None:
            self._engine = workflow.make_search_engine(self._resources.database)
        engine, encoded = self._engine, self.encoded
        settings = replace(settings, exclude_case=self.indexedCase)

        def work(progress: Any) -> Any:
            progress.update(0, 1, "Searching")
            hits = workflow.search_study(engine, encoded, settings)
            progress.update(1, 1, "Searching")
            return hits

        return workflow.BackgroundTask(work, name="FDN search")

    def publishHits(self, hits: list[Any]) -> Any:
        from FDNRetrievalLib import scene

        self._hits = list(hits)
        self._table = scene.write_results_table(slicer.mrmlScene, hits, "FDN retrieval results", self._table)
        return self._table

    def showTable(self) -> None:
        from FDNRetrievalLib import scene

        scene.show_table_in_view(slicer.mrmlScene, self._table)

    def numHits(self) -> int:
        return len(self._hits)

    @staticmethod
    def registerLayout(layoutNode: Any, topK: int) -> int:
        from FDNRetrievalLib import scene

        return scene.register_results_layout(layoutNode, max(1, topK))

    def showQuery(self, volume: Any, querySlice: int, fitView: Any) -> None:
        from FDNRetrievalLib import scene

        scene.assign_view_volumes(slicer.mrmlScene, scene.QUERY_VIEW, volume)
        fitView(scene.QUERY_VIEW)
        scene.jump_to_study_slice(slicer.mrmlScene, scene.QUERY_VIEW, self.study, querySlice)
        if self._segmentation is not None and slicer.mrmlScene.IsNodePresent(self._segmentation):
            scene.show_only_in_views(
                slicer.mrmlScene, self._segmentation, [*STANDARD_VIEWS, scene.QUERY_VIEW]
            )

    def showHit(self, hit: Any, sequence: str, fitView: Any) -> None:
        from fdn_core.data.readers import CaseFiles
        from FDNRetrievalLib import scene

        files = CaseFiles.from_source(hit.case_id, self._resources.database.sources(hit.case_id))
        case = scene.load_reference_case(slicer.mrmlScene, slicer.modules.volumes.logic(), files, sequence)
        view = scene.result_view_names(hit.rank)[-1]
        scene.assign_view_volumes(slicer.mrmlScene, view, case.volume, case.labels)
        fitView(view)
        scene.jump_to_axial_slice(slicer.mrmlScene, view, case.volume, hit.slice_index)
        scene.put_in_folder(
            slicer.mrmlScene, "FDN retrieved cases", [n for n in (case.volume, case.labels) if n is not None]
        )

    def showRow(self, row: int, sequence: str, fitView: Any) -> None:
        if not 0 <= row < len(self._hits):
            return
        hit = self._hits[row]
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(
            self.registerLayout(layoutManager.layoutLogic().GetLayoutNode(), len(self._hits))
        )
        self.showHit(hit, sequence, fitView)
        slicer.util.showStatusMessage(
            f"Result {hit.rank}: case {hit.case_id}, axial slice {hit.slice_index}", 5000
        )

    def linkResultViews(self) -> None:
        from FDNRetrievalLib import scene

        if self._viewLink is not None:
            self._viewLink.remove()
        names = [scene.QUERY_VIEW, *scene.result_view_names(len(self._hits))]
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
    """Runs the same scenario as Testing/test_slicer_logic.py, inside Slicer, on a tiny synthetic cohort."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SlicerFDNRetrievalScenario()

    def test_SlicerFDNRetrievalScenario(self) -> None:
        self.delayDisplay("Installing/checking the Python packages")
        SlicerFDNRetrievalLogic().ensureDependencies()
        from FDNRetrievalLib import scenario

        with tempfile.TemporaryDirectory(prefix="FDNRetrievalTest") as tmp:
            work = pathlib.Path(tmp)
            self.delayDisplay("Building a tiny model, cohort and database")
            fixture = scenario.build_fixture(work)
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
        self.delayDisplay(f"Test passed ({report['num_hits']} hits, {report['num_slices']} slices)")
