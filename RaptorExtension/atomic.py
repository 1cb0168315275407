"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every output (embeddings, CSV tables, probes, error logs) goes through these
helpers, so a crash, a kill or a full disk never leaves a torn file behind.
A write that fails (read-only folder, full disk, a folder in the way) removes
its temporary file and raises :class:`~.errors.OutputError` naming the output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import write_failure

_TEMP_NAME_BYTES = 160  # file names are limited to 255 bytes; leave room for mkstemp's random part and suffix


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if exc.filename not in (None, tmp):  # the caller failed to read some other file: not a write failure
            raise
        raise write_failure(target, exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def user_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def temp_file_beside(target: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """A new temporary file in ``target``'s folder (made if missing), to be renamed over it; ``(fd, path)``.

    Its mode is what the user's umask gives: ``mkstemp`` makes files 0600, and
    renamed into place they would be private even under umask 022, so
    colleagues on a shared cohort folder could not read them.  Its name starts
    with ``.`` and a prefix of ``target``'s name cut short, so a target whose
    name is close to the system's limit still gets a temporary file.  A folder
    that cannot take it raises :class:`~.errors.OutputError` naming ``target``.
    """
    target = Path(target)
    stem = target.name.encode("utf-8")[:_TEMP_NAME_BYTES].decode("utf-8", errors="ignore")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise write_failure(target, exc) from None
    try:
        os.fchmod(fd, user_file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
