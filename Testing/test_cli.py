"""The ``fdn`` entry point: core commands, plugin commands through entry points, broken plugins, layering."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from fdn_core import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_is_listed() -> None:
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    core = {"phantom", "inspect", "index", "query", "eval-retrieval", "eval-model", "demo"}
    assert core <= names
    assert {"train", "export"} <= names  # added by the installed fdn-training through fdn.commands


def test_a_broken_plugin_is_listed_and_explains_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint(name="broken", value="no_such_module_xyz:register", group=cli.ENTRY_POINT_GROUP)
    shadow = EntryPoint(name="index", value="no_such_module_xyz:register", group=cli.ENTRY_POINT_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken, shadow])
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded from no_such_module_xyz:register" in err and "reinstall" in err
    parser = cli.build_parser()  # a plugin can never replace a core command
    action = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    helps = {a.dest: a.help or "" for a in action._choices_actions}
    assert "cannot be loaded" in helps["broken"] and "cannot be loaded" not in helps["index"]


def test_core_never_imports_training_slicer_or_the_web_viewer() -> None:
    forbidden = ("fdn_training", "slicer", "FDNRetrievalLib", "FDNRetrievalWeb", "vtk", "qt", "trame")
    for path in (ROOT / "fdn_core").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path}: imports {name}"


def test_core_tests_never_import_vtk_or_slicer() -> None:
    """Only the Slicer tests need slicer-core: importing every other test module (and conftest) pulls in
    neither vtk nor Slicer, so the core suite runs where slicer-core is not installed."""
    import subprocess
    import sys

    modules = sorted(
        p.stem for p in (ROOT / "Testing").glob("test_*.py") if "slicer" not in p.stem and "web" not in p.stem
    )
    code = (
        "import sys; sys.path[:0] = ['Testing']; import conftest\n"
        f"for m in {modules!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vtk', 'slicer', 'FDNRetrievalLib'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_flag_takes_a_folder_or_a_shipped_models_name(tmp_path: Path, monkeypatch: Any) -> None:
    import argparse

    from fdn_core.cli.args import model_folder
    from fdn_core.resources import shipped_model_dir

    monkeypatch.chdir(tmp_path)
    assert model_folder("demo") == shipped_model_dir("demo")
    (tmp_path / "demo").mkdir()  # a folder of that name here wins
    assert model_folder("demo") == Path("demo")
    assert model_folder("runs/x/bundle") == Path("runs/x/bundle")  # a path is a path, even if missing
    with pytest.raises(argparse.ArgumentTypeError, match=r"neither a folder nor a shipped model.*demo"):
        model_folder("nosuch")
