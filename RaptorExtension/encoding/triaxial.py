"""Stream the slices of the three planes through the encoder and average them.

This is the hot loop.  Its design choices:

* Slices are cut from the cube on the device and batched *across planes and
  across volumes*, so the GPU always gets full batches.
* Only running sums are kept (float64, per volume and plane: p*p x d), never
  the tokens of all slices of a volume.
* A slice that is exactly constant (air, or padding around a scan) gives the
  same tokens for the same value and shape, so each constant slice is encoded
  once per encoder and reused (built at the slice's own shape, so it goes
  through the same resizing); the result is the same embedding as encoding
  every slice.
* A CUDA out-of-memory error halves the batch and retries; at a batch of one
  it becomes a clear error.
* ``cancel`` is checked before every batch, so a cancel takes effect within
  one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import Cancelled, ModelError
from ..names import PLANES
from .model import Encoder
from .slices import check_preprocess


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


SliceTokensFn = Callable[[Any, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``hook(key, plane_index, slice_indices, patch_tokens, cls_tokens)`` for every encoded slice group.

``patch_tokens`` is (n, p*p, d) and ``cls_tokens`` (n, d), float32 on the device.
Used by the explainer, which needs per-slice tokens (the CLS ones too when
``keep_cls`` is on); the plain embedding path never keeps them.
"""


@dataclass
class PlaneSums:
    """Running sums for one volume: what the mean over slices is computed from."""

    key: Any
    plane_axes: tuple[int, ...]
    slice_counts: list[int]
    patches: torch.Tensor  # (planes, p*p, d) float64
    cls: torch.Tensor  # (planes, d) float64
    done: int = 0
    pending: int = 0  # slices queued but not yet encoded
    total: int = 0
    finished_queueing: bool = False


@dataclass
class TriaxialResult:
    key: Any
    patch_mean: torch.Tensor  # (planes, p*p, d) float64
    cls_mean: torch.Tensor  # (planes, d) float64
    slice_counts: list[int]


class TriaxialEncoder:
    """Mean patch tokens over every slice of each plane of each cube."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        planes: Iterable[str] = PLANES,
        batch_size: int | None = None,
        dedup_constant_slices: bool = True,
        max_cached_constants: int = 64,
        preprocess: str = "direct",
    ) -> None:
        self.encoder = encoder
        self.preprocess = check_preprocess(preprocess)
        self.planes = tuple(planes)
        unknown = [p for p in self.planes if p not in PLANES]
        if unknown or not self.planes or len(set(self.planes)) != len(self.planes):
            raise ModelError(f"planes must be a subset of {', '.join(PLANES)} (got {', '.join(self.planes)})")
        self.plane_axes = tuple(PLANES.index(p) for p in self.planes)
        self.batch_size = batch_size or (128 if encoder.device.type == "cuda" else 16)
        self.dedup = dedup_constant_slices
        self._constants: dict[tuple[float, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_constants = max_cached_constants
        self.encoded_slices = 0  # slices that went through the model (for benchmarks)
        self.reused_slices = 0  # constant slices served from the cache

    # ------------------------------------------------------------------
    def _forward(self, slices: torch.Tensor, cancel: CancelToken | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (n, H, W) slices, splitting on CUDA out-of-memory."""
        outs_cls, outs_patch = [], []
        start = 0
        n = slices.shape[0]
        while start < n:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            size = min(self.batch_size, n - start)
            try:
                cls, patch = self.encoder.tokens(slices[start : start + size], self.preprocess)
            except torch.OutOfMemoryError:
                if self.encoder.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch_size <= 1:
                    raise ModelError(
                        "the GPU ran out of memory even with a batch of 1 slice; close other GPU programs or use --device cpu"
                    ) from None
                self.batch_size = max(1, self.batch_size // 2)
                continue
            outs_cls.append(cls)
            outs_patch.append(patch)
            self.encoded_slices += size
            start += size
        return torch.cat(outs_cls), torch.cat(outs_patch)

    def constant_slice_tokens(self, value: float, shape: tuple[int, int],
                              cancel: CancelToken | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS (d,) and patch tokens (p*p, d) of a ``shape`` slice that is ``value`` throughout.

        The very tensors a constant slice of a volume is served from, so a
        reference computed from them matches such a slice bit for bit.
        """
        return self._constant_tokens([float(value)], tuple(shape), cancel)[0]

    def _constant_tokens(self, values: list[float], shape: tuple[int, int], cancel) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokens of constant slices of ``shape`` with these values, each value encoded once."""
        keys = [(v, *shape) for v in values]
        missing = [key for key in dict.fromkeys(keys) if key not in self._constants]
        if missing:
            images = torch.tensor([key[0] for key in missing], dtype=torch.float32, device=self.encoder.device)
            cls, patch = self._forward(images.view(-1, 1, 1).expand(-1, *shape), cancel)
            if len(self._constants) + len(missing) > self._max_constants:
                self._constants.clear()
            for i, key in enumerate(missing):
                self._constants[key] = (cls[i], patch[i])
        return [self._constants[key] for key in keys]

    # ------------------------------------------------------------------
    def encode(
        self,
        cubes: Iterable[tuple[Any, torch.Tensor]],
        *,
        progress: Callable[[Any, int, int], None] | None = None,
        cancel: CancelToken | None = None,
        slice_hook: SliceTokensFn | None = None,
    ) -> Iterator[TriaxialResult]:
        """Yield one :class:`TriaxialResult` per (key, cube) as soon as its slices are done.

        ``cubes`` may be a lazy generator: the next cube is prepared only when
        the batch needs more slices, so at most two cubes are held at once.
        ``progress(key, done, total)`` reports per-volume slice counts.
        """
        d = self.encoder.hidden_size
        pp = self.encoder.patch_grid**2
        dev = self.encoder.device
        queue: list[tuple[PlaneSums, int, int, torch.Tensor, int]] = []  # (state, plane slot, first slice, cube, count)
        queued = 0
        active: list[PlaneSums] = []

        def flush(limit: int) -> Iterator[TriaxialResult]:
            nonlocal queue, queued
            while queued >= limit and queued > 0:
                take, taken = [], 0
                while queue and taken < self.batch_size:
                    state, slot, start, cube, count = queue[0]
                    n = min(count, self.batch_size - taken)
                    take.append((state, slot, start, cube, n))
                    taken += n
                    if n == count:
                        queue.pop(0)
                    else:
                        queue[0] = (state, slot, start + n, cube, count - n)
                queued -= taken
                cuts = [_cut(cube, state.plane_axes[slot], start, n) for state, slot, start, cube, n in take]
                if len({tuple(c.shape[1:]) for c in cuts}) == 1:
                    cls, patch = self._forward(torch.cat(cuts), cancel)
                else:  # a non-cubic native grid: planes have differently shaped slices
                    outs = [self._forward(c, cancel) for c in cuts]
                    cls, patch = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
                offset = 0
                for state, slot, start, cube, n in take:
                    state.patches[slot] += patch[offset : offset + n].sum(0, dtype=torch.float64)
                    state.cls[slot] += cls[offset : offset + n].sum(0, dtype=torch.float64)
                    if slice_hook is not None:
                        idx = torch.arange(start, start + n, device=dev)
                        slice_hook(state.key, slot, idx, patch[offset : offset + n], cls[offset : offset + n])
                    offset += n
                    state.done += n
                    state.pending -= n
                    if progress is not None:
                        progress(state.key, state.done, state.total)
                yield from finished()

        def finished() -> Iterator[TriaxialResult]:
            nonlocal active
            still = []
            for state in active:
                if state.finished_queueing and state.pending == 0:
                    counts = torch.tensor(state.slice_counts, dtype=torch.float64, device=dev)
                    yield TriaxialResult(
                        key=state.key,
                        patch_mean=state.patches / counts.view(-1, 1, 1),
                        cls_mean=state.cls / counts.view(-1, 1),
                        slice_counts=state.slice_counts,
                    )
                else:
                    still.append(state)
            active = still

        for key, cube in cubes:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            counts = [int(cube.shape[a]) for a in self.plane_axes]
            state = PlaneSums(
                key=key,
                plane_axes=self.plane_axes,
                slice_counts=counts,
                patches=torch.zeros((len(counts), pp, d), dtype=torch.float64, device=dev),
                cls=torch.zeros((len(counts), d), dtype=torch.float64, device=dev),
                total=sum(counts),
            )
            active.append(state)
            for slot, axis in enumerate(self.plane_axes):
                runs = self._queue_plane(state, slot, axis, cube, cancel, slice_hook)
                for start, n in runs:
                    queue.append((state, slot, start, cube, n))
                    queued += n
                    state.pending += n
            state.finished_queueing = True
            if progress is not None and state.done:
                progress(state.key, state.done, state.total)
            yield from finished()
            yield from flush(self.batch_size)
        yield from flush(1)
        yield from finished()

    def _queue_plane(self, state: PlaneSums, slot: int, axis: int, cube: torch.Tensor, cancel, slice_hook) -> list[tuple[int, int]]:
        """Serve constant slices from the cache; return runs (start, n) of slices to encode."""
        n_slices = int(cube.shape[axis])
        if not self.dedup:
            return [(0, n_slices)]
        other = tuple(a for a in range(3) if a != axis)
        lo = cube.amin(dim=other)
        hi = cube.amax(dim=other)
        constant = (lo == hi).cpu().numpy()
        if not constant.any():
            return [(0, n_slices)]
        values = lo.cpu().numpy()
        const_idx = np.flatnonzero(constant)
        shape = tuple(int(cube.shape[a]) for a in other)
        tokens = self._constant_tokens([float(values[i]) for i in const_idx], shape, cancel)
        for i, (cls, patch) in zip(const_idx, tokens):
            state.patches[slot] += patch.to(torch.float64)
            state.cls[slot] += cls.to(torch.float64)
        if slice_hook is not None:
            for i, (cls, patch) in zip(const_idx, tokens):
                slice_hook(state.key, slot, torch.tensor([int(i)], device=cube.device), patch[None], cls[None])
        state.done += len(const_idx)
        self.reused_slices += len(const_idx)
        runs, start = [], None
        for i in range(n_slices + 1):
            varying = i < n_slices and not constant[i]
            if varying and start is None:
                start = i
            elif not varying and start is not None:
                runs.append((start, i - start))
                start = None
        return runs


def _cut(cube: torch.Tensor, axis: int, start: int, n: int) -> torch.Tensor:
    """Slices ``start..start+n`` along ``axis`` as an (n, H, W) tensor."""
    return cube.narrow(axis, start, n).movedim(axis, 0)
