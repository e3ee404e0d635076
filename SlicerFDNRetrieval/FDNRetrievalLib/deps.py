"""First-use installation of fdn_core inside Slicer's Python (standard library only: runs before install).

What gets installed, and from where:

- PyTorch comes from the PyTorch extension (``PyTorchUtils``), never from pip here: it picks the build
  that fits the GPU driver. SimpleITK ships with Slicer. Both are left alone by pip (``skip_packages``).
- The other third-party requirements of ``fdn-retrieval`` (read from the bundled ``pyproject.toml``) come
  from PyPI, or from a local wheel folder ("wheelhouse") for machines without internet.
- ``fdn-retrieval`` itself (the ``fdn_core`` package) is built from the source copy the extension ships
  in ``Resources/FDNRetrievalSource`` (a source checkout uses the repository root), or taken from the
  wheelhouse when it holds an ``fdn_retrieval-*.whl``. It is installed with ``--no-deps`` and
  ``--no-build-isolation`` so that nothing is downloaded for the build.

The Slicer widget supplies the side-effecting callables (consent dialog, pip, PyTorchUtils), so this
module stays testable without Slicer.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLED_SOURCE_DIRNAME",
    "DISTRIBUTION",
    "SLICER_PROVIDED",
    "TEST_INSTALL_ENV",
    "DependencyError",
    "EnvironmentReport",
    "InstallPlan",
    "check_environment",
    "default_resource_paths",
    "ensure_installed",
    "find_bundled_source",
    "install_allowed",
    "installed_version",
    "make_plan",
    "missing_requirements",
    "pins_from_report",
    "torch_problem",
    "write_wheelhouse",
]

DISTRIBUTION = "fdn-retrieval"
BUNDLED_SOURCE_DIRNAME = "FDNRetrievalSource"
#: Distributions Slicer provides itself: torch through the PyTorch extension, SimpleITK bundled.
SLICER_PROVIDED = ("torch", "SimpleITK")
REQUESTER = "FDN Retrieval"
#: Set to 1 to let the self-test install missing packages in testing mode (never set on the build factory).
TEST_INSTALL_ENV = "FDNRETRIEVAL_TEST_INSTALL"


class DependencyError(RuntimeError):
    """The Python packages the module needs are missing and could not be installed."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise DependencyError(f"cannot read the package name of requirement {requirement!r}")
    return match.group(1)


def find_bundled_source(module_dir: str | Path) -> Path | None:
    """The folder holding ``pyproject.toml`` + ``fdn_core/`` shipped with (or beside) the module, or None."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "Resources" / BUNDLED_SOURCE_DIRNAME, module_dir.parent):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and (candidate / "fdn_core").is_dir():
            try:
                name = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"]
            except (OSError, KeyError, tomllib.TOMLDecodeError):
                continue
            if _canonical(name) == DISTRIBUTION:
                return candidate
    return None


def default_resource_paths(
    module_dir: str | Path, demo_root: str | Path | None = None
) -> tuple[Path | None, Path | None]:
    """The shipped demo model and a database for it, where they exist.

    The model is looked for in the module's Resources, in the installed ``fdn_core`` package
    (``fdn_core/resources/models/demo``), then in the fdn_core source shipped with the extension (so that
    the panel shows it before the first-use install); (None, None) when there is none. The database is
    ``<model>/db`` when shipped, else the demo database built on this computer (``<demo_root>/demo/db``, see
    ``FDNRetrievalLib.demo``), else the one ``make demo`` wrote in a source checkout (``demo_out/db``).
    """
    module_dir = Path(module_dir)
    shipped = Path("fdn_core") / "resources" / "models" / "demo"
    roots = [module_dir / "Resources" / "models" / "demo"]
    spec = importlib.util.find_spec("fdn_core")
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).resolve().parent / "resources" / "models" / "demo")
    roots.append(module_dir / "Resources" / BUNDLED_SOURCE_DIRNAME / shipped)
    for root in roots:
        if (root / "bundle.json").is_file():
            dbs = [root / "db"]
            if demo_root is not None:
                dbs.append(Path(demo_root) / "demo" / "db")
            dbs.append(module_dir.parent / "demo_out" / "db")
            return root, next((db for db in dbs if (db / "manifest.json").is_file()), None)
    return None, None


def installed_version(distribution: str = DISTRIBUTION) -> str | None:
    """Installed version of ``distribution`` in this Python, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _satisfies(version: str, specifiers: str) -> bool:
    """Check ``version`` against simple comma-separated specifiers (>=, <=, >, <, ==, !=)."""
    # packaging is not guaranteed before install; these operators are all our pyproject uses.
    have = _version_tuple(version)
    for spec in filter(None, (s.strip() for s in specifiers.split(","))):
        match = re.match(r"(>=|<=|==|!=|>|<|~=)\s*(.+)", spec)
        if not match:
            raise DependencyError(f"unsupported version specifier {spec!r}")
        op, raw = match.groups()
        want = _version_tuple(raw)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {
            ">=": a >= b,
            "<=": a <= b,
            ">": a > b,
            "<": a < b,
            "==": a[: len(want)] == want,
            "!=": a[: len(want)] != want,
            "~=": a >= b and a[: len(want) - 1] == want[:-1],
        }[op]
        if not ok:
            return False
    return True


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements (``name>=x,<y`` strings, markers ignored) not satisfied in this Python."""
    missing = []
    for requirement in requirements:
        text = requirement.split(";")[0].strip()
        name = _requirement_name(text)
        specifiers = text[len(name) :].strip()
        specifiers = re.sub(r"^\[[^\]]*\]", "", specifiers).strip()
        version = installed_version(name)
        if version is None or (specifiers and not _satisfies(version, specifiers)):
            missing.append(text)
    return missing


@dataclass(frozen=True)
class InstallPlan:
    """What to install: torch range, other requirements, the package source and an optional wheelhouse."""

    version: str
    torch_requirement: str
    requirements: tuple[str, ...]
    source_dir: Path | None
    wheelhouse: Path | None = None
    skip_packages: tuple[str, ...] = field(default=SLICER_PROVIDED)
    #: What building the demo database needs beyond the core (the ``phantom`` extra: nilearn's template).
    demo_requirements: tuple[str, ...] = ()

    def dependency_pip_args(self, requirements: Sequence[str]) -> list[str]:
        """pip arguments installing ``requirements`` (offline from the wheelhouse when one is set)."""
        if self.wheelhouse is not None:
            return ["--no-index", "--find-links", str(self.wheelhouse), *requirements]
        return list(requirements)

    def package_pip_args(self) -> list[str]:
        """pip arguments installing fdn-retrieval itself without touching its dependencies."""
        if self.wheelhouse is not None and any(self.wheelhouse.glob("fdn_retrieval-*.whl")):
            return [
                "--no-index",
                "--find-links",
                str(self.wheelhouse),
                "--no-deps",
                f"{DISTRIBUTION}=={self.version}",
            ]
        if self.source_dir is None:
            raise DependencyError(
                "the fdn_core source is not bundled with this module installation and the wheel folder holds "
                "no fdn_retrieval wheel; reinstall the FDNRetrieval extension or pick a wheel folder that "
                "contains fdn_retrieval-*.whl"
            )
        args = ["--no-deps", "--no-build-isolation", "--upgrade", str(self.source_dir)]
        return args

    def package_needs_install(self) -> bool:
        """True when fdn-retrieval is absent or another version than the bundled one."""
        return installed_version(DISTRIBUTION) != self.version


def _source_version(source: Path, project: dict[str, Any]) -> str:
    """The bundled package's version: pyproject's static ``version``, else ``fdn_core.__version__``."""
    if "version" in project:
        return str(project["version"])
    init = source / "fdn_core" / "__init__.py"
    try:
        tree = ast.parse(init.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as exc:
        raise DependencyError(f"cannot read the version of the bundled fdn_core ({init}): {exc}") from exc
    for node in tree.body:
        names = [getattr(t, "id", None) for t in node.targets] if isinstance(node, ast.Assign) else []
        value = getattr(node, "value", None)
        if "__version__" in names and isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
    raise DependencyError(f"{init} defines no __version__; reinstall the FDNRetrieval extension")


def make_plan(module_dir: str | Path, wheelhouse: str | Path | None = None) -> InstallPlan:
    """Read the bundled ``pyproject.toml`` and plan the install (nothing is installed here)."""
    source = find_bundled_source(module_dir)
    if wheelhouse is not None and str(wheelhouse).strip() not in ("", "."):
        wheelhouse = Path(wheelhouse)
        if not wheelhouse.is_dir():
            raise DependencyError(
                f"wheel folder {wheelhouse} does not exist; pick the folder made with 'pip download' "
                "(see the module documentation, 'offline installation')"
            )
    else:
        wheelhouse = None
    if source is None:
        raise DependencyError(
            f"cannot find the bundled fdn_core source ({BUNDLED_SOURCE_DIRNAME}) next to {module_dir}; "
            "reinstall the FDNRetrieval extension"
        )
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_requirement = ""
    requirements = []
    provided = {_canonical(p) for p in SLICER_PROVIDED}
    for requirement in project.get("dependencies", []):
        name = _requirement_name(requirement)
        if _canonical(name) == "torch":
            torch_requirement = requirement[len(name) :].strip()
        elif _canonical(name) not in provided:
            requirements.append(requirement)
    extras = project.get("optional-dependencies", {})
    return InstallPlan(
        version=_source_version(source, project),
        torch_requirement=torch_requirement,
        requirements=tuple(requirements),
        source_dir=source,
        wheelhouse=wheelhouse,
        demo_requirements=tuple(extras.get("phantom", ())),
    )


@dataclass(frozen=True)
class EnvironmentReport:
    """What this Python has, compared with a plan; read from package metadata only (nothing imported, so it
    is cheap and safe in a worker thread)."""

    torch_version: str | None
    torch_requirement: str
    missing: tuple[str, ...]
    package_needs_install: bool

    @property
    def torch_ok(self) -> bool:
        """torch is installed in the required range."""
        return self.torch_version is not None and (
            not self.torch_requirement or _satisfies(self.torch_version, self.torch_requirement)
        )

    @property
    def ready(self) -> bool:
        """Nothing to install: the module can run."""
        return self.torch_ok and not self.missing and not self.package_needs_install


def torch_problem(version: str | None, requirement: str) -> str | None:
    """What is wrong with the installed torch for ``requirement`` and how to fix it, or None."""
    if version is None:
        return (
            "PyTorch is not installed. Open the 'PyTorch Utils' module (install the PyTorch extension from "
            f"the Extensions Manager if it is missing), set the version requirement to '{requirement}', "
            "press 'Install PyTorch', then restart Slicer."
        )
    if requirement and not _satisfies(version, requirement):
        return (
            f"PyTorch {version} is installed, but FDN Retrieval needs torch{requirement}. Open the "
            "'PyTorch Utils' module, press 'Uninstall PyTorch' and restart Slicer; then set the version "
            f"requirement to '{requirement}' there, press 'Install PyTorch' and restart Slicer again."
        )
    return None


def check_environment(plan: InstallPlan, extra: Sequence[str] = ()) -> EnvironmentReport:
    """Compare this Python with ``plan`` (plus ``extra`` requirements, e.g. ``plan.demo_requirements``)."""
    return EnvironmentReport(
        torch_version=installed_version("torch"),
        torch_requirement=plan.torch_requirement,
        missing=tuple(missing_requirements([*plan.requirements, *extra])),
        package_needs_install=plan.package_needs_install(),
    )


def install_allowed(testing: bool, environ: Mapping[str, str] | None = None) -> bool:
    """May the module install packages now? Not in Slicer's testing mode (the Extensions Index's build
    factory runs the self-test there, and dialogs accept themselves) unless ``FDNRETRIEVAL_TEST_INSTALL=1``
    is set."""
    environ = os.environ if environ is None else environ
    return not testing or environ.get(TEST_INSTALL_ENV, "").strip().lower() in ("1", "true", "yes")


def ensure_installed(
    plan: InstallPlan,
    *,
    install_torch: Callable[[str], bool],
    confirm: Callable[[str, str], bool],
    pip_install: Callable[[list[str]], None],
    pip_ensure: Callable[[list[str]], None] | None = None,
    extra: Sequence[str] = (),
    allowed: bool = True,
) -> list[str]:
    """Install what is missing, asking once for consent; returns the list of what was installed.

    ``install_torch(version_spec)`` is called only when torch is missing and returns True when it is (now)
    installed; a torch outside the required range is never replaced here (it may already be loaded): the
    error says how to fix it with PyTorch Utils. ``confirm(title, text)`` asks the user. ``pip_install(args)``
    runs pip; ``pip_ensure(requirements)``, when Slicer offers it (>= 5.11, with progress and restart
    detection), installs plain requirements. ``extra``: requirements beyond the core (e.g. the demo's).
    ``allowed=False`` (testing mode, see ``install_allowed``): nothing is installed; DependencyError names
    what is missing.
    """
    report = check_environment(plan, extra)
    if report.ready:
        return []
    if not allowed:
        what = [*report.missing, *([DISTRIBUTION] if report.package_needs_install else [])]
        if not report.torch_ok:
            what.insert(0, f"torch{plan.torch_requirement}")
        raise DependencyError(
            f"not installing {', '.join(what)} in testing mode; set {TEST_INSTALL_ENV}=1 to allow it"
        )
    if report.torch_version is None and not install_torch(plan.torch_requirement):
        raise DependencyError(
            torch_problem(None, plan.torch_requirement) or "PyTorch is needed but was not installed."
        )
    problem = torch_problem(installed_version("torch"), plan.torch_requirement)
    if problem:
        raise DependencyError(problem)
    missing = missing_requirements([*plan.requirements, *extra])
    package = plan.package_needs_install()
    if not missing and not package:
        return []
    items = [*missing, *([f"{DISTRIBUTION} {plan.version} (FDN retrieval core)"] if package else [])]
    origin = (
        f"the wheel folder {plan.wheelhouse}" if plan.wheelhouse else "the Python Package Index (internet)"
    )
    text = (
        "FDN Retrieval needs these Python packages in Slicer's Python environment:\n\n"
        + "\n".join(f"  - {item}" for item in items)
        + f"\n\nThey will be installed from {origin}"
        + ("" if not package else f"; fdn_core from the copy shipped with the extension ({plan.source_dir})")
        + ". PyTorch and SimpleITK are not touched. Continue?"
    )
    if not confirm("FDN Retrieval - install Python packages", text):
        raise DependencyError("installation declined: the module cannot run without these packages")
    installed: list[str] = []
    if missing:
        if pip_ensure is not None and plan.wheelhouse is None:
            pip_ensure(missing)
        else:
            pip_install(plan.dependency_pip_args(missing))
        still = missing_requirements(missing)
        if still:
            raise DependencyError(
                f"pip finished but these requirements are still missing: {', '.join(still)}"
            )
        installed.extend(missing)
    if package:
        pip_install(plan.package_pip_args())
        if plan.package_needs_install():
            raise DependencyError(
                f"pip finished but {DISTRIBUTION} {plan.version} is still not installed; see the Python "
                "console"
            )
        installed.append(f"{DISTRIBUTION}=={plan.version}")
    return installed


# ----------------------------------------------------------------------------------------- offline wheels

#: Distributions never put in a wheelhouse: Slicer-provided ones and torch's own CUDA runtime wheels.
_NEVER_DOWNLOAD = re.compile(r"^(torch|simpleitk|triton|nvidia-.*)$")


def pins_from_report(report: dict[str, Any]) -> list[str]:
    """``name==version`` of every distribution a ``pip install --dry-run --report`` would install, except
    torch (and its CUDA wheels) and SimpleITK, which Slicer provides."""
    pins = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name, version = meta.get("name"), meta.get("version")
        if not name or not version:
            raise DependencyError(f"pip report entry without name/version: {item!r}")
        if not _NEVER_DOWNLOAD.match(_canonical(name)):
            pins.append(f"{name}=={version}")
    return sorted(pins, key=str.lower)


def write_wheelhouse(module_dir: str | Path, dest: str | Path, python: str = sys.executable) -> list[Path]:
    """Fill ``dest`` with every wheel the module needs beyond what ``python`` already has (run it with a
    Slicer of the same version and platform as the offline computer, PyTorch extension installed), the
    demo database's (nilearn) included.

    Steps: ``pip install --dry-run --report`` lists what is missing; ``pip download --no-deps`` fetches
    exactly those (torch and SimpleITK never); ``pip wheel --no-deps`` builds fdn-retrieval itself from
    the bundled source. Needs the internet; the result installs with no network (``InstallPlan``).
    """
    plan = make_plan(module_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        pip = [python, "-m", "pip"]
        subprocess.run(
            [
                *pip,
                "install",
                "--dry-run",
                "--quiet",
                "--report",
                str(report_path),
                *plan.requirements,
                *plan.demo_requirements,
            ],
            check=True,
        )
        pins = pins_from_report(json.loads(report_path.read_text(encoding="utf-8")))
    if pins:
        subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *pins], check=True
        )
    assert plan.source_dir is not None
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(plan.source_dir)],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def main(argv: Sequence[str] | None = None) -> int:
    """``PythonSlicer -m FDNRetrievalLib.deps wheelhouse DEST``: make an offline wheel folder."""
    parser = argparse.ArgumentParser(prog="FDNRetrievalLib.deps", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheelhouse", help="download/build every wheel the module needs into DEST")
    wheels.add_argument("dest", type=Path)
    wheels.add_argument("--module-dir", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    try:
        written = write_wheelhouse(args.module_dir, args.dest)
    except (DependencyError, subprocess.CalledProcessError) as exc:
        print(f"FDNRetrievalLib.deps: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(written)} wheels in {args.dest}; pick this folder as 'Offline wheel folder' in the module")
    return 0


if __name__ == "__main__":
    sys.exit(main())
