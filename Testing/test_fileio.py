"""fileio: folder replacement (exchange rename, two-rename fallback and its recovery), stale temporaries,
SIGTERM clean-up, path checks and OS error messages."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fdn_core.fileio as fileio
from fdn_core.errors import IntegrityError
from fdn_core.fileio import atomic_dir, describe_os_error, recover_dir, resolve_inside

ROOT = Path(__file__).resolve().parents[1]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _fill(folder: Path, text: str) -> None:
    (folder / "data.txt").write_text(text)


def test_atomic_dir_creates_and_replaces_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _fill(tmp, "one")
        assert not out.exists()
    assert (out / "data.txt").read_text() == "one"
    with pytest.raises(FileExistsError), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        _fill(tmp, "two")
        assert (out / "data.txt").read_text() == "one"  # untouched until the new one is complete
    assert (out / "data.txt").read_text() == "two" and _siblings(out) == []
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        _fill(tmp, "three")
        raise RuntimeError("failed half way")
    assert (out / "data.txt").read_text() == "two" and _siblings(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux")
def test_exchange_paths_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _fill(a, "A")
    _fill(b, "B")
    assert fileio.exchange_paths(a, b)
    assert (a / "data.txt").read_text() == "B" and (b / "data.txt").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        fileio.exchange_paths(a, tmp_path / "missing")


def test_two_rename_fallback_undoes_a_failed_second_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _fill(tmp, "old")
    monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)
    real = os.replace

    def second_fails(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(dst))
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", second_fails)
    with pytest.raises(OSError, match="busy"), atomic_dir(out, overwrite=True) as tmp:
        _fill(tmp, "new")
    monkeypatch.undo()
    assert (out / "data.txt").read_text() == "old" and _siblings(out) == []


def _die_between_renames(out: str) -> None:
    """Child process: replace ``out`` with the fallback and die (os._exit) between its two renames."""
    fileio.exchange_paths = lambda a, b: False  # type: ignore[assignment]
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        real(src, dst)
        if Path(dst).name == f".{Path(out).name}.old":
            os._exit(9)

    fileio.os.replace = replace  # type: ignore[assignment]
    with atomic_dir(out, overwrite=True) as tmp:
        _fill(tmp, "new")


def test_a_death_between_the_two_renames_is_finished_by_recover_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _fill(tmp, "old")
    proc = multiprocessing.get_context("fork").Process(target=_die_between_renames, args=(str(out),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 9
    assert (
        not out.exists()
        and f".{out.name}.old" in _siblings(out)
        and f".{out.name}.swap.json" in _siblings(out)
    )
    monkeypatch.setattr(fileio, "SWAP_GRACE_S", 0.2)  # the marker is fresh: recover_dir waits this long
    done = recover_dir(out)
    assert done is not None and "finished an interrupted replacement" in done
    assert (out / "data.txt").read_text() == "new" and _siblings(out) == []
    assert recover_dir(out) is None


def test_recover_dir_undoes_a_replacement_of_the_old_naming(tmp_path: Path) -> None:
    """What the previous ``atomic_dir`` left when killed between its renames: no marker, the previous copy
    in ``.NAME.old``: it is put back."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old"
    old.mkdir()
    _fill(old, "previous")
    (tmp_path / ".out.k2j4h5g6.tmp").mkdir()
    assert "undid" in (recover_dir(out) or "")
    assert (out / "data.txt").read_text() == "previous"


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    host = fileio._host_tag()
    stale = tmp_path / f".out.{host}.{int(dead.stdout)}.abcd_123.tmp"
    alive = tmp_path / f".out.{host}.{os.getpid()}.zz99.tmp"
    legacy_old, legacy_new = tmp_path / ".out.abcd1234.tmp", tmp_path / ".out.wxyz5678.tmp"
    for p in (stale, alive, legacy_old, legacy_new):
        p.mkdir()
        _fill(p, "junk")
    long_ago = time.time() - 2 * fileio.LEGACY_TMP_AGE_S
    os.utime(legacy_old, (long_ago, long_ago))
    with atomic_dir(out) as tmp:
        _fill(tmp, "x")
    assert not stale.exists() and not legacy_old.exists()
    assert alive.exists() and legacy_new.exists()  # a live process's, and a recent one of unknown owner


SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from fdn_core.cli import _terminate_as_interrupt
from fdn_core.fileio import atomic_dir

out = Path(sys.argv[1])
with _terminate_as_interrupt():
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "big.bin").write_bytes(b"x" * (1 << 20))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    except KeyboardInterrupt:
        sys.exit(143)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics")
def test_sigterm_removes_the_temporary_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _fill(tmp, "kept")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 143, done.stderr
    assert _siblings(out) == [] and (out / "data.txt").read_text() == "kept"


def test_resolve_inside(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("x")
    assert resolve_inside(tmp_path, "sub/f.txt", "doc") == tmp_path / "sub" / "f.txt"
    for bad in ("../x", "sub/../../x", "/etc/hostname", "", None, 3):
        with pytest.raises(IntegrityError, match="doc"):
            resolve_inside(tmp_path, bad, "doc")
    (tmp_path / "sub" / "link").symlink_to("/etc")
    with pytest.raises(IntegrityError, match="outside"):
        resolve_inside(tmp_path, "sub/link/hostname", "doc")


def test_os_errors_in_words() -> None:
    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/db/segments/x.npy"))
    assert full.startswith("/db/segments/x.npy: No space left on device [ENOSPC]") and "disk is full" in full
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/ro"))
    assert "busy" in describe_os_error(OSError(errno.EBUSY, "Device or resource busy", "/dev/x"))
    assert "no permission" in describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x"))
    other = describe_os_error(OSError(errno.ENOTCONN, "Transport endpoint is not connected"))
    assert "[ENOTCONN]" in other and "check the path" in other
    assert "check the path" in describe_os_error(OSError("no errno at all"))


def test_marker_json_is_plain(tmp_path: Path) -> None:
    """The marker of the fallback names folders beside the target only (never a path elsewhere)."""
    out = tmp_path / "out"
    out.mkdir()
    old = tmp_path / ".out.old"
    old.mkdir()
    _fill(old, "previous")
    os.rmdir(out)
    (tmp_path / ".out.swap.json").write_text(json.dumps({"new": "../../etc", "old": ".out.old"}))
    long_ago = time.time() - 60
    os.utime(tmp_path / ".out.swap.json", (long_ago, long_ago))
    assert "undid" in (recover_dir(out) or "")
    assert (out / "data.txt").read_text() == "previous"


def test_signal_handlers_are_restored() -> None:
    from fdn_core.cli import _terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with _terminate_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
