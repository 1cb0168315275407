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

from ..embeddings.embedding import FORMAT_VERSION, Embedding, build_metadata
from ..embeddings.settings import check_compatible, settings_hash
from ..errors import RaptorError
from ..volumes.intensity import IntensityPreset, ct_hint, normalize, resolve_preset
from ..volumes.prefetch import prefetch
from ..volumes.resample import resample_array_to_cube
from ..volumes.volume import Volume, VolumeRef, torch_ready, validate_volume
from .model import Encoder, load_encoder
from .projection import PROJECTION_NAMES, make_projection
from .settings import DEFAULT_GRID, EmbedSettings
from .triaxial import TriaxialEncoder, TriaxialResult

ProgressCallback = Callable[[str, int, int], None]
"""``progress(volume_id, slices_done, slices_total)``."""


def settings_known_before_loading(settings: EmbedSettings, preset: str | None = None) -> dict:
    """The comparable settings a run fixes before its model is loaded.

    The weights' hash, the projection's (it depends on the model's width) and,
    unless asked for, the image size come with the model; the preset is known
    when it is set, or when the caller resolved ``auto`` (pass it as ``preset``).
    """
    known = {"format_version": FORMAT_VERSION, "planes": list(settings.planes), "grid": settings.grid,
             "keep_cls": bool(settings.keep_cls), "preprocess": settings.preprocess}
    if settings.projection_file is None:  # a projector file decides K (and R) only once it is read
        known.update({"k": int(settings.k if settings.k is not None else 100), "seed": int(settings.seed),
                      "projection": PROJECTION_NAMES[settings.projection]})
    if settings.image_size:
        known["image_size"] = int(settings.image_size)
    if preset is None and (settings.preset or "auto").lower() != "auto":
        preset = resolve_preset(settings.preset, None, settings.ct_window).describe()
    if preset:
        known["preset"] = preset
    return known


def check_known_settings(existing: dict, settings: EmbedSettings, what: str, preset: str | None = None) -> None:
    """Refuse, before any model is loaded, outputs made with settings this run would not make (naming each)."""
    candidate = dict(existing)
    candidate.update(settings_known_before_loading(settings, preset))
    check_compatible(existing, candidate, what)


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
        self.notice: Callable[[str], None] | None = None
        """Called with a one-line hint (e.g. a CT file without modality under ``--preset auto``), once per embedder."""
        self.notice_by_id = False
        """Hints name the volume's id rather than its source path (anonymized batches never print paths)."""
        self._hinted = False

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
        data = torch.from_numpy(np.ascontiguousarray(torch_ready(volume.array))).to(self.encoder.device, torch.float32)
        if self.notice is not None and not self._hinted and preset.name == "minmax" and s.preset == "auto":
            where = volume.id if self.notice_by_id else (volume.source or volume.id)
            hint = ct_hint(s.preset, volume.modality, float(data.min()), float(data.max()), where)
            if hint:
                self._hinted = True
                self.notice(hint)
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
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        if not np.isfinite(vector).all():  # never written: a NaN embedding looks like data to every consumer
            bad = int(vector.size - np.count_nonzero(np.isfinite(vector)))
            raise RaptorError(f"{vol.source}: its embedding came out with {bad} NaN or infinite values of {vector.size} "
                              f"(intensity preset {prepared.preset.describe()}); nothing was written for it")
        return Embedding(vector=vector, metadata=meta)

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
            try:
                embedding = self.finish(prep, result, time.perf_counter() - start)
            except RaptorError as exc:
                yield ref, None, str(exc)
                continue
            yield ref, embedding, None
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


__all__ = ["EmbedSettings", "Embedder", "DEFAULT_GRID", "settings_known_before_loading", "check_known_settings"]
