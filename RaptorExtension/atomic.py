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
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import write_failure

_TEMP_NAME_BYTES = 160  # file names are limited to 255 bytes; leave room for mkstemp's random part and suffix


def temporary_beside(target: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a temporary file in ``target``'s folder (made if missing); returns ``(fd, path)``.

    Its name starts with ``.`` and a prefix of ``target``'s name cut short, so a
    target whose name is close to the system's limit still gets a temporary file.
    """
    target = Path(target)
    stem = target.name.encode("utf-8")[:_TEMP_NAME_BYTES].decode("utf-8", errors="ignore")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise write_failure(target, exc) from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    fd, tmp = temporary_beside(target)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
