"""The run folder of `lora-jax finetune`: one run at a time, files that are whole or absent, a metrics
log that survives a kill, and a clean stop on SIGINT / SIGTERM.

A run folder outlives the processes that write to it: a run is killed (``kill -9``, a pre-empted
node, Ctrl-C), rerun, resumed, and sometimes started twice by mistake. Each piece here keeps the folder
usable through that:

* `RunLock`: an exclusive lock on the folder (``.lock``, an OS ``flock``), so a second run on the same
  folder is refused with the holder's pid instead of both writing checkpoints into it. The kernel
  releases the lock when its holder dies, so a lock left by a killed run is taken over; where the file
  system has no ``flock``, a lock file naming a dead pid on this host is taken over.
* `write_atomic` / `atomic_path`: a file is written under a temporary name, flushed to disk and renamed
  over the old one, so a reader (or the next run) sees the old file or the new one, never half of one.
* `read_metrics` / `trim_metrics`: the JSONL metrics log, read past a partial last line (a kill in the
  middle of a write), and cut back to the step a resumed run restarts from, so no step appears twice.
* `StopSignals`: SIGINT and SIGTERM ask the training loop to stop after the step in progress (it then
  saves a checkpoint and raises `Interrupted`); the same signal again stops at once.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with RunLock(folder):
    ...     _ = write_atomic(folder / "metrics.jsonl", '{"step": 1}\\n{"step": 2}\\n{"st')
    ...     [r["step"] for r in read_metrics(folder / "metrics.jsonl")]
    [1, 2]
    >>> trim_metrics(folder / "metrics.jsonl", 1)
    1
    >>> (folder / "metrics.jsonl").read_text()
    '{"step": 1}\\n'
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator

__all__ = [
    "LOCK_FILE",
    "FolderInUse",
    "Interrupted",
    "RunLock",
    "StopSignals",
    "atomic_path",
    "check_folder",
    "read_metrics",
    "remove_stale_temporaries",
    "set_aside",
    "trim_metrics",
    "write_atomic",
]

LOCK_FILE = ".lock"
_TMP_MARK = ".tmp"


class FolderInUse(RuntimeError):
    """Another live process holds the lock of a run folder.

    Attributes:
        holder: what the holder wrote in the lock file (``pid``, ``host``, ``started``), or ``{}``.
    """

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM.

    Attributes:
        signum: the signal.
        step: the step whose checkpoint was saved on the way out (None: nothing was saved).
        directory: where that checkpoint is (None with ``step``).
    """

    def __init__(self, signum: int, step: int | None = None, directory: str | None = None):
        self.signum, self.step, self.directory = int(signum), step, directory
        name = signal.Signals(self.signum).name
        where = f": checkpoint of step {step} saved in {directory}" if step is not None else ""
        super().__init__(f"interrupted by {name}{where}")


# ----------------------------------------------------------------------------------------------------
# The folder and its lock


def check_folder(path: str | os.PathLike) -> pathlib.Path:
    """Raises unless `path` is a folder this process can create (if missing) and write to.

    Nothing is created. Returns the absolute path.

    Raises:
        ValueError: `path` is empty, is a file, lies under a file, or is (or would be created in) a folder
            that is not writable; the message says which.
    """
    if not str(path).strip():
        raise ValueError("the output folder is an empty string; give a folder name.")
    folder = pathlib.Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file, not a folder.")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{str(folder)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == folder else f"its parent {str(existing)!r}"
        raise ValueError(f"{str(folder)!r} is not writable: {what} does not allow this user to write there.")
    return folder


def _holder_text(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that has not written its pid yet"
    host = f" on {holder['host']}" if holder.get("host") else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']}{host}{since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """An exclusive, process-wide lock on a run folder: ``folder/.lock`` with the holder's pid in it.

    `acquire` takes an OS ``flock`` on the file (released by the kernel when the holder exits, however it
    exits) and writes ``{"pid", "host", "started"}`` into it; `release` removes the file. A lock held by a
    live process is refused with `FolderInUse` naming that process. Without ``flock`` support (some
    network file systems) the pid in the file decides: a dead pid on this host is taken over.

    Use it as a context manager, or `acquire` / `release`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder).absolute()
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock (the folder must exist).

        Raises:
            FolderInUse: a live process holds it.
        """
        if self._fd is not None:
            return self
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                got = _try_flock(fd)
                if got is False or (got is None and _held_by_live_process(_read_holder(fd))):
                    holder = _read_holder(fd)
                    raise FolderInUse(
                        f"{str(self.folder)!r} is in use by another run ({_holder_text(holder)}); "
                        f"wait for it to finish, or write to another folder.",
                        holder,
                    )
                # A holder that released the lock unlinked the file after we opened it: lock the new one.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                me = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RuntimeError(f"could not lock {str(self.path)!r}: it keeps being replaced by other processes.")

    def release(self) -> None:
        """Removes the lock file and releases the lock (a no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiting process then re-checks the inode
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held elsewhere; None: this file system has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _held_by_live_process(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # cannot tell from here: assume it is alive
    return _pid_alive(pid)


def set_aside(folder: str | os.PathLike, names, tag: str) -> list[pathlib.Path]:
    """Moves the entries `names` of `folder` that exist into ``folder/set_aside/<tag>/`` (nothing deleted).

    Returns:
        The new paths.
    """
    folder = pathlib.Path(folder)
    present = [folder / n for n in names if (folder / n).exists()]
    if not present:
        return []
    dest, n = folder / "set_aside" / tag, 1
    while dest.exists():
        dest, n = folder / "set_aside" / f"{tag}.{n}", n + 1
    dest.mkdir(parents=True)
    moved = []
    for p in present:
        p.rename(dest / p.name)
        moved.append(dest / p.name)
    return moved


# ----------------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. no directory handles on this OS
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path`; on success it is flushed to disk and renamed to `path`.

    The temporary name keeps `path`'s suffix (``.loss.png.<pid>.tmp.png``), so writers that choose a
    format by extension (matplotlib) still do. On an exception the temporary file is removed and `path`
    is left as it was.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(p) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> p.read_text()
        'whole'
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_MARK}{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> pathlib.Path:
    """Writes `data` to `path` through `atomic_path`: readers see the old content or the new, never part."""
    path = pathlib.Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Removes the temporary files `atomic_path` left in `folder` when a writer was killed.

    Call it only while holding the folder's `RunLock` (no other writer can be running).
    """
    removed = []
    for p in pathlib.Path(folder).glob(f".*{_TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------
# The metrics log (one JSON record per line)


def _parse_lines(text: str, path) -> list[dict]:
    """The records of JSONL `text`: a last line without its newline is left out (a write cut short),
    a line elsewhere that is not a JSON object is skipped with a warning naming it."""
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines[:-1]):  # lines[-1]: "" after a final newline, else a partial line
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif line.strip():
            warnings.warn(f"{str(path)!r} line {i + 1} is not a JSON record; skipped.", stacklevel=3)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL metrics file, in order; ``[]`` if there is none.

    A last line without its newline (the process was killed in the middle of writing it) is ignored;
    a line elsewhere that is not a JSON object is skipped with a warning.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return _parse_lines(path.read_text(errors="replace"), path)


def trim_metrics(path: str | os.PathLike, step: int) -> int:
    """Rewrites a JSONL metrics file (atomically) keeping the records with ``step <= step``, without a
    partial last line, so a run resumed at `step` appends after it with no step twice.

    Returns:
        How many records were dropped (a partial last line not counted).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


# ----------------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """While active, SIGINT and SIGTERM ask to stop (`signum` is set) instead of ending the process.

    The loop that uses it checks `signum` between steps, saves, and stops. The same signal a second time
    restores the previous handlers and raises `Interrupted` at once (nothing saved). Outside the main
    thread (where Python cannot install handlers) it does nothing.

    Example:
        >>> import os, signal
        >>> with StopSignals(announce=False) as stop:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     stop.signum == signal.SIGTERM
        True
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise Interrupted(signum)
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            print(
                f"lora-jax: {name}: saving a checkpoint after the step in progress, then stopping "
                f"({name} again stops at once, without saving).",
                file=sys.stderr,
                flush=True,
            )

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
