"""The embedding settings a probe was fitted with: to embed a new volume exactly the same way.

Free of PyTorch, so the Slicer modules can ask which embedding a probe needs
before anything is installed or sent to a server.
"""

from __future__ import annotations

from ..embeddings.settings import with_defaults
from ..encoding.projection import FILE_PROJECTION, PROJECTION_NAMES
from ..encoding.settings import EmbedSettings
from ..errors import RaptorError
from ..names import PLANES
from .probe import Probe


def embed_settings_for(probe: Probe, *, model: str | None = None, device: str = "auto", batch_size: int | None = None,
                       cache_dir: str | None = None, projection_file: str | None = None) -> EmbedSettings:
    """The embedding settings a probe was fitted with, to embed a new volume the same way.

    ``model`` overrides where the weights come from (a local folder instead of
    a hub id); the weights' hash is still checked against the probe's.  A probe
    fitted on embeddings made with a projector file needs that file
    (``projection_file``); its SHA-256 is checked against the probe's.
    """
    e = with_defaults(probe.embedding)
    needed = ("k", "grid") if e.get("projection") == FILE_PROJECTION else ("k", "seed", "grid")  # a file's R has no seed
    lacking = [key for key in needed if e.get(key) is None]
    if lacking:
        raise RaptorError(f"{probe.label()}: records no {', '.join(lacking)} for its embeddings; "
                          "a volume cannot be embedded the way it expects")
    preset, window = parse_preset(str(e.get("preset") or "auto"))
    planes = e.get("planes") or list(PLANES)
    methods = {name: method for method, name in PROJECTION_NAMES.items()}
    if e["projection"] == FILE_PROJECTION:
        if projection_file is None:
            raise RaptorError(
                f"{probe.label()}: was fitted on embeddings made with a projector file (R's SHA-256 "
                f"{str(e.get('projection_sha256'))[:12]}…); pass that file with --projection-file"
            )
        method, seed = "pcg64", 0
    elif e["projection"] in methods:
        method, seed = methods[e["projection"]], int(e["seed"])
    else:
        raise RaptorError(f"{probe.label()}: records an unknown projection {e['projection']!r}")
    return EmbedSettings(
        model=model or str(e.get("encoder") or ""),
        k=int(e["k"]),
        seed=seed,
        projection=method,
        projection_file=projection_file,
        preprocess=str(e["preprocess"]),
        grid=e["grid"],
        preset=preset,
        ct_window=window,
        planes=tuple(planes),
        keep_cls=bool(e.get("keep_cls")),
        image_size=int(e["image_size"]) if e.get("image_size") else None,
        device=device,
        batch_size=batch_size,
        cache_dir=cache_dir,
    )


def parse_preset(text: str) -> tuple[str, tuple[float, float] | None]:
    """``ct[-1000,1000]`` -> ("ct", (-1000, 1000)); ``mri[p0.5,p99.5]`` -> ("mri", None); else (text, None)."""
    name, _, rest = text.partition("[")
    if name == "ct" and rest.endswith("]"):
        try:
            lo, hi = (float(v) for v in rest[:-1].split(","))
            return "ct", (lo, hi)
        except ValueError:
            raise RaptorError(f"the probe records an unreadable CT window {text!r}") from None
    return name, None
