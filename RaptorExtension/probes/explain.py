"""Exact explanations of linear probes: slice attention and 3D heatmaps.

Why it is exact
---------------
A Raptor embedding is linear in the per-slice tokens: for plane ``pl`` with
``n`` slices, patch position ``rc`` and projected channel ``k``

    x[pl, k, rc] = (1/n) * sum_s sum_j R[k, j] * t_s[rc, j]

(and with ``keep_cls`` the CLS block is ``(1/n) * sum_s cls_s``).  A linear
probe's decision value for output ``o`` is ``sum_f W[o, f] (x_f - mu_f) / sigma_f + b[o]``
(its standardizer folded in).  Substituting, the decision is the bias ``b[o]``
plus a sum of one term per (plane, slice, patch), plus one term per (plane,
slice) for the CLS block:

    c[pl, s, rc] = (1/n) * (t_s[rc] . v[o, pl, rc]  -  m[o, pl, rc]),
    v[o, pl, rc] = sum_k (W[o, pl, k, rc] / sigma) R[k, :],
    m[o, pl, rc] = sum_k (W[o, pl, k, rc] / sigma) mu[pl, k, rc].

The training mean ``mu`` is spread evenly over the slices, so contributions
are measured against the average training volume: a volume whose embedding
equals the training mean has an all-zero heatmap and its logit is the bias.
The tokens are never projected or kept: each slice group's tokens are dotted
with ``v`` in the encoder's slice hook as they stream past, and only the
(planes, slices, p, p) contributions stay.

Heatmap
-------
Each slice's p x p patch contributions are spread over that slice's voxels in
proportion to the area each voxel shares with each patch (the ViT sees the
slice resized to its input size and cut into p x p patches, so patch ``r``
covers the slice rows ``[r L/p, (r+1) L/p)``); a CLS contribution is spread
evenly over its slice.  Summing the three planes gives a cube-space heatmap
whose voxels add up exactly to the sum of all contributions.  The cube-space
heatmap is then resampled (trilinear) into the input volume's own voxel grid
and scaled by the ratio of voxel volumes, so it overlays the input in Slicer;
with ``grid="native"`` the cube *is* the input array and no resampling is
needed.  The location of a patch token is its patch: attention mixes
information across patches, so the heatmap says which tokens carried the
evidence, not which pixels caused it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..embeddings.embedding import Embedding
from ..embeddings.settings import settings_of, with_defaults
from ..encoding.pipeline import Embedder, EmbedSettings
from ..encoding.projection import FILE_PROJECTION, PROJECTION_NAMES
from ..encoding.triaxial import PLANES
from ..errors import RaptorError
from ..volumes.intensity import resolve_preset
from ..volumes.volume import Volume
from .probe import Probe


@dataclass
class OutputTarget:
    """Which decision value is explained: an output row of the probe and a sign."""

    name: str
    index: int
    sign: float


def output_target(probe: Probe, name: str | None, scores: np.ndarray | None = None) -> OutputTarget:
    """Resolve a class/label/target name (default: the positive or most likely class)."""
    if name is None:
        if probe.task == "binary":
            name = probe.classes[1]
        elif probe.task in ("multiclass", "multilabel") and scores is not None:
            name = probe.classes[int(np.argmax(scores))]
        else:
            name = probe.classes[0]
    if name not in probe.classes:
        raise RaptorError(f"probe {probe.label()} has no class or target {name!r} (it has {', '.join(probe.classes)})")
    if probe.task == "binary":
        return OutputTarget(name=name, index=0, sign=1.0 if name == probe.classes[1] else -1.0)
    return OutputTarget(name=name, index=probe.classes.index(name), sign=1.0)


@dataclass
class VolumeExplanation:
    """Contributions of every plane, slice and patch to every output of a linear probe."""

    probe: Probe
    embedding: Embedding
    planes: list[str]
    plane_axes: list[int]
    patch_contributions: list[np.ndarray]
    """Per plane: (outputs, slices, p, p) float64, the CLS part excluded."""
    cls_contributions: list[np.ndarray] | None
    """Per plane: (outputs, slices) float64 when the embedding keeps CLS tokens."""
    decision: np.ndarray
    """(outputs,) the probe's decision values from the embedding, as ``raptor probe apply`` computes them."""
    scores: np.ndarray
    """(classes,) probabilities or regression values."""
    cube: np.ndarray
    """The prepared (normalized, resampled) cube the encoder saw, (a0, a1, a2) float32."""
    cube_ijk_to_ras: np.ndarray | None
    input_ijk_to_ras: np.ndarray
    input_shape: tuple[int, int, int]
    seconds: float = 0.0

    def slice_curves(self, output: int) -> list[np.ndarray]:
        """Per plane, the contribution of every slice (patches plus CLS): the 'slice attention'."""
        curves = []
        for i, pc in enumerate(self.patch_contributions):
            curve = pc[output].sum(axis=(1, 2))
            if self.cls_contributions is not None:
                curve = curve + self.cls_contributions[i][output]
            curves.append(curve)
        return curves

    def total(self, output: int) -> float:
        return float(sum(c.sum() for c in self.slice_curves(output)))

    def explain(self, name: str | None = None, *, heatmap: bool = True, device: str | torch.device = "cpu") -> "Explanation":
        """The explanation of one class/label/target, with its heatmaps."""
        target = output_target(self.probe, name, self.scores)
        s = target.sign
        curves = [s * c for c in self.slice_curves(target.index)]
        bias = s * float(self.probe.bias[target.index])
        decision = s * float(self.decision[target.index])
        cube_heat = input_heat = None
        if heatmap:
            cube_heat = s * self.cube_heatmap(target.index)
            input_heat = heatmap_to_input(cube_heat, self.cube_ijk_to_ras, self.input_ijk_to_ras, self.input_shape,
                                          device=device)
        score_index = self.probe.classes.index(target.name)
        return Explanation(
            output=target.name,
            decision=decision,
            score=float(self.scores[score_index]),
            bias=bias,
            planes=list(self.planes),
            plane_axes=list(self.plane_axes),
            slice_curves=curves,
            cube_heatmap=cube_heat,
            heatmap=input_heat,
            cube=self.cube,
            cube_ijk_to_ras=self.cube_ijk_to_ras,
            input_ijk_to_ras=self.input_ijk_to_ras,
            task=self.probe.task,
            probe_name=self.probe.name or self.probe.label(),
        )

    def cube_heatmap(self, output: int) -> np.ndarray:
        """Contributions spread over the cube's voxels; the voxels sum to :meth:`total`."""
        heat = np.zeros(self.cube.shape, dtype=np.float64)
        for i, axis in enumerate(self.plane_axes):
            contributions = self.patch_contributions[i][output]  # (slices, p, p)
            in_plane = [a for a in range(3) if a != axis]
            rows, cols = self.cube.shape[in_plane[0]], self.cube.shape[in_plane[1]]
            p = contributions.shape[1]
            plane = np.einsum("hr,src,wc->shw", patch_overlap(rows, p), contributions, patch_overlap(cols, p))
            if self.cls_contributions is not None:
                plane += (self.cls_contributions[i][output] / (rows * cols))[:, None, None]
            heat += np.moveaxis(plane, 0, axis)
        return heat


@dataclass
class Explanation:
    """One output explained: decision = bias + sum(slice_curves), and heatmaps that add up the same."""

    output: str
    decision: float
    score: float
    bias: float
    planes: list[str]
    plane_axes: list[int]
    slice_curves: list[np.ndarray]
    cube_heatmap: np.ndarray | None
    heatmap: np.ndarray | None
    """Float32 (K, J, I) in the input volume's voxel grid (its IJK-to-RAS)."""
    cube: np.ndarray
    cube_ijk_to_ras: np.ndarray | None
    input_ijk_to_ras: np.ndarray
    task: str
    probe_name: str
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(c.sum() for c in self.slice_curves))

    @property
    def residual(self) -> float:
        """decision - (bias + contributions): float rounding only (the embedding is stored as float32)."""
        return self.decision - (self.bias + self.total)

    def top_slice(self, plane: int) -> int:
        """The slice of a plane that adds most to the decision."""
        return int(np.argmax(self.slice_curves[plane]))

    def slice_ras(self, plane: int, index: int) -> np.ndarray:
        """RAS millimetres of the centre of a slice, for jumping Slicer's slice views to it."""
        shape = self.cube.shape
        centre = [(n - 1) / 2 for n in shape]
        centre[self.plane_axes[plane]] = float(index)
        a0, a1, a2 = centre
        matrix = self.cube_ijk_to_ras if self.cube_ijk_to_ras is not None else self.input_ijk_to_ras
        return (np.asarray(matrix) @ np.array([a2, a1, a0, 1.0]))[:3]


def patch_overlap(length: int, patches: int) -> np.ndarray:
    """(length, patches): the share of each patch that falls on each voxel row; columns sum to 1."""
    edges = np.arange(patches + 1, dtype=np.float64) * (length / patches)
    lo = np.arange(length, dtype=np.float64)[:, None]
    overlap = np.clip(np.minimum(lo + 1, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0.0, None)
    return overlap / (length / patches)


def heatmap_to_input(
    cube_heat: np.ndarray,
    cube_ijk_to_ras: np.ndarray | None,
    input_ijk_to_ras: np.ndarray,
    input_shape: tuple[int, int, int],
    *,
    device: str | torch.device = "cpu",
    chunk_voxels: int = 8_000_000,
) -> np.ndarray:
    """Resample a cube-space heatmap into the input's (K, J, I) grid (trilinear, zero outside).

    Values are contributions per voxel, so they are scaled by the ratio of
    voxel volumes: the input heatmap sums to about the same total.  Processed
    in slabs of K so a 512x512x600 CT never needs a multi-gigabyte grid.
    """
    if cube_ijk_to_ras is None:
        if tuple(cube_heat.shape) != tuple(input_shape):
            raise RaptorError("a native-grid heatmap must have the input's shape")
        return cube_heat.astype(np.float32)
    cube_m = np.asarray(cube_ijk_to_ras, dtype=np.float64)
    in_m = np.asarray(input_ijk_to_ras, dtype=np.float64)
    to_cube = np.linalg.inv(cube_m) @ in_m  # input ijk -> cube ijk
    ratio = abs(np.linalg.det(in_m[:3, :3])) / abs(np.linalg.det(cube_m[:3, :3]))
    nk, nj, ni = (int(v) for v in input_shape)
    d0, d1, d2 = cube_heat.shape
    source = torch.from_numpy(np.ascontiguousarray(cube_heat, dtype=np.float32)).to(device)[None, None]
    out = np.empty((nk, nj, ni), dtype=np.float32)
    slab = max(1, chunk_voxels // max(1, nj * ni))
    jj = torch.arange(nj, dtype=torch.float64, device=device).view(1, nj, 1)
    ii = torch.arange(ni, dtype=torch.float64, device=device).view(1, 1, ni)
    t = torch.from_numpy(to_cube).to(device)
    for k0 in range(0, nk, slab):
        kk = torch.arange(k0, min(nk, k0 + slab), dtype=torch.float64, device=device).view(-1, 1, 1)
        coords = [t[c, 0] * ii + t[c, 1] * jj + t[c, 2] * kk + t[c, 3] for c in range(3)]  # cube i, j, k
        ci, cj, ck = coords
        grid = torch.stack(
            [2.0 * ci / max(d2 - 1, 1) - 1.0, 2.0 * cj / max(d1 - 1, 1) - 1.0, 2.0 * ck / max(d0 - 1, 1) - 1.0], dim=-1
        ).to(torch.float32)[None]
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        out[k0 : k0 + sampled.shape[0]] = (sampled * ratio).cpu().numpy()
    return out


ProgressFn = Callable[[str, int, int], None]


def embed_settings_for(probe: Probe, *, model: str | None = None, device: str = "auto", batch_size: int | None = None,
                       cache_dir: str | None = None, projection_file: str | None = None) -> EmbedSettings:
    """The embedding settings a probe was fitted with, to embed a new volume the same way.

    ``model`` overrides where the weights come from (a local folder instead of
    a hub id); the weights' hash is still checked against the probe's.  A probe
    fitted on embeddings made with a projector file needs that file
    (``projection_file``); its SHA-256 is checked against the probe's.
    """
    e = with_defaults(probe.embedding)
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


def explain_volume(
    probe: Probe,
    embedder: Embedder,
    volume: Volume,
    *,
    progress: ProgressFn | None = None,
    cancel=None,
) -> VolumeExplanation:
    """Embed ``volume`` once and decompose every output of ``probe`` over planes, slices and patches.

    Refuses an MLP probe (not additive) and an embedder whose settings differ
    from the probe's, before any slice is encoded.
    """
    start = time.perf_counter()
    if not probe.is_linear:
        raise RaptorError(f"probe {probe.label()} is an MLP; only linear probes (logistic, ridge) can be explained exactly")
    preset = resolve_preset(embedder.settings.preset, volume.modality, embedder.settings.ct_window)
    expected = dict(settings_of(embedder.settings_metadata(preset.describe())), n_features=embedder.n_features)
    expected["encoder"] = embedder.encoder.name
    probe.check_embedding(expected, volume.source)

    planes = list(embedder.settings.planes)
    n_planes, k, p = len(planes), embedder.settings.k, embedder.encoder.patch_grid
    d = embedder.encoder.hidden_size
    pp = p * p
    dev = embedder.encoder.device
    n_patch = n_planes * k * pp
    outputs = probe.weight.shape[0]
    w = probe.weight / probe.feature_scale  # (outputs, features) on raw features
    mu = probe.feature_mean
    w_patch = w[:, :n_patch].reshape(outputs, n_planes, k, pp)
    mu_patch = mu[:n_patch].reshape(n_planes, k, pp)
    r = np.asarray(embedder.projection, dtype=np.float64)  # (k, d)
    v = torch.from_numpy(np.einsum("olkp,kd->olpd", w_patch, r)).to(dev)  # (outputs, planes, pp, d)
    m_patch = np.einsum("olkp,lkp->olp", w_patch, mu_patch)  # (outputs, planes, pp)
    keep_cls = bool(embedder.settings.keep_cls)
    if keep_cls:
        w_cls = torch.from_numpy(np.ascontiguousarray(w[:, n_patch:].reshape(outputs, n_planes, d))).to(dev)
        m_cls = np.einsum("old,ld->ol", w[:, n_patch:].reshape(outputs, n_planes, d), mu[n_patch:].reshape(n_planes, d))

    prepared = embedder.prepare(volume)
    cube_shape = tuple(int(s) for s in prepared.cube.shape)
    plane_axes = [PLANES.index(pl) for pl in planes]
    counts = [cube_shape[a] for a in plane_axes]
    raw_patch = [np.zeros((outputs, n, pp), dtype=np.float64) for n in counts]
    raw_cls = [np.zeros((outputs, n), dtype=np.float64) for n in counts] if keep_cls else None

    def hook(key, slot, indices, patch_tokens, cls_tokens):
        idx = indices.cpu().numpy()
        dots = torch.einsum("npd,opd->onp", patch_tokens.to(torch.float64), v[:, slot])
        raw_patch[slot][:, idx] = dots.cpu().numpy()
        if raw_cls is not None:
            raw_cls[slot][:, idx] = torch.einsum("nd,od->on", cls_tokens.to(torch.float64), w_cls[:, slot]).cpu().numpy()

    report = (lambda key, done, total: progress(volume.id, done, total)) if progress else None
    results = list(embedder.triaxial.encode([(volume.id, prepared.cube)], progress=report, cancel=cancel, slice_hook=hook))
    embedding = embedder.finish(prepared, results[0], time.perf_counter() - start)
    probe.check_embedding(dict(embedding.settings(), n_features=embedding.vector.size), volume.source)

    patch_contributions = [
        ((raw_patch[i] - m_patch[:, i, None, :]) / counts[i]).reshape(outputs, counts[i], p, p) for i in range(n_planes)
    ]
    cls_contributions = (
        [(raw_cls[i] - m_cls[:, i, None]) / counts[i] for i in range(n_planes)] if keep_cls else None
    )
    vector = embedding.vector[None]
    return VolumeExplanation(
        probe=probe,
        embedding=embedding,
        planes=planes,
        plane_axes=plane_axes,
        patch_contributions=patch_contributions,
        cls_contributions=cls_contributions,
        decision=probe.decision(vector)[0],
        scores=probe.scores(vector)[0],
        cube=prepared.cube.float().cpu().numpy(),
        cube_ijk_to_ras=None if prepared.cube_to_ras is None else np.asarray(prepared.cube_to_ras, dtype=np.float64),
        input_ijk_to_ras=np.asarray(volume.ijk_to_ras, dtype=np.float64),
        input_shape=tuple(int(s) for s in volume.array.shape),
        seconds=time.perf_counter() - start,
    )


__all__ = ["embed_settings_for", "parse_preset", "explain_volume", "VolumeExplanation", "Explanation", "heatmap_to_input", "patch_overlap", "output_target"]
