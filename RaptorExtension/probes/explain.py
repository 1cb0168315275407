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

Baselines
---------
Each contribution is measured against a reference, and the bias absorbs what
the reference itself scores, so bias plus contributions is the decision in
both cases:

``background`` (the default)
    against an empty slice of the preset's background value (0 after the
    intensity preset: the bottom of its window, air for ``ct``, and the value
    the cube is padded with): ``c[pl, s, rc] = (1/n) (t_s[rc] - t_bg[rc]) . v``,
    and the bias becomes ``b + sum (t_bg . v - m)``.  A constant background
    slice (air around the body, padding) contributes exactly 0, because it is
    encoded once per value and its tokens *are* ``t_bg``; what is left is what
    the anatomy adds.
``mean``
    against the average training volume: the training mean ``mu`` is spread
    evenly over the slices, ``c = (1/n) (t_s . v - m)``.  A volume whose
    embedding equals the training mean has an all-zero heatmap and its logit
    is the bias; but every constant slice gets the same, often large, share,
    so an empty slice can rank first.

The tokens are never projected or kept: each slice group's tokens are dotted
with ``v`` in the encoder's slice hook as they stream past, and only the
(planes, slices, p, p) dot products stay.

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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..embeddings.embedding import Embedding
from ..embeddings.settings import settings_of
from ..encoding.pipeline import Embedder
from ..encoding.triaxial import PLANES
from ..errors import RaptorError
from ..volumes.intensity import resolve_preset
from ..volumes.volume import Volume
from .explanation import BASELINES, Explanation
from .probe import Probe
from .probe_settings import embed_settings_for, parse_preset


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



BACKGROUND_VALUE = 0.0
"""The preset's background in the prepared cube: the bottom of its window (air for ``ct``), and the padding."""


@dataclass
class VolumeExplanation:
    """The dot products of every plane, slice and patch with every output of a linear probe, and their references.

    Contributions are ``(raw - reference) / slices`` for the chosen baseline (:data:`BASELINES`).
    """

    probe: Probe
    embedding: Embedding
    volume_id: str
    planes: list[str]
    plane_axes: list[int]
    raw_patch: list[np.ndarray]
    """Per plane: (outputs, slices, p*p) float64, each slice's tokens dotted with the probe's patch weights."""
    raw_cls: list[np.ndarray] | None
    """Per plane: (outputs, slices) float64 when the embedding keeps CLS tokens."""
    references: dict[str, tuple[np.ndarray, np.ndarray | None]]
    """Per baseline: the patch reference (outputs, planes, p*p) and the CLS one (outputs, planes)."""
    constant_slices: list[np.ndarray]
    """Per plane: (slices,) bool, True where the slice is one value throughout (air, padding)."""
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

    def contributions(self, baseline: str = BASELINES[0]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Per plane, (outputs, slices, p, p) patch contributions and (outputs, slices) CLS ones (or None)."""
        ref_patch, ref_cls = self._reference(baseline)
        p = int(round(np.sqrt(self.raw_patch[0].shape[2])))
        patch = [((raw - ref_patch[:, i, None, :]) / raw.shape[1]).reshape(raw.shape[0], raw.shape[1], p, p)
                 for i, raw in enumerate(self.raw_patch)]
        cls = None
        if self.raw_cls is not None:
            cls = [(raw - ref_cls[:, i, None]) / raw.shape[1] for i, raw in enumerate(self.raw_cls)]
        return patch, cls

    def bias(self, output: int, baseline: str = BASELINES[0]) -> float:
        """The probe's bias plus what the baseline itself scores (nothing for ``mean``)."""
        bias = float(self.probe.bias[output])
        if baseline == "mean":
            return bias
        ref_patch, ref_cls = self._reference(baseline)
        mean_patch, mean_cls = self.references["mean"]
        bias += float((ref_patch[output] - mean_patch[output]).sum())
        if ref_cls is not None:
            bias += float((ref_cls[output] - mean_cls[output]).sum())
        return bias

    def _reference(self, baseline: str):
        if baseline not in self.references:
            raise RaptorError(f"unknown explanation baseline {baseline!r} (choose from {', '.join(BASELINES)})")
        return self.references[baseline]

    def slice_curves(self, output: int, baseline: str = BASELINES[0]) -> list[np.ndarray]:
        """Per plane, the contribution of every slice (patches plus CLS): the 'slice attention'."""
        patch, cls = self.contributions(baseline)
        curves = []
        for i, pc in enumerate(patch):
            curve = pc[output].sum(axis=(1, 2))
            if cls is not None:
                curve = curve + cls[i][output]
            curves.append(curve)
        return curves

    def total(self, output: int, baseline: str = BASELINES[0]) -> float:
        return float(sum(c.sum() for c in self.slice_curves(output, baseline)))

    def explain(self, name: str | None = None, *, heatmap: bool = True, device: str | torch.device = "cpu",
                baseline: str = BASELINES[0]) -> "Explanation":
        """The explanation of one class/label/target, with its heatmaps, against ``baseline``."""
        target = output_target(self.probe, name, self.scores)
        s = target.sign
        curves = [s * c for c in self.slice_curves(target.index, baseline)]
        bias = s * self.bias(target.index, baseline)
        decision = s * float(self.decision[target.index])
        cube_heat = input_heat = None
        if heatmap:
            cube_heat = s * self.cube_heatmap(target.index, baseline)
            input_heat = heatmap_to_input(cube_heat, self.cube_ijk_to_ras, self.input_ijk_to_ras, self.input_shape,
                                          device=device)
        score_index = self.probe.classes.index(target.name)
        columns = list(self.probe.label_columns)
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
            baseline=baseline,
            volume_id=self.volume_id,
            label_column=columns[0] if len(columns) == 1 and self.probe.task in ("binary", "multiclass") else "",
            constant_slices=[c.copy() for c in self.constant_slices],
        )

    def cube_heatmap(self, output: int, baseline: str = BASELINES[0]) -> np.ndarray:
        """Contributions spread over the cube's voxels; the voxels sum to :meth:`total`."""
        patch, cls = self.contributions(baseline)
        heat = np.zeros(self.cube.shape, dtype=np.float64)
        for i, axis in enumerate(self.plane_axes):
            contributions = patch[i][output]  # (slices, p, p)
            in_plane = [a for a in range(3) if a != axis]
            rows, cols = self.cube.shape[in_plane[0]], self.cube.shape[in_plane[1]]
            p = contributions.shape[1]
            plane = np.einsum("hr,src,wc->shw", patch_overlap(rows, p), contributions, patch_overlap(cols, p))
            if cls is not None:
                plane += (cls[i][output] / (rows * cols))[:, None, None]
            heat += np.moveaxis(plane, 0, axis)
        return heat


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

    def dot_patch(patch_tokens: torch.Tensor, slot: int) -> np.ndarray:  # (n, pp, d) -> (outputs, n, pp)
        return torch.einsum("npd,opd->onp", patch_tokens.to(torch.float64), v[:, slot]).cpu().numpy()

    def dot_cls(cls_tokens: torch.Tensor, slot: int) -> np.ndarray:  # (n, d) -> (outputs, n)
        return torch.einsum("nd,od->on", cls_tokens.to(torch.float64), w_cls[:, slot]).cpu().numpy()

    def hook(key, slot, indices, patch_tokens, cls_tokens):
        idx = indices.cpu().numpy()
        raw_patch[slot][:, idx] = dot_patch(patch_tokens, slot)
        if raw_cls is not None:
            raw_cls[slot][:, idx] = dot_cls(cls_tokens, slot)

    report = (lambda key, done, total: progress(volume.id, done, total)) if progress else None
    results = list(embedder.triaxial.encode([(volume.id, prepared.cube)], progress=report, cancel=cancel, slice_hook=hook))
    embedding = embedder.finish(prepared, results[0], time.perf_counter() - start)
    probe.check_embedding(dict(embedding.settings(), n_features=embedding.vector.size), volume.source)

    # The background reference: an empty slice, encoded (once) exactly as the encoder encodes constant slices,
    # and dotted the same way, so a background slice of the volume contributes exactly 0.
    # Constant slices are encoded at their plane's own slice shape, so the reference is too.
    background = [
        embedder.triaxial.constant_slice_tokens(
            BACKGROUND_VALUE, tuple(int(prepared.cube.shape[a]) for a in range(3) if a != axis), cancel)
        for axis in plane_axes
    ]
    bg_patch = np.stack([dot_patch(background[i][1][None], i)[:, 0] for i in range(n_planes)], axis=1)
    bg_cls = np.stack([dot_cls(background[i][0][None], i)[:, 0] for i in range(n_planes)], axis=1) if keep_cls else None
    references = {"background": (bg_patch, bg_cls), "mean": (m_patch, m_cls if keep_cls else None)}

    cube = prepared.cube
    constant = []
    for axis in plane_axes:
        other = tuple(a for a in range(3) if a != axis)
        constant.append((cube.amin(dim=other) == cube.amax(dim=other)).cpu().numpy())
    vector = embedding.vector[None]
    return VolumeExplanation(
        probe=probe,
        embedding=embedding,
        volume_id=volume.id,
        planes=planes,
        plane_axes=plane_axes,
        raw_patch=raw_patch,
        raw_cls=raw_cls,
        references=references,
        constant_slices=constant,
        decision=probe.decision(vector)[0],
        scores=probe.scores(vector)[0],
        cube=cube.float().cpu().numpy(),
        cube_ijk_to_ras=None if prepared.cube_to_ras is None else np.asarray(prepared.cube_to_ras, dtype=np.float64),
        input_ijk_to_ras=np.asarray(volume.ijk_to_ras, dtype=np.float64),
        input_shape=tuple(int(s) for s in volume.array.shape),
        seconds=time.perf_counter() - start,
    )


__all__ = ["BASELINES", "embed_settings_for", "parse_preset", "explain_volume", "VolumeExplanation", "Explanation", "heatmap_to_input",
           "patch_overlap", "output_target"]
