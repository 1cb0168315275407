"""The embedding settings as plain data: what a job asks for, importable without PyTorch.

The Slicer modules build these before PyTorch is installed, and send them to
a Raptor server as JSON (:func:`settings_to_json`, :func:`settings_from_json`),
so this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import RaptorError
from ..names import DEFAULT_MODEL, PLANES, PREPROCESS_CHOICES, PRESETS, PROJECTIONS, device_problem, window_problem

DEFAULT_GRID = 256


@dataclass
class EmbedSettings:
    """Everything that decides an embedding's bits (and a few speed knobs that do not)."""

    model: str = DEFAULT_MODEL
    k: int | None = 100  # None: 100, or the K of projection_file
    seed: int | None = 0
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
        if not self.planes or any(p not in PLANES for p in self.planes) or len(set(self.planes)) != len(self.planes):
            raise RaptorError(f"planes must be some of {', '.join(PLANES)}, each once (got {', '.join(map(str, self.planes)) or 'none'})")
        if self.k is not None and not 1 <= int(self.k) <= 100_000:
            raise RaptorError(f"K must be between 1 and 100000 (got {self.k})")
        seed_limit = 2**32 if self.projection == "numpy-legacy" else 2**63
        if self.seed is not None and not 0 <= int(self.seed) < seed_limit:  # None: R from a projector file
            raise RaptorError(f"seed must be between 0 and {seed_limit - 1} (got {self.seed})")
        if self.image_size is not None and not 14 <= int(self.image_size) <= 1024:
            raise RaptorError(f"image size must be between 14 and 1024 pixels (got {self.image_size})")
        if self.batch_size is not None and not 1 <= int(self.batch_size) <= 4096:
            raise RaptorError(f"batch size must be between 1 and 4096 slices (got {self.batch_size})")
        if str(self.preset).lower() not in PRESETS:
            raise RaptorError(f"unknown intensity preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.preprocess not in PREPROCESS_CHOICES:
            raise RaptorError(
                f"unknown slice preprocessing {self.preprocess!r} (choose from {', '.join(PREPROCESS_CHOICES)})"
            )
        if self.projection not in PROJECTIONS:
            raise RaptorError(f"unknown projection {self.projection!r} (choose from {', '.join(PROJECTIONS)})")
        if self.projection_file is not None and self.projection != "pcg64":
            raise RaptorError("a projector file replaces the drawn R: give --projection-file or --projection, not both")
        problem = device_problem(str(self.device))
        if problem:
            raise RaptorError(problem)
        if self.ct_window is not None and (problem := window_problem(self.ct_window)):
            raise RaptorError(problem)


_FIELD_TYPES = {
    "model": (str,),
    "k": (int, type(None)),
    "seed": (int,),
    "grid": (int, str),
    "preset": (str,),
    "ct_window": (list, tuple, type(None)),
    "planes": (list, tuple),
    "keep_cls": (bool,),
    "image_size": (int, type(None)),
    "preprocess": (str,),
    "projection": (str,),
    "projection_file": (str, type(None)),
    "device": (str,),
    "batch_size": (int, type(None)),
    "dedup_constant_slices": (bool,),
    "cache_dir": (str, type(None)),
}


def settings_to_json(settings: EmbedSettings) -> dict:
    """The settings as a JSON-able dict (tuples become lists)."""
    data = dataclasses.asdict(settings)
    data["planes"] = list(settings.planes)
    data["ct_window"] = list(settings.ct_window) if settings.ct_window is not None else None
    return data


def settings_from_json(data, what: str = "settings") -> EmbedSettings:
    """Settings from a JSON object someone sent: every field checked for its type, unknown fields refused."""
    if not isinstance(data, dict):
        raise RaptorError(f"{what}: must be a JSON object")
    known = {f.name for f in dataclasses.fields(EmbedSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RaptorError(f"{what}: unknown field {unknown[0]!r}")
    values = {}
    for name, value in data.items():
        types = _FIELD_TYPES.get(name, (object,))
        if isinstance(value, bool) and bool not in types:
            raise RaptorError(f"{what}: {name} must be {' or '.join(t.__name__ for t in types)}, not a boolean")
        if not isinstance(value, types):
            raise RaptorError(f"{what}: {name} must be {' or '.join(t.__name__ for t in types)} (got {type(value).__name__})")
        values[name] = value
    if values.get("ct_window") is not None:
        window = values["ct_window"]
        if len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window):
            raise RaptorError(f"{what}: ct_window must be two numbers [low, high]")
        values["ct_window"] = (float(window[0]), float(window[1]))
    if "planes" in values:
        if not all(isinstance(p, str) for p in values["planes"]):
            raise RaptorError(f"{what}: planes must be a list of plane names")
        values["planes"] = tuple(values["planes"])
    return EmbedSettings(**values)


__all__ = ["DEFAULT_GRID", "EmbedSettings", "settings_from_json", "settings_to_json"]
