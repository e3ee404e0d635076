"""The reliability drill (bench/drills.py) in the test suite: one test per drill case, and the totals.

The drill runs once per test session, in a subprocess of its own (it forks a child per command from a parent
that has imported, but not run, torch: that must not be this pytest process, whose torch and numba thread
pools earlier tests may have started), over exactly the cases pytest selected; each test then checks its
case's outcome. The slow cases (concurrency, SIGTERM, training runs) carry the ``slow`` mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import drills  # noqa: E402  (numpy only at import: no torch, vtk or Slicer)

BY_ID = {c.cid: c for c in drills.CASES}
TARGETS = {
    "fdn phantom",
    "fdn inspect",
    "fdn index build",
    "fdn index add",
    "fdn index remove",
    "fdn index info",
    "fdn index compact",
    "fdn query",
    "fdn eval-retrieval",
    "fdn eval-model",
    "fdn train",
    "fdn export",
    "database API",
    "bundle loader",
    "Slicer library",
}


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the drill over the selected cases; case id -> its JSON record (outcome, message, passed)."""
    selected = sorted(
        {
            item.callspec.params["cid"]
            for item in request.session.items
            if getattr(item, "originalname", "") == "test_drill_case" and hasattr(item, "callspec")
        }
    )
    if not selected:
        return {}
    work = tmp_path_factory.mktemp("drills")
    report = work / "drills.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "training")])}
    drill = str(ROOT / "bench" / "drills.py")
    cmd = [sys.executable, drill, "--out", str(work / "work"), "--json", str(report), "--cases", *selected]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if not report.is_file():
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        pytest.fail(f"the drill did not finish (exit {proc.returncode}):\n{output}")
    print(proc.stdout)  # the table, shown with -s or on failure
    return {c["cid"]: c for c in json.loads(report.read_text(encoding="utf-8"))["cases"]}


def test_the_drill_has_over_100_cases_against_every_target() -> None:
    assert len(BY_ID) == len(drills.CASES), "case ids must be unique"
    assert len(drills.CASES) >= 100
    assert {c.target for c in drills.CASES} >= TARGETS
    assert {c.expect for c in drills.CASES} == {"error", "warning", "ok"}
    assert all(c.fixed_by in ("earlier", "this change") for c in drills.CASES)


@pytest.mark.parametrize(
    "cid", [pytest.param(c.cid, id=c.cid, marks=[pytest.mark.slow] if c.slow else []) for c in drills.CASES]
)
def test_drill_case(outcomes: dict[str, Any], cid: str) -> None:
    case, got = BY_ID[cid], outcomes[cid]
    if got["outcome"] == "SKIPPED":
        pytest.skip(got["message"])
    assert got["passed"], (
        f"{case.target}: {case.fault}: expected {case.expect}, observed {got['outcome']} "
        f"(names the file: {got['names_file']}, the fix: {got['names_fix']}):\n{got['message']}"
    )


def test_no_traceback_silent_wrong_answer_or_lost_update(outcomes: dict[str, Any]) -> None:
    bad = {cid: o["outcome"] for cid, o in outcomes.items() if o["outcome"] in drills._BAD}
    assert bad == {}
    unclear = [cid for cid, o in outcomes.items() if o["names_file"] is False or o["names_fix"] is False]
    assert unclear == []


def test_judging_a_command(tmp_path: Path) -> None:
    """The drill's verdicts: a traceback, a silent success where an error was due, a message without the
    file or the fix, a clean error."""
    tb = drills.Proc(1, "", 'Traceback (most recent call last):\n  File "x"\nValueError: boom\n', 0.1)
    assert drills.cli_error(tb, ["a.nii"]).outcome == "TRACEBACK"
    silent = drills.Proc(0, "done\n", "", 0.1)
    assert drills.cli_error(silent, ["a.nii"]).outcome == "SILENT WRONG"
    vague = drills.cli_error(drills.Proc(2, "", "fdn inspect: error: something is wrong\n", 0.1), ["a.nii"])
    assert (vague.outcome, vague.names_file, vague.names_fix) == ("error", False, False)
    own_name = drills.cli_error(drills.Proc(2, "", "fdn export: error: a.nii is bad\n", 0.1), ["a.nii"])
    assert own_name.names_fix is False  # the command's name ("export") is no advice
    clear = drills.cli_error(
        drills.Proc(2, "", "fdn query: error: a.nii: t1 is empty; replace it\n", 0.1),
        ["a.nii"],
        words="empty",
    )
    assert (clear.outcome, clear.names_file, clear.names_fix) == ("error", True, True)
    case = drills.Case("x/y", "fdn query", "fault", "error", lambda d: clear)
    table = drills.format_table([(case, clear)])
    assert "fdn query" in table and "tracebacks 0" in table and "passed 1" in table
