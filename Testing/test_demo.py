"""``fdn demo`` end to end on a reduced setting, and its report opened in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fdn_core.cli import main

pytestmark = pytest.mark.slow  # the demo end to end and its report in headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    out = tmp_path_factory.mktemp("demo")
    code = main(
        ["demo", "--out", str(out), "--cases", "10", "--shape", "64", "64", "40", "--seed", "7",
         "--model", str(tiny_bundle), "--device", "cpu", "--workers", "1", "--top", "3", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    return out / "report"


def test_demo_report_has_every_artefact(demo_report: Path) -> None:
    for name in ["index.html", "retrieval_eval.json", "retrieval_eval.md", "demo_summary.json",
                 "montage_normal.png", "montage_abnormal.png", "montage_sum.png", "montage_composite.png",
                 "reconstructions.png", "binarization.png", "explanation.png"]:  # fmt: skip
        path = demo_report / name
        assert path.is_file() and path.stat().st_size > 0, name
    html = (demo_report / "index.html").read_text()
    for src in ["montage_normal.png", "reconstructions.png", "binarization.png"]:
        assert f'src="{src}"' in html
    # The baselines stand beside the FDN and the oracle, with one margin sentence per similarity.
    for label in [
        "Random (random slice",
        "Level prior (same axial level",
        "Pooled pixels (L2, 8x8x4)",
        "Oracle",
    ]:
        assert label in html, label
    for col in ["S_normal", "S_abnormal", "S_sum", "S_sum_normalized"]:
        assert f"<li>{col}: FDN " in html and "the best trivial baseline" in html
    # RELAX: the explanation figure and the mass shares of the FDN's two maps beside the chance level
    assert "Explanations (RELAX)" in html and 'src="explanation.png"' in html
    assert "FDN / abnormal" in html and "FDN / normal" in html and "chance level" in html


def test_demo_numbers_are_finite_and_in_range(demo_report: Path) -> None:
    summary = json.loads((demo_report / "demo_summary.json").read_text())
    assert len(summary["queries"]) >= 2 and not set(summary["queries"]) & set(summary["references"])
    table = summary["summary"]
    paper = {"euclidean", "angular", "hamming"}
    assert set(table) - {"simsiam", "ynet"} == paper | {f"{d}+context" for d in paper} | {
        "oracle",
        "random",
        "level_prior",
        "pooled_pixels",
    }
    assert set(summary["margins"]) == {"S_normal", "S_abnormal", "S_sum", "S_sum_normalized"}
    for method, cols in table.items():
        for col in ("S_normal", "S_abnormal", "S_sum", "S_sum_normalized"):
            dice = cols[col]["mean_dice"]
            assert dice is not None and math.isfinite(dice) and 0.0 <= dice <= 1.0, (method, col, dice)
            if method != "oracle":
                # The oracle maximises the very score reported, so nothing beats it on average.
                assert dice <= table["oracle"][col]["mean_dice"] + 1e-9
    assert summary["total_seconds"] > 0


def test_demo_reuses_an_identical_cohort(demo_report: Path, tiny_bundle: Path, capsys) -> None:
    out = demo_report.parent
    before = (out / "cohort" / "cohort.json").stat().st_mtime_ns
    code = main(
        ["demo", "--out", str(out), "--cases", "10", "--shape", "64", "64", "40", "--seed", "7",
         "--model", str(tiny_bundle), "--device", "cpu", "--workers", "1", "--top", "3", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "reusing the cohort" in capsys.readouterr().out
    assert (out / "cohort" / "cohort.json").stat().st_mtime_ns == before


def test_demo_refuses_too_few_cases(tmp_path: Path, tiny_bundle: Path, capsys) -> None:
    code = main(["demo", "--out", str(tmp_path), "--cases", "3", "--model", str(tiny_bundle)])
    assert code == 2
    assert "at least 8 cases" in capsys.readouterr().err


def test_demo_refuses_a_missing_model(tmp_path: Path, capsys) -> None:
    code = main(["demo", "--out", str(tmp_path), "--cases", "8", "--shape", "64", "64", "40",
                 "--model", str(tmp_path / "nope"), "--workers", "1", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (scripts/setup.sh installs it)"
)
def test_report_renders_in_headless_chromium(demo_report: Path) -> None:
    from playwright.sync_api import sync_playwright

    handler = partial(SimpleHTTPRequestHandler, directory=str(demo_report))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )  # fmt: skip
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html", wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            assert len(images) >= 6
            broken = [src for src, complete, width in images if not complete or width == 0]
            assert not broken, f"broken images: {broken}"
            headers = page.eval_on_selector_all("table th", "els => els.map(e => e.textContent)")
            assert any("S_normal" in h for h in headers)
            assert any(
                "Oracle" in t for t in page.eval_on_selector_all("td", "els => els.map(e => e.textContent)")
            )
            browser.close()
    finally:
        server.shutdown()
