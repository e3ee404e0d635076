"""Reliability drill: bad inputs and faults against the ``fdn`` commands, the code database, the bundle loader
and the Slicer library, each with the outcome it must have.

    python bench/drills.py [--out DIR] [--runner fork|spawn] [--only REGEX] [--skip-slow] [--json FILE]

The drill builds its own tiny fixtures in a temporary folder (a phantom cohort of 4 cases at 32x32x16, an
untrained tiny bundle, a second bundle, a code database, a two-step training run), then runs every case and
prints a table: the input or fault, the expected outcome, the observed outcome, and whether the message names
the file (or flag, case, volume) and what to do; then the totals: tracebacks, silent wrong answers, lost
updates, messages without the file or the fix, refused good input, timeouts.

Every command runs in a process of its own, so that a traceback shows as one (``Traceback (most recent call
last)`` on stderr): ``--runner spawn`` starts ``python -m fdn_core.cli ...`` for each command (faithful; about
five seconds of imports per command on a small machine); ``--runner fork`` (the default on POSIX) forks a
child of a parent that has imported the same modules but run nothing, and the child runs
``fdn_core.cli.main(argv)`` with its own stdout/stderr, exactly what ``python -m fdn_core.cli`` runs, without
the imports. Calls of the database API and the bundle loader run in such children too (an exception other
than ``FDNError`` counts as a traceback); the Slicer library's cases run in one spawned process on
slicer-core's MRML. Faults that cannot be made for real (disk full, read-only file system, device busy; a
permission denied while running as root) are injected by replacing one function in the child so that it
raises the ``OSError`` the operating system would raise.

Outcomes: ``error`` (a clear error: exit status 2 or 1 from the command, an ``FDNError`` from the API),
``warning`` (the result, plus a warning naming the input), ``ok`` (the correct result, checked). Observed
outcomes that count against the target: ``TRACEBACK``, ``SILENT WRONG`` (an error or warning was due but the
result came back without one, or a result is wrong), ``LOST UPDATE``, ``REFUSED`` (good input refused),
``TIMEOUT``. The test suite runs the same cases (Testing/test_drills.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "training", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
import numpy as np  # noqa: E402

__all__ = [
    "CASES",
    "Case",
    "Drill",
    "Observation",
    "main",
    "passed",
    "run_case",
    "run_drill",
    "select",
    "summarize",
]

#: The cohort's shape (voxels; the phantom keeps a 240 x 240 x 155 mm field of view).
SHAPE = (32, 32, 16)
N_CASES = 4
MODS = ("t1", "t1ce", "t2", "flair")
# Words of a message that say what to do (imperatives, or a rule the input must follow).
_FIX = re.compile(
    r"\b(?:give|use|pass|re-?export|re-?download|re-?index|fix|choose|check|run|remove|delete|restore|add|"
    r"rename|resample|replace|convert|pick|move|omit|lower|raise|start|point|free|retry|wait|split|keep|put|"
    r"install|reinstall|load|harden|co-register|export|select|resume|skip|accept|leave|rebuild|"
    r"build (?:one|it)|"
    r"must|expected|expects|allowed|should|needs?|make sure|ensure|read access|permissions?|one of)\b"
    r"|`fdn |available:|usage:",
    re.IGNORECASE,
)
_TRACEBACK = "Traceback (most recent call last)"


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Observation:
    """What one case did: ``outcome`` (see the module docstring), the message shown to the user, and
    whether it names the file (flag, case, volume) and the fix (None where no message is due)."""

    outcome: str
    message: str = ""
    names_file: bool | None = None
    names_fix: bool | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Case:
    """One bad input or fault: where it is aimed, what it is, what must happen, and how to run it."""

    cid: str
    target: str
    fault: str
    expect: str  # "error" | "warning" | "ok"
    run: Callable[[Drill], Observation]
    slow: bool = False
    fixed_by: str = "this change"  # or "earlier" for problems fixed before this drill


@dataclass
class Proc:
    """A finished child: exit status and output."""

    rc: int
    out: str
    err: str
    seconds: float
    timed_out: bool = False

    @property
    def text(self) -> str:
        return f"{self.out}\n{self.err}"


@dataclass
class ApiResult:
    """A library call made in a child: its value, or the exception it raised."""

    value: Any = None
    error_type: str | None = None
    fdn_error: bool = False
    message: str = ""
    trace: str = ""
    seconds: float = 0.0
    timed_out: bool = False


# ------------------------------------------------------------------------------------------------ runner


_PRELOAD = (
    "torch",
    "nibabel",
    "SimpleITK",
    "scipy.ndimage",
    "fdn_core.cli",
    "fdn_core.cli.index",
    "fdn_core.cli.query",
    "fdn_core.cli.eval_retrieval",
    "fdn_core.cli.eval_model",
    "fdn_core.model.bundle",
    "fdn_core.retrieval",
    "fdn_core.codes.database",
    "fdn_core.codes.search",
    "fdn_core.codes.scan",
    "fdn_core.evaluation.retrieval_eval",
    "fdn_core.evaluation.model_eval",
    "fdn_core.data.cache",
    "fdn_core.report.montage",
    "fdn_training.train",
    "fdn_training.commands.train",
    "fdn_training.commands.export",
)

# A child of --runner spawn that injects faults first: python -c _INJECT_BOOT SPECS_JSON ARGV...
_INJECT_BOOT = (
    "import json, sys; sys.path[:0] = {paths!r}; import drills; "
    "drills.apply_faults(json.loads(sys.argv[1])); from fdn_core.cli import main; "
    "sys.exit(main(sys.argv[2:]))"
)


def _fault_function(
    code: int | None, only: str | None, real: Callable[..., Any] | None
) -> Callable[..., Any]:
    """A stand-in that raises ``OSError(code)`` (``MemoryError`` for None) naming its first argument (only
    when it, or the file it reads, contains ``only``)."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        target = f"{args[0]} {getattr(args[0], 'file_like', '')}" if args else ""
        if only is not None and only not in target:
            assert real is not None
            return real(*args, **kwargs)
        if code is None:
            raise MemoryError
        if code == errno.EACCES:
            raise PermissionError(code, os.strerror(code), target)
        raise OSError(code, os.strerror(code), target)

    return fail


def apply_faults(specs: Sequence[dict[str, Any]]) -> None:
    """Inject faults in this (child) process: each spec replaces ``module.attr`` by a function raising
    ``OSError(errno[spec["errno"]])`` (only for first arguments containing ``spec["only"]``, if given)."""
    import importlib

    for spec in specs:
        module = importlib.import_module(spec["module"])
        owner: Any = module
        *parents, attr = spec["attr"].split(".")
        for name in parents:
            owner = getattr(owner, name)
        real = getattr(owner, attr, None)
        code = None if spec["errno"] == "MemoryError" else getattr(errno, spec["errno"])
        setattr(owner, attr, _fault_function(code, spec.get("only"), real))


def fault(module: str, attr: str, code: str, only: str | None = None) -> dict[str, Any]:
    """An injection spec for ``apply_faults``."""
    return {"module": module, "attr": attr, "errno": code, "only": only}


class Drill:
    """Runs commands and library calls in child processes, and holds the fixture paths."""

    def __init__(self, work: Path, runner: str = "fork", timeout: float = 240.0) -> None:
        self.work = work
        self.runner = runner
        self.timeout = timeout
        self.cohort = work / "cohort"
        self.bundle = work / "bundle"
        self.bundle2 = work / "bundle_other"
        self.db = work / "db"
        self.run_dir = work / "run"
        self.cases_dir = work / "cases"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "training")]),
            "PYTHONUNBUFFERED": "1",
        }
        self._n = 0
        self.slicer_results: dict[str, dict[str, Any]] = {}
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the children share two cores with other jobs
        self.env.setdefault("OMP_NUM_THREADS", "1")
        if runner == "fork":
            import importlib

            for name in _PRELOAD:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)

    # -------------------------------------------------------------------------------------------- paths
    def ids(self) -> list[str]:
        """The cohort's case ids."""
        return [f"phantom_{i:04d}" for i in range(N_CASES)]

    def new_dir(self, name: str) -> Path:
        """A fresh empty folder under the work folder."""
        self._n += 1
        path = self.work / "tmp" / f"{self._n:03d}_{name}"
        path.mkdir(parents=True)
        return path

    def common(self, data: Path | None = None, model: Path | None = None) -> list[str]:
        """``--model ... --data ... --device cpu --no-progress``."""
        return [
            "--model",
            str(model or self.bundle),
            "--data",
            str(data or self.cohort),
            "--device",
            "cpu",
            "--no-progress",
        ]

    # ---------------------------------------------------------------------------------------- commands
    def fdn(
        self,
        *argv: str,
        faults: Sequence[dict[str, Any]] = (),
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_start: Callable[[int], None] | None = None,
        max_file_bytes: int | None = None,
    ) -> Proc:
        """Run ``fdn ARGV`` in a child process; ``faults`` are injected first (``apply_faults``);
        ``on_start(pid)`` is called while it runs (e.g. to send it a signal); ``max_file_bytes`` limits the
        size of any file it writes (RLIMIT_FSIZE: the operating system fails writes beyond it, EFBIG, as a
        full disk fails them with ENOSPC; C-level writers included)."""
        argv = tuple(str(a) for a in argv)
        limit = timeout or self.timeout
        if self.runner == "spawn":
            if faults:
                boot = _INJECT_BOOT.format(paths=[str(ROOT / "bench"), str(ROOT), str(ROOT / "training")])
                cmd = [sys.executable, "-c", boot, json.dumps(list(faults)), *argv]
            else:
                cmd = [sys.executable, "-m", "fdn_core.cli", *argv]
            return self._spawn(cmd, {**self.env, **(env or {})}, limit, on_start, max_file_bytes)
        return self._fork(lambda: _cli_child(argv, faults, max_file_bytes), env or {}, limit, on_start)

    def api(self, name: str, *args: Any, timeout: float | None = None) -> ApiResult:
        """Call ``api_<name>(drill_work, *args)`` of this module in a child process."""
        limit = timeout or self.timeout
        result_file = self.work / "tmp" / f"api_{os.getpid()}_{time.monotonic_ns()}.json"
        result_file.parent.mkdir(parents=True, exist_ok=True)
        if self.runner == "spawn":
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--api",
                name,
                json.dumps([str(self.work), *args]),
                str(result_file),
            ]
            proc = self._spawn(cmd, self.env, limit, None)
        else:
            proc = self._fork(lambda: _api_child(name, [str(self.work), *args], result_file), {}, limit, None)
        if proc.timed_out:
            return ApiResult(timed_out=True, seconds=proc.seconds, message="timed out")
        try:
            doc = json.loads(result_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ApiResult(
                error_type="ChildDied", message=proc.err[-2000:], trace=proc.err, seconds=proc.seconds
            )
        finally:
            result_file.unlink(missing_ok=True)
        return ApiResult(**{**doc, "seconds": proc.seconds})

    def _spawn(
        self,
        cmd: list[str],
        env: dict[str, str],
        limit: float,
        on_start: Callable[[int], None] | None,
        max_file_bytes: int | None = None,
    ) -> Proc:
        start = time.monotonic()
        preexec = None if max_file_bytes is None else (lambda: _limit_file_size(max_file_bytes))
        with subprocess.Popen(
            cmd,
            cwd=self.work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            preexec_fn=preexec,
        ) as child:
            if on_start is not None:
                on_start(child.pid)
            try:
                out, err = child.communicate(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
                timed_out = True
        return Proc(child.returncode, out, err, time.monotonic() - start, timed_out)

    def _fork(
        self,
        body: Callable[[], int],
        env: dict[str, str],
        limit: float,
        on_start: Callable[[int], None] | None,
    ) -> Proc:
        self._n += 1
        out_path = self.work / "tmp" / f"fork_{self._n}.out"
        err_path = self.work / "tmp" / f"fork_{self._n}.err"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: its own stdout/stderr, environment and working folder
            code = 1
            try:
                with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
                    os.dup2(fo.fileno(), 1)
                    os.dup2(fe.fileno(), 2)
                os.environ.update(env)
                os.chdir(self.work)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = body()
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        if on_start is not None:
            on_start(pid)
        timed_out = False
        status = 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > limit:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.01)
        rc = os.waitstatus_to_exitcode(status)
        read = lambda p: p.read_text(encoding="utf-8", errors="replace") if p.exists() else ""  # noqa: E731
        proc = Proc(rc, read(out_path), read(err_path), time.monotonic() - start, timed_out)
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)
        return proc


def _limit_file_size(max_bytes: int) -> None:
    """Make writes beyond ``max_bytes`` per file fail with EFBIG in this process (no SIGXFSZ)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def _cli_child(
    argv: Sequence[str], faults: Sequence[dict[str, Any]], max_file_bytes: int | None = None
) -> int:
    """Body of a forked child: what ``python -m fdn_core.cli ARGV`` runs (uncaught exceptions print their
    traceback, as the interpreter would)."""
    apply_faults(faults)
    if max_file_bytes is not None:
        _limit_file_size(max_file_bytes)
    from fdn_core.cli import main

    try:
        return int(main(list(argv)) or 0)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1


def _api_child(name: str, args: list[Any], result_file: Path) -> int:
    """Body of a child making one library call; writes an ``ApiResult`` as JSON."""
    from fdn_core.errors import FDNError

    doc: dict[str, Any]
    try:
        value = globals()[f"api_{name}"](*args)
        doc = {"value": value}
    except BaseException as exc:
        doc = {
            "error_type": type(exc).__name__,
            "fdn_error": isinstance(exc, FDNError),
            "message": str(exc),
            "trace": traceback.format_exc(),
        }
    result_file.write_text(json.dumps(doc, default=str), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------- judging


Culprit = str | tuple[str, ...]


def _names(message: str, culprits: Sequence[Culprit]) -> bool:
    """Whether ``message`` names every culprit (a string, or a tuple of alternatives)."""
    for c in culprits:
        options = (c,) if isinstance(c, str) else c
        if not any(o in message for o in options):
            return False
    return True


def _error_text(proc: Proc) -> str:
    """The error message a command printed (its ``fdn ...: error:`` lines and what follows, or argparse's)."""
    lines = proc.err.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("fdn ", "usage:")) and ("error" in line or line.startswith("usage:")):
            return "\n".join(lines[i:]).strip()
    problems = [ln for ln in proc.text.splitlines() if ln.strip().startswith("- ") or "problem" in ln]
    return "\n".join(problems).strip() or proc.err.strip()[-1500:] or proc.out.strip()[-1500:]


def cli_error(
    proc: Proc, culprits: Sequence[Culprit], codes: tuple[int, ...] = (2,), words: str = ""
) -> Observation:
    """The observation of a command that must fail with a clear error (exit status in ``codes``) naming
    ``culprits``; ``words`` (a regex), when given, must appear in the message (what is wrong)."""
    if proc.timed_out:
        return Observation("TIMEOUT", proc.err[-300:], seconds=proc.seconds)
    if _TRACEBACK in proc.text:
        return Observation("TRACEBACK", _last_exception(proc.text), seconds=proc.seconds)
    if proc.rc == 0:
        return Observation("SILENT WRONG", f"exit 0: {proc.out.strip()[-300:]}", seconds=proc.seconds)
    message = _error_text(proc)
    if proc.rc not in codes or (words and not re.search(words, message, re.IGNORECASE)):
        return Observation(
            "SILENT WRONG", f"exit {proc.rc}, not the expected error: {message}", seconds=proc.seconds
        )
    advice = re.sub(r"^fdn [\w-]+: error: ", "", message)  # the command's own name is no advice
    return Observation(
        "error", message, _names(message, culprits), bool(_FIX.search(advice)), seconds=proc.seconds
    )


def cli_ok(
    proc: Proc, check: Callable[[Proc], str | None], warning: Sequence[Culprit] | None = None
) -> Observation:
    """A command that must succeed: ``check(proc)`` returns None when the result is right, else what is
    wrong. With ``warning`` a warning naming those culprits must be shown too."""
    if proc.timed_out:
        return Observation("TIMEOUT", proc.err[-300:], seconds=proc.seconds)
    if _TRACEBACK in proc.text:
        return Observation("TRACEBACK", _last_exception(proc.text), seconds=proc.seconds)
    if proc.rc != 0:
        return Observation("REFUSED", _error_text(proc), seconds=proc.seconds)
    wrong = check(proc)
    if wrong is not None:
        return Observation("SILENT WRONG", wrong, seconds=proc.seconds)
    if warning is None:
        return Observation("ok", _summary_line(proc.out), seconds=proc.seconds)
    lines = [
        ln for ln in proc.text.splitlines() if "WARNING" in ln or "warning" in ln.lower() or "resampled" in ln
    ]
    message = "\n".join(lines)
    if not lines:
        return Observation("SILENT WRONG", "no warning: " + _summary_line(proc.out), seconds=proc.seconds)
    return Observation(
        "warning", message, _names(message, warning), bool(_FIX.search(message)) or None, seconds=proc.seconds
    )


def api_error(res: ApiResult, culprits: Sequence[Culprit], kinds: tuple[str, ...] = ()) -> Observation:
    """A library call that must raise an ``FDNError`` (of one of ``kinds`` when given) naming ``culprits``."""
    if res.timed_out:
        return Observation("TIMEOUT", res.message, seconds=res.seconds)
    if res.error_type is None:
        return Observation("SILENT WRONG", f"returned {str(res.value)[:300]}", seconds=res.seconds)
    if not res.fdn_error:
        return Observation("TRACEBACK", f"{res.error_type}: {res.message}"[:600], seconds=res.seconds)
    if kinds and res.error_type not in kinds:
        return Observation(
            "SILENT WRONG", f"{res.error_type} instead of {kinds}: {res.message}", seconds=res.seconds
        )
    return Observation(
        "error",
        res.message,
        _names(res.message, culprits),
        bool(_FIX.search(res.message)),
        seconds=res.seconds,
    )


def api_ok(res: ApiResult, check: Callable[[Any], str | None], outcome: str = "ok") -> Observation:
    """A library call that must return a right value (``check(value)`` is None) without raising."""
    if res.timed_out:
        return Observation("TIMEOUT", res.message, seconds=res.seconds)
    if res.error_type is not None:
        kind = "REFUSED" if res.fdn_error else "TRACEBACK"
        return Observation(kind, f"{res.error_type}: {res.message}"[:600], seconds=res.seconds)
    wrong = check(res.value)
    if wrong is not None:
        kind = "LOST UPDATE" if wrong.startswith("lost") else "SILENT WRONG"
        return Observation(kind, wrong, seconds=res.seconds)
    return Observation(outcome, str(res.value)[:300], seconds=res.seconds)


def _last_exception(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception|Warning|Interrupt)\b", ln)]
    return (tail[-1] if tail else lines[-1] if lines else "")[:500]


def _summary_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[-2:])[:300]


# ------------------------------------------------------------------------------- fixtures (child calls)


def api_build_fixtures(work: str) -> dict[str, Any]:
    """The tiny cohort, two untrained bundles, and a code database of the cohort (built by the library)."""
    from fdn_core.data.phantom import generate_cohort
    from fdn_core.model.bundle import load_bundle, save_untrained_bundle
    from fdn_core.retrieval import build_index

    root = Path(work)
    generate_cohort(root / "cohort", n_cases=N_CASES, seed=7, shape=SHAPE, workers=1)
    save_untrained_bundle(root / "bundle", seed=0)
    save_untrained_bundle(root / "bundle_other", seed=1)
    bundle = load_bundle(root / "bundle", device="cpu")
    result = build_index(bundle, root / "cohort", root / "db", workers=1)
    return {"indexed": len(result.added) if hasattr(result, "added") else None}


def api_train_base(work: str) -> dict[str, Any]:
    """A two-step training run of the tiny config on the cohort (the base of the --resume cases)."""
    from fdn_training.train import train

    result = train(
        "tiny_test",
        Path(work) / "cohort",
        Path(work) / "run",
        device="cpu",
        max_steps=2,
        export_bundle=False,
        show_progress_bar=False,
    )
    return {"steps": result.steps}


# ------------------------------------------------------------------------------------ bad-input makers


def _nib() -> Any:
    import nibabel as nib

    return nib


def copy_case(drill: Drill, src: str, name: str, dest_root: Path) -> Path:
    """Copy cohort case ``src`` to ``dest_root/name/`` with its files renamed ``name_<kind>.nii.gz``."""
    folder = dest_root / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted((drill.cohort / src).iterdir()):
        shutil.copyfile(f, folder / f.name.replace(src, name))
    return folder


def bad_case(
    drill: Drill, name: str, mutate: Callable[[Path, str], None] | None, src: str = "phantom_0001"
) -> Path:
    """A one-case cohort folder holding case ``name`` (a copy of ``src``) after ``mutate(case_dir, name)``."""
    root = drill.new_dir(name)
    folder = copy_case(drill, src, name, root)
    if mutate is not None:
        mutate(folder, name)
    return root


def bad_cohort(drill: Drill, name: str, mutate: Callable[[Path, str], None], good: Sequence[str]) -> Path:
    """A cohort of the ``good`` cases (copies) plus one bad case ``name``."""
    root = bad_case(drill, name, mutate)
    for cid in good:
        copy_case(drill, cid, cid, root)
    return root


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = _nib().load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib = _nib()
    nib.save(nib.Nifti1Image(data, affine), str(path))


def save_raw_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save with the sform set to ``affine`` as given (even singular or NaN) and no qform."""
    nib = _nib()
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, str(path))


def edit(kind: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, str], None]:
    """A mutator replacing the voxels of file ``kind`` by ``fn(voxels)`` (same affine)."""

    def mutate(folder: Path, name: str) -> None:
        path = folder / f"{name}_{kind}.nii.gz"
        data, affine = load_nifti(path)
        save_nifti(path, fn(data.copy()), affine)

    return mutate


def set_affine(
    kinds: Sequence[str], affine_fn: Callable[[np.ndarray], np.ndarray], raw: bool = False
) -> Callable[[Path, str], None]:
    """A mutator giving files ``kinds`` the affine ``affine_fn(old)`` (``raw``: written as given)."""

    def mutate(folder: Path, name: str) -> None:
        for kind in kinds:
            path = folder / f"{name}_{kind}.nii.gz"
            data, affine = load_nifti(path)
            (save_raw_affine if raw else save_nifti)(path, data, affine_fn(affine))

    return mutate


def rotation(degrees: float, axis: int = 2) -> np.ndarray:
    """A 4x4 rotation about world axis ``axis`` (through the origin)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique(degrees: float, axis: int = 2) -> Callable[[Path, str], None]:
    """Every file of the case rotated by ``degrees`` about its centre (the voxels stay: the grid turns)."""

    def turn(affine: np.ndarray) -> np.ndarray:
        centre = affine @ np.array([SHAPE[0] / 2, SHAPE[1] / 2, SHAPE[2] / 2, 1.0])
        to, back = np.eye(4), np.eye(4)
        to[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
        return back @ rotation(degrees, axis) @ to @ affine

    return set_affine((*MODS, "seg", "anat"), turn)


def replace_bytes(kind: str, fn: Callable[[bytes], bytes]) -> Callable[[Path, str], None]:
    """A mutator rewriting the bytes of file ``kind``."""

    def mutate(folder: Path, name: str) -> None:
        path = folder / f"{name}_{kind}.nii.gz"
        path.write_bytes(fn(path.read_bytes()))

    return mutate


def as_file(
    kind: str, new_name: str, content: bytes | Callable[[Path, str], bytes]
) -> Callable[[Path, str], None]:
    """A mutator replacing file ``kind`` by a file ``new_name`` (``{name}``: the case) holding ``content``."""

    def mutate(folder: Path, name: str) -> None:
        (folder / f"{name}_{kind}.nii.gz").unlink()
        data = content(folder, name) if callable(content) else content
        (folder / new_name.format(name=name)).write_bytes(data)

    return mutate


def nifti_claiming(shape: tuple[int, ...], payload: int = 64) -> Callable[[Path, str], bytes]:
    """Uncompressed NIfTI bytes whose header claims ``shape`` float32 voxels but holds ``payload`` bytes."""

    def content(folder: Path, name: str) -> bytes:
        nib = _nib()
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.float32)
        hdr.set_data_shape(shape)
        hdr.set_sform(np.eye(4), code=1)
        hdr["vox_offset"] = 352
        return hdr.binaryblock + b"\0" * 4 + b"\0" * payload

    return content


def plain_nifti_truncated(kind: str) -> Callable[[Path, str], None]:
    """File ``kind`` saved uncompressed (.nii) and cut to half its size."""

    def mutate(folder: Path, name: str) -> None:
        path = folder / f"{name}_{kind}.nii.gz"
        data, affine = load_nifti(path)
        path.unlink()
        nii = folder / f"{name}_{kind}.nii"
        save_nifti(nii, data.astype(np.float32), affine)
        raw = nii.read_bytes()
        nii.write_bytes(raw[: len(raw) // 2])

    return mutate


NRRD_LIAR = (
    b"NRRD0004\ntype: float\ndimension: 3\nsizes: 3000 3000 3000\nspace: left-posterior-superior\n"
    b"space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\nencoding: raw\n\n"
    + b"\0"
    * 256
)
MHA_LIAR = (
    b"ObjectType = Image\nNDims = 3\nDimSize = 2000 2000 2000\nElementType = MET_FLOAT\n"
    b"ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n" + b"\0" * 256
)
MHD_MISSING_RAW = (
    b"ObjectType = Image\nNDims = 3\nDimSize = 32 32 16\nElementType = MET_FLOAT\nElementSpacing = 1 1 1\n"
    b"ElementDataFile = gone.raw\n"
)


def msd_task(drill: Drill, name: str, mutate: Callable[[Path], None] | None = None) -> Path:
    """A Decathlon task of two cohort cases (4D images, labels, dataset.json), then ``mutate(root)``."""
    from fdn_core.labels import MSD_DATASET_LABELS, MSD_DATASET_MODALITY

    root = drill.new_dir(name)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    brats_to_msd = np.array([0, 2, 1, 0, 3], dtype=np.uint8)  # 1 NCR -> 2, 2 ED -> 1, 4 ET -> 3
    for cid in drill.ids()[:2]:
        chans = [load_nifti(drill.cohort / cid / f"{cid}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]
        affine = chans[0][1]
        save_nifti(
            root / "imagesTr" / f"{cid}.nii.gz",
            np.stack([c[0] for c in chans], -1).astype(np.float32),
            affine,
        )
        seg, _ = load_nifti(drill.cohort / cid / f"{cid}_seg.nii.gz")
        save_nifti(root / "labelsTr" / f"{cid}.nii.gz", brats_to_msd[np.asarray(seg, np.uint8)], affine)
    (root / "dataset.json").write_text(
        json.dumps({"name": "drill", "modality": MSD_DATASET_MODALITY, "labels": MSD_DATASET_LABELS}),
        encoding="utf-8",
    )
    if mutate is not None:
        mutate(root)
    return root


# ------------------------------------------------------------------------------------------------ cases

CASES: list[Case] = []


def case(
    cid: str, target: str, fault: str, expect: str, slow: bool = False, fixed_by: str = "this change"
) -> Callable[[Callable[[Drill], Observation]], Callable[[Drill], Observation]]:
    """Register a drill case."""

    def register(fn: Callable[[Drill], Observation]) -> Callable[[Drill], Observation]:
        CASES.append(Case(cid, target, fault, expect, fn, slow, fixed_by))
        return fn

    return register


def _file(name: str, kind: str) -> str:
    return f"{name}_{kind}."


def _put(a: np.ndarray, value: Any) -> np.ndarray:
    a.flat[a.size // 2] = value
    return a


def _blank_slice(a: np.ndarray, k: int) -> np.ndarray:
    out = a.astype(np.float32)
    out[:, :, k] = 0
    return out


def _all(mutators: Iterator[Callable[[Path, str], None]] | Any) -> Callable[[Path, str], None]:
    fns = list(mutators)

    def mutate(folder: Path, name: str) -> None:
        for fn in fns:
            fn(folder, name)

    return mutate


def _parallel(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[:3, 1] = out[:3, 0]
    return out


def _nan_affine(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[0, 0] = np.nan
    return out


def _shifted(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[:3, 3] += 7.0
    return out


def _rgb(a: np.ndarray) -> np.ndarray:
    scaled = (255 * a / max(float(a.max()), 1.0)).astype(np.uint8)
    rgb = np.zeros(a.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = scaled, scaled, scaled
    return rgb


def _duplicate_t1(folder: Path, name: str) -> None:
    data, affine = load_nifti(folder / f"{name}_t1.nii.gz")
    save_nifti(folder / f"{name}_t1.nii", data, affine)


def _second_prefix(folder: Path, name: str) -> None:
    shutil.copyfile(folder / f"{name}_t1.nii.gz", folder / "intruder_t1.nii.gz")


def _dangling_t2(folder: Path, name: str) -> None:
    (folder / f"{name}_t2.nii.gz").unlink()
    (folder / f"{name}_t2.nii.gz").symlink_to(folder / "nowhere.nii.gz")


# --- cohort files read by the readers: `fdn inspect DIR` loads every case and lists every problem --------

_READER_FAULTS: list[tuple[str, str, Callable[[Path, str], None], str, str, str]] = [
    # (name, fault, mutate, file kind named, words the message must contain, fixed_by)
    (
        "nan",
        "NaN voxel in T1",
        edit("t1", lambda a: _put(a.astype(np.float32), np.nan)),
        "t1",
        "NaN",
        "earlier",
    ),
    (
        "inf",
        "infinite voxel in FLAIR",
        edit("flair", lambda a: _put(a.astype(np.float32), np.inf)),
        "flair",
        "infinite",
        "earlier",
    ),
    (
        "zeroall",
        "all four sequences all-zero",
        _all(edit(m, np.zeros_like) for m in MODS),
        "t1",
        "empty",
        "this change",
    ),
    ("zerot2", "one all-zero sequence (T2)", edit("t2", np.zeros_like), "t2", "empty", "this change"),
    (
        "negt1",
        "T1 with no voxel above 0 (values -1000..0)",
        edit("t1", lambda a: -a.astype(np.float32)),
        "t1",
        "empty",
        "this change",
    ),
    (
        "flatt1ce",
        "constant T1ce (100 everywhere)",
        edit("t1ce", lambda a: np.full_like(a, 100)),
        "t1ce",
        "same value",
        "this change",
    ),
    (
        "singular",
        "all-zero (singular) affine in every file",
        set_affine((*MODS, "seg", "anat"), lambda a: np.zeros((4, 4)), raw=True),
        "t1ce",
        "singular",
        "this change",
    ),
    (
        "singt2",
        "singular affine in T2 only",
        set_affine(("t2",), lambda a: np.zeros((4, 4)), raw=True),
        "t2",
        "singular",
        "this change",
    ),
    (
        "parallel",
        "affine with two parallel voxel axes (T1ce)",
        set_affine(("t1ce",), _parallel, raw=True),
        "t1ce",
        "singular",
        "this change",
    ),
    (
        "nanaff",
        "NaN in the affine (T1ce)",
        set_affine(("t1ce",), _nan_affine, raw=True),
        "t1ce",
        "singular|NaN",
        "this change",
    ),
    ("oblique30", "30-degree oblique grid (all files)", oblique(30.0), "t1ce", "oblique", "this change"),
    (
        "tilt20",
        "20-degree tilt about the left-right axis",
        oblique(20.0, axis=0),
        "t1ce",
        "oblique",
        "this change",
    ),
    ("twod", "2-D image (T1 is one slice)", edit("t1", lambda a: a[:, :, 0]), "t1", "3D", "earlier"),
    (
        "fived",
        "5-D image (T1 with 2 extra axes)",
        edit("t1", lambda a: np.stack([a, a], -1)[..., None, :]),
        "t1",
        "3D",
        "earlier",
    ),
    (
        "fourd",
        "4-D image in the BraTS layout (T2 has 2 volumes)",
        edit("t2", lambda a: np.stack([a, a], -1)),
        "t2",
        "3D",
        "earlier",
    ),
    (
        "complex",
        "complex-valued T1",
        edit("t1", lambda a: a.astype(np.complex64) * (1 + 1j)),
        "t1",
        "complex",
        "this change",
    ),
    ("rgb", "RGB T2 image", edit("t2", _rgb), "t2", "colour|RGB|3D", "this change"),
    (
        "seg3",
        "segmentation with label 3 (BraTS uses 1, 2, 4)",
        edit("seg", lambda a: _put(a, 3)),
        "seg",
        "label",
        "earlier",
    ),
    ("seg7", "segmentation with label 7", edit("seg", lambda a: _put(a, 7)), "seg", "label", "earlier"),
    (
        "segfrac",
        "segmentation with value 1.5",
        edit("seg", lambda a: _put(a.astype(np.float32), 1.5)),
        "seg",
        "non-integer",
        "earlier",
    ),
    (
        "segneg",
        "segmentation with value -1",
        edit("seg", lambda a: _put(a.astype(np.int16), -1)),
        "seg",
        "outside|label",
        "earlier",
    ),
    (
        "segnan",
        "segmentation with a NaN",
        edit("seg", lambda a: _put(a.astype(np.float32), np.nan)),
        "seg",
        "NaN",
        "earlier",
    ),
    ("anat9", "anatomy labels with value 9", edit("anat", lambda a: _put(a, 9)), "anat", "label", "earlier"),
    (
        "trunc",
        "truncated gzip (T1ce cut in half)",
        replace_bytes("t1ce", lambda b: b[: len(b) // 2]),
        "t1ce",
        "truncated|corrupt",
        "earlier",
    ),
    (
        "notgz",
        "random bytes named .nii.gz (T1)",
        replace_bytes("t1", lambda b: bytes(range(256)) * 8),
        "t1",
        "cannot be read|not",
        "earlier",
    ),
    (
        "empty0",
        "zero-byte FLAIR file",
        replace_bytes("flair", lambda b: b""),
        "flair",
        "cannot be read|empty",
        "earlier",
    ),
    (
        "plaintrunc",
        "uncompressed .nii cut in half (header claims more data)",
        plain_nifti_truncated("t2"),
        "t2",
        "truncated|holds only",
        "earlier",
    ),
    (
        "hugehdr",
        "NIfTI header claiming 3000x3000x3000 voxels",
        as_file("t1", "{name}_t1.nii", nifti_claiming((3000, 3000, 3000))),
        "t1",
        "limit",
        "earlier",
    ),
    (
        "liarnii",
        "NIfTI header claiming 500x500x400 voxels, 64 bytes of data",
        as_file("t1", "{name}_t1.nii", nifti_claiming((500, 500, 400))),
        "t1",
        "holds only|truncated",
        "earlier",
    ),
    (
        "liarnrrd",
        "NRRD header claiming 3000^3 voxels",
        as_file("t2", "{name}_t2.nrrd", NRRD_LIAR),
        "t2",
        "limit",
        "earlier",
    ),
    (
        "liarmha",
        "MetaImage header claiming 2000^3 voxels",
        as_file("flair", "{name}_flair.mha", MHA_LIAR),
        "flair",
        "limit|holds only",
        "earlier",
    ),
    (
        "mhdraw",
        "MetaImage header whose .raw data file is missing",
        as_file("t1", "{name}_t1.mhd", MHD_MISSING_RAW),
        "t1",
        "missing|cannot",
        "earlier",
    ),
    (
        "nomod",
        "missing modality (no FLAIR)",
        lambda f, n: (f / f"{n}_flair.nii.gz").unlink(),
        "flair",
        "missing",
        "earlier",
    ),
    ("twot1", "two T1 files (.nii and .nii.gz)", _duplicate_t1, "t1", "several", "earlier"),
    ("shape", "T2 of another shape", edit("t2", lambda a: a[:-2]), "t2", "grid|shape", "earlier"),
    (
        "spacing",
        "T2 with another voxel spacing",
        set_affine(("t2",), lambda a: a @ np.diag([2.0, 1, 1, 1])),
        "t2",
        "spacing",
        "earlier",
    ),
    ("segshift", "segmentation on a shifted grid", set_affine(("seg",), _shifted), "seg", "grid", "earlier"),
    ("twocases", "files of two cases in one folder", _second_prefix, "twocases", "several cases", "earlier"),
    ("dangling", "T2 is a dangling symbolic link", _dangling_t2, "t2", "missing", "this change"),
]


def _reader_case(
    name: str, mutate: Callable[[Path, str], None], kind: str, words: str
) -> Callable[[Drill], Observation]:
    def run(d: Drill) -> Observation:
        root = bad_case(d, name, mutate)
        culprit = name if kind == name else _file(name, kind)
        return cli_error(d.fdn("inspect", root, "--no-progress"), [culprit], words=words)

    return run


for _name, _fault, _mutate, _kind, _words, _by in _READER_FAULTS:
    CASES.append(
        Case(
            f"inspect/{_name}",
            "fdn inspect",
            _fault,
            "error",
            _reader_case(_name, _mutate, _kind, _words),
            fixed_by=_by,
        )
    )


@case("inspect/oblique-resample", "fdn inspect", "30-degree oblique case with --oblique resample", "warning")
def _(d: Drill) -> Observation:
    root = bad_case(d, "obres", oblique(30.0))
    proc = d.fdn("--oblique", "resample", "inspect", root, "--no-progress")
    return cli_ok(
        proc,
        lambda p: None if "1 readable case" in p.out and "obres" in p.out else p.out[-300:],
        warning=["obres", "oblique"],
    )


@case("inspect/oblique-small", "fdn inspect", "0.5-degree oblique grid (under the tolerance)", "ok")
def _(d: Drill) -> Observation:
    root = bad_case(d, "obsmall", oblique(0.5))
    proc = d.fdn("inspect", root, "--no-progress")
    return cli_ok(
        proc, lambda p: None if "1 readable case" in p.out and "WARNING" not in p.err else p.text[-300:]
    )


@case("inspect/uint8", "fdn inspect", "uint8 images (0..255)", "ok")
def _(d: Drill) -> Observation:
    def to_u8(folder: Path, name: str) -> None:
        for m in MODS:
            edit(m, lambda a: (255 * a / max(float(a.max()), 1.0)).astype(np.uint8))(folder, name)

    root = bad_case(d, "byte", to_u8)
    return cli_ok(
        d.fdn("inspect", root, "--no-progress"), lambda p: None if "1 readable case" in p.out else p.text
    )


@case("inspect/unicode", "fdn inspect", "unicode and spaces in folder and case names", "ok")
def _(d: Drill) -> Observation:
    root = d.new_dir("ünïcødé") / "Kohorte mit Leerzeichen"
    copy_case(d, "phantom_0002", "Fall_ü_日本", root)
    return cli_ok(
        d.fdn("inspect", root, "--no-progress"),
        lambda p: None if "Fall_ü_日本" in p.out and "1 readable" in p.out else p.text[-300:],
    )


@case("inspect/hidden", "fdn inspect", "macOS ._ files beside the images", "ok")
def _(d: Drill) -> Observation:
    def litter(folder: Path, name: str) -> None:
        (folder / f"._{name}_t1.nii.gz").write_bytes(b"\0\5\26\7 junk")

    root = bad_case(d, "hid", litter)
    return cli_ok(
        d.fdn("inspect", root, "--no-progress"), lambda p: None if "1 readable" in p.out else p.text
    )


@case("inspect/empty-folder", "fdn inspect", "empty cohort folder", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    root = d.new_dir("emptycohort")
    return cli_error(d.fdn("inspect", root, "--no-progress"), ["emptycohort"], words="no cases")


@case("inspect/file", "fdn inspect", "cohort path that is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("cohortfile") / "cohort.txt"
    path.write_text("not a folder")
    return cli_error(d.fdn("inspect", path, "--no-progress"), ["cohort.txt"], words="not a folder")


@case("inspect/missing", "fdn inspect", "cohort path that does not exist", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(d.fdn("inspect", d.work / "no_such_cohort", "--no-progress"), ["no_such_cohort"])


@case(
    "inspect/dup-ids",
    "fdn inspect",
    "one case id in two group folders (HGG/x, LGG/x)",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    root = d.new_dir("dupids")
    for group in ("HGG", "LGG"):
        copy_case(d, "phantom_0001", "same_id", root / group)
    return cli_error(d.fdn("inspect", root, "--no-progress"), ["same_id"], words="unique")


@case("inspect/unreadable-file", "fdn inspect", "image file without read permission", "error")
def _(d: Drill) -> Observation:
    root = bad_case(d, "noperm", None)
    target = root / "noperm" / "noperm_t2.nii.gz"
    faults: list[dict[str, Any]] = []
    if os.geteuid() == 0:  # root reads anything: make the OS answer EACCES for this file
        faults = [
            fault("nibabel", "load", "EACCES", only="noperm_t2"),
            fault("fdn_core.data.readers", "nib.load", "EACCES", only="noperm_t2"),
        ]
    else:
        target.chmod(0)
    try:
        return cli_error(
            d.fdn("inspect", root, "--no-progress", faults=faults), ["noperm_t2"], words="permission"
        )
    finally:
        target.chmod(0o644)


@case("inspect/unreadable-folder", "fdn inspect", "cohort folder without read permission", "error")
def _(d: Drill) -> Observation:
    root = bad_case(d, "nolist", None)
    faults: list[dict[str, Any]] = []
    if os.geteuid() == 0:
        faults = [
            fault("os", "listdir", "EACCES", only="nolist"),
            fault("os", "scandir", "EACCES", only="nolist"),
        ]
    else:
        root.chmod(0)
    try:
        return cli_error(
            d.fdn("inspect", root, "--no-progress", faults=faults), ["nolist"], words="permission"
        )
    finally:
        root.chmod(0o755)


# Decathlon layout
def _msd_channels3(root: Path) -> None:
    path = root / "imagesTr" / "phantom_0000.nii.gz"
    data, affine = load_nifti(path)
    save_nifti(path, data[..., :3], affine)


def _msd_zero_channel(root: Path) -> None:
    path = root / "imagesTr" / "phantom_0001.nii.gz"
    data, affine = load_nifti(path)
    data = data.copy()
    data[..., 2] = 0
    save_nifti(path, data, affine)


for _name, _fault, _mutate, _culprit, _words, _by in [
    ("msd3", "Decathlon 4-D image with 3 channels", _msd_channels3, "phantom_0000", "4D|channels", "earlier"),
    (
        "msdjson",
        "Decathlon dataset.json that is not JSON",
        lambda r: (r / "dataset.json").write_text("{oops"),
        "dataset.json",
        "modality",
        "earlier",
    ),
    (
        "msdorphan",
        "Decathlon label without an image",
        lambda r: shutil.copyfile(r / "labelsTr" / "phantom_0000.nii.gz", r / "labelsTr" / "orphan.nii.gz"),
        "orphan",
        "no image",
        "earlier",
    ),
    (
        "msdmod",
        "Decathlon dataset.json naming 3 modalities",
        lambda r: (r / "dataset.json").write_text(
            json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}})
        ),
        "dataset.json",
        "modality",
        "earlier",
    ),
    (
        "msdzero",
        "Decathlon 4-D image with an all-zero T1gd channel",
        _msd_zero_channel,
        "phantom_0001",
        "empty",
        "this change",
    ),
]:

    def _msd_run(
        d: Drill, name: str = _name, mutate: Any = _mutate, culprit: str = _culprit, words: str = _words
    ) -> Observation:
        root = msd_task(d, name, mutate)
        return cli_error(d.fdn("inspect", root, "--no-progress"), [culprit], words=words)

    CASES.append(Case(f"inspect/{_name}", "fdn inspect", _fault, "error", _msd_run, fixed_by=_by))


@case(
    "inspect/dicom-empty",
    "fdn query",
    "KIND=PATH naming a folder without a DICOM series",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    folder = d.new_dir("dicomless")
    (folder / "notes.txt").write_text("no images here")
    files = [f"{m}={d.cohort / 'phantom_0001' / f'phantom_0001_{m}.nii.gz'}" for m in ("t1", "t2", "flair")]
    proc = d.fdn(
        "query",
        "--db",
        d.db,
        "--model",
        d.bundle,
        "--case",
        *files,
        f"t1ce={folder}",
        "--slice",
        "3",
        "--device",
        "cpu",
    )
    return cli_error(proc, ["dicomless"], words="DICOM")


# --- fdn phantom ------------------------------------------------------------------------------------------


def _phantom(d: Drill, *argv: Any) -> Proc:
    return d.fdn("phantom", *argv)


@case("phantom/zero-cases", "fdn phantom", "--cases 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(
        _phantom(d, "--out", d.work / "ph0", "--cases", "0", "--seed", "1"), [("--cases", "n_cases")]
    )


@case("phantom/negative-seed", "fdn phantom", "--seed -1", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(
        _phantom(d, "--out", d.work / "ph1", "--cases", "1", "--seed", "-1"), [("--seed", "seed")]
    )


@case("phantom/zero-shape", "fdn phantom", "--shape 0 32 16", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = _phantom(d, "--out", d.work / "ph2", "--cases", "1", "--seed", "1", "--shape", "0", "32", "16")
    return cli_error(proc, [("--shape", "shape")])


@case("phantom/out-file", "fdn phantom", "--out is an existing file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    target = d.new_dir("phfile") / "taken.txt"
    target.write_text("x")
    return cli_error(_phantom(d, "--out", target, "--cases", "1", "--seed", "1"), ["taken.txt"])


@case("phantom/out-nonempty", "fdn phantom", "--out is a non-empty folder", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    target = d.new_dir("phfull")
    (target / "keep.txt").write_text("x")
    return cli_error(
        _phantom(d, "--out", target, "--cases", "1", "--seed", "1"), ["phfull"], words="not empty"
    )


@case("phantom/not-a-number", "fdn phantom", "--cases abc", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_phantom(d, "--out", d.work / "ph3", "--cases", "abc", "--seed", "1"), ["--cases"])


# --- fdn index build ------------------------------------------------------------------------------------


def _build(
    d: Drill, db: Path, *extra: Any, data: Path | None = None, model: Path | None = None, **kw: Any
) -> Proc:
    return d.fdn(
        "index", "build", "--db", db, *d.common(data, model), "--workers", "1", "--no-hamming", *extra, **kw
    )


def _bundle_copy(d: Drill, name: str, mutate: Callable[[Path], None]) -> Path:
    target = d.new_dir(name) / "bundle"
    shutil.copytree(d.bundle, target)
    mutate(target)
    return target


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a JSON file; a bundle manifest gets its self-hash recomputed (a careful tamperer)."""
    import hashlib

    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    if "manifest_sha256" in doc:
        body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
        doc["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(doc), encoding="utf-8")


def _flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@case(
    "build/model-missing",
    "fdn index build",
    "--model folder that does not exist",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.work / "dbx", model=d.work / "no_bundle"), ["no_bundle"])


@case("build/model-file", "fdn index build", "--model is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("modelfile") / "model.bin"
    path.write_bytes(b"\0" * 100)
    return cli_error(_build(d, d.work / "dbx", model=path), ["model.bin"])


@case("build/bundle-json", "fdn index build", "bundle.json that is not JSON", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    bundle = _bundle_copy(d, "badjson", lambda b: (b / "bundle.json").write_text("{not json"))
    return cli_error(_build(d, d.work / "dbx", model=bundle), ["bundle.json"])


@case(
    "build/weights-edited",
    "fdn index build",
    "one byte of model.safetensors changed",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    bundle = _bundle_copy(d, "badweights", lambda b: _flip_byte(b / "model.safetensors"))
    return cli_error(
        _build(d, d.work / "dbx", model=bundle), ["model.safetensors"], words="hash|altered|match"
    )


@case(
    "build/weights-truncated", "fdn index build", "model.safetensors cut in half", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    def cut(b: Path) -> None:
        raw = (b / "model.safetensors").read_bytes()
        (b / "model.safetensors").write_bytes(raw[: len(raw) // 2])

    return cli_error(
        _build(d, d.work / "dbx", model=_bundle_copy(d, "cutweights", cut)), ["model.safetensors"]
    )


@case(
    "build/bundle-traversal",
    "fdn index build",
    "bundle.json naming a file outside the bundle (../)",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    def escape(b: Path) -> None:
        def change(doc: dict[str, Any]) -> None:
            files = doc.get("files") or {}
            files["../../outside.safetensors"] = dict(next(iter(files.values())))

        _edit_json(b / "bundle.json", change)

    return cli_error(_build(d, d.work / "dbx", model=_bundle_copy(d, "escape", escape)), ["outside"])


@case(
    "build/bundle-types",
    "fdn index build",
    "bundle.json with a wrongly typed field",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    def retype(b: Path) -> None:
        _edit_json(b / "bundle.json", lambda doc: doc.__setitem__("format_version", "two"))

    return cli_error(_build(d, d.work / "dbx", model=_bundle_copy(d, "retyped", retype)), ["bundle.json"])


@case(
    "build/data-missing", "fdn index build", "--data folder that does not exist", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.work / "dbx", data=d.work / "no_cohort"), ["no_cohort"])


@case("build/db-file", "fdn index build", "--db is an existing file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("dbfile") / "db.txt"
    path.write_text("x")
    return cli_error(_build(d, path, "--cases", "phantom_0000"), ["db.txt"])


@case(
    "build/db-foreign",
    "fdn index build",
    "--db is a non-empty folder that is not a database",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    folder = d.new_dir("foreign")
    (folder / "thesis.docx").write_text("precious")
    obs = cli_error(_build(d, folder, "--cases", "phantom_0000", "--overwrite"), ["foreign"])
    if (folder / "thesis.docx").read_text() != "precious":
        return Observation("SILENT WRONG", "the folder's file was replaced")
    return obs


@case(
    "build/db-exists",
    "fdn index build",
    "--db holds a database already (no --overwrite)",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.db, "--cases", "phantom_0000"), [d.db.name], words="overwrite")


@case(
    "build/unknown-case",
    "fdn index build",
    "--cases naming a case that is not in the cohort",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.work / "dbu", "--cases", "phantom_9999"), ["phantom_9999"])


def _staged_cases(db: Path) -> int:
    try:
        doc = json.loads((db / "build.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(int(s.get("num_cases", 0)) for s in doc.get("segments", []))


@case(
    "build/bad-case-stops",
    "fdn index build",
    "cohort with a NaN case: stop, keep the committed batch",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "zz_nan", edit("t1", lambda a: _put(a.astype(np.float32), np.nan)), d.ids()[:2])
    db = d.new_dir("dbnan") / "db"
    obs = cli_error(_build(d, db, "--commit-every", "1", data=data), ["zz_nan_t1"], words="NaN")
    if obs.outcome == "error" and _staged_cases(db) != 2:
        return Observation("LOST UPDATE", f"{_staged_cases(db)} committed case(s) kept, expected 2")
    return obs


@case(
    "build/skip-bad",
    "fdn index build",
    "--skip-bad over a cohort with a NaN case",
    "warning",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "zz_nan2", edit("t1", lambda a: _put(a.astype(np.float32), np.nan)), d.ids()[:2])
    db = d.new_dir("dbskip") / "db"
    proc = _build(d, db, "--skip-bad", data=data)
    return cli_ok(proc, lambda p: None if "2 cases" in p.out else p.out[-300:], warning=["zz_nan2"])


@case("build/zero-case", "fdn index build", "cohort with an all-zero case", "error")
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "zz_zero", _all(edit(m, np.zeros_like) for m in MODS), d.ids()[:1])
    return cli_error(_build(d, d.new_dir("dbzero") / "db", data=data), ["zz_zero_t1"], words="empty")


@case(
    "build/zero-modality-skip",
    "fdn index build",
    "--skip-bad over a cohort with an all-zero FLAIR",
    "warning",
)
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "zz_zflair", edit("flair", np.zeros_like), d.ids()[:1])
    proc = _build(d, d.new_dir("dbzf") / "db", "--skip-bad", data=data)
    return cli_ok(
        proc, lambda p: None if "1 cases" in p.out else p.out[-300:], warning=["zz_zflair_flair", "empty"]
    )


@case("build/oblique-case", "fdn index build", "cohort with a 30-degree oblique case", "error")
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "zz_obl", oblique(30.0), d.ids()[:1])
    return cli_error(_build(d, d.new_dir("dbobl") / "db", data=data), ["zz_obl_t1ce"], words="oblique")


@case("build/singular-case", "fdn index build", "cohort with a singular-affine case", "error")
def _(d: Drill) -> Observation:
    data = bad_cohort(
        d, "zz_sing", set_affine((*MODS, "seg", "anat"), lambda a: np.zeros((4, 4)), raw=True), d.ids()[:1]
    )
    return cli_error(_build(d, d.new_dir("dbsing") / "db", data=data), ["zz_sing_t1ce"], words="singular")


def _os_fault_case(code: str, words: str) -> Callable[[Drill], Observation]:
    def run(d: Drill) -> Observation:
        db = d.new_dir(f"db{code}") / "db"
        proc = _build(
            d, db, "--cases", "phantom_0000", faults=[fault("fdn_core.codes.database", "_write_npy", code)]
        )
        obs = cli_error(proc, [db.name], words=words)
        leftovers = [p.name for p in db.parent.rglob("*") if ".tmp" in p.name or p.name.startswith(".db.")]
        if obs.outcome == "error" and leftovers:
            return Observation("SILENT WRONG", f"half-written files left: {leftovers[:3]}")
        return obs

    return run


for _code, _words, _what in [
    ("ENOSPC", "disk is full", "disk full"),
    ("EROFS", "read-only", "read-only file system"),
    ("EBUSY", "busy", "device busy"),
    ("EIO", "input/output|I/O", "I/O error"),
]:
    CASES.append(
        Case(
            f"build/{_code.lower()}",
            "fdn index build",
            f"{_what} while writing codes",
            "error",
            _os_fault_case(_code, _words),
            fixed_by="earlier",
        )
    )


@case(
    "build/sigterm",
    "fdn index build",
    "SIGTERM in the middle of a build, then the same command",
    "ok",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = d.new_dir("dbterm") / "db"
    argv = (
        "index",
        "build",
        "--db",
        db,
        *d.common(),
        "--workers",
        "1",
        "--no-hamming",
        "--commit-every",
        "1",
    )

    def stop_after_first_commit(pid: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _staged_cases(db) < 1:
            time.sleep(0.02)
        os.kill(pid, signal.SIGTERM)

    first = d.fdn(*argv, on_start=stop_after_first_commit)
    if _TRACEBACK in first.text:
        return Observation("TRACEBACK", _last_exception(first.text))
    if first.rc == 0:
        return Observation("ok", "finished before the signal (nothing to check)")
    if first.rc != 128 + signal.SIGTERM or "run the same command again" not in first.err:
        return Observation("SILENT WRONG", f"exit {first.rc}: {first.err[-300:]}")
    kept = _staged_cases(db)
    second = d.fdn(*argv)
    return cli_ok(
        second, lambda p: None if f"{N_CASES} cases" in p.out and kept >= 1 else f"kept {kept}: {p.out}"
    )


@case("build/batch-zero", "fdn index build", "--batch-size 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.work / "dbb", "--batch-size", "0"), ["--batch-size"])


@case("build/workers-zero", "fdn index build", "--workers 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(
        d.fdn("index", "build", "--db", d.work / "dbw", *d.common(), "--workers", "0"), ["--workers"]
    )


@case("build/commit-zero", "fdn index build", "--commit-every 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_build(d, d.work / "dbc", "--commit-every", "0"), ["--commit-every"])


@case(
    "build/device-cuda",
    "fdn index build",
    "--device cuda:7 on a machine without that GPU",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    proc = d.fdn(
        "index",
        "build",
        "--db",
        d.work / "dbg",
        "--model",
        d.bundle,
        "--data",
        d.cohort,
        "--device",
        "cuda:7",
        "--no-progress",
    )
    if proc.rc == 0:
        return Observation("ok", "this machine has a cuda:7")
    return cli_error(proc, ["cuda:7"])


@case("build/device-bogus", "fdn index build", "--device tpu", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = d.fdn(
        "index",
        "build",
        "--db",
        d.work / "dbg",
        "--model",
        d.bundle,
        "--data",
        d.cohort,
        "--device",
        "tpu",
        "--no-progress",
    )
    return cli_error(proc, ["tpu"])


# --- fdn index add / remove / compact / info --------------------------------------------------------------


def db_copy(d: Drill, name: str) -> Path:
    """A copy of the fixture database beside it (its relative source paths stay valid)."""
    target = d.work / f"db_{name}"
    shutil.copytree(d.db, target)
    return target


def _manifest(db: Path) -> dict[str, Any]:
    return json.loads((db / "manifest.json").read_text(encoding="utf-8"))


def _rehash(db: Path, doc: dict[str, Any]) -> None:
    """Write a manifest with a recomputed self-hash (a careful tamperer)."""
    from fdn_core.codes import database as dbmod

    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    (db / "manifest.json").write_text(json.dumps({**body, "manifest_sha256": dbmod._manifest_hash(body)}))


@case("add/db-missing", "fdn index add", "--db that does not exist", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = d.fdn("index", "add", "--db", d.work / "no_db", *d.common(), "--workers", "1")
    return cli_error(proc, ["no_db"])


@case("add/nothing-new", "fdn index add", "adding a cohort that is indexed already", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    db = db_copy(d, "again")
    proc = d.fdn("index", "add", "--db", db, *d.common(), "--workers", "1")
    return cli_ok(proc, lambda p: None if "nothing to add" in p.out else p.out[-300:])


@case(
    "add/namesake", "fdn index add", "another study named like a database case", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "namesake")
    root = d.new_dir("namesake")
    copy_case(d, "phantom_0002", "phantom_0000", root)  # phantom_0002's images under the name phantom_0000
    proc = d.fdn("index", "add", "--db", db, *d.common(data=root), "--workers", "1")
    return cli_error(proc, ["phantom_0000"], words="other image files")


@case(
    "add/other-model",
    "fdn index add",
    "--model of another network than the database's",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    root = bad_case(d, "newcase", None, src="phantom_0002")
    proc = d.fdn("index", "add", "--db", db_copy(d, "othermodel"), *d.common(data=root, model=d.bundle2))
    return cli_error(proc, ["db_othermodel"], words="model")


@case("add/zero-case", "fdn index add", "adding an all-zero study", "error")
def _(d: Drill) -> Observation:
    root = bad_case(d, "addzero", _all(edit(m, np.zeros_like) for m in MODS))
    proc = d.fdn("index", "add", "--db", db_copy(d, "addzero"), *d.common(data=root), "--workers", "1")
    return cli_error(proc, ["addzero_t1"], words="empty")


@case("add/data-file", "fdn index add", "--data is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("datafile") / "cohort.zip"
    path.write_bytes(b"PK\3\4")
    proc = d.fdn("index", "add", "--db", db_copy(d, "datafile"), *d.common(data=path))
    return cli_error(proc, ["cohort.zip"])


@case(
    "add/two-writers",
    "fdn index add",
    "two `fdn index add` at once on one database",
    "ok",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "writers")
    roots = [
        bad_case(d, f"writer{i}", None, src=src) for i, src in enumerate(("phantom_0001", "phantom_0002"))
    ]
    for r, i in zip(roots, (0, 1)):  # new content: scale the images so they are new studies
        for m in MODS:
            edit(m, lambda a, k=i: a.astype(np.float32) * (1.5 + k))(r / f"writer{i}", f"writer{i}")
    import threading

    procs: list[Proc] = []
    threads = [
        threading.Thread(
            target=lambda r=r: procs.append(
                d.fdn("index", "add", "--db", db, *d.common(data=r), "--workers", "1")
            )
        )
        for r in roots
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        if _TRACEBACK in p.text or p.rc != 0:
            return cli_ok(p, lambda _: None)
    info = d.fdn("index", "info", db, "--cases")
    missing = [f"writer{i}" for i in (0, 1) if f"writer{i}" not in info.out]
    if missing:
        return Observation("LOST UPDATE", f"lost {missing}: {info.out[-300:]}")
    return cli_ok(info, lambda p: None if "integrity     OK" in p.out else p.out[-300:])


@case("remove/unknown", "fdn index remove", "--case that is not in the database", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(
        d.fdn("index", "remove", "--db", db_copy(d, "rmunknown"), "--case", "ghost_17"), ["ghost_17"]
    )


@case("remove/db-file", "fdn index remove", "--db is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("rmfile") / "db.json"
    path.write_text("{}")
    return cli_error(d.fdn("index", "remove", "--db", path, "--case", "phantom_0000"), ["db.json"])


@case(
    "remove/then-query",
    "fdn index remove",
    "remove a case, then query: it is never returned",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "removed")
    rm = d.fdn("index", "remove", "--db", db, "--case", "phantom_0003")
    if rm.rc != 0:
        return cli_ok(rm, lambda _: None)
    proc = d.fdn(
        "query",
        "--db",
        db,
        "--model",
        d.bundle,
        "--case",
        "phantom_0000",
        "--slice",
        "8",
        "--top",
        "10",
        "--device",
        "cpu",
    )
    return cli_ok(
        proc,
        lambda p: (
            "removed case returned"
            if "phantom_0003" in p.out
            else (None if "2 result(s)" in p.out else p.out[-300:])
        ),
    )


@case("compact/missing", "fdn index compact", "--db that does not exist", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(d.fdn("index", "compact", "--db", d.work / "gone_db"), ["gone_db"])


@case("compact/after-remove", "fdn index compact", "compact after a removal", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    db = db_copy(d, "compact")
    d.fdn("index", "remove", "--db", db, "--case", "phantom_0001")
    d.fdn("index", "compact", "--db", db)
    info = d.fdn("index", "info", db, "--cases")
    return cli_ok(
        info,
        lambda p: (
            None
            if "integrity     OK" in p.out and "phantom_0001" not in p.out and "phantom_0002" in p.out
            else p.out[-400:]
        ),
    )


@case("info/file", "fdn index info", "a database path that is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("infofile") / "db"
    path.write_text("x")
    return cli_error(d.fdn("index", "info", path), [str(path.parent.name)])


@case("info/empty-folder", "fdn index info", "an empty folder", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(d.fdn("index", "info", d.new_dir("emptydb")), ["emptydb"])


@case(
    "info/flipped-byte", "fdn index info", "one byte of a code segment changed", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "flipped")
    seg = db / _manifest(db)["segments"][0]["folder"]
    target = sorted(seg.glob("normal*.npy"))[0]
    _flip_byte(target, offset=target.stat().st_size - 3)
    return cli_error(d.fdn("index", "info", db), [target.name], codes=(1, 2), words="corrupt|hash|match")


@case("info/manifest-truncated", "fdn index info", "manifest.json cut in half", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    db = db_copy(d, "mtrunc")
    raw = (db / "manifest.json").read_bytes()
    (db / "manifest.json").write_bytes(raw[: len(raw) // 2])
    return cli_error(d.fdn("index", "info", db), ["manifest.json"], codes=(1, 2))


@case(
    "info/manifest-types",
    "fdn index info",
    "manifest field of the wrong type (rehashed)",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "mtypes")
    doc = _manifest(db)
    doc["num_codes"] = "many"
    _rehash(db, doc)
    return cli_error(d.fdn("index", "info", db), ["manifest.json"], codes=(1, 2))


@case(
    "info/traversal",
    "fdn index info",
    "manifest naming a segment outside the database (../)",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "mtraverse")
    doc = _manifest(db)
    doc["segments"][0]["folder"] = "../../etc"
    _rehash(db, doc)
    return cli_error(d.fdn("index", "info", db), ["../../etc"], codes=(1, 2))


@case("info/manifest-missing", "fdn index info", "manifest.json deleted", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    db = db_copy(d, "mgone")
    (db / "manifest.json").unlink()
    return cli_error(d.fdn("index", "info", db), ["db_mgone"], codes=(1, 2))


@case("info/segment-deleted", "fdn query", "a code segment folder deleted", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    db = db_copy(d, "segdel")
    shutil.rmtree(db / _manifest(db)["segments"][0]["folder"])
    proc = d.fdn(
        "query", "--db", db, "--model", d.bundle, "--case", "phantom_0000", "--slice", "3", "--device", "cpu"
    )
    return cli_error(proc, ["db_segdel"])


@case(
    "info/litter",
    "fdn index info",
    "temporary files of a killed writer in the database",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "litter")
    (db / "segments" / ".tmp-killed-writer").mkdir(parents=True, exist_ok=True)
    (db / "segments" / ".tmp-killed-writer" / "normal.npy").write_bytes(b"\0" * 64)
    (db / ".manifest.json.tmp123").write_text("{")
    return cli_ok(d.fdn("index", "info", db), lambda p: None if "integrity     OK" in p.out else p.out[-300:])


# --- fdn query --------------------------------------------------------------------------------------------


def _query(d: Drill, *argv: Any, db: Path | None = None, model: Path | None = None, **kw: Any) -> Proc:
    return d.fdn("query", "--db", db or d.db, "--model", model or d.bundle, *argv, "--device", "cpu", **kw)


def _study(
    d: Drill, name: str, mutate: Callable[[Path, str], None] | None, src: str = "phantom_0001"
) -> Path:
    """A query study folder (one case) made from cohort case ``src``."""
    return bad_case(d, name, mutate, src=src) / name


def _hits(out: str) -> list[tuple[str, int, float]]:
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+(\d+)\s+(\S+)\s*$", out, re.MULTILINE)
    return [(c, int(k), float(x)) for c, k, x in rows]


@case("query/top-zero", "fdn query", "--top 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "3", "--top", "0"), ["--top"])


@case("query/top-negative", "fdn query", "--top -3", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "3", "--top", "-3"), ["--top"])


@case("query/top-huge", "fdn query", "--top 1000000000", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = _query(d, "--case", "phantom_0000", "--slice", "8", "--top", "1000000000")
    return cli_ok(proc, lambda p: None if len(_hits(p.out)) == N_CASES - 1 else f"hits {_hits(p.out)}")


@case("query/slice-negative", "fdn query", "--slice -1", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "-1"), ["--slice"])


@case("query/slice-outside-db", "fdn query", "--slice 999 of a database case", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "999"), ["999", "phantom_0000"])


@case(
    "query/slice-outside-study", "fdn query", "--slice 999 of an external study", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    study = _study(d, "q999", None, src="phantom_0002")
    return cli_error(_query(d, "--case", study, "--slice", "999"), ["999", "q999"])


@case(
    "query/unknown-case",
    "fdn query",
    "--case neither a database case nor a path",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_4242", "--slice", "3"), ["phantom_4242"])


_QUERY_FAULTS: list[tuple[str, str, Callable[[Path, str], None], str, str, str]] = [
    (
        "qnan",
        "study with a NaN voxel (T2)",
        edit("t2", lambda a: _put(a.astype(np.float32), np.nan)),
        "t2",
        "NaN",
        "earlier",
    ),
    (
        "qzero",
        "all-zero study (four sequences)",
        _all(edit(m, np.zeros_like) for m in MODS),
        "t1",
        "empty",
        "this change",
    ),
    (
        "qzeroflair",
        "study with an all-zero FLAIR",
        edit("flair", np.zeros_like),
        "flair",
        "empty",
        "this change",
    ),
    (
        "qsing",
        "study with a singular affine (all files)",
        set_affine((*MODS, "seg", "anat"), lambda a: np.zeros((4, 4)), raw=True),
        "t1ce",
        "singular",
        "this change",
    ),
    (
        "qsingt1",
        "study whose T1 alone has a singular affine",
        set_affine(("t1",), lambda a: np.zeros((4, 4)), raw=True),
        "t1",
        "singular",
        "this change",
    ),
    (
        "qtrunc",
        "study with a truncated T1ce",
        replace_bytes("t1ce", lambda b: b[: len(b) // 3]),
        "t1ce",
        "truncated|corrupt",
        "earlier",
    ),
    ("qtwod", "study whose T2 is a 2-D image", edit("t2", lambda a: a[:, :, 0]), "t2", "3D", "earlier"),
    (
        "qcomplex",
        "study with a complex FLAIR",
        edit("flair", lambda a: a.astype(np.complex64)),
        "flair",
        "complex",
        "this change",
    ),
    (
        "qseg5",
        "study with segmentation label 5",
        edit("seg", lambda a: _put(a, 5)),
        "seg",
        "label",
        "earlier",
    ),
]


def _query_case(
    name: str, mutate: Callable[[Path, str], None], kind: str, words: str
) -> Callable[[Drill], Observation]:
    def run(d: Drill) -> Observation:
        study = _study(d, name, mutate)
        return cli_error(_query(d, "--case", study, "--slice", "8"), [_file(name, kind)], words=words)

    return run


for _name, _fault, _mutate, _kind, _words, _by in _QUERY_FAULTS:
    CASES.append(
        Case(
            f"query/{_name}",
            "fdn query",
            _fault,
            "error",
            _query_case(_name, _mutate, _kind, _words),
            fixed_by=_by,
        )
    )


@case(
    "query/oblique", "fdn query", "30-degree oblique study (resampled onto an axis-aligned grid)", "warning"
)
def _(d: Drill) -> Observation:
    study = _study(d, "qobl", oblique(30.0))
    proc = _query(d, "--case", study, "--slice", "8", "--top", "3")
    return cli_ok(
        proc, lambda p: None if len(_hits(p.out)) == 3 else p.out[-300:], warning=["qobl", "oblique"]
    )


@case("query/oblique-refuse", "fdn query", "oblique study with --oblique refuse", "error")
def _(d: Drill) -> Observation:
    study = _study(d, "qoblr", oblique(30.0))
    proc = d.fdn(
        "--oblique",
        "refuse",
        "query",
        "--db",
        d.db,
        "--model",
        d.bundle,
        "--case",
        study,
        "--slice",
        "8",
        "--device",
        "cpu",
    )
    return cli_error(proc, [_file("qoblr", "t1ce")], words="oblique")


@case("query/oblique-accept", "fdn query", "oblique copy of a database case with --oblique accept", "warning")
def _(d: Drill) -> Observation:
    study = _study(d, "qobla", oblique(30.0))
    proc = d.fdn(
        "--oblique",
        "accept",
        "query",
        "--db",
        d.db,
        "--model",
        d.bundle,
        "--case",
        study,
        "--slice",
        "8",
        "--device",
        "cpu",
        "--top",
        "3",
    )
    return cli_ok(
        proc, lambda p: None if len(_hits(p.out)) == 3 else p.out[-300:], warning=["qobla", "oblique"]
    )


@case(
    "query/abnormal-from-syntax",
    "fdn query",
    "--abnormal-from without CASE:SLICE",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    proc = _query(d, "--case", "phantom_0000", "--slice", "3", "--abnormal-from", "phantom_0001")
    return cli_error(proc, ["phantom_0001"], words="CASE:SLICE")


@case(
    "query/abnormal-from-unknown",
    "fdn query",
    "--abnormal-from naming an unknown case",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    proc = _query(d, "--case", "phantom_0000", "--slice", "3", "--abnormal-from", "nobody:3")
    return cli_error(proc, ["nobody"])


@case(
    "query/abnormal-from-slice",
    "fdn query",
    "--abnormal-from with a slice outside the case",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    proc = _query(d, "--case", "phantom_0000", "--slice", "3", "--abnormal-from", "phantom_0001:500")
    return cli_error(proc, ["500"])


@case(
    "query/montage-under-file",
    "fdn query",
    "--montage inside a path that is a file",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    blocker = d.new_dir("montage") / "plain.txt"
    blocker.write_text("x")
    proc = _query(d, "--case", "phantom_0000", "--slice", "3", "--montage", blocker / "out.png")
    return cli_error(proc, ["plain.txt"])


@case("query/json-readonly", "fdn query", "--json on a read-only file system", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    target = d.new_dir("jsonro") / "hits.json"
    proc = _query(
        d,
        "--case",
        "phantom_0000",
        "--slice",
        "3",
        "--json",
        target,
        faults=[fault("fdn_core.fileio", "os.replace", "EROFS", only="hits.json")],
    )
    obs = cli_error(proc, ["hits.json"], words="read-only")
    left = [p.name for p in target.parent.iterdir()]
    if obs.outcome == "error" and left:
        return Observation("SILENT WRONG", f"half-written files left: {left}")
    return obs


@case(
    "query/other-model",
    "fdn query",
    "--model of another network than the database's",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(
        _query(d, "--case", "phantom_0000", "--slice", "3", model=d.bundle2), [d.db.name], words="model"
    )


@case("query/two-files", "fdn query", "--case with two of the four image files", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    src = d.cohort / "phantom_0001"
    proc = _query(d, "--case", src / "phantom_0001_t1.nii.gz", src / "phantom_0001_t2.nii.gz", "--slice", "3")
    return cli_error(proc, ["t1ce", "flair"], words="missing")


@case(
    "query/kind-missing",
    "fdn query",
    "--case KIND=PATH naming a file that does not exist",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    src = d.cohort / "phantom_0001"
    files = [src / f"phantom_0001_{m}.nii.gz" for m in ("t1", "t2", "flair")]
    proc = _query(d, "--case", *files, f"t1ce={d.work / 'lost_t1ce.nii.gz'}", "--slice", "3")
    return cli_error(proc, ["lost_t1ce.nii.gz"])


@case("query/namesake", "fdn query", "external study named like a database case", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    # another patient's study (phantom_0002's images, brighter) in a folder named like database case 0003
    brighter = _all(edit(m, lambda a: a.astype(np.float32) * 1.5) for m in MODS)
    study = _study(d, "phantom_0003", brighter, src="phantom_0002")
    proc = _query(d, "--case", study, "--slice", "8", "--top", "10")
    return cli_ok(
        proc,
        lambda p: (
            None
            if "not in the database" in p.out and "phantom_0003" in {h[0] for h in _hits(p.out)}
            else p.out[-400:]
        ),
    )


@case(
    "query/copy-of-case",
    "fdn query",
    "a renamed copy of a database case (excluded as itself)",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    study = _study(d, "renamed_copy", None, src="phantom_0002")
    proc = _query(d, "--case", study, "--slice", "8", "--top", "10")
    return cli_ok(
        proc,
        lambda p: (
            None
            if "phantom_0002" not in {h[0] for h in _hits(p.out)} and "in the database" in p.out
            else p.out[-400:]
        ),
    )


@case("query/unicode-study", "fdn query", "study in a unicode path with spaces", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    root = d.new_dir("Études") / "IRM cérébrale"
    study = copy_case(d, "phantom_0002", "Patient_é_1", root)
    proc = _query(d, "--case", study, "--slice", "8", "--top", "2")
    return cli_ok(proc, lambda p: None if len(_hits(p.out)) == 2 else p.out[-300:])


@case("query/json-folder", "fdn query", "--json naming an existing folder", "error")
def _(d: Drill) -> Observation:
    folder = d.new_dir("jsonfolder")
    return cli_error(
        _query(d, "--case", "phantom_0000", "--slice", "3", "--json", folder), ["jsonfolder", "--json"]
    )


@case("query/empty-case-arg", "fdn query", "--case '' (an empty argument)", "error")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "", "--slice", "3"), ["--case"])


@case("query/empty-slice", "fdn query", "query slice outside the head (no voxel above 0)", "warning")
def _(d: Drill) -> Observation:
    def blank_bottom(folder: Path, name: str) -> None:
        for m in MODS:
            edit(m, lambda a: _blank_slice(a, 0))(folder, name)

    study = _study(d, "qblank", blank_bottom, src="phantom_0002")
    proc = _query(d, "--case", study, "--slice", "0", "--top", "2")
    return cli_ok(
        proc, lambda p: None if len(_hits(p.out)) == 2 else p.out[-300:], warning=["qblank", "empty"]
    )


@case("query/mode-bogus", "fdn query", "--mode both-ish", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "3", "--mode", "bothish"), ["--mode"])


@case(
    "query/hamming",
    "fdn query",
    "--distance hamming on a database without binary codes yet",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    db = db_copy(d, "hamming")
    shutil.rmtree(db / "hamming", ignore_errors=True)
    proc = _query(d, "--case", "phantom_0000", "--slice", "8", "--distance", "hamming", "--top", "3", db=db)
    return cli_ok(proc, lambda p: None if len(_hits(p.out)) == 3 else p.out[-300:])


@case(
    "query/db-is-bundle", "fdn query", "--db pointing at a model bundle folder", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    return cli_error(_query(d, "--case", "phantom_0000", "--slice", "3", db=d.bundle), [d.bundle.name])


# --- fdn eval-retrieval / eval-model ---------------------------------------------------------------------


def _eval_r(d: Drill, *argv: Any, data: Path | None = None) -> Proc:
    extra = ["--data", str(data)] if data is not None else []
    return d.fdn(
        "eval-retrieval",
        "--db",
        d.db,
        "--model",
        d.bundle,
        *extra,
        "--device",
        "cpu",
        "--no-progress",
        "--draws",
        "1",
        *argv,
    )


@case("evalr/top-zero", "fdn eval-retrieval", "--top 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_eval_r(d, "--top", "0", "--leave-one-out", "--out", d.work / "er0"), ["--top"])


@case(
    "evalr/no-data", "fdn eval-retrieval", "neither --data nor --leave-one-out", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    return cli_error(_eval_r(d, "--out", d.work / "er1"), ["--data"])


@case(
    "evalr/zero-query",
    "fdn eval-retrieval",
    "query cohort holding an all-zero case (was: Dice 0.000)",
    "error",
)
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "ezero", _all(edit(m, np.zeros_like) for m in MODS), d.ids())
    return cli_error(_eval_r(d, "--out", d.work / "er2", data=data), ["ezero_t1"], words="empty")


@case(
    "evalr/unknown-query",
    "fdn eval-retrieval",
    "--queries naming an unknown case",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(
        _eval_r(d, "--queries", "nobody_1", "--out", d.work / "er3", data=d.cohort), ["nobody_1"]
    )


@case("evalr/out-file", "fdn eval-retrieval", "--out is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("erout") / "report.md"
    path.write_text("x")
    return cli_error(_eval_r(d, "--leave-one-out", "--out", path, "--baselines"), ["report.md"])


@case(
    "evalr/leave-one-out",
    "fdn eval-retrieval",
    "--leave-one-out on the tiny database",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    out = d.work / "er_loo"
    proc = _eval_r(d, "--leave-one-out", "--out", out, "--baselines", "--distances", "euclidean")
    return cli_ok(proc, lambda p: None if (out / "retrieval_eval.json").is_file() else p.out[-300:])


@case(
    "evalr/unlabelled",
    "fdn eval-retrieval",
    "query cohort without segmentations",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    def unlabel(folder: Path, name: str) -> None:
        (folder / f"{name}_seg.nii.gz").unlink()

    data = bad_case(d, "nolabel", unlabel, src="phantom_0002")
    return cli_error(_eval_r(d, "--out", d.work / "er4", "--baselines", data=data), ["nolabel"])


def _eval_m(d: Drill, *argv: Any, data: Path | None = None) -> Proc:
    return d.fdn(
        "eval-model",
        "--model",
        d.bundle,
        "--data",
        data or d.cohort,
        "--device",
        "cpu",
        "--no-progress",
        "--leak-epochs",
        "1",
        *argv,
    )


@case(
    "evalm/held-out",
    "fdn eval-model",
    "--held-out with a bundle that records no validation cases",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return cli_error(_eval_m(d, "--held-out", "--out", d.work / "em0"), [d.bundle.name], words="validation")


@case("evalm/leak-epochs", "fdn eval-model", "--leak-epochs 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = d.fdn(
        "eval-model", "--model", d.bundle, "--data", d.cohort, "--out", d.work / "em1", "--leak-epochs", "0"
    )
    return cli_error(proc, ["--leak-epochs"])


@case("evalm/unknown-case", "fdn eval-model", "--cases naming an unknown case", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_eval_m(d, "--cases", "ghost_3", "--out", d.work / "em2"), ["ghost_3"])


@case("evalm/zero-case", "fdn eval-model", "cohort holding an all-zero FLAIR", "error")
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "mzero", edit("flair", np.zeros_like), d.ids()[:2])
    return cli_error(_eval_m(d, "--out", d.work / "em3", data=data), ["mzero_flair"], words="empty")


@case("evalm/out-file", "fdn eval-model", "--out is a file", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    path = d.new_dir("emout") / "eval.txt"
    path.write_text("x")
    return cli_error(_eval_m(d, "--cases", "phantom_0000", "phantom_0001", "--out", path), ["eval.txt"])


# --- fdn train / export -----------------------------------------------------------------------------------


def _train(d: Drill, *argv: Any, **kw: Any) -> Proc:
    return d.fdn("train", "--device", "cpu", "--no-progress", "--threads", "1", "--no-export", *argv, **kw)


def _base_run(d: Drill) -> Path:
    """The two-step training run (made on first use), copied to a fresh folder (its slice cache too: still
    valid for the same cohort, rebuilt for another)."""
    if not (d.run_dir / "checkpoints" / "last.pt").is_file():
        res = d.api("train_base", timeout=600)
        if res.error_type is not None or res.timed_out:
            raise RuntimeError(f"could not train the base run: {res.error_type}: {res.message}\n{res.trace}")
    target = d.new_dir("run") / "run"
    shutil.copytree(d.run_dir, target, ignore=shutil.ignore_patterns("tensorboard"))
    return target


def _other_cohort(d: Drill, name: str) -> Path:
    """Another cohort with the same case ids (its images differ): the trap of a silent resume."""
    root = d.new_dir(name)
    for cid in d.ids():
        copy_case(d, cid, cid, root)
        for m in MODS:
            edit(m, lambda a: a.astype(np.float32) * 1.25)(root / cid, cid)
    return root


@case("train/no-config", "fdn train", "no --config for a new run", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_train(d, "--data", d.cohort, "--out", d.work / "tr0"), ["--config"])


@case("train/config-missing", "fdn train", "--config file that does not exist", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(
        _train(d, "--config", d.work / "nope.yaml", "--data", d.cohort, "--out", d.work / "tr1"),
        ["nope.yaml"],
    )


@case("train/config-unknown-key", "fdn train", "--config with an unknown key", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    cfg = d.new_dir("cfg") / "typo.yaml"
    base = (ROOT / "training" / "fdn_training" / "configs" / "tiny_test.yaml").read_text()
    cfg.write_text(base.replace("  batch_size: 4", "  batch_size: 4\n  batchsize: 8"))
    return cli_error(_train(d, "--config", cfg, "--data", d.cohort, "--out", d.work / "tr2"), ["batchsize"])


@case("train/max-steps-zero", "fdn train", "--max-steps 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = _train(d, "--config", "tiny_test", "--data", d.cohort, "--out", d.work / "tr3", "--max-steps", "0")
    return cli_error(proc, ["--max-steps"])


@case("train/threads-zero", "fdn train", "--threads 0", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    proc = d.fdn(
        "train", "--config", "tiny_test", "--data", d.cohort, "--out", d.work / "tr4", "--threads", "0"
    )
    return cli_error(proc, ["--threads"])


@case("train/one-case", "fdn train", "--data with a single case", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    data = bad_case(d, "lonely", None)
    return cli_error(_train(d, "--config", "tiny_test", "--data", data, "--out", d.work / "tr5"), ["lonely"])


@case("train/resume-nothing", "fdn train", "--resume in a folder without a run", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(_train(d, "--resume", "--data", d.cohort, "--out", d.new_dir("tr6")), ["last.pt"])


@case("train/zero-case", "fdn train", "cohort holding an all-zero T1ce", "error")
def _(d: Drill) -> Observation:
    data = bad_cohort(d, "tzero", edit("t1ce", np.zeros_like), d.ids()[:2])
    proc = _train(d, "--config", "tiny_test", "--data", data, "--out", d.work / "tr7", "--max-steps", "1")
    return cli_error(proc, ["tzero_t1ce"], words="empty")


@case(
    "train/resume-other-data", "fdn train", "--resume with another --data (same case ids)", "error", slow=True
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    other = _other_cohort(d, "othercohort")
    proc = _train(d, "--resume", "--data", other, "--out", run, "--max-steps", "3")
    return cli_error(proc, ["othercohort", "--allow-data-change"], words="trained on")


@case(
    "train/resume-other-data-allowed",
    "fdn train",
    "--resume with another --data and --allow-data-change",
    "warning",
    slow=True,
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    other = _other_cohort(d, "othercohort2")
    proc = _train(d, "--resume", "--data", other, "--out", run, "--max-steps", "3", "--allow-data-change")
    return cli_ok(
        proc,
        lambda p: None if "trained 3 steps" in p.out else p.out[-300:],
        warning=["othercohort2", "allow-data-change"],
    )


@case(
    "train/resume-moved-data",
    "fdn train",
    "--resume with a copy of the cohort in another folder",
    "ok",
    slow=True,
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    moved = d.new_dir("moved") / "cohort"
    shutil.copytree(d.cohort, moved)
    proc = _train(d, "--resume", "--data", moved, "--out", run, "--max-steps", "3")
    return cli_ok(proc, lambda p: None if "trained 3 steps" in p.out else p.out[-300:])


@case("train/resume-fewer-cases", "fdn train", "--resume with a cohort missing one case", "error", slow=True)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    fewer = d.new_dir("fewer")
    for cid in d.ids()[:-1]:
        copy_case(d, cid, cid, fewer)
    proc = _train(d, "--resume", "--data", fewer, "--out", run, "--max-steps", "3")
    return cli_error(proc, ["fewer", "removed"], words="trained on")


@case(
    "train/resume-truncated",
    "fdn train",
    "--resume from a truncated last.pt",
    "error",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    return cli_error(_train(d, "--resume", "--data", d.cohort, "--out", run), ["last.pt"])


@case(
    "train/out-holds-run",
    "fdn train",
    "new run into a folder that holds one (no --resume)",
    "error",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    return cli_error(_train(d, "--config", "tiny_test", "--data", d.cohort, "--out", run), ["--resume"])


@case(
    "train/init-and-resume",
    "fdn train",
    "--init-from together with --resume",
    "error",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    proc = _train(
        d, "--resume", "--init-from", run / "checkpoints" / "last.pt", "--data", d.cohort, "--out", run
    )
    return cli_error(proc, ["--init-from", "--resume"])


@case("export/run-missing", "fdn export", "--run folder that does not exist", "error", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return cli_error(d.fdn("export", "--run", d.work / "no_run", "--out", d.work / "ex0"), ["no_run"])


@case(
    "export/checkpoint-missing",
    "fdn export",
    "--checkpoint path that does not exist",
    "error",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    proc = d.fdn("export", "--run", d.work, "--checkpoint", d.work / "ghost.pt", "--out", d.work / "ex1")
    return cli_error(proc, ["ghost.pt"])


@case(
    "export/not-a-checkpoint", "fdn export", "--checkpoint that is a text file", "error", fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    path = d.new_dir("notckpt") / "weights.pt"
    path.write_text("hello")
    return cli_error(
        d.fdn("export", "--run", d.work, "--checkpoint", path, "--out", d.work / "ex2"), ["weights.pt"]
    )


@case(
    "export/out-exists", "fdn export", "--out exists (no --overwrite)", "error", slow=True, fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    out = d.new_dir("exout")
    proc = d.fdn("export", "--run", run, "--checkpoint", "last", "--out", out)
    return cli_error(proc, ["exout"], words="overwrite|exists")


@case(
    "export/disk-full",
    "fdn export",
    "a file-size limit of 100 kB while writing the bundle (like a full disk)",
    "error",
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    out = d.new_dir("exfull") / "bundle"
    proc = d.fdn("export", "--run", run, "--checkpoint", "last", "--out", out, max_file_bytes=100_000)
    obs = cli_error(proc, ["model.safetensors"], words="EFBIG|too large|limit")
    left = [p.name for p in out.parent.iterdir()]
    if obs.outcome == "error" and left:
        return Observation("SILENT WRONG", f"half-written bundle left: {left}")
    return obs


@case(
    "train/disk-full",
    "fdn train",
    "a file-size limit of 1 MB while writing a checkpoint (like a full disk)",
    "error",
    slow=True,
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    ckpts = [run / "checkpoints" / f"{n}.pt" for n in ("last", "best")]
    before = [p.read_bytes() for p in ckpts]
    proc = _train(
        d, "--resume", "--data", d.cohort, "--out", run, "--max-steps", "4", max_file_bytes=1_000_000
    )
    obs = cli_error(proc, [("last.pt", "best.pt")], words="EFBIG|too large|limit")
    if obs.outcome == "error" and [p.read_bytes() for p in ckpts] != before:
        return Observation("SILENT WRONG", "a checkpoint changed although writing it failed")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    if obs.outcome == "error" and leftovers:
        return Observation("SILENT WRONG", f"half-written files left: {leftovers}")
    return obs


@case(
    "train/sigterm", "fdn train", "SIGTERM while training, then --resume", "ok", slow=True, fixed_by="earlier"
)
def _(d: Drill) -> Observation:
    run = _base_run(d)
    log = run / "train_log.csv"
    size = log.stat().st_size

    def stop_when_training(pid: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and log.stat().st_size <= size:
            time.sleep(0.02)
        os.kill(pid, signal.SIGTERM)

    first = _train(
        d, "--resume", "--data", d.cohort, "--out", run, "--max-steps", "400", on_start=stop_when_training
    )
    if _TRACEBACK in first.text:
        return Observation("TRACEBACK", _last_exception(first.text))
    if first.rc != 128 + signal.SIGTERM:
        return Observation("SILENT WRONG", f"exit {first.rc}: {first.err[-300:]}")
    second = _train(d, "--resume", "--data", d.cohort, "--out", run, "--max-steps", "6")
    return cli_ok(second, lambda p: None if "trained 6 steps" in p.out else p.out[-300:])


@case("query/out-of-memory", "fdn query", "out of memory while reading a study's voxels", "error")
def _(d: Drill) -> Observation:
    study = _study(d, "memhog", None, src="phantom_0002")
    proc = _query(
        d,
        "--case",
        study,
        "--slice",
        "3",
        faults=[fault("nibabel.arrayproxy", "ArrayProxy.__array__", "MemoryError", only="memhog")],
    )
    return cli_error(proc, ["memhog_"], words="memory")


@case(
    "build/two-builds",
    "fdn index build",
    "two `fdn index build` of one new database at once",
    "ok",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    import threading

    db = d.new_dir("twobuilds") / "db"
    procs: list[Proc] = []
    threads = [threading.Thread(target=lambda: procs.append(_build(d, db))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        if _TRACEBACK in p.text:
            return Observation("TRACEBACK", _last_exception(p.text))
        if p.rc not in (0, 2):
            return Observation("SILENT WRONG", f"exit {p.rc}: {p.err[-300:]}")
    info = d.fdn("index", "info", db, "--cases")
    if any(cid not in info.out for cid in d.ids()):
        return Observation("LOST UPDATE", info.out[-400:])
    return cli_ok(
        info,
        lambda p: (
            None if "integrity     OK" in p.out and f"cases         {N_CASES}" in p.out else p.out[-400:]
        ),
    )


# --- the code database API ------------------------------------------------------------------------------

_K, _GRID = 8, (2, 3)


def _books(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(_K, 4)).astype(np.float32), rng.normal(size=(_K, 4)).astype(np.float32)


def _new_db(path: Path) -> Any:
    from fdn_core.codes.database import CodeDatabase

    bn, ba = _books()
    return CodeDatabase.create(
        path, fingerprint="d" * 64, codebook_normal=bn, codebook_abnormal=ba, grid_shape=_GRID
    )


def _codes(
    case_id: Any, slices: int = 3, seed: int = 0, grid: tuple[int, int] = _GRID, high: int = _K, **arrays: Any
) -> Any:
    from fdn_core.codes.database import CaseCodes

    rng = np.random.default_rng(seed)
    images = {m: f"/data/{case_id}_{m}.nii.gz" for m in MODS}
    return CaseCodes(
        case_id=case_id,
        normal=arrays.get("normal", rng.integers(0, high, (slices, *grid)).astype(np.uint16)),
        abnormal=rng.integers(0, high, (slices, *grid)).astype(np.uint16),
        has_abnormal=arrays.get("has_abnormal", np.zeros(slices, bool)),
        source={"layout": "brats", "images": images, "image4d": None, "seg": None, "anat": None},
    )


def api_db(work: str, action: str, name: str) -> Any:
    """One database call of the drill (``action``) on a fresh database ``work/dbapi/<name>``."""
    from fdn_core.codes.database import CodeDatabase

    path = Path(work) / "dbapi" / name
    if action == "open-missing":
        return CodeDatabase.open(path / "nothing_here").cases
    if action == "open-file":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a database")
        return CodeDatabase.open(path).cases
    if action == "nan-codebook":
        bn, ba = _books()
        bn[0, 0] = np.nan
        return str(
            CodeDatabase.create(
                path, fingerprint="d" * 64, codebook_normal=bn, codebook_abnormal=ba, grid_shape=_GRID
            ).path
        )
    db = _new_db(path)
    if action == "code-too-large":
        db.add_cases([_codes("big", high=_K + 5)])
    elif action == "wrong-grid":
        db.add_cases([_codes("grid", grid=(3, 3))])
    elif action == "bad-id":
        db.add_cases([_codes(42)])
    elif action == "empty-id":
        db.add_cases([_codes("")])
    elif action == "duplicate":
        db.add_cases([_codes("twice")])
        db.add_cases([_codes("twice", seed=1)])
    elif action == "flags-length":
        db.add_cases([_codes("flags", has_abnormal=np.zeros(7, bool))])
    elif action == "slice-outside":
        db.add_cases([_codes("A")])
        return db.slice_codes("A", 99)
    elif action == "sources-unknown":
        return db.sources("nobody")
    elif action == "remove-unknown":
        db.remove_cases(["nobody"])
    elif action == "negative-codes":
        db.add_cases([_codes("neg", normal=np.full((3, *_GRID), -3, np.int32))])
    elif action == "float-codes":
        db.add_cases([_codes("flt", normal=np.full((3, *_GRID), 0.5, np.float32))])
    elif action == "create-over-foreign":
        path.parent.mkdir(parents=True, exist_ok=True)
        foreign = path.parent / f"{name}_foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        bn, ba = _books()
        CodeDatabase.create(
            foreign,
            fingerprint="d" * 64,
            codebook_normal=bn,
            codebook_abnormal=ba,
            grid_shape=_GRID,
            overwrite=True,
        )
    else:
        raise KeyError(action)
    return sorted(CodeDatabase.open(path).cases)


def _writer(path: str, prefix: str, n: int) -> None:
    from fdn_core.codes.database import CodeDatabase

    db = CodeDatabase.open(path, verify=False)
    for i in range(n):
        db.add_cases([_codes(f"{prefix}{i}", seed=i)])


def api_db_writers(work: str, n: int) -> dict[str, Any]:
    """Two processes adding ``n`` cases each to one database at once; a reader opening it meanwhile."""
    import multiprocessing

    from fdn_core.codes.database import CodeDatabase

    path = Path(work) / "dbapi" / "writers"
    _new_db(path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), p, n)) for p in ("a", "b")]
    for p in procs:
        p.start()
    reads, errors = 0, []
    while any(p.is_alive() for p in procs):
        try:
            db = CodeDatabase.open(path, verify=reads % 4 == 0)
            assert db.normal_codes.shape[0] == 3 * len(db.cases)
            db.close()
            reads += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    for p in procs:
        p.join()
    cases = sorted(CodeDatabase.open(path).cases)
    return {"cases": cases, "reads": reads, "read_errors": errors[:3], "exit": [p.exitcode for p in procs]}


def api_db_recover(work: str) -> list[str]:
    """A database replaced by a writer that died between its two renames: opening it repairs it."""
    from fdn_core.codes.database import CodeDatabase

    path = Path(work) / "dbapi" / "renames"
    _new_db(path).add_cases([_codes("kept")])
    aside = path.with_name(f".{path.name}.old")
    path.rename(aside)  # the first rename (old copy aside) happened, the second (new copy in place) did not
    stale = time.time() - 60
    os.utime(aside, (stale, stale))
    return sorted(CodeDatabase.open(path).cases)


_DB_FAULTS = [
    ("open-missing", "open a database that does not exist", "nothing_here", "earlier"),
    ("open-file", "open a database path that is a file", "open-file", "earlier"),
    ("nan-codebook", "create with a NaN in a codebook", "codebook", "earlier"),
    ("code-too-large", "add codes >= the codebook size", "big", "earlier"),
    ("wrong-grid", "add codes of another grid shape", "grid", "earlier"),
    ("bad-id", "add a case id that is not a string (42)", "42", "earlier"),
    ("empty-id", "add an empty case id", "case id", "earlier"),
    ("duplicate", "add a case id that exists", "twice", "earlier"),
    ("flags-length", "add abnormal flags of the wrong length", "flags", "earlier"),
    ("slice-outside", "read the codes of a slice outside the case", "99", "earlier"),
    ("sources-unknown", "ask the source of an unknown case", "nobody", "earlier"),
    ("remove-unknown", "remove an unknown case", "nobody", "earlier"),
    ("negative-codes", "add negative code indices", "neg", "earlier"),
    ("float-codes", "add non-integer code indices", "flt", "earlier"),
    ("create-over-foreign", "create (overwrite) over a folder that is not a database", "foreign", "earlier"),
]


def _db_case(action: str, culprit: str) -> Callable[[Drill], Observation]:
    def run(d: Drill) -> Observation:
        return api_error(d.api("db", action, action), [culprit])

    return run


for _action, _fault, _culprit, _by in _DB_FAULTS:
    CASES.append(
        Case(f"db/{_action}", "database API", _fault, "error", _db_case(_action, _culprit), fixed_by=_by)
    )


@case(
    "db/two-writers",
    "database API",
    "two writer processes and a reader at once (20 cases each)",
    "ok",
    slow=True,
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    n = 20

    def check(v: dict[str, Any]) -> str | None:
        expected = sorted(f"{p}{i}" for p in "ab" for i in range(n))
        lost = sorted(set(expected) - set(v["cases"]))
        if lost:
            return f"lost {len(lost)} case(s): {lost[:5]}"
        if v["read_errors"] or v["exit"] != [0, 0]:
            return f"reader errors {v['read_errors']}, writer exits {v['exit']}"
        return None

    return api_ok(d.api("db_writers", n, timeout=300), check)


@case(
    "db/died-between-renames",
    "database API",
    "a replacement that died between its two renames",
    "ok",
    fixed_by="earlier",
)
def _(d: Drill) -> Observation:
    return api_ok(d.api("db_recover"), lambda v: None if v == ["kept"] else f"cases {v}")


# --- the bundle loader ------------------------------------------------------------------------------------


def api_bundle(work: str, action: str) -> Any:
    """One call of the bundle loader / encoder (``action``) on copies of the drill's bundle."""
    from fdn_core.model.bundle import load_bundle

    src = Path(work) / "bundle"
    target = Path(work) / "bundleapi" / action
    if action == "missing":
        return str(load_bundle(target / "nothing", device="cpu").path)
    if action == "is-file":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("not a bundle")
        return str(load_bundle(target, device="cpu").fingerprint)
    shutil.copytree(src, target)
    if action == "version":
        _edit_json(target / "bundle.json", lambda doc: doc.__setitem__("format_version", 99))
        return load_bundle(target, device="cpu").fingerprint
    if action == "weights-missing":
        (target / "model.safetensors").unlink()
        return load_bundle(target, device="cpu").fingerprint
    if action == "manifest-list":
        (target / "bundle.json").write_text("[1, 2, 3]")
        return load_bundle(target, device="cpu").fingerprint
    bundle = load_bundle(target, device="cpu")
    s = bundle.config.image_size
    if action == "encode-shape":
        return bundle.encode_slices(np.zeros((2, 3, s, s), np.float32)).normal.shape
    if action == "encode-nan":
        images = np.zeros((2, 4, s, s), np.float32)
        images[1, 0, 5, 5] = np.nan
        return bundle.encode_slices(images).normal.shape
    if action == "encode-dtype":
        return bundle.encode_slices(np.zeros((2, 4, s, s), np.float64)).normal.shape
    if action == "encode-batch-zero":
        return bundle.encode_slices(np.zeros((2, 4, s, s), np.float32), batch_size=0).normal.shape
    if action == "encode-empty":
        return list(bundle.encode_slices(np.zeros((0, 4, s, s), np.float32)).normal.shape)
    raise KeyError(action)


for _action, _fault, _culprit, _expect, _by in [
    ("missing", "load a bundle folder that does not exist", "nothing", "error", "earlier"),
    ("is-file", "load a bundle path that is a file", "is-file", "error", "earlier"),
    ("version", "bundle.json of an unknown format version", "bundle.json", "error", "earlier"),
    ("weights-missing", "bundle without model.safetensors", "model.safetensors", "error", "earlier"),
    ("manifest-list", "bundle.json holding a JSON list", "bundle.json", "error", "earlier"),
    ("encode-shape", "encode slices with 3 channels", "shape", "error", "earlier"),
    ("encode-nan", "encode slices holding a NaN", "slice 1", "error", "earlier"),
    ("encode-dtype", "encode float64 slices", "float32", "error", "earlier"),
    ("encode-batch-zero", "encode with batch_size=0", "batch_size", "error", "this change"),
]:

    def _bundle_run(d: Drill, action: str = _action, culprit: str = _culprit) -> Observation:
        return api_error(d.api("bundle", action), [culprit])

    CASES.append(Case(f"bundle/{_action}", "bundle loader", _fault, _expect, _bundle_run, fixed_by=_by))


@case("bundle/encode-empty", "bundle loader", "encode zero slices", "ok", fixed_by="earlier")
def _(d: Drill) -> Observation:
    return api_ok(d.api("bundle", "encode-empty"), lambda v: None if v[0] == 0 else f"shape {v}")


# --- the Slicer library on slicer-core's MRML (one spawned process runs them all) -----------------------


def slicer_actions(work: Path) -> dict[str, Callable[[], Any]]:
    """The Slicer library's bad inputs: each action reads a study (or sets a search up) from MRML nodes."""
    sys.path.insert(0, str(ROOT / "SlicerFDNRetrieval"))
    from fdn_core.data.readers import CaseFiles, find_cases
    from FDNRetrievalLib import scenario
    from FDNRetrievalLib import scene as sc
    from FDNRetrievalLib import workflow as wf

    ctx = scenario.make_scene_context()
    scene = ctx.scene
    files = {c.case_id: c for c in find_cases(work / "cohort")}
    nodes = scenario.load_case_nodes(ctx, files["phantom_0001"], suffix=" (drill)")
    t2 = sc.node_voxels(nodes["t2"])
    m_t2 = sc.node_ijk_to_ras(nodes["t2"])

    def with_t2(array: np.ndarray, matrix: np.ndarray, name: str) -> Any:
        node = sc.add_scalar_volume(scene, array, matrix, name, "drill")
        return sc.read_study({**nodes, "t2": node}).warnings

    def parallel() -> Any:
        m = m_t2.copy()
        m[:3, 1] = m[:3, 0]
        return with_t2(t2, m, "Parallel T2")

    def singular_t1ce() -> Any:
        node = sc.add_scalar_volume(
            scene, sc.node_voxels(nodes["t1ce"]), np.zeros((4, 4)), "Zero T1ce", "drill"
        )
        return sc.read_study({**nodes, "t1ce": node}).warnings

    def oblique_all() -> Any:
        turned = {}
        for key, node in nodes.items():
            matrix = rotation(30.0) @ sc.node_ijk_to_ras(node)
            turned[key] = sc.add_scalar_volume(scene, sc.node_voxels(node), matrix, f"Oblique {key}", "drill")
        return sc.read_study(turned).warnings

    def colour() -> Any:
        vec = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Colour T2")
        import slicer

        slicer.util.updateVolumeFromArray(vec, np.zeros((*t2.shape[::-1], 3), np.uint8))
        vec.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m_t2))
        return sc.read_study({**nodes, "t2": vec}).warnings

    def nonlinear() -> Any:
        node = sc.add_scalar_volume(scene, t2, m_t2, "Warped T2", "drill")
        grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
        node.SetAndObserveTransformNodeID(grid.GetID())
        return sc.read_study({**nodes, "t2": node}).warnings

    def reference_missing() -> Any:
        gone = CaseFiles(
            "gone_case", "brats", {m: work / "gone" / f"gone_case_{m}.nii.gz" for m in MODS}, None, None, None
        )
        return str(sc.load_reference_case(scene, ctx.volumes_logic, gone))

    far = m_t2.copy()
    far[:3, 3] += 5000.0
    return {
        "singular-t2": lambda: with_t2(t2, np.zeros((4, 4)), "Zero-matrix T2"),
        "singular-t1ce": singular_t1ce,
        "parallel-t2": parallel,
        "zero-volume": lambda: with_t2(np.zeros_like(t2), m_t2, "Blank T2"),
        "nan-volume": lambda: with_t2(_put(t2.copy(), np.nan), m_t2, "NaN T2"),
        "two-d": lambda: with_t2(t2[:, :, :1], m_t2, "Flat T2"),
        "missing": lambda: sc.read_study({**nodes, "flair": None}).warnings,
        "same-node": lambda: sc.read_study({**nodes, "t2": nodes["t1"]}).warnings,
        "oblique": oblique_all,
        "no-overlap": lambda: with_t2(t2, far, "Distant T2"),
        "colour": colour,
        "nonlinear": nonlinear,
        "top-k": lambda: str(wf.SearchSettings(0, top_k=0)),
        "reference-missing": reference_missing,
    }


def run_slicer_actions(work: Path, out: Path) -> None:
    """Body of the spawned Slicer process: run every action, record its value or exception as JSON."""
    from fdn_core.errors import FDNError

    results: dict[str, dict[str, Any]] = {}
    try:
        actions = slicer_actions(work)
    except BaseException as exc:  # slicer-core missing or the scene could not be made
        results["__setup__"] = {
            "error_type": type(exc).__name__,
            "message": str(exc),
            "trace": traceback.format_exc(),
        }
        actions = {}
    for name, fn in actions.items():
        try:
            results[name] = {"value": fn()}
        except BaseException as exc:
            results[name] = {
                "error_type": type(exc).__name__,
                "fdn_error": isinstance(exc, FDNError),
                "message": str(exc),
                "trace": traceback.format_exc(),
            }
    out.write_text(json.dumps(results, default=str), encoding="utf-8")


def _slicer_result(d: Drill, name: str) -> ApiResult | None:
    """The result of Slicer action ``name`` (all run in one spawned process on first use); None when
    slicer-core is not installed."""
    results: dict[str, dict[str, Any]] = d.slicer_results
    if not results:
        out = d.work / "tmp" / "slicer_results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = d._spawn(
            [sys.executable, str(Path(__file__).resolve()), "--slicer", str(d.work), str(out)],
            d.env,
            d.timeout,
            None,
        )
        try:
            results.update(json.loads(out.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            results["__setup__"] = {"error_type": "ChildDied", "message": proc.err[-1500:]}
    if "__setup__" in results:
        setup = results["__setup__"]
        if setup["error_type"] in ("ImportError", "ModuleNotFoundError"):
            return None
        return ApiResult(
            error_type=setup["error_type"], message=f"Slicer library unavailable: {setup['message']}"
        )
    doc = results.get(name, {"error_type": "Missing", "message": f"no result for {name}"})
    return ApiResult(
        **{k: v for k, v in doc.items() if k in ("value", "error_type", "fdn_error", "message", "trace")}
    )


for _action, _fault, _culprits, _expect, _by in [
    (
        "singular-t2",
        "T2 node with an all-zero IJK-to-RAS matrix",
        ["Zero-matrix T2", "singular"],
        "error",
        "this change",
    ),
    (
        "singular-t1ce",
        "T1ce node with an all-zero IJK-to-RAS matrix",
        ["Zero T1ce", "singular"],
        "error",
        "this change",
    ),
    (
        "parallel-t2",
        "T2 node with two parallel voxel axes",
        ["Parallel T2", "singular"],
        "error",
        "this change",
    ),
    ("zero-volume", "all-zero T2 volume", ["Blank T2", "empty"], "error", "earlier"),
    ("nan-volume", "T2 volume with a NaN", ["NaN T2", "NaN"], "error", "earlier"),
    ("two-d", "2-D T2 image", ["Flat T2", "2D"], "error", "earlier"),
    ("missing", "no FLAIR selected", ["FLAIR"], "error", "earlier"),
    ("same-node", "the T1 node selected as T2 too", ["same volume"], "error", "earlier"),
    ("oblique", "all four nodes 30 degrees oblique", ["Oblique t1ce", "oblique"], "warning", "this change"),
    ("no-overlap", "T2 node 5 m away from the T1ce", ["Distant T2", "overlap"], "error", "earlier"),
    ("colour", "RGB vector volume as T2", ["Colour T2", "components"], "error", "earlier"),
    ("nonlinear", "T2 under a non-linear transform", ["Warped T2", "non-linear"], "error", "earlier"),
    ("top-k", "top-K 0 in the search settings", ["top-K"], "error", "earlier"),
    ("reference-missing", "reference case whose files are gone", ["gone_case"], "error", "earlier"),
]:

    def _slicer_run(
        d: Drill, action: str = _action, culprits: list[str] = _culprits, expect: str = _expect
    ) -> Observation:
        res = _slicer_result(d, action)
        if res is None:
            return Observation("SKIPPED", "slicer-core is not installed (pip install 'fdn-retrieval[test]')")
        if expect == "error":
            return api_error(res, culprits)

        def warned(value: Any) -> str | None:
            text = " ".join(value or [])
            return None if _names(text, culprits) else f"no warning naming {culprits}: {text[:200]}"

        obs = api_ok(res, warned, outcome="warning")
        if obs.outcome == "warning":
            text = " ".join(res.value or [])
            obs = Observation("warning", text, True, bool(_FIX.search(text)), res.seconds)
        return obs

    CASES.append(Case(f"slicer/{_action}", "Slicer library", _fault, _expect, _slicer_run, fixed_by=_by))


# ------------------------------------------------------------------------------------------ the drill


_BAD = ("TRACEBACK", "SILENT WRONG", "LOST UPDATE", "REFUSED", "TIMEOUT", "DRILL ERROR")


def passed(c: Case, o: Observation) -> bool:
    """Whether a case had its expected outcome, with a message naming the file and the fix where due."""
    return o.outcome == c.expect and o.names_file is not False and o.names_fix is not False


def build_fixtures(d: Drill) -> None:
    """Make the cohort, bundles and database (in a child, like everything that imports torch)."""
    res = d.api("build_fixtures", timeout=900)
    if res.error_type is not None or res.timed_out:
        raise RuntimeError(f"fixtures failed: {res.error_type}: {res.message}\n{res.trace}")


def run_case(d: Drill, c: Case) -> Observation:
    """Run one case; a bug of the drill itself is a ``DRILL ERROR``, never a pass."""
    start = time.monotonic()
    try:
        obs = c.run(d)
    except Exception as exc:
        obs = Observation("DRILL ERROR", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-800:])
    if c.expect == "warning" and obs.outcome == "warning":
        obs.names_fix = None  # a warning reports what was done; no fix is due
    obs.seconds = time.monotonic() - start
    return obs


def select(only: str | None = None, skip_slow: bool = False, ids: Sequence[str] | None = None) -> list[Case]:
    """The cases whose ids match ``only`` (a regex) or are in ``ids``, without the slow ones if asked."""
    known = {c.cid for c in CASES}
    unknown = sorted(set(ids or ()) - known)
    if unknown:
        raise SystemExit(f"unknown case id(s): {unknown}; --list shows them")
    return [
        c
        for c in CASES
        if (only is None or re.search(only, c.cid))
        and (ids is None or c.cid in ids)
        and not (skip_slow and c.slow)
    ]


def run_drill(
    work: Path,
    runner: str = "fork",
    cases: Sequence[Case] | None = None,
    progress: Callable[[Case, Observation], None] | None = None,
) -> list[tuple[Case, Observation]]:
    """Build the fixtures in ``work`` and run ``cases`` (default: all)."""
    d = Drill(work, runner)
    build_fixtures(d)
    results = []
    for c in CASES if cases is None else cases:
        obs = run_case(d, c)
        results.append((c, obs))
        if progress is not None:
            progress(c, obs)
    return results


def summarize(results: Sequence[tuple[Case, Observation]]) -> dict[str, int]:
    """The totals of a drill."""
    outcomes = [o.outcome for _, o in results]
    return {
        "cases": len(results),
        "passed": sum(passed(c, o) for c, o in results),
        "tracebacks": outcomes.count("TRACEBACK"),
        "silent wrong answers": outcomes.count("SILENT WRONG"),
        "lost updates": outcomes.count("LOST UPDATE"),
        "good input refused": outcomes.count("REFUSED"),
        "timeouts": outcomes.count("TIMEOUT"),
        "drill errors": outcomes.count("DRILL ERROR"),
        "skipped": outcomes.count("SKIPPED"),
        "messages without the file": sum(o.names_file is False for _, o in results),
        "messages without the fix": sum(o.names_fix is False for _, o in results),
        "expected outcome not met": sum(o.outcome not in (c.expect, "SKIPPED") for c, o in results),
    }


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_table(results: Sequence[tuple[Case, Observation]], width: int = 60) -> str:
    """The drill's table (one row per case) and its totals."""
    head = ("#", "target", "input or fault", "expected", "observed", "file", "fix", "s")
    rows = [head]
    for i, (c, o) in enumerate(results, 1):
        fault_text = c.fault if len(c.fault) <= width else c.fault[: width - 1] + "…"
        observed = o.outcome if passed(c, o) or o.outcome in _BAD else f"{o.outcome} (!)"
        rows.append(
            (
                str(i),
                c.target,
                fault_text,
                c.expect,
                observed,
                _yn(o.names_file),
                _yn(o.names_fix),
                f"{o.seconds:.1f}",
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    totals = summarize(results)
    lines.append("")
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    fixed_here = sum(c.fixed_by == "this change" for c, _ in results)
    lines.append(
        f"({fixed_here} cases of problems fixed by this change, {len(results) - fixed_here} fixed before)"
    )
    return "\n".join(lines)


def format_messages(results: Sequence[tuple[Case, Observation]], width: int = 150) -> str:
    """What each case showed the user (first lines of the message)."""
    out = []
    for i, (c, o) in enumerate(results, 1):
        text = " ".join(o.message.split())
        out.append(f"{i:>3} {c.cid}: {o.outcome}: {textwrap.shorten(text, width, placeholder=' …')}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the drill and print its table; exit 1 when any case missed its expected outcome."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder to keep (default: a temporary one)"
    )
    parser.add_argument(
        "--runner", choices=("fork", "spawn"), default="fork" if hasattr(os, "fork") else "spawn"
    )
    parser.add_argument("--only", default=None, help="regex on case ids")
    parser.add_argument("--cases", nargs="+", default=None, metavar="ID", help="run exactly these case ids")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the slow cases")
    parser.add_argument("--json", type=Path, default=None, help="write every case and message as JSON")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--api", nargs=3, metavar=("NAME", "ARGS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--slicer", nargs=2, metavar=("WORK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.api:  # child of --runner spawn
        name, call_args, out = args.api
        return _api_child(name, json.loads(call_args), Path(out))
    if args.slicer:
        run_slicer_actions(Path(args.slicer[0]), Path(args.slicer[1]))
        return 0
    if args.list:
        for c in CASES:
            print(f"{c.cid:<40} {c.target:<20} {c.expect:<8} {'slow ' if c.slow else ''}{c.fault}")
        print(f"{len(CASES)} cases")
        return 0
    with contextlib.ExitStack() as stack:
        if args.out is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fdn_drills_")))
        else:
            work = args.out.resolve()
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)

        def tick(c: Case, o: Observation) -> None:
            mark = "pass" if passed(c, o) else "FAIL"
            print(f"[{mark}] {c.cid}: {o.outcome} ({o.seconds:.1f} s)", file=sys.stderr, flush=True)

        start = time.monotonic()
        cases = select(args.only, args.skip_slow, args.cases)
        results = run_drill(work, args.runner, cases, progress=tick)
        print(format_table(results))
        print(f"\nmessages ({time.monotonic() - start:.0f} s in all, runner {args.runner}):")
        print(format_messages(results))
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "totals": summarize(results),
                        "cases": [
                            {
                                **{k: v for k, v in asdict(c).items() if k != "run"},
                                **asdict(o),
                                "passed": passed(c, o),
                            }
                            for c, o in results
                        ],
                    },
                    indent=1,
                    ensure_ascii=False,
                ),
                encoding="utf-8",
            )
    return 0 if all(passed(c, o) or o.outcome == "SKIPPED" for c, o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
