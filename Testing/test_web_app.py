"""``fdn web`` in a real browser: the server on a free local port with a tiny model and database, driven by
headless Debian Chromium through Playwright (no browser download).

The page loads; Encode shows progress and finishes, while another tab's round trips to the server stay short;
Cancel stops a second encode; Search fills K result views and the table; a table row changes the large view;
the axial-context box and the lesion filter reach the search;
bad uploads give messages in the page (never a traceback); a database from another model is refused in the
page; the uploads folder is gone when the server stops. Timings as the browser sees them and screenshots go to
``test-artifacts/web/`` (``FDN_TEST_ARTIFACTS`` overrides).

Needs the web environment (``bash scripts/setup.sh web`` -> ``.venv-web``): skipped where trame-slicer or
Playwright or Chromium is missing, so the test environment's suite passes without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytest.importorskip("trame_slicer", reason="the web environment is not installed (bash scripts/setup.sh web)")
pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/setup.sh web)"),
]

ARTIFACTS = Path(os.environ.get("FDN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
SHAPE = (48, 48, 32)  # small phantom cases: a tiny-model encode takes about a second
LONG_SHAPE = (48, 48, 160)  # one long study, to cancel while it encodes
TOP_K = 3
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMINGS: dict[str, Any] = {}
# A second tab's round trips to the server (``fdn_ping``) every 50 ms, until ``window.__stop``.
PING_LOOP = """() => { window.__pings = []; window.__stop = false; (async () => {
    while (!window.__stop) { const t = performance.now(); await window.trame.trigger('fdn_ping');
      window.__pings.push(performance.now() - t); await new Promise(r => setTimeout(r, 50)); } })(); }"""
LOG_TAIL: list[str] = []


# ------------------------------------------------------------------------------------------------ fixture


@pytest.fixture(scope="module")
def web_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model and the database of a 4-case phantom cohort; a data folder with a fifth (unindexed) case
    and a long case; a second model with its own database (another fingerprint)."""
    from fdn_core.data.phantom import generate_cohort
    from fdn_core.model.bundle import load_bundle, save_untrained_bundle
    from fdn_core.retrieval import index_cohort

    root = tmp_path_factory.mktemp("web")
    generate_cohort(root / "data", 5, seed=11, shape=SHAPE, workers=1)
    generate_cohort(root / "long", 1, seed=12, shape=LONG_SHAPE, workers=1)
    shutil.copytree(root / "long" / "phantom_0000", root / "data" / "long_0000")
    for path in (root / "data" / "long_0000").iterdir():
        path.rename(path.with_name(path.name.replace("phantom_0000", "long_0000")))
    model = save_untrained_bundle(root / "model", seed=0)
    cases = [f"phantom_{i:04d}" for i in range(4)]
    index_cohort(load_bundle(model, device="cpu"), root / "data", root / "db", cases=cases)
    other = save_untrained_bundle(root / "other_model", seed=1)
    index_cohort(load_bundle(other, device="cpu"), root / "data", root / "other_db", cases=cases[:1])
    return {
        "root": root,
        "model": model,
        "db": root / "db",
        "data": root / "data",
        "other_db": root / "other_db",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m fdn_core.cli web ...`` in a subprocess (through the ``fdn.commands`` entry point)."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fdn_core.cli", "web", *args, "--port", str(self.port), "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("fdn web exited:\n" + "".join(self.lines))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.2)
        raise AssertionError("fdn web did not start listening in 120 s:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def uploads_folder(self) -> Path:
        for line in self.lines:
            if "uploads go to" in line:
                return Path(line.split("uploads go to", 1)[1].split("(")[0].strip())
        raise AssertionError("the server did not say where uploads go")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def server(web_data: dict[str, Path]) -> Iterator[Server]:
    srv = Server(
        "--model", str(web_data["model"]), "--db", str(web_data["db"]), "--data", str(web_data["data"])
    )
    global LOG_TAIL
    LOG_TAIL = srv.lines
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        yield chromium
        chromium.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.fixture(scope="module")
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    tab = context.new_page()
    tab.errors = []
    tab.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    yield tab
    context.close()


def _state(page: Any, key: str) -> Any:
    return page.evaluate(f"() => window.trame.state.get({key!r})")


def _wait_state(page: Any, expression: str, timeout_s: float = 60) -> None:
    page.wait_for_function(
        f"() => {{ const s = window.trame && window.trame.state; return !!s && ({expression}); }}",
        timeout=timeout_s * 1e3,
        polling=100,  # an interval, not requestAnimationFrame: a page behind another tab gets no frames
    )


def _messages(page: Any) -> str:
    return str(page.locator("#fdn-messages").inner_text())


def _view_image(page: Any, tag: str) -> np.ndarray:
    """The pixels of slice view ``tag`` (its grid cell without caption and slider) as the browser shows it."""
    from PIL import Image

    cell = page.locator(f".layout-grid-item:has(.fdn-caption-{tag})")
    if cell.count() == 0:
        shown = page.eval_on_selector_all(
            ".layout-grid-item .fdn-caption", "els => els.map(e => e.className)"
        )
        templates = page.evaluate(
            "() => Object.keys(window.trame.state.state).filter(k => k.startsWith('trame__template'))"
        )
        raise AssertionError(
            f"view {tag} is not on the page; the views shown: {shown}; templates {templates}"
            + "".join(LOG_TAIL[-40:])
        )
    box = cell.bounding_box()
    assert box is not None, f"view {tag} is not visible"
    shot = page.screenshot(clip={**box, "height": box["height"] * 0.8})
    return np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float32)


def _wait_image(page: Any, tag: str, timeout_s: float = 30) -> np.ndarray:
    """Wait until view ``tag`` shows an image (not a black view), return its pixels."""
    deadline = time.monotonic() + timeout_s
    while True:
        pixels = _view_image(page, tag)
        if (pixels > 40).mean() > 0.02 or time.monotonic() > deadline:
            return pixels
        page.wait_for_timeout(200)


def _pick_study(page: Any, title: str) -> None:
    page.click("#fdn-study .v-field")
    page.locator(".v-overlay .v-list-item", has_text=title).first.click()
    _wait_state(page, f"s.get('fdn_study') === {title!r} && !s.get('fdn_busy')")


def _start_pings(page: Any) -> None:
    page.evaluate(PING_LOOP)


def _stop_pings(page: Any) -> list[float]:
    page.evaluate("() => { window.__stop = true; }")
    page.wait_for_timeout(300)
    return [float(v) for v in page.evaluate("() => window.__pings")]


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {
        "n": int(array.size),
        "median_ms": round(float(np.median(array)), 1),
        "p95_ms": round(float(np.percentile(array, 95)), 1),
        "max_ms": round(float(array.max()), 1),
    }


# ------------------------------------------------------------------------------------------------- tests


def test_page_loads(page: Any, server: Server) -> None:
    started = time.perf_counter()
    page.goto(server.url)
    page.wait_for_selector("#fdn-encode")
    TIMINGS["page_load_s"] = round(time.perf_counter() - started, 2)
    _wait_state(
        page, "s.get('fdn_ready') === true || (s.get('fdn_messages') || []).some(m => m.type === 'error')"
    )
    TIMINGS["page_ready_s"] = round(time.perf_counter() - started, 2)
    assert _state(page, "fdn_ready"), _messages(page)
    assert "4 cases" in page.locator("#fdn-resources").inner_text()
    titles = [item["title"] for item in _state(page, "fdn_studies")]
    assert "phantom_0004" in titles and "long_0000" in titles and "phantom_0000 (in database)" in titles
    assert not page.errors


def test_encode_shows_progress_and_finishes(page: Any, browser: Any, server: Server) -> None:
    _pick_study(page, "phantom_0004")
    query = _wait_image(page, "FDNQuery")
    assert (query > 40).mean() > 0.02, "the study is not shown in the query view"
    # a bad lesion size is refused by name before anything starts; the default is then put back
    page.fill("#fdn-min-lesion", "-1")
    page.click("#fdn-encode")
    page.wait_for_function(
        "() => document.querySelector('#fdn-messages').innerText.includes('Smallest lesion shown')"
    )
    assert not _state(page, "fdn_busy") and not _state(page, "fdn_encoded")
    page.fill("#fdn-min-lesion", "0")  # and 0 reaches the encoding: nothing is removed
    # a second tab measures round trips to the server before and during the encode
    other = browser.new_page()
    other.goto(server.url)
    other.wait_for_selector("#fdn-encode")
    _start_pings(other)
    page.wait_for_timeout(1500)
    idle = _stop_pings(other)
    progress: list[float] = []
    _start_pings(other)
    started = time.perf_counter()
    page.click("#fdn-encode")
    page.wait_for_selector("#fdn-progress-text", state="visible")
    while not _state(page, "fdn_encoded") and time.perf_counter() - started < 120:
        progress.append(float(_state(page, "fdn_progress") or 0))
        page.wait_for_timeout(50)
    TIMINGS["encode_s"] = round(time.perf_counter() - started, 2)
    busy = _stop_pings(other)
    other.close()
    assert _state(page, "fdn_encoded"), _messages(page)
    assert "Encoded 32 slices" in _messages(page)
    assert "Segmentation: " in _messages(page) and "(no size filter)" in _messages(page)
    assert any(0 < p < 100 for p in progress) or max(progress, default=0) > 0, progress
    TIMINGS["ping_idle"], TIMINGS["ping_during_encode"] = _summary(idle), _summary(busy)
    assert len(busy) >= 3 and np.median(busy) < 250, f"round trips during the encode: {busy}"
    # the predicted segmentation and the normal-appearing image are shown
    normal = _wait_image(page, "FDNNormal")
    assert (normal > 40).mean() > 0.02, "no normal-appearing image"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "encoded.png"))


def test_cancel_stops_a_second_encode(page: Any) -> None:
    _pick_study(page, "long_0000")
    page.click("#fdn-encode")
    _wait_state(page, "s.get('fdn_busy') && s.get('fdn_progress') > 0")
    clicked = time.perf_counter()
    page.click("#fdn-cancel")
    _wait_state(page, "!s.get('fdn_busy')", timeout_s=30)
    TIMINGS["cancel_s"] = round(time.perf_counter() - clicked, 2)
    assert "Encoding: cancelled" in _messages(page)
    assert not _state(page, "fdn_encoded")
    assert TIMINGS["cancel_s"] < 5


def test_search_fills_result_views_and_table(page: Any) -> None:
    _pick_study(page, "phantom_0004")
    page.click("#fdn-encode")
    _wait_state(page, "s.get('fdn_encoded') && !s.get('fdn_busy')", timeout_s=120)
    page.fill("#fdn-top-k", str(TOP_K))
    _wait_state(page, f"s.get('fdn_top_k') === {TOP_K}")
    started = time.perf_counter()
    page.click("#fdn-search")
    page.wait_for_selector(f"#fdn-row-{TOP_K}", timeout=60_000)
    TIMINGS["search_round_trip_s"] = round(time.perf_counter() - started, 2)
    TIMINGS["search_server_s"] = _state(page, "fdn_timings").get("search_s")
    rows = page.locator("#fdn-results-table tbody tr")
    assert rows.count() == TOP_K
    cases = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(TOP_K)]
    assert len(set(cases)) == TOP_K, "one result per case"
    assert page.locator(".layout-grid-item").count() == TOP_K + 1  # the query and K results
    for rank in range(1, TOP_K + 1):
        caption = page.locator(f".fdn-caption-FDNResult{rank}").inner_text()
        assert cases[rank - 1] in caption and "slice" in caption
        pixels = _wait_image(page, f"FDNResult{rank}")
        assert (pixels > 40).mean() > 0.02, f"result view {rank} is empty"
    page.screenshot(path=str(ARTIFACTS / "results.png"))


def test_table_row_changes_the_large_view(page: Any) -> None:
    page.click("#fdn-row-1")
    page.wait_for_selector("#fdn-detail-caption")
    _wait_state(page, "s.get('fdn_view') === 'detail'")
    first_caption = page.locator("#fdn-detail-caption").inner_text()
    first = _wait_image(page, "FDNDetail")
    page.click("#fdn-row-3")
    _wait_state(page, "s.get('fdn_detail_caption').startsWith('Result 3')")
    page.wait_for_timeout(1000)
    second = _wait_image(page, "FDNDetail")
    assert first_caption.startswith("Result 1") and "axial slice" in first_caption
    # the caption's wrap can change the view's height by a few pixels: compare the common area
    h, w = min(first.shape[0], second.shape[0]), min(first.shape[1], second.shape[1])
    assert np.abs(first[:h, :w] - second[:h, :w]).mean() > 1.0, "the large view did not change"
    page.screenshot(path=str(ARTIFACTS / "detail.png"))
    page.click("#fdn-back")
    _wait_state(page, "s.get('fdn_view') === 'results'")


def test_composite_abnormal_query_searches(page: Any) -> None:
    """Mode abnormal with the abnormal code from another slice: results come, no error."""
    last_id = max((m["id"] for m in _state(page, "fdn_messages")), default=0)
    page.click("#fdn-mode-abnormal")
    page.click("#fdn-composite")
    _wait_state(page, "s.get('fdn_mode') === 'abnormal' && s.get('fdn_composite') === true")
    page.fill("#fdn-abnormal-slice", "10")
    _wait_state(page, "s.get('fdn_abnormal_slice') === 10")
    page.click("#fdn-search")
    _wait_state(page, f"s.get('fdn_hits').length === {TOP_K} && !s.get('fdn_busy')", timeout_s=60)
    new = [m for m in _state(page, "fdn_messages") if m["id"] > last_id and m["type"] in ("error", "warning")]
    assert not new, _messages(page)
    page.click("#fdn-composite")
    page.click("#fdn-mode-both")


def test_axial_context_searches(page: Any) -> None:
    """The axial-context box reaches the search: results come, no error, and they differ from the plain
    search's distances (the normal term then spans the neighbouring slices)."""
    _wait_state(page, "s.get('fdn_composite') === false && s.get('fdn_mode') === 'both'")
    page.click("#fdn-search")
    _wait_state(page, f"s.get('fdn_hits').length === {TOP_K} && !s.get('fdn_busy')", timeout_s=60)
    plain = json.dumps([h["distance"] for h in _state(page, "fdn_hits")], separators=(",", ":"))
    last_id = max((m["id"] for m in _state(page, "fdn_messages")), default=0)
    page.click("#fdn-axial-context")
    _wait_state(page, "s.get('fdn_axial_context') === true")
    page.click("#fdn-search")
    _wait_state(
        page,
        f"s.get('fdn_hits').length === {TOP_K} && !s.get('fdn_busy') && "
        f"JSON.stringify(s.get('fdn_hits').map(h => h.distance)) !== '{plain}'",
        timeout_s=60,
    )
    new = [m for m in _state(page, "fdn_messages") if m["id"] > last_id and m["type"] in ("error", "warning")]
    assert not new, _messages(page)
    page.click("#fdn-axial-context")
    _wait_state(page, "s.get('fdn_axial_context') === false")


def test_lesion_filter_searches(page: Any, web_data: dict[str, Path]) -> None:
    """The "References" select reaches the search: "without lesion" returns only database slices whose
    lesion flag is False, "with lesion" only flagged ones; a value outside the vocabulary is refused by
    name in the page, and the search then runs again with "any"."""
    from fdn_core.codes.database import CodeDatabase

    db = CodeDatabase.open(web_data["db"])

    def flag(case_id: str, k: int) -> bool:
        rows = db.case_rows(case_id)
        return bool(db.has_abnormal[rows][np.flatnonzero(db.slice_indices[rows] == k)[0]])

    _wait_state(page, "s.get('fdn_lesion') === 'any' && !s.get('fdn_busy')")
    titles = [item["title"] for item in _state(page, "fdn_lesions")]
    assert titles == ["any slice", "without lesion", "with lesion"]
    for title, value, keep in (("without lesion", "without", False), ("with lesion", "with", True)):
        last_id = max((m["id"] for m in _state(page, "fdn_messages")), default=0)
        page.click("#fdn-lesion .v-field")
        page.locator(".v-overlay .v-list-item", has_text=title).first.click()
        _wait_state(page, f"s.get('fdn_lesion') === {value!r}")
        page.evaluate("() => window.trame.state.set('fdn_hits', [])")  # so the new hits can be told apart
        _wait_state(page, "s.get('fdn_hits').length === 0")
        page.click("#fdn-search")
        _wait_state(page, "s.get('fdn_hits').length > 0 && !s.get('fdn_busy')", timeout_s=60)
        hits = _state(page, "fdn_hits")
        assert all(flag(h["case"], int(h["slice"])) is keep for h in hits), (value, hits)
        new = [m for m in _state(page, "fdn_messages") if m["id"] > last_id and m["type"] == "error"]
        assert not new, _messages(page)
    page.evaluate("() => window.trame.state.set('fdn_lesion', 'healthy')")
    _wait_state(page, "s.get('fdn_lesion') === 'healthy'")
    page.click("#fdn-search")
    page.wait_for_function(
        "() => document.querySelector('#fdn-messages').innerText.includes('unknown lesion filter')"
    )
    assert "Traceback" not in _messages(page)
    page.evaluate("() => window.trame.state.set('fdn_lesion', 'any')")
    _wait_state(page, "s.get('fdn_lesion') === 'any'")


def test_bad_uploads_give_messages(page: Any, web_data: dict[str, Path], tmp_path: Path) -> None:
    case = web_data["data"] / "phantom_0001"
    files = {k: case / f"phantom_0001_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair")}
    # one file is not an image
    bad = tmp_path / "bad"
    bad.mkdir()
    for kind, path in files.items():
        target = bad / f"upload_{kind}.nii.gz"
        target.write_bytes(path.read_bytes() if kind != "t2" else b"this is not a NIfTI file")
    page.set_input_files("#fdn-upload input[type=file]", [str(p) for p in sorted(bad.iterdir())])
    page.wait_for_function(
        "() => document.querySelector('#fdn-messages').innerText.includes('cannot be read')",
        timeout=60_000,
        polling=100,
    )
    text = _messages(page)
    assert "upload_t2.nii.gz" in text and "Traceback" not in text
    # a sequence missing
    page.set_input_files("#fdn-upload input[type=file]", [str(files[k]) for k in ("t1", "t1ce", "t2")])
    page.wait_for_function(
        "() => document.querySelector('#fdn-messages').innerText.includes('Missing FLAIR')",
        timeout=30_000,
        polling=100,
    )
    # a good upload opens the study
    page.set_input_files("#fdn-upload input[type=file]", [str(p) for p in files.values()])
    _wait_state(page, "s.get('fdn_study') === 'phantom_0001' && !s.get('fdn_busy')")
    assert not page.errors


def test_database_of_another_model_is_refused_in_the_page(browser: Any, web_data: dict[str, Path]) -> None:
    srv = Server("--model", str(web_data["model"]), "--db", str(web_data["other_db"]))
    try:
        tab = browser.new_page()
        tab.goto(srv.url)
        _wait_state(tab, "(s.get('fdn_messages') || []).some(m => m.type === 'error')")
        text = _messages(tab)
        assert "different model" in text and "Traceback" not in text
        assert not _state(tab, "fdn_ready")
        tab.close()
    finally:
        assert srv.stop() in (0, 143, -15)


def test_uploads_are_removed_when_the_server_stops(server: Server) -> None:
    folder = server.uploads_folder()
    assert folder.is_dir()
    server.stop()
    assert not folder.exists(), "the uploads folder outlived the server"
