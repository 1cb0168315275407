"""From volumes to embeddings: prepare, encode, project, describe.

:class:`Embedder` holds the loaded encoder and the projection, so Slicer (and
a long batch) loads the model once and embeds many volumes.  Preparation
(intensity preset, isotropic resampling) runs on the encoder's device.
Reading the next volumes from disk runs in background threads or processes
while the GPU encodes the current ones (:mod:`..volumes.prefetch`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..embeddings.embedding import Embedding, build_metadata
from ..embeddings.settings import settings_hash
from ..errors import RaptorError
from ..volumes.intensity import IntensityPreset, normalize, resolve_preset
from ..volumes.prefetch import prefetch
from ..volumes.resample import resample_array_to_cube
from ..volumes.volume import Volume, VolumeRef, validate_volume
from .model import DEFAULT_MODEL, Encoder, load_encoder
from .projection import PROJECTION_NAMES, make_projection
from .slices import check_preprocess
from .triaxial import PLANES, TriaxialEncoder, TriaxialResult

DEFAULT_GRID = 256


@dataclass
class EmbedSettings:
    """Everything that decides an embedding's bits (and a few speed knobs that do not)."""

    model: str = DEFAULT_MODEL
    k: int | None = 100  # None: 100, or the K of projection_file
    seed: int = 0
    grid: int | str = DEFAULT_GRID
    preset: str = "auto"
    ct_window: tuple[float, float] | None = None
    planes: tuple[str, ...] = PLANES
    keep_cls: bool = False
    image_size: int | None = None
    preprocess: str = "direct"  # how a slice becomes the model's image: direct or reference (see .slices)
    projection: str = "pcg64"  # how R is drawn from the seed: pcg64 or numpy-legacy (see .projection)
    projection_file: str | None = None  # a user's R (.npy, d x K or K x d) instead of drawing one
    # Speed and placement only: they do not change what the embedding means.
    device: str = "auto"
    batch_size: int | None = None
    dedup_constant_slices: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.grid, str):
            if self.grid != "native":
                try:
                    self.grid = int(self.grid)
                except ValueError:
                    raise RaptorError(f"grid must be a number of voxels or 'native' (got {self.grid!r})") from None
        if self.grid != "native" and not 2 <= int(self.grid) <= 2048:
            raise RaptorError(f"grid must be between 2 and 2048 voxels (got {self.grid})")
        self.planes = tuple(self.planes)
        check_preprocess(self.preprocess)
        if self.projection not in PROJECTION_NAMES:
            raise RaptorError(f"unknown projection {self.projection!r} (choose from {', '.join(PROJECTION_NAMES)})")
        if self.projection_file is not None and self.projection != "pcg64":
            raise RaptorError("a projector file replaces the drawn R: give --projection-file or --projection, not both")


ProgressCallback = Callable[[str, int, int], None]
"""``progress(volume_id, slices_done, slices_total)``."""


@dataclass
class PreparedVolume:
    volume: Volume
    cube: torch.Tensor
    cube_to_ras: np.ndarray | None
    preset: IntensityPreset


class Embedder:
    """Turns volumes into Raptor embeddings with one loaded encoder."""

    def __init__(self, settings: EmbedSettings | None = None, encoder: Encoder | None = None) -> None:
        self.settings = settings or EmbedSettings()
        s = self.settings
        self.encoder = encoder or load_encoder(
            s.model, device=s.device, image_size=s.image_size, cache_dir=s.cache_dir
        )
        self.projector = make_projection(s.projection, s.k, self.encoder.hidden_size, s.seed, s.projection_file)
        if s.k != self.projector.k or (s.projection_file is not None and s.seed is not None):
            # K comes from the projector file; its seed plays no part.
            self.settings = s = dataclasses.replace(s, k=self.projector.k, seed=self.projector.seed)
        self.projection = self.projector.matrix  # (K, d)
        self.projection_sha256 = self.projector.sha256
        self._projection_t = torch.from_numpy(np.array(self.projection, dtype=np.float64)).to(self.encoder.device)
        self.triaxial = TriaxialEncoder(
            self.encoder,
            planes=s.planes,
            batch_size=s.batch_size,
            dedup_constant_slices=s.dedup_constant_slices,
            preprocess=s.preprocess,
        )

    # ------------------------------------------------------------------
    @property
    def feature_shape(self) -> tuple[int, int, int, int]:
        p = self.encoder.patch_grid
        return (len(self.settings.planes), self.settings.k, p, p)

    @property
    def n_features(self) -> int:
        n = int(np.prod(self.feature_shape))
        if self.settings.keep_cls:
            n += len(self.settings.planes) * self.encoder.hidden_size
        return n

    def settings_metadata(self, preset: str) -> dict:
        """The comparable part of the metadata (same for every volume of a run with one preset)."""
        s, e = self.settings, self.encoder
        return build_metadata(
            encoder=e.name,
            encoder_type=e.model_type,
            weight_sha256=e.weight_sha256,
            hidden_size=e.hidden_size,
            patch_size=e.patch_size,
            image_size=e.image_size,
            patch_grid=e.patch_grid,
            k=s.k,
            seed=s.seed,
            **self.projector.metadata(),
            planes=list(s.planes),
            grid=s.grid,
            preset=preset,
            keep_cls=bool(s.keep_cls),
            preprocess=s.preprocess,
            **({"reference_sizes": [e.image_size, e.reference_resize, e.image_size]} if s.preprocess == "reference" else {}),
            shape=list(self.feature_shape),
            n_features=self.n_features,
            layout="patch block (planes, K, p, p) in C order" + (", then CLS block (planes, d)" if s.keep_cls else ""),
        )

    # ------------------------------------------------------------------
    def prepare(self, volume: Volume) -> PreparedVolume:
        """Intensity preset then isotropic resampling, on the encoder's device."""
        validate_volume(volume)
        s = self.settings
        preset = resolve_preset(s.preset, volume.modality, s.ct_window)
        data = torch.from_numpy(np.ascontiguousarray(volume.array)).to(self.encoder.device, torch.float32)
        data = normalize(data, preset)
        if s.grid == "native":
            cube, cube_to_ras = data, None
        else:
            cube, cube_to_ras = resample_array_to_cube(data, volume.ijk_to_ras, int(s.grid), volume.has_geometry)
        return PreparedVolume(volume, cube, cube_to_ras, preset)

    def finish(self, prepared: PreparedVolume, result: TriaxialResult, seconds: float) -> Embedding:
        """Project the plane means and attach the metadata."""
        p = self.encoder.patch_grid
        planes = len(self.settings.planes)
        projected = torch.einsum("ntd,kd->nkt", result.patch_mean, self._projection_t)  # (planes, K, p*p)
        vector = projected.reshape(planes, self.settings.k, p, p).float().cpu().numpy().ravel()
        if self.settings.keep_cls:
            vector = np.concatenate([vector, result.cls_mean.float().cpu().numpy().ravel()])
        vol = prepared.volume
        meta = self.settings_metadata(prepared.preset.describe())
        meta.update(
            id=vol.id,
            source=vol.source,
            modality=vol.modality,
            source_shape_kji=list(vol.array.shape),
            source_ijk_to_ras=np.asarray(vol.ijk_to_ras).round(9).tolist(),
            source_spacing=[round(v, 9) for v in vol.spacing],
            source_has_geometry=vol.has_geometry,
            cube_shape=list(prepared.cube.shape),
            cube_ijk_to_ras=None if prepared.cube_to_ras is None else prepared.cube_to_ras.round(9).tolist(),
            slices_per_plane=result.slice_counts,
            device=str(self.encoder.device),
            precision=str(self.encoder.dtype).replace("torch.", ""),
            seconds=round(seconds, 4),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"dicom": vol.info} if vol.info else {}),
        )
        meta["settings_hash"] = settings_hash(meta)
        return Embedding(vector=np.ascontiguousarray(vector, dtype=np.float32), metadata=meta)

    # ------------------------------------------------------------------
    def embed_volume(
        self,
        volume: Volume,
        *,
        progress: ProgressCallback | None = None,
        cancel=None,
        slice_hook=None,
    ) -> Embedding:
        """Embed one in-memory volume."""
        start = time.perf_counter()
        prepared = self.prepare(volume)
        results = list(
            self.triaxial.encode(
                [(volume.id, prepared.cube)],
                progress=progress,
                cancel=cancel,
                slice_hook=slice_hook,
            )
        )
        return self.finish(prepared, results[0], time.perf_counter() - start)

    def embed_many(
        self,
        refs: Iterable[VolumeRef],
        *,
        progress: ProgressCallback | None = None,
        cancel=None,
        readers: int = 2,
        loader: str = "threads",
    ) -> Iterator[tuple[VolumeRef, Embedding | None, str | None]]:
        """Embed many volumes, batching slices across them; yields ``(ref, embedding, error)``.

        A volume that fails to read or prepare yields an error message and the
        others go on; errors in the encoder itself (GPU, model) propagate.
        ``loader="processes"`` reads in ``readers`` processes instead of
        threads (see :mod:`..volumes.prefetch`; the refs must be picklable).
        """
        failures: list[tuple[VolumeRef, str]] = []
        prepared: dict[int, tuple[VolumeRef, PreparedVolume, float]] = {}

        def cubes() -> Iterator[tuple[int, torch.Tensor]]:
            for slot, (ref, loaded) in enumerate(prefetch(refs, readers, processes=loader == "processes")):
                start = time.perf_counter()
                try:
                    if isinstance(loaded, BaseException):
                        raise loaded
                    prep = self.prepare(loaded)
                except RaptorError as exc:
                    failures.append((ref, str(exc)))
                    continue
                prepared[slot] = (ref, prep, start)
                yield slot, prep.cube

        for result in self.triaxial.encode(cubes(), progress=_by_id(progress, prepared), cancel=cancel):
            while failures:
                ref, message = failures.pop(0)
                yield ref, None, message
            ref, prep, start = prepared.pop(result.key)
            yield ref, self.finish(prep, result, time.perf_counter() - start), None
        while failures:
            ref, message = failures.pop(0)
            yield ref, None, message


def _by_id(progress: ProgressCallback | None, prepared: dict) -> Callable[[Any, int, int], None] | None:
    if progress is None:
        return None

    def report(slot, done, total):
        entry = prepared.get(slot)
        progress(entry[0].id if entry else str(slot), done, total)

    return report


__all__ = ["EmbedSettings", "Embedder", "DEFAULT_GRID"]
