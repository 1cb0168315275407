"""Read the next volumes while the encoder works: in threads, or in loader processes.

:func:`prefetch` is the one entry point; ``processes=True`` (or
:func:`resolve_loader`'s choice) reads in loader processes, so decoding never
stalls the thread that feeds the GPU.

Why processes and not threads: Slicer's readers (VTK and ITK through the
``slicer-core`` wrappers) keep Python's GIL while they decode a series.  A
loader *thread* therefore freezes the encoding thread for the whole read (a
CT series takes about half a second), and the GPU starves.  Loader processes
decode truly in parallel.

Why files on a RAM disk to hand volumes back: returning a 100 MB array
through a ``multiprocessing`` pipe pickles and copies it several times in the
receiving process, holding the GIL.  Here a loader writes the array as
``.npy`` into a private folder on ``/dev/shm`` (tmpfs, i.e. memory) and the
encoding process reads it with one ``readinto`` (no GIL held) and deletes it.

A reader that crashes its process (a segfault in a native decoder on a
corrupt file) costs that volume only: the pool is restarted, the other
volumes in flight are read again, and a volume that takes a loader down twice
is reported as unreadable.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from ..errors import RaptorError
from .volume import Volume, VolumeRef

HANDOFF_PREFIX = "raptor-load-"


@dataclass
class _Handoff:
    """A loaded volume whose voxels wait in ``path``."""

    path: str
    volume: Volume


def _load_to_file(ref: VolumeRef, folder: str) -> _Handoff | Volume | RaptorError:
    """Runs in a loader process: read, validate, park the voxels in ``folder``."""
    try:
        volume = ref.load()
    except RaptorError as exc:
        return exc
    except Exception as exc:  # an unexpected reader failure becomes a per-volume error
        return RaptorError(f"{ref.source}: could not be read ({type(exc).__name__}: {exc})")
    path = os.path.join(folder, uuid.uuid4().hex + ".npy")
    try:
        np.save(path, np.ascontiguousarray(volume.array), allow_pickle=False)
    except OSError:  # the RAM disk is full (a container's small /dev/shm): send it through the pipe instead
        _unlink(path)
        return volume
    volume.array = np.empty((0, 0, 0), dtype=volume.array.dtype)
    return _Handoff(path, volume)


def die_with_parent(cleanup: str | None = None, parent: int | None = None) -> None:
    """Make this (child) process end when its parent does, removing ``cleanup`` (its hand-off folder) first.

    Why: a ``kill -9`` of ``raptor batch`` left its loader processes (each
    holding a few hundred MB) and multiprocessing's resource tracker alive for
    good.  On Linux the kernel sends SIGUSR1 when the parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and as a second guard, a thread
    watches the parent id.  Either way the hand-off folder on ``/dev/shm`` is
    removed, and the resource tracker, which lives as long as some process
    holds its pipe, exits once the loaders are gone and removes the
    semaphores it tracks.
    """
    import signal
    import threading

    if parent is None:
        parent = os.getppid()

    def parent_gone() -> bool:
        if os.getppid() != parent:
            return True
        try:  # a killed parent with several threads stays our parent until its last thread is gone
            with open(f"/proc/{parent}/stat", "rb") as handle:
                return handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
        except (OSError, IndexError):
            return not _alive(parent)

    def leave(wait: float) -> None:
        deadline = time.monotonic() + wait
        while not parent_gone() and time.monotonic() < deadline:
            time.sleep(0.02)
        if cleanup and parent_gone():  # never when the parent lives on: its other loaders still use the folder
            shutil.rmtree(cleanup, ignore_errors=True)
        os._exit(1)

    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        try:
            import ctypes

            signal.signal(signal.SIGUSR1, lambda signum, frame: leave(5.0))
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
        except (OSError, AttributeError, ValueError):  # no prctl: the watcher below still works
            pass
    if parent_gone():  # the parent died while this process was starting, before the guard was set
        leave(0.0)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                leave(0.0)

    threading.Thread(target=watch, name="raptor-parent-watch", daemon=True).start()


def _loader_init(folder: str, parent: int) -> None:
    die_with_parent(folder, parent)


def _receive(result: _Handoff | Volume | RaptorError) -> Volume | RaptorError:
    if isinstance(result, (RaptorError, Volume)):
        return result
    try:
        array = np.load(result.path, allow_pickle=False)
    finally:
        _unlink(result.path)
    result.volume.array = array
    return result.volume


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def handoff_base(min_free: int = 2 << 30) -> str:
    """``/dev/shm`` when it is a writable RAM disk with room for a few volumes, else the temporary folder."""
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= min_free:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def remove_stale_handoffs(base: str) -> None:
    """Delete hand-off folders left by killed jobs of this user (their process is gone)."""
    try:
        entries = os.listdir(base)
    except OSError:
        return
    for name in entries:
        if not name.startswith(HANDOFF_PREFIX):
            continue
        folder = os.path.join(base, name)
        try:
            pid = int(name[len(HANDOFF_PREFIX) :].split("-")[0])
            if os.stat(folder).st_uid != os.getuid():
                continue
        except (ValueError, OSError):
            continue
        if not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _picklable(ref: VolumeRef) -> bool:
    try:
        pickle.dumps(ref)
    except Exception:
        return False
    return True


def prefetch_in_processes(
    refs: Iterable[VolumeRef], workers: int, depth: int
) -> Iterator[tuple[VolumeRef, Volume | RaptorError]]:
    """Load volumes in ``workers`` processes, in order, at most ``depth`` ahead.

    Same contract as :func:`prefetch`: errors are yielded, not
    raised.  References must be picklable (those from
    :meth:`.sources.SeriesItem.ref` are); if the first one is not, loading
    falls back to threads.

    When a loader process dies, the volumes that were in flight are read
    again one at a time, so the one that kills its reader is identified and
    reported, and the others are not blamed.
    """
    refs = iter(refs)
    first = next(refs, None)
    if first is None:
        return
    if not _picklable(first):
        yield from prefetch(_chain(first, refs), workers, depth)
        return
    refs = _chain(first, refs)
    depth = max(depth, workers + 1)
    base = handoff_base()
    remove_stale_handoffs(base)
    folder = tempfile.mkdtemp(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-", dir=base)
    context = multiprocessing.get_context("spawn")

    def new_pool(n: int) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_loader_init,
                                                      initargs=(folder, os.getpid()))

    pool = new_pool(workers)
    pending: deque[list] = deque()  # [ref, future]
    isolating = 0  # how many leading entries are being re-read one at a time after a crash
    try:
        exhausted = False
        while True:
            while not exhausted and not isolating and len(pending) < depth:
                ref = next(refs, None)
                if ref is None:
                    exhausted = True
                    break
                pending.append([ref, pool.submit(_load_to_file, ref, folder)])
            if not pending:
                break
            entry = pending[0]
            try:
                result = entry[1].result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                if isolating:
                    # One read at a time: the head is the one that took its process down.
                    pending.popleft()
                    isolating -= 1
                    yield entry[0], RaptorError(
                        f"{entry[0].source}: the reader crashed its process on this series (a corrupt file?)"
                    )
                else:
                    isolating = len(pending)
                pool = new_pool(1)
                for other in pending:
                    if _needs_resubmit(other[1]):
                        other[1] = pool.submit(_load_to_file, other[0], folder)
                if not isolating:
                    pool.shutdown(wait=True)
                    pool = new_pool(workers)
                continue
            pending.popleft()
            if isolating:
                isolating -= 1
                if not isolating:
                    pool.shutdown(wait=True)
                    pool = new_pool(workers)
            yield entry[0], _receive(result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for entry in pending:
            if entry[1].done() and not entry[1].cancelled() and entry[1].exception() is None:
                result = entry[1].result()
                if isinstance(result, _Handoff):
                    _unlink(result.path)
        shutil.rmtree(folder, ignore_errors=True)


def _needs_resubmit(future: concurrent.futures.Future) -> bool:
    if future.cancelled() or not future.done():
        return True
    return isinstance(future.exception(), BrokenProcessPool)


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest




def prefetch(
    refs: Iterable[VolumeRef], workers: int = 2, depth: int = 2, *, processes: bool = False
) -> Iterator[tuple[VolumeRef, Volume | BaseException]]:
    """Load volumes in background threads, in order, at most ``depth`` ahead.

    The next scans are read while the GPU encodes the current one.  Slicer's
    VTK/ITK readers hold the GIL for much of a read (measured: a Python loop
    ran at 15-20% speed beside a reading thread), so outside Slicer a long
    batch should use ``processes``; threads remain the safe
    choice inside Slicer.  Errors are returned, not
    raised, so one unreadable file does not stop the others.  With
    ``processes`` the reads run in loader processes (:func:`prefetch_in_processes`), for
    readers that hold the GIL.
    """
    if processes and workers > 0:
        yield from prefetch_in_processes(refs, workers, depth)
        return
    refs = iter(refs)
    if workers <= 0:
        for ref in refs:
            try:
                yield ref, ref.load()
            except RaptorError as exc:
                yield ref, exc
        return

    def load(ref: VolumeRef):
        try:
            return ref.load()
        except RaptorError as exc:
            return exc
        except Exception as exc:  # an unexpected reader failure becomes a per-volume error
            return RaptorError(f"{ref.source}: could not be read ({type(exc).__name__}: {exc})")

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raptor-read") as pool:
        pending: list[tuple[VolumeRef, concurrent.futures.Future]] = []
        for ref in refs:
            pending.append((ref, pool.submit(load, ref)))
            if len(pending) > depth:
                head, future = pending.pop(0)
                yield head, future.result()
        for head, future in pending:
            yield head, future.result()


def resolve_loader(loader: str, readers: int) -> str:
    if loader not in ("auto", "threads", "processes"):
        raise RaptorError(f"loader must be auto, threads or processes (got {loader!r})")
    if loader != "auto":
        return loader
    in_slicer = hasattr(sys.modules.get("slicer"), "app")
    return "threads" if in_slicer or readers <= 0 else "processes"


__all__ = ["prefetch", "prefetch_in_processes", "resolve_loader", "handoff_base", "remove_stale_handoffs"]
