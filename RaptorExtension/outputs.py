"""What a run writes: outputs checked against each other and the inputs, and one writer per table.

Why: a finished table is worth hours of GPU time.  Two ways to lose it were
found by attacking the command line: an output naming the same file as
another output or an input (``--errors t.csv`` beside ``--csv t.csv``,
``--parquet`` on the CSV, ``merge a.csv b.csv -o a.csv``), and two runs
appending to one table at once (every id twice, a table no reader accepts).

- :func:`check_outputs` refuses, before any work, outputs that coincide with
  each other or with an input once paths are resolved (symbolic links, ``..``,
  hard links), and outputs that are folders where a file is expected;
- :class:`TableLock` is an exclusive lock for the life of a run on a table it
  appends to; a second writer is refused in one line that names the holder's
  process id.  The lock is the operating system's (``fcntl.flock`` on Linux and
  macOS, ``msvcrt.locking`` on Windows), so it is released when the holder
  exits, however it exits; the lock file beside the table (``.NAME.lock``) is
  removed when the run ends and is harmless when a kill leaves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import OutputError, RaptorError, write_failure

Named = tuple[str, "str | os.PathLike | None"]
"""``(what, path)``: what the path is to the user (``--csv``, ``the errors CSV``), and the path."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def output_path(path: str | os.PathLike) -> Path:
    """``path`` with ``..`` resolved the way the system does (``a/missing/../t.csv`` does not exist until ``a/missing`` does).

    Paths without ``..`` are returned as given, so messages show what the user typed.
    """
    path = Path(path)
    return Path(os.path.realpath(path)) if ".." in path.parts else path


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's device and inode when it exists (hard links and case-insensitive names are the same file)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


class _Seen:
    """Paths by resolved name and by identity, to find the same file named twice in linear time."""

    def __init__(self) -> None:
        self.by_path: dict[Path, tuple[str, Path]] = {}
        self.by_identity: dict[tuple[int, int], tuple[str, Path]] = {}

    def find(self, path: Path) -> tuple[str, Path] | None:
        hit = self.by_path.get(_resolved(path))
        if hit is None and (identity := _identity(path)) is not None:
            hit = self.by_identity.get(identity)
        return hit

    def add(self, what: str, path: Path) -> None:
        self.by_path.setdefault(_resolved(path), (what, path))
        identity = _identity(path)
        if identity is not None:
            self.by_identity.setdefault(identity, (what, path))


def _kind(path: Path) -> str | None:
    """``file``, ``folder`` or None (absent); a name the system refuses (too long) is a write failure now."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise write_failure(path, exc) from None
    import stat

    return "folder" if stat.S_ISDIR(st.st_mode) else "file"


def check_outputs(outputs: Iterable[Named], inputs: Iterable[Named] = (), *, folders: Iterable[Named] = ()) -> None:
    """Refuse outputs that would overwrite each other or an input, before anything is read or written.

    ``outputs`` are files the run writes (``None`` entries are skipped),
    ``inputs`` files or folders it reads (list a DICOM folder's files to protect
    them), ``folders`` output folders.
    """
    for what, folder in folders:
        if folder is not None and _kind(Path(folder)) == "file":
            raise OutputError(f"{folder}: is a file, but {what} must be a folder")
    protected = _Seen()
    for what, path in inputs:
        if path is None or str(path) == "":
            continue
        protected.add(what, Path(path))
    written = _Seen()
    for what, path in outputs:
        if path is None or str(path) == "":
            continue
        path = Path(path)
        if _kind(path) == "folder":
            raise OutputError(f"{path}: is a folder, but {what} must name a file")
        hit = written.find(path)
        if hit is not None:
            shown = path if str(path) == str(hit[1]) else f"{hit[1]} and {path}"
            raise RaptorError(f"{shown}: {hit[0]} and {what} name the same file; give each output its own name")
        hit = protected.find(path)
        if hit is not None:
            raise RaptorError(f"{path}: {what} is also an input ({hit[0]}); writing it would destroy the input")
        written.add(what, path)


def check_outputs_against_files(outputs: Iterable[Named], files: Iterable[str]) -> None:
    """Refuse outputs that are one of ``files`` (the volume files a cohort lists); cheap for long lists."""
    outs = [(what, Path(p)) for what, p in outputs if p is not None and str(p) != ""]
    if not outs:
        return
    seen = _Seen()
    for what, path in outs:
        seen.add(what, path)
    names = {_resolved(path).name for _, path in outs} | {path.name for _, path in outs}
    for file in files:
        if os.path.basename(file) in names and (hit := seen.find(Path(file))) is not None:
            raise RaptorError(f"{hit[1]}: {hit[0]} is also an input (a volume of the cohort); writing it would destroy it")


# ---------------------------------------------------------------------------
# One writer per table


def lock_path_for(table: str | os.PathLike) -> Path:
    table = Path(table)
    name = table.name
    if len(name.encode("utf-8")) > 200:  # keep the lock file's name within the system's limit
        name = name[:100] + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return table.with_name(f".{name}.lock")


_WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks are mandatory: lock a byte past the text, so the holder's id stays readable


class TableLock:
    """An exclusive, non-blocking lock on ``table`` for the life of a run.

    Use as a context manager or with :meth:`acquire` / :meth:`release`.  A
    second run (another process, or another job in this one) is refused with
    :class:`~.errors.RaptorError` naming the holder's process id.
    """

    def __init__(self, table: str | os.PathLike, what: str = "table") -> None:
        self.table = Path(table)
        self.what = what
        self.path = lock_path_for(self.table)
        self._fd: int | None = None

    def acquire(self) -> "TableLock":
        missing = []
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        self._made = missing  # removed again at release when the run left them empty
        for _ in range(20):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise write_failure(self.table, exc) from None
            try:
                locked = _try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_made_folders()
                raise RaptorError(
                    f"{self.table}: another raptor run is writing this {self.what} ({holder}); "
                    "wait for it to finish, or write to another file"
                )
            # The holder before us may have removed the lock file after we opened it: lock the file the name holds now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if not same:
                _unlock(fd)
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            except OSError:
                pass  # the lock holds without the note; a second writer then reads "process unknown"
            self._fd = fd
            return self
        raise RaptorError(f"{self.table}: could not lock it (its lock file {self.path} keeps changing)")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter that opened the old file sees it is gone
        _unlock(fd)
        os.close(fd)
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in getattr(self, "_made", []):
            try:
                folder.rmdir()  # only when empty: a run that wrote its table keeps the folder
            except OSError:
                break
        self._made = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "TableLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class TableLocks:
    """Several :class:`TableLock` taken together (all or none), released together."""

    def __init__(self, tables: Sequence[Named]) -> None:
        seen: set[Path] = set()
        self.locks = []
        for what, path in tables:
            if path is None:
                continue
            real = _resolved(path)
            if real not in seen:
                seen.add(real)
                self.locks.append(TableLock(real, what))

    def __enter__(self) -> "TableLocks":
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __exit__(self, *exc) -> None:
        self.release()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True

    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # a file system without locks (some network mounts): refuse rather than risk it
            raise RaptorError(f"cannot lock files here ({exc.strerror}); write the table to a local folder") from None
        return True

    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(fd: int) -> str:
    """What the holder wrote into the lock file (``pid N on HOST since ...``), waiting briefly for it."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 512).decode("utf-8", errors="replace").strip()
            if text:
                return text.splitlines()[0]
        time.sleep(0.05)
    return "process id unknown"


__all__ = ["output_path", "check_outputs", "check_outputs_against_files", "TableLock", "TableLocks", "lock_path_for"]
