"""Atomic file writes, folder replacement, content hashes and path checks: nothing is left half-written.

- ``atomic_path`` / ``atomic_write_bytes`` / ``atomic_write_json``: write beside the target, flush, rename.
- ``atomic_dir``: build a folder under a temporary name and put it in place whole. An existing folder is
  replaced by one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``); where the OS or file system has
  no exchange, by two renames recorded in a marker file first, so ``recover_dir`` can finish or undo a
  replacement that died between them. Temporary folders carry the host and process id in their name, and
  those of dead processes are swept by the next ``atomic_dir`` on the same path.
- ``sha256_file``, ``HashingWriter``: hashes without a second read.
- ``resolve_inside``: a file named by a document (manifest, bundle) must resolve inside its folder.
- ``describe_os_error``: an OSError in words (path, errno name, what to do) for people.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fdn_core.errors import IntegrityError

__all__ = [
    "HashingWriter",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "describe_os_error",
    "exchange_paths",
    "fsync_dir",
    "pid_alive",
    "recover_dir",
    "resolve_inside",
    "sha256_file",
]

#: Seconds a leftover temporary folder in the old naming (no host/pid) must be untouched before it is swept.
LEGACY_TMP_AGE_S = 3600.0
#: Seconds ``recover_dir`` waits for a replacement in progress (between its two renames) to finish itself.
SWAP_GRACE_S = 5.0


def _umask_mode(base: int) -> int:
    """``base`` permissions filtered by the process umask (mkstemp/mkdtemp would leave 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes (sha256) and counts what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` to the file and the hash."""
        self._h.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        """Flush the file."""
        self._f.flush()

    def hexdigest(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry to disk where the OS allows it (POSIX); a no-op elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def resolve_inside(folder: str | Path, name: object, what: str) -> Path:
    """``folder / name`` after checking that ``name`` is a relative path that stays inside ``folder``,
    symbolic links resolved; otherwise IntegrityError naming ``what`` (the document that names it)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IntegrityError(f"{what}: names a file {name!r}, which is not a file name")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise IntegrityError(
            f"{what}: names the absolute path {name!r}; every file it names must lie inside {folder}"
        )
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise IntegrityError(
            f"{what}: names {name!r}, which resolves to {target}, outside {base}; every file it names "
            "must lie inside its own folder (the document was edited, or a link points elsewhere)"
        )
    return Path(folder) / name


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed onto ``path``, else
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _umask_mode(0o666))
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one being written
            exc.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------------ exchange, replacement


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS or the file system offers no exchange (the caller falls back); raises the
    OSError of a real failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when unsure, e.g. on Windows)."""
    if sys.platform == "win32" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _tmp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _legacy_tmp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp$")


def _sweep_stale_tmp(path: Path) -> None:
    """Remove temporary folders beside ``path`` left by dead processes (best effort)."""
    parent = path.parent
    if not parent.is_dir():
        return
    ours, legacy = _tmp_pattern(path.name), _legacy_tmp_pattern(path.name)
    host = _host_tag()
    now = time.time()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = ours.match(entry.name)
        stale = False
        if m is not None:
            stale = m.group("host") == host and not pid_alive(int(m.group("pid")))
        elif legacy.match(entry.name):
            with contextlib.suppress(OSError):
                stale = now - entry.stat().st_mtime > LEGACY_TMP_AGE_S
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _swap_files(path: Path) -> tuple[Path, Path]:
    """(marker file, old-copy folder) of a two-rename replacement of ``path``."""
    return path.with_name(f".{path.name}.swap.json"), path.with_name(f".{path.name}.old")


def recover_dir(path: str | Path) -> str | None:
    """Finish or undo a replacement of folder ``path`` that died between its two renames.

    Returns what was done (for a log line), or None when nothing needed doing. With a marker naming a
    complete new folder, the replacement is finished; otherwise the previous copy is put back.
    """
    path = Path(path)
    marker, old = _swap_files(path)
    if not marker.exists() and not old.exists():
        return None
    if path.exists():
        # The replacement finished; only its clean-up is left.
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        return None
    # Nothing at ``path``: a replacement is between its renames. One that wrote its marker recently may
    # still be running: give it time to finish. (Without a marker, it was made by an older version.)
    deadline = time.monotonic() + SWAP_GRACE_S
    while marker.exists() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if time.time() - marker.stat().st_mtime > SWAP_GRACE_S:
                break
        time.sleep(0.05)
        if path.exists():
            return None
    new: Path | None = None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        name = json.loads(marker.read_text(encoding="utf-8"))["new"]
        if isinstance(name, str) and "/" not in name and "\\" not in name:
            new = path.with_name(name)
    done = None
    if new is not None and new.is_dir():
        os.replace(new, path)
        done = f"{path}: finished an interrupted replacement (the new copy from {new.name} is in place)"
    elif old.is_dir():
        os.replace(old, path)
        done = f"{path}: undid an interrupted replacement (the previous copy is back in place)"
    fsync_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    shutil.rmtree(old, ignore_errors=True)
    return done


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    With ``overwrite`` an existing directory is swapped out only after the new one is complete: in one
    atomic exchange where the OS has one, else in two renames that ``recover_dir`` can finish or undo.
    An interruption (exception, Ctrl-C, SIGTERM handled as Ctrl-C) removes the temporary directory.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    _sweep_stale_tmp(path)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{_host_tag()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    )
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                with contextlib.suppress(OSError):
                    _fsync_file(Path(root) / f)
            fsync_dir(root)
        if path.exists() or path.is_symlink():
            if exchange_paths(tmp, path):
                fsync_dir(path.parent)  # ``tmp`` now holds the previous copy; removed below
            else:
                marker, old = _swap_files(path)
                if old.exists():
                    shutil.rmtree(old)
                atomic_write_json(marker, {"new": tmp.name, "old": old.name})
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    if not path.exists() and old.exists():
                        os.replace(old, path)  # undo: the previous copy goes back
                    marker.unlink(missing_ok=True)
                    raise
                fsync_dir(path.parent)
                marker.unlink()
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ messages

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on it (or choose a folder on another disk) and run the "
    "command again",
    errno.EDQUOT: "your disk quota is used up: free space (or choose another folder) and run the command "
    "again",
    errno.EROFS: "the file system is read-only: choose a writable folder (or copy the data to one)",
    errno.EACCES: "no permission: ask for access to it (read access for input, write access for output), "
    "or choose a folder you may use",
    errno.EPERM: "the operation is not permitted there: choose a folder you may write to",
    errno.EBUSY: "the device or file is busy: close programs that use it (viewers, backups, other fdn "
    "commands) and run the command again",
    errno.EIO: "the disk or network share reported an input/output error: check it (and its cable or "
    "connection), then run the command again",
    errno.ENOENT: "check the path (a folder may have been moved or deleted meanwhile)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file was expected: check the path",
    errno.EEXIST: "something is in the way (e.g. a file where a folder is needed): choose another path or "
    "move it away",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the file system's largest file: "
    "raise the limit or choose another disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other programs",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter folder path",
    errno.EXDEV: "the temporary and final paths lie on different file systems: keep them on one disk",
}


def describe_os_error(exc: OSError) -> str:
    """``PATH: what happened [ERRNO]; what to do`` for an OSError (disk full, read-only, busy, ...)."""
    code = exc.errno
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    what = exc.strerror or (os.strerror(code) if isinstance(code, int) else str(exc)) or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    text = f"{where}: {what}" if where is not None else what
    if exc.filename2 is not None:
        text += f" (and {exc.filename2})"
    if name:
        text += f" [{name}]"
    advice = _ADVICE.get(code) if isinstance(code, int) else None
    text += f"; {advice or 'check the path, the permissions and the disk, then run the command again'}"
    return text
