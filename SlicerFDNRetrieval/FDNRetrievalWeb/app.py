"""The ``fdn web`` application: the Slicer panel's workflow as a trame-slicer page.

Pick a study (a case of the data folder or of the database's cohort, or four uploaded files), **Encode**
(progress bar, Cancel), see the predicted segmentation over the study and the normal-appearing image beside it
(or blended over it), choose the query slice with the query view's slider, set the search (mode, distance,
top-K, one result per case, axial context, references with or without a lesion, composite query) and
**Search**: the query and the top-K retrieved slices appear as slice views with their tumour labels, captioned
with case, slice and distance, above a results table; a click on a result (caption or table row) shows that
case at that slice large beside the query.

How the server stays responsive: reading studies, encoding, searching and reading the retrieved cases run in a
worker thread (``FDNRetrievalLib.tasks.BackgroundTask``, the panel's worker, with its Cancel); the asyncio
event loop that serves every browser tab only polls it every ``POLL_S`` and applies the results to the MRML
scene (MRML and VTK stay on the loop's thread). torch, numpy's large copies, nibabel's decompression and the
compiled search kernel release the GIL, so the loop keeps answering (measured: ``Testing/test_web_app.py``).
Expected problems (bad input, a database from another model, missing files) become messages in the page; an
unexpected error shows its type and message and leaves its traceback in the server log, never in the page.

One server is one reading session: every tab connected to it shows the same study and results (trame shares
one state per server). Start one server per reader (another ``--port``) for separate sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.labels import LESION_FILTER_LABELS, MIN_LESION_ML, MODALITIES, PAPER_DISTANCES
from FDNRetrievalLib import scene as sc
from FDNRetrievalLib import tasks
from FDNRetrievalLib import views as lib_views
from FDNRetrievalLib.naming import SEQUENCE_LABELS

from .studies import DisplayVolume, StudyCatalogue, UploadArea, ViewVolume, read_display_volume
from .viewer import DETAIL_LAYOUT, DETAIL_VIEW, QUERY_VIEW, SessionViewer

__all__ = ["POLL_S", "FDNWebApp", "WebSettings"]

log = logging.getLogger(__name__)

#: How often the event loop looks at a running worker (s): the progress bar's update rate.
POLL_S = 0.1
#: Result views made ahead of the first search (the default top-K), so that search does not wait for them.
PREPARED_RESULTS = 10
_MESSAGE_LIMIT = 5


@dataclass
class WebSettings:
    """What ``fdn web`` was started with."""

    model: Path
    database: Path | None
    data: Path | None = None
    device: str = "auto"
    threads: int = 1
    origin: str = ""
    upload_parent: Path | None = None
    notes: list[str] = field(default_factory=list)


class _BusyError(RuntimeError):
    pass


class FDNWebApp:
    """One trame server with one Slicer scene: the page, its state and its handlers.

    ``server``: a trame server (a fresh one by default). The model and database are opened in the background
    once the server runs (``start_background_work``); the page says when they are ready.
    """

    def __init__(self, settings: WebSettings, server: Any = None) -> None:
        import slicer
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp

        self.settings = settings
        self.server = server or get_server(f"fdn-web-{id(self)}", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.uploads = UploadArea(settings.upload_parent)
        self.slicer_app = SlicerApp()
        slicer.mrmlScene = self.slicer_app.scene  # slicer.util helpers look for it
        _register_view_factory(self.slicer_app.view_manager, self.server, self._populate_view)
        self.layouts = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.viewer = SessionViewer(self.slicer_app, self.layouts, on_query_slice=self._on_query_slice)

        self.resources: Any = None
        self.engine: Any = None
        self.catalogue = StudyCatalogue()
        self.study_files: Any = None
        self.encoded: Any = None
        self.indexed_case: str | None = None
        self.hits: list[Any] = []
        self.volumes: dict[tuple[str, str], DisplayVolume] = {}
        self._task: tasks.BackgroundTask[Any] | None = None
        self._detail_rank: int | None = None
        self._upload_chunks: list[dict[str, Any]] = []
        self._message_ids = itertools.count(1)
        self._closed = False
        self._init_state()
        self._build_ui()
        self.ctrl.on_server_ready.add(self._on_server_ready)

    # ------------------------------------------------------------------------------------------- state

    def _init_state(self) -> None:
        s = self.state
        s.update(
            {
                "fdn_ready": False,
                "fdn_resources": "Opening the model and the database ...",
                "fdn_busy": False,
                "fdn_busy_label": "",
                "fdn_progress": 0,
                "fdn_progress_text": "",
                "fdn_messages": [],
                "fdn_studies": [],
                "fdn_study_key": None,
                "fdn_study": "",
                "fdn_study_info": "",
                "fdn_slices": 0,
                "fdn_encoded": False,
                "fdn_query_slice": None,
                "fdn_sequence": "flair",
                "fdn_sequences": [{"title": SEQUENCE_LABELS[m], "value": m} for m in MODALITIES],
                "fdn_normal_opacity": 0.0,
                "fdn_mode": "both",
                "fdn_distance": "euclidean",
                "fdn_distances": list(PAPER_DISTANCES),
                "fdn_top_k": 10,
                "fdn_volume_wise": True,
                "fdn_axial_context": False,
                "fdn_lesion": "any",
                "fdn_lesions": [{"title": t, "value": v} for v, t in LESION_FILTER_LABELS.items()],
                "fdn_min_lesion_ml": MIN_LESION_ML,
                "fdn_composite": False,
                "fdn_abnormal_slice": 0,
                "fdn_hits": [],
                "fdn_captions": {},
                "fdn_view": "study",
                "fdn_detail_caption": "",
                "fdn_upload_key": 0,
                "fdn_timings": {},
            }
        )
        s.change("fdn_study_key")(self._on_study_key)
        s.change("fdn_sequence")(self._on_sequence)
        s.change("fdn_normal_opacity")(self._on_normal_opacity)
        self.server.trigger("fdn_ping")(self.ping)

    def ping(self) -> dict[str, Any]:
        """A cheap round trip (the responsiveness test uses it): server time and whether work runs."""
        return {"time": time.time(), "busy": self._task is not None}

    def _message(self, kind: str, text: str) -> None:
        """Show a message in the page (kind: error, warning, info, success); the newest few are kept."""
        entry = {"id": next(self._message_ids), "type": kind, "text": text}
        with self.state:
            self.state.fdn_messages = [*self.state.fdn_messages, entry][-_MESSAGE_LIMIT:]

    def dismiss_message(self, message_id: int) -> None:
        """Remove one message (its close button)."""
        self.state.fdn_messages = [m for m in self.state.fdn_messages if m["id"] != message_id]

    def _report(self, what: str, exc: BaseException) -> None:
        text, expected = tasks.describe_failure(exc)
        if not expected:
            log.error("%s failed", what, exc_info=exc)
            text = f"{what} failed unexpectedly ({text}). The server log has the details."
        self._message("error", text)

    # ------------------------------------------------------------------------------------------ tasks

    def _start(
        self,
        label: str,
        work: Callable[[Any], Any],
        on_done: Callable[[Any, tasks.TaskStatus], None],
        on_tick: Callable[[], None] | None = None,
    ) -> bool:
        """Run ``work(progress)`` in a worker thread; ``on_done(result, status)`` on the event loop, and
        ``on_tick()`` at every poll meanwhile (to show partial results). One task at a time: False (and a
        message) while another one runs."""
        if self._task is not None:
            self._message("info", f"Wait until '{self.state.fdn_busy_label}' has finished, or cancel it.")
            return False
        task = tasks.BackgroundTask(work, name=label).start()
        self._task = task
        with self.state:
            self.state.update(
                {"fdn_busy": True, "fdn_busy_label": label, "fdn_progress": 0, "fdn_progress_text": label}
            )
        from trame_server.utils.asynchronous import create_task

        create_task(self._follow(task, label, on_done, on_tick))
        return True

    async def _follow(
        self,
        task: tasks.BackgroundTask[Any],
        label: str,
        on_done: Callable[[Any, tasks.TaskStatus], None],
        on_tick: Callable[[], None] | None,
    ) -> None:
        try:
            while True:
                status = task.status()
                with self.state:
                    self.state.fdn_progress = round(100.0 * status.fraction, 1)
                    self.state.fdn_progress_text = status.message or label
                    if on_tick is not None and not status.finished:
                        try:
                            on_tick()
                        except Exception as exc:  # showing partial results must not stop the polling
                            self._report(label, exc)
                if status.finished:
                    break
                await asyncio.sleep(POLL_S)
            self._task = None
            if status.cancelled:
                self._message("info", f"{label}: cancelled.")
            elif status.error is not None:
                self._report(label, status.error)
            else:
                applying = time.perf_counter()
                try:
                    with self.state:
                        on_done(task.result(), status)
                except Exception as exc:  # applying results must never take the page down
                    self._report(label, exc)
                log.info(
                    "%s: %.2f s in the worker, %.3f s applying the results on the event loop",
                    label,
                    status.elapsed_s,
                    time.perf_counter() - applying,
                )
        finally:
            self._task = None
            with self.state:
                self.state.update({"fdn_busy": False, "fdn_busy_label": "", "fdn_progress_text": ""})

    def cancel(self) -> None:
        """Cancel the running work (it stops at its next progress report, within a fraction of a second)."""
        if self._task is not None:
            self._task.cancel()

    # ---------------------------------------------------------------------------------- model, database

    def _on_server_ready(self, **_: Any) -> None:
        self.start_background_work()

    def start_background_work(self) -> None:
        """Open the model and database (hash-verified), build the search engine, list the studies."""
        settings = self.settings

        def work(progress: Any) -> tuple[Any, Any, StudyCatalogue]:
            import torch

            from fdn_core.codes.search import Query
            from FDNRetrievalLib import workflow as wf

            torch.set_num_threads(settings.threads)
            progress.update(0, 3, "Opening the model and the database")
            resources = wf.open_resources(settings.model, settings.database, device=settings.device)
            progress.update(1, 3, "Preparing the model and the search")
            # The first pass through the network initialises torch's kernels (seconds on a CPU), the first
            # search loads (on a new machine: compiles) the search kernel: both now, not at the first click.
            size = resources.bundle.preprocess.image_size
            resources.bundle.reconstruct(np.zeros((1, len(MODALITIES), size, size), np.float32), batch_size=1)
            engine = wf.make_search_engine(resources.database, resources.bundle)
            first = np.asarray(resources.database.normal_codes[0])
            engine.search(
                Query(normal=first, abnormal=np.asarray(resources.database.abnormal_codes[0])), top=1
            )
            progress.update(2, 3, "Listing the studies")
            catalogue = StudyCatalogue.build(resources.database, settings.data)
            return resources, engine, catalogue

        def done(result: tuple[Any, Any, StudyCatalogue], status: tasks.TaskStatus) -> None:
            self.resources, self.engine, self.catalogue = result
            db = self.resources.database
            self.state.fdn_ready = True
            self.state.fdn_resources = (
                f"Model {self.resources.model_path.name} on {self.resources.bundle.device.type}; database "
                f"{self.resources.database_path} ({len(db.cases)} cases, {len(db)} slices)"
                + (f", from {settings.origin}" if settings.origin else "")
            )
            self.state.fdn_studies = self.catalogue.items()
            # the learned distance only when the model has a retrieval embedding
            self.state.fdn_distances = list(self.engine.offered_distances)
            for problem in self.catalogue.problems[:3]:
                self._message("warning", problem)
            if self.resources.bundle.device.type == "cpu":
                log.info("encoding on the CPU")
            self._prepare_views()

        if not self._start("Opening the model and the database", work, done):
            return
        for note in settings.notes:
            self._message("info", note)

    def _prepare_views(self) -> None:
        """Make the result views and the large view ahead of the first search, one per event-loop turn."""
        from trame_server.utils.asynchronous import create_task

        async def prepare() -> None:
            for tag in (*sc.result_view_names(PREPARED_RESULTS), DETAIL_VIEW):
                if self._closed:
                    return
                with self.state:  # a view's page template is state: push it with the view, whole
                    self.viewer.ensure_view(tag)
                await asyncio.sleep(0.05)

        create_task(prepare())

    # ------------------------------------------------------------------------------------------- study

    def _on_study_key(self, fdn_study_key: str | None = None, **_: Any) -> None:
        if not fdn_study_key or fdn_study_key.startswith("upload:"):
            return
        try:
            files = self.catalogue.files(fdn_study_key, self._database())
        except Exception as exc:
            self._report("Opening the study", exc)
            return
        self._load_study(files)

    def _database(self) -> Any:
        return None if self.resources is None else self.resources.database

    def _load_study(self, files: Any) -> None:
        """Read and check the study's four sequences (worker), then show it (event loop)."""
        from fdn_core.data.readers import load_case

        def work(progress: Any) -> tuple[Any, dict[str, ViewVolume]]:
            progress.update(0, 2, f"Reading {files.case_id}")
            case = load_case(files)
            progress.update(1, 2, f"Preparing {files.case_id} for display")
            inputs = {
                m: ViewVolume.from_canonical(case.image[c], case.affine) for c, m in enumerate(MODALITIES)
            }
            return case, inputs

        def done(result: tuple[Any, dict[str, ViewVolume]], status: tasks.TaskStatus) -> None:
            case, inputs = result
            volumes = sc.StudyVolumes(
                image=case.image,
                affine=case.affine,
                reference_ijk_to_ras=case.affine,
                reference_shape=tuple(int(s) for s in case.image.shape[1:]),  # type: ignore[arg-type]
                reference_name=case.case_id,
                names={m: f"{case.case_id} {SEQUENCE_LABELS[m]}" for m in MODALITIES},
                resampled=tuple(case.resampled),
            )
            self._forget_results()
            self.encoded, self.indexed_case = None, None
            self.viewer.show_study(case.case_id, volumes, inputs)
            self.study_files = files
            self.uploads.discard_others(files)
            shape = volumes.shape
            self.state.update(
                {
                    "fdn_study": case.case_id,
                    "fdn_study_info": f"{shape[0]} x {shape[1]} x {shape[2]} voxels, "
                    + " x ".join(f"{s:.3g}" for s in volumes.spacing)
                    + " mm",
                    "fdn_slices": shape[2],
                    "fdn_encoded": False,
                    "fdn_view": "study",
                    "fdn_abnormal_slice": shape[2] // 2,
                }
            )
            for kind in case.resampled:
                label = SEQUENCE_LABELS.get(kind, kind)
                self._message(
                    "warning",
                    f"{label} is on another voxel grid than T1ce; it was resampled onto the T1ce grid "
                    "(linear interpolation). Check that the four files come from one examination.",
                )

        self._start(f"Opening {files.case_id}", work, done)

    # ---------------------------------------------------------------------------------------- uploads

    def upload_chunk(self, files: list[dict[str, Any]]) -> None:
        """The page sends the chosen files in chunks; an empty list ends the upload."""
        if files:
            self._upload_chunks.extend(files)
            return
        chunks, self._upload_chunks = self._upload_chunks, []
        self.state.fdn_upload_key += 1
        try:
            from trame.app.file_upload import ClientFile

            pairs = [(ClientFile(f).name or "file", ClientFile(f).content or b"") for f in chunks]
            files = self.uploads.stage(pairs)
        except Exception as exc:
            self._report("Upload", exc)
            return
        self.state.fdn_study_key = None
        self._load_study(files)

    def upload_failed(self, status: str, error: str | None = None) -> None:
        """The browser could not send the files."""
        if status != "success":
            self._message(
                "error", f"The upload did not reach the server ({error or 'unknown reason'}); try again."
            )

    # ----------------------------------------------------------------------------------------- encode

    def encode(self) -> None:
        """Encode the study: codes of every slice, predicted segmentation, normal-appearing image."""
        if self.viewer.study is None or self.resources is None:
            self._message("info", "Pick a study first (and wait until the model and database are open).")
            return
        from FDNRetrievalLib import workflow as wf

        resources, study = self.resources, self.viewer.study
        try:
            min_ml = float(self.state.fdn_min_lesion_ml)
        except (TypeError, ValueError):
            min_ml = float("nan")
        if not (np.isfinite(min_ml) and 0 <= min_ml <= 100):
            self._message("error", "Smallest lesion shown: give a number of mL from 0 to 100 (0 shows all).")
            return

        def work(progress: Any) -> tuple[Any, str | None, dict[str, ViewVolume]]:
            batch = wf.choose_batch_size(resources.bundle)
            encoded = wf.encode_study(
                resources.bundle,
                study.volumes.image,
                study.volumes.affine,
                batch_size=batch,
                progress=progress,
                min_lesion_ml=min_ml,
            )
            recon = {}
            if encoded.recon_normal is not None:
                recon = {
                    m: ViewVolume.from_canonical(
                        encoded.recon_normal[c], study.volumes.affine, study.windows[m]
                    )
                    for c, m in enumerate(MODALITIES)
                }
            return encoded, wf.find_indexed_case(resources.database, encoded), recon

        def done(result: tuple[Any, str | None, dict[str, ViewVolume]], status: tasks.TaskStatus) -> None:
            if self.viewer.study is not study:
                return  # another study was opened meanwhile
            encoded, indexed, recon = result
            self.encoded, self.indexed_case = encoded, indexed
            self.viewer.show_encoded(encoded.seg, recon)
            k = self.viewer.query_slice()
            self.state.update(
                {
                    "fdn_encoded": True,
                    "fdn_abnormal_slice": k if k is not None else encoded.num_slices // 2,
                    "fdn_timings": {**self.state.fdn_timings, "encode_s": round(status.elapsed_s, 2)},
                }
            )
            text = (
                f"Encoded {encoded.num_slices} slices in {status.elapsed_s:.1f} s. "
                f"Segmentation: {encoded.lesions.describe()}."
            )
            if indexed is not None:
                text += f" This study is case {indexed} of the database: it is left out of the results."
            self._message("success", text)
            warning = wf.device_warning(resources.bundle, encoded.num_slices)
            if warning and status.elapsed_s > 30:
                self._message("info", warning)

        self._start("Encoding", work, done)

    # ----------------------------------------------------------------------------------------- search

    def _settings(self) -> Any:
        from fdn_core.errors import DataError
        from FDNRetrievalLib import workflow as wf

        k = self.viewer.query_slice()
        if k is None:
            raise DataError("The query view is outside the study: move its slider onto the brain.")
        s = self.state
        abnormal = int(s.fdn_abnormal_slice) if s.fdn_composite else None
        return wf.SearchSettings(
            query_slice=k,
            mode=str(s.fdn_mode),
            distance=str(s.fdn_distance),
            top_k=int(s.fdn_top_k),
            volume_wise=bool(s.fdn_volume_wise),
            axial_context=bool(s.fdn_axial_context),
            lesion=str(s.fdn_lesion),
            abnormal_slice=abnormal,
            exclude_case=self.indexed_case,
        )

    def search(self) -> None:
        """Search the database with the query slice (worker). The table and the captions appear as soon as
        the search returns; each result view fills in as its case has been read (worker, in rank order)."""
        if self.encoded is None:
            self._message("info", "Encode the study first.")
            return
        from FDNRetrievalLib import workflow as wf

        try:
            settings = self._settings()
        except Exception as exc:
            self._report("Search", exc)
            return
        engine, encoded, sequence = self.engine, self.encoded, self.viewer.sequence
        files_of, loaded = self._reader()
        arrived: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        started = time.perf_counter()

        def work(progress: Any) -> None:
            hits = wf.search_study(engine, encoded, settings)
            arrived.put(("hits", hits, time.perf_counter() - started))
            cases = [h.case_id for h in hits]
            self._read_volumes(cases, sequence, loaded, progress, files_of, arrived)

        def done(_: None, status: tasks.TaskStatus) -> None:
            self._drain(arrived)
            self._tidy_references()
            timings = {**self.state.fdn_timings, "search_total_s": round(status.elapsed_s, 2)}
            self.state.fdn_timings = timings
            if not self.hits:
                self._message("info", wf.no_result_message(settings.lesion))

        self._start("Searching", work, done, on_tick=lambda: self._drain(arrived))

    def _reader(self) -> tuple[Callable[[str], Any], set[tuple[str, str]]]:
        """How the worker finds a database case's files, and the (case, sequence) pairs already loaded."""
        from fdn_core.data.readers import CaseFiles

        database = self.resources.database
        loaded = {key for key in self.volumes if self.viewer.has_reference(*key)}
        return (lambda case_id: CaseFiles.from_database(database, case_id)), loaded

    @staticmethod
    def _read_volumes(
        case_ids: list[str],
        sequence: str,
        loaded: set[tuple[str, str]],
        progress: Any,
        files_of: Callable[[str], Any],
        arrived: queue.SimpleQueue[tuple[str, Any, Any]],
    ) -> None:
        """Worker: read ``sequence`` and labels of each case not yet loaded, in rank order, handing each over
        as it is read. A case that cannot be read is handed over as its error message (shown in the page)
        instead of failing the whole search."""
        todo = [c for c in dict.fromkeys(case_ids) if (c, sequence) not in loaded]
        for i, case_id in enumerate(todo):
            progress.update(i, len(todo), f"Reading retrieved case {case_id} ({i + 1} of {len(todo)})")
            try:
                value: Any = read_display_volume(files_of(case_id), sequence)
            except Exception as exc:
                text, expected = tasks.describe_failure(exc)
                if not expected:
                    log.error("reading case %s failed", case_id, exc_info=exc)
                value = text
            arrived.put(("volume", (case_id, sequence), value))
        progress.update(len(todo), max(len(todo), 1), "Showing the results")

    def _drain(self, arrived: queue.SimpleQueue[tuple[str, Any, Any]]) -> None:
        """Event loop: show what the worker has handed over so far (the hits, then case by case)."""
        while True:
            try:
                kind, key, value = arrived.get_nowait()
            except queue.Empty:
                return
            if kind == "hits":
                self.hits = key
                self.state.fdn_timings = {**self.state.fdn_timings, "search_s": round(value, 3)}
                self._show_hits()
            elif isinstance(value, DisplayVolume):
                self.volumes[key] = value
                self.viewer.reference_nodes(value)
                self._show_case(key[0])
            else:
                self._message("warning", value)
                self._show_case(key[0], problem=True)

    def _show_hits(self) -> None:
        """The results layout, table and captions; result views whose case is loaded already are shown."""
        top_k = max(1, len(self.hits))
        self.viewer.show_results_layout(top_k)
        rows = [
            {"rank": h.rank, "case": h.case_id, "slice": h.slice_index, "distance": f"{h.distance:.4g}"}
            for h in self.hits
        ]
        k = self.viewer.query_slice()
        captions = {QUERY_VIEW: f"{self.state.fdn_study} · slice {k}" if k is not None else ""}
        for tag, hit in zip(sc.result_view_names(top_k), self.hits):
            captions[tag] = f"{hit.case_id} · slice {hit.slice_index} · reading ..."
        self.state.update(
            {"fdn_hits": rows, "fdn_captions": captions, "fdn_view": "results", "fdn_detail_caption": ""}
        )
        for case_id in dict.fromkeys(h.case_id for h in self.hits):
            if (case_id, self.viewer.sequence) in self.volumes:
                self._show_case(case_id)

    def _show_case(self, case_id: str, problem: bool = False) -> None:
        """Fill the result views of ``case_id`` (several with per-slice results) and their captions."""
        volume = self.volumes.get((case_id, self.viewer.sequence))
        captions = dict(self.state.fdn_captions)
        for tag, hit in zip(sc.result_view_names(len(self.hits)), self.hits):
            if hit.case_id != case_id:
                continue
            if volume is not None and not problem:
                self.viewer.show_reference(tag, volume, hit.slice_index)
                captions[tag] = f"{hit.case_id} · slice {hit.slice_index} · {hit.distance:.3g}"
            else:
                captions[tag] = f"{hit.case_id}: cannot be shown"
        self.state.fdn_captions = captions

    def _tidy_references(self) -> None:
        """Keep the loaded reference cases bounded (the current results always stay)."""
        sequence = self.viewer.sequence
        self.viewer.forget_references([(h.case_id, sequence) for h in self.hits])
        self.volumes = {key: v for key, v in self.volumes.items() if self.viewer.has_reference(*key)}

    def _forget_results(self) -> None:
        self.hits, self._detail_rank = [], None
        self.state.update({"fdn_hits": [], "fdn_captions": {}, "fdn_detail_caption": ""})

    # ----------------------------------------------------------------------------------------- detail

    def open_result(self, rank: int) -> None:
        """Show result ``rank`` (1-based) large beside the query."""
        hits = [h for h in self.hits if h.rank == int(rank)]
        if not hits:
            return
        hit = hits[0]
        volume = self.volumes.get((hit.case_id, self.viewer.sequence))
        if volume is None:
            why = "it is still being read" if self._task is not None else "see the message above"
            self._message("info", f"Case {hit.case_id} cannot be shown yet ({why}).")
            return
        self.viewer.show_reference(DETAIL_VIEW, volume, hit.slice_index)
        self.viewer.set_layout(DETAIL_LAYOUT)
        self._detail_rank = hit.rank
        caption = lib_views.hit_caption(hit, self.viewer.sequence)
        self.state.update(
            {
                "fdn_view": "detail",
                "fdn_detail_caption": caption,
                "fdn_captions": {**self.state.fdn_captions, DETAIL_VIEW: caption},
            }
        )

    def back_to_results(self) -> None:
        """Return from the large view to all results."""
        if self.hits:
            self._detail_rank = None
            self.viewer.show_results_layout(len(self.hits))
            self.state.fdn_view = "results"

    def back_to_study(self) -> None:
        """Show the study layout (query and normal-appearing views)."""
        from .viewer import STUDY_LAYOUT

        self.viewer.set_layout(STUDY_LAYOUT)
        self.state.fdn_view = "study"

    # ----------------------------------------------------------------------------------- view controls

    def _on_query_slice(self, k: int | None) -> None:
        with self.state:
            self.state.fdn_query_slice = k
            if k is not None and not self.state.fdn_composite:
                self.state.fdn_abnormal_slice = k  # the composite query starts from the query slice
            if self.state.fdn_view != "study" and k is not None:
                self.state.fdn_captions = {
                    **self.state.fdn_captions,
                    QUERY_VIEW: f"{self.state.fdn_study} · slice {k}",
                }

    def _on_sequence(self, fdn_sequence: str = "flair", **_: Any) -> None:
        if fdn_sequence not in MODALITIES or fdn_sequence == self.viewer.sequence:
            return
        self.viewer.set_sequence(fdn_sequence)
        if not self.hits:
            return
        hits, detail = list(self.hits), self.state.fdn_view == "detail"
        rank = self._detail_rank
        files_of, loaded = self._reader()
        arrived: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        if not detail:
            self._show_hits()

        def work(progress: Any) -> None:
            self._read_volumes([h.case_id for h in hits], fdn_sequence, loaded, progress, files_of, arrived)

        def done(_: None, status: tasks.TaskStatus) -> None:
            self._drain(arrived)
            self._tidy_references()
            if detail and rank is not None and self.hits == hits:
                self.open_result(rank)

        self._start(
            f"Showing {SEQUENCE_LABELS[fdn_sequence]}", work, done, on_tick=lambda: self._drain(arrived)
        )

    def _on_normal_opacity(self, fdn_normal_opacity: float = 0.0, **_: Any) -> None:
        self.viewer.set_normal_opacity(float(fdn_normal_opacity or 0.0))

    # -------------------------------------------------------------------------------------------- UI

    def _populate_view(self, server: Any, view_id: str, view: Any) -> None:
        """Inside each slice view: its label (top left), its slice slider and its caption (bottom). A result's
        caption opens it large."""
        from trame.widgets import html
        from trame_slicer.app.logic import connect_slice_view_slider_to_state
        from trame_slicer.app.ui import Slider

        tag = view.get_singleton_tag()
        label = {QUERY_VIEW: "Q", "FDNNormal": "Normal-appearing", DETAIL_VIEW: "Result"}.get(
            tag, tag.removeprefix("FDNResult")
        )
        color = "#F34A33" if tag == QUERY_VIEW else ("#8E8E8E" if tag == "FDNNormal" else "#6EB04B")
        html.Div(
            label,
            classes="fdn-view-label",
            style=f"position:absolute;top:4px;left:6px;padding:0 6px;border-radius:4px;background:{color};"
            "color:white;font-weight:600;font-size:13px;",
        )
        with html.Div(
            classes="fdn-view-footer",
            style="position:absolute;bottom:0;left:0;width:100%;background:rgba(0,0,0,0.55);",
        ):
            Slider(
                typed_state=connect_slice_view_slider_to_state(server, view),
                classes="fdn-slice-slider mx-2",
                theme="dark",
                density="compact",
            )
            rank = tag.removeprefix("FDNResult")
            # Small result views: the caption wraps rather than hiding the distance.
            kwargs: dict[str, Any] = {"style": "line-height:1.25;overflow-wrap:anywhere;"}
            if rank.isdigit():
                kwargs["click"] = (self.open_result, f"[{int(rank)}]")
                kwargs["style"] += "cursor:pointer;"
            html.Div(
                f"{{{{ fdn_captions['{tag}'] || '' }}}}",
                classes=f"fdn-caption fdn-caption-{tag} text-caption text-white px-2 pb-1",
                **kwargs,
            )

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v3

        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            self.ui = layout
            layout.title.set_text("FDN Retrieval")
            client.Style(
                "html { overflow-y: hidden; } .fdn-view-footer .v-slider { margin: 0 !important; }"
                " .fdn-row { cursor: pointer; } .fdn-row:hover { background: rgba(110,176,75,0.15); }"
            )
            with layout.toolbar:
                v3.VSpacer()
                html.Div(
                    "{{ fdn_resources }}", classes="text-caption mr-4 text-truncate", style="max-width: 60%;",
                    id="fdn-resources",
                )  # fmt: skip
            with layout.drawer as drawer:
                drawer.width = 390
                self._build_panel()
            layout.footer.hide()
            with layout.content, html.Div(style="display:flex;flex-direction:column;height:100%;"):
                with html.Div(style="flex:1 1 auto;display:flex;min-height:0;", id="fdn-views"):
                    self.layouts.initialize_layout_grid(layout)
                with html.Div(
                    v_if="fdn_view === 'detail'",
                    classes="d-flex align-center px-3 py-1",
                    style="background:#1e1e1e;color:white;",
                ):
                    html.Div("{{ fdn_detail_caption }}", id="fdn-detail-caption", classes="flex-grow-1")
                    v3.VBtn("Back to all results", click=self.back_to_results, size="small", id="fdn-back")
                self._build_table()

    def _build_panel(self) -> None:
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        with html.Div(classes="pa-3 d-flex flex-column", style="gap: 10px;"):
            with html.Div(id="fdn-messages"):
                v3.VAlert(
                    "{{ m.text }}",
                    v_for="m in fdn_messages",
                    key="m.id",
                    type=("m.type",),
                    density="compact",
                    variant="tonal",
                    closable=True,
                    classes="fdn-message mb-2 text-body-2",
                    click_close=(self.dismiss_message, "[m.id]"),
                )

            # --- study
            html.Div("Study", classes="text-subtitle-2")
            with html.Div(id="fdn-study"):
                v3.VSelect(
                    v_model=("fdn_study_key",),
                    items=("fdn_studies",),
                    label="Case of the data folder or the database",
                    density="compact",
                    hide_details=True,
                    disabled=("fdn_busy || !fdn_ready",),
                )
            with html.Div(id="fdn-upload"):
                v3.VFileInput(
                    key=("fdn_upload_key",),
                    label="... or upload T1, T1ce, T2, FLAIR (NIfTI, NRRD, MHA)",
                    multiple=True,
                    density="compact",
                    hide_details=True,
                    prepend_icon="mdi-upload",
                    disabled=("fdn_busy",),
                    change=(
                        "window.load_files_by_chunks($event.target.files, "
                        f"{{ trigger_name: '{self.server.trigger_name(self.upload_chunk)}' }})"
                        ".then(({ status, errorMsg }) => trigger("
                        f"'{self.server.trigger_name(self.upload_failed)}', [status ? 'success' : 'failure', "
                        "errorMsg]))"
                    ),
                )
            html.Div(
                "{{ fdn_study }} <span class='text-medium-emphasis'>{{ fdn_study_info }}</span>",
                v_if="fdn_study",
                classes="text-body-2",
                id="fdn-study-name",
            )
            with v3.VBtnToggle(
                v_model=("fdn_sequence",), mandatory=True, density="compact", divided=True, variant="outlined"
            ):
                for m in MODALITIES:
                    v3.VBtn(SEQUENCE_LABELS[m], value=m, size="small", id=f"fdn-seq-{m}")

            # --- encode
            with html.Div(classes="d-flex", style="gap: 8px;"):
                v3.VBtn(
                    "Encode",
                    click=self.encode,
                    color="primary",
                    disabled=("fdn_busy || !fdn_ready || !fdn_study",),
                    id="fdn-encode",
                )
                v3.VBtn(
                    "Cancel", click=self.cancel, disabled=("!fdn_busy",), variant="outlined", id="fdn-cancel"
                )
                v3.VTextField(
                    v_model_number=("fdn_min_lesion_ml",),
                    type="number",
                    min=0,
                    step=0.5,
                    label="Smallest lesion (mL)",
                    title="Predicted lesions smaller than this are left out of this study's segmentation "
                    "and its abnormal-slice flags (0 shows everything the model predicts; databases are "
                    "indexed with 2 mL); applies from the next Encode",
                    density="compact",
                    hide_details=True,
                    style="max-width: 150px;",
                    id="fdn-min-lesion",
                )
            with html.Div(v_show="fdn_busy", id="fdn-progress"):
                v3.VProgressLinear(model_value=("fdn_progress",), height=8, color="primary", rounded=True)
                html.Div("{{ fdn_progress_text }}", classes="text-caption", id="fdn-progress-text")
            with html.Div(v_if="fdn_encoded", classes="text-body-2"):
                html.Div("Normal-appearing image over the study", classes="text-caption")
                v3.VSlider(
                    v_model=("fdn_normal_opacity",),
                    min=0,
                    max=1,
                    step=0.05,
                    density="compact",
                    hide_details=True,
                    id="fdn-normal-opacity",
                )

            # --- search
            v3.VDivider()
            html.Div("Search", classes="text-subtitle-2")
            html.Div(
                "Query slice <b>{{ fdn_query_slice === null ? '-' : fdn_query_slice }}</b> of "
                "0-{{ fdn_slices - 1 }} (the query view's slider)",
                v_if="fdn_study",
                classes="text-body-2",
                id="fdn-query-slice",
            )
            with v3.VBtnToggle(
                v_model=("fdn_mode",), mandatory=True, density="compact", divided=True, variant="outlined"
            ):
                for value, title in (("both", "Both"), ("normal", "Normal"), ("abnormal", "Abnormal")):
                    v3.VBtn(title, value=value, size="small", id=f"fdn-mode-{value}")
            with html.Div(classes="d-flex", style="gap: 8px;"):
                v3.VSelect(
                    v_model=("fdn_distance",),
                    items=("fdn_distances",),
                    label="Distance",
                    density="compact",
                    hide_details=True,
                    id="fdn-distance",
                )
                v3.VTextField(
                    v_model_number=("fdn_top_k",),
                    type="number",
                    min=1,
                    max=20,
                    label="Top-K",
                    density="compact",
                    hide_details=True,
                    style="max-width: 90px;",
                    id="fdn-top-k",
                )
            v3.VCheckbox(
                v_model=("fdn_volume_wise",),
                label="One result per case",
                density="compact",
                hide_details=True,
                id="fdn-volume-wise",
            )
            v3.VCheckbox(
                v_model=("fdn_axial_context",),
                label="Axial context (match the neighbouring slices' anatomy)",
                density="compact",
                hide_details=True,
                id="fdn-axial-context",
            )
            with html.Div(id="fdn-lesion"):  # a box with the id, as for the study select
                v3.VSelect(
                    v_model=("fdn_lesion",),
                    items=("fdn_lesions",),
                    label="References",
                    density="compact",
                    hide_details=True,
                )
            with html.Div(classes="d-flex align-center", style="gap: 8px;"):
                v3.VCheckbox(
                    v_model=("fdn_composite",),
                    label="Abnormal code from slice",
                    density="compact",
                    hide_details=True,
                    id="fdn-composite",
                )
                v3.VTextField(
                    v_model_number=("fdn_abnormal_slice",),
                    type="number",
                    min=0,
                    disabled=("!fdn_composite",),
                    density="compact",
                    hide_details=True,
                    style="max-width: 90px;",
                    id="fdn-abnormal-slice",
                )
            with html.Div(classes="d-flex", style="gap: 8px;"):
                v3.VBtn(
                    "Search",
                    click=self.search,
                    color="primary",
                    disabled=("fdn_busy || !fdn_encoded",),
                    id="fdn-search",
                )
                v3.VBtn(
                    "Study view",
                    click=self.back_to_study,
                    variant="text",
                    disabled=("!fdn_study || fdn_view === 'study'",),
                    id="fdn-study-view",
                )

    def _build_table(self) -> None:
        """The results table under the views: rank, case, slice, distance; a row opens that result large."""
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        with (
            html.Div(
                v_if="fdn_hits.length && fdn_view !== 'study'",
                id="fdn-results",
                style="flex:0 0 auto;max-height:26vh;overflow-y:auto;border-top:1px solid #444;",
            ),
            v3.VTable(density="compact", hover=True, fixed_header=True, id="fdn-results-table"),
        ):
            with html.Thead(), html.Tr():
                for title in ("#", "Case", "Axial slice", "Distance"):
                    html.Th(title)
            with (
                html.Tbody(),
                html.Tr(
                    v_for="hit in fdn_hits",
                    key="hit.rank",
                    classes="fdn-row",
                    id=("`fdn-row-${hit.rank}`",),
                    click=(self.open_result, "[hit.rank]"),
                ),
            ):
                html.Td("{{ hit.rank }}")
                html.Td("{{ hit.case }}")
                html.Td("{{ hit.slice }}")
                html.Td("{{ hit.distance }}")

    # ------------------------------------------------------------------------------------------- exit

    def close(self) -> None:
        """Stop the work, remove the uploads (server exit)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task.wait(10)
        self.uploads.close()


def _register_view_factory(view_manager: Any, server: Any, populate: Callable[..., None]) -> None:
    """Slice views only (no 3D view), each drawn with ``populate``.

    A view is built without rendering (trame-slicer renders a new view about 40 times while building it and
    setting its properties, before its image is streamed: most of the 0.3-0.7 s it takes), and calls its
    ``resized_hook`` after the browser resized it, so that the viewer can fit the image to the view's new
    shape (a layout change resizes views after the server has set them up).
    """
    from trame_slicer.rca_view.rca_view_factory import RemoteViewFactory
    from trame_slicer.views import DirectRendering, SliceView, ViewType

    class FDNSliceView(SliceView):  # type: ignore[misc]
        resized_hook: Callable[[Any], None] | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._resizing = False
            super().__init__(*args, **kwargs)

        @property
        def _building(self) -> bool:
            # Until the factory installs the streaming render strategy, a render draws for nobody.
            return isinstance(getattr(self, "_scheduled_render", None), DirectRendering)

        def render(self) -> None:
            if self._building:
                return
            super().render()

        def _update_slice_size(self, *args: Any) -> None:
            super()._update_slice_size(*args)
            hook = self.resized_hook
            if hook is None or self._building or self._resizing:
                return
            self._resizing = True  # the hook fits the view, which resizes the slice node again
            try:
                hook(self)
            finally:
                self._resizing = False

    view_manager.register_factory(
        RemoteViewFactory(server, FDNSliceView, view_type=ViewType.SLICE_VIEW, populate_view_ui_f=populate)
    )
