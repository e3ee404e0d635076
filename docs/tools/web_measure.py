"""Time ``fdn web`` as a browser sees it, and take the README's screenshot.

Start the server first (``make web`` after ``make demo``, or ``fdn web --model M --db DB --data DIR``), then::

    .venv-web/bin/python docs/tools/web_measure.py --url http://127.0.0.1:8080/ \\
        --study phantom_0012 --slice 103 --screenshot docs/images/web-results.png

Headless Debian Chromium through Playwright: page load (HTML and scripts, then model and database ready),
Encode (click to segmentation shown), the round trips of a second tab to the server before and during the
encode (``fdn_ping``), Search (click to the results table shown, and click to every result view filled with
its case, read from disk), and a table row (click to the large view). Prints JSON. ``--study``: a case title
in the study list (default: the first case that is not in the database); ``--slice``: the query slice (moved
with the query view's slider; default: the middle slice).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

PING_LOOP = """() => { window.__pings = []; window.__stop = false; (async () => {
    while (!window.__stop) { const t = performance.now(); await window.trame.trigger('fdn_ping');
      window.__pings.push(performance.now() - t); await new Promise(r => setTimeout(r, 50)); } })(); }"""


def _wait(page: Any, expression: str, timeout_s: float = 600) -> None:
    page.wait_for_function(
        f"() => {{ const s = window.trame && window.trame.state; return !!s && ({expression}); }}",
        timeout=timeout_s * 1e3,
    )


def _pings(page: Any) -> dict[str, float]:
    page.evaluate("() => { window.__stop = true; }")
    page.wait_for_timeout(300)
    values = sorted(page.evaluate("() => window.__pings"))
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median_ms": round(values[len(values) // 2], 1),
        "p95_ms": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1),
        "max_ms": round(values[-1], 1),
    }


def _go_to_slice(page: Any, k: int) -> int:
    """Move the query view's slider (trame-slicer's slider state) until the query slice is ``k``."""
    key = "FDNQuery__SliderState__value"
    for _ in range(8):
        current = page.evaluate("() => window.trame.state.get('fdn_query_slice')")
        if current == k:
            break
        value, step = page.evaluate(
            f"() => [window.trame.state.get('{key}'), window.trame.state.get('FDNQuery__SliderState__step')]"
        )
        page.evaluate(f"() => window.trame.state.set('{key}', {value + (k - current) * step})")
        page.wait_for_timeout(500)
        if page.evaluate("() => window.trame.state.get('fdn_query_slice')") == current:
            step = -step  # the slider runs against the slice index
            page.evaluate(f"() => window.trame.state.set('{key}', {value + (k - current) * step})")
            page.wait_for_timeout(500)
    return int(page.evaluate("() => window.trame.state.get('fdn_query_slice')"))


def measure(
    url: str, study: str | None, top_k: int, screenshot: Path | None, query_slice: int | None = None
) -> dict[str, Any]:
    """Drive one study through the page; the timings (s, ms for round trips) as a dict."""
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        started = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#fdn-encode")
        out["page_load_s"] = round(time.perf_counter() - started, 2)
        _wait(page, "s.get('fdn_ready') === true")
        out["page_ready_s"] = round(time.perf_counter() - started, 2)
        titles = [item["title"] for item in page.evaluate("() => window.trame.state.get('fdn_studies')")]
        title = study or next(t for t in titles if "(in database)" not in t)
        page.click("#fdn-study .v-field")
        page.locator(".v-overlay .v-list-item", has_text=title).first.click()
        started = time.perf_counter()
        _wait(page, f"s.get('fdn_study') === {title.split(' ')[0]!r} && !s.get('fdn_busy')")
        out["open_study_s"] = round(time.perf_counter() - started, 2)
        other = browser.new_page()
        other.goto(url)
        other.wait_for_selector("#fdn-encode")
        _wait(other, "true")
        other.evaluate(PING_LOOP)
        page.wait_for_timeout(2000)
        out["ping_idle"] = _pings(other)
        other.evaluate(PING_LOOP)
        started = time.perf_counter()
        page.click("#fdn-encode")
        _wait(page, "s.get('fdn_encoded') && !s.get('fdn_busy')")
        out["encode_s"] = round(time.perf_counter() - started, 2)
        out["ping_during_encode"] = _pings(other)
        other.close()
        if query_slice is not None:
            out["query_slice"] = _go_to_slice(page, query_slice)
        page.fill("#fdn-top-k", str(top_k))
        _wait(page, f"s.get('fdn_top_k') === {top_k}")
        started = time.perf_counter()
        page.click("#fdn-search")
        page.wait_for_selector(f"#fdn-row-{top_k}")
        out["search_table_s"] = round(time.perf_counter() - started, 2)
        _wait(page, f"s.get('fdn_hits').length === {top_k} && !s.get('fdn_busy')")
        out["search_round_trip_s"] = round(time.perf_counter() - started, 2)
        out["server_timings"] = page.evaluate("() => window.trame.state.get('fdn_timings')")
        page.wait_for_timeout(2500)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        started = time.perf_counter()
        page.click("#fdn-row-2")
        _wait(page, "s.get('fdn_view') === 'detail'")
        out["open_result_s"] = round(time.perf_counter() - started, 2)
        out["study"] = title
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080/")
    parser.add_argument("--study", help="a study title of the list (default: the first not in the database)")
    parser.add_argument("--slice", type=int, help="the query slice (default: the middle slice)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--screenshot", type=Path, help="save the results page here (PNG)")
    args = parser.parse_args()
    print(json.dumps(measure(args.url, args.study, args.top_k, args.screenshot, args.slice), indent=2))


if __name__ == "__main__":
    main()
