"""Speed and memory of the embedding pipeline (a benchmark, not a test).

Prints seconds per volume, slices per second, achieved TFLOP/s and peak
memory for a random-init ViT of a real DINOv2 shape (speed does not depend on
the weights), plus the speed-up from encoding constant slices once on the
real CT when ../shared/data is present.

    # one H100, DINOv2-L, 256^3 (the README's numbers)
    .venv/bin/python bench/embed_speed.py --arch L --grid 256 --volumes 8
    # this CPU, ViT-S, smaller grid
    .venv/bin/python bench/embed_speed.py --arch S --grid 64 --volumes 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RaptorExtension.encoding.model import (  # noqa: E402
    DINOV2_SHAPES,
    encoder_from_model,
    random_dinov2,
)
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings  # noqa: E402
from RaptorExtension.volumes.readers import read_volume  # noqa: E402
from RaptorExtension.volumes.volume import (
    Volume,  # noqa: E402
    VolumeRef,
)

ARCHS = DINOV2_SHAPES
SHARED_CT = ROOT.parent / "shared" / "data" / "dicom" / "pancreatic-ct-cbct-seg"


def flops_per_slice(d: int, layers: int, tokens: int, patch: int = 14) -> float:
    """Multiply-adds x 2 of one ViT forward: projections, MLP (ratio 4), attention, patch embedding."""
    per_layer = 24 * tokens * d * d + 4 * tokens * tokens * d
    return layers * per_layer + 2 * (tokens - 1) * 3 * patch * patch * d


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_ct(grid: int, seed: int) -> Volume:
    """A cubic CT-like volume filling the whole cube (no padding, so no constant slices)."""
    rng = np.random.default_rng(seed)
    array = rng.normal(40, 300, size=(grid, grid, grid)).astype(np.float32)
    return Volume(array=array, ijk_to_ras=np.eye(4), id=f"synthetic{seed}", source="synthetic", modality="CT")


def run(embedder: Embedder, volumes: list[Volume]) -> float:
    refs = [VolumeRef(id=v.id, source=v.source, loader=lambda v=v: v) for v in volumes]
    if embedder.encoder.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ref, _e, error in embedder.embed_many(refs, readers=0):
        assert error is None, error
    if embedder.encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="L" if torch.cuda.is_available() else "S")
    parser.add_argument("--grid", type=int, default=256)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--skip-real-ct", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    shape = ARCHS[args.arch]
    model = random_dinov2(**shape, image_size=224, seed=0)
    encoder = encoder_from_model(model, f"random-dinov2-{args.arch}", device=args.device)
    embedder = Embedder(EmbedSettings(model=encoder.name, k=args.k, grid=args.grid, batch_size=args.batch_size,
                                      preset="ct"), encoder=encoder)
    dev = encoder.device
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"DINOv2-{args.arch} shape random weights, {str(encoder.dtype).replace('torch.', '')}, "
          f"batch {embedder.triaxial.batch_size}, grid {args.grid}^3, torch {torch.__version__}")

    run(embedder, [synthetic_ct(args.grid, 99)])  # warm-up: kernels, allocator
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    volumes = [synthetic_ct(args.grid, s) for s in range(args.volumes)]
    encoded_before = embedder.triaxial.encoded_slices
    seconds = run(embedder, volumes)
    slices = embedder.triaxial.encoded_slices - encoded_before
    tokens = encoder.patch_grid**2 + encoder.num_prefix_tokens
    tflops = flops_per_slice(encoder.hidden_size, shape["layers"], tokens) * slices / seconds / 1e12
    result = {
        "device": str(dev),
        "arch": args.arch,
        "grid": args.grid,
        "batch_size": embedder.triaxial.batch_size,
        "seconds_per_volume": seconds / args.volumes,
        "slices_per_second": slices / seconds,
        "tflops": tflops,
        "peak_memory_gb": peak_memory_gb(dev),
        "peak_memory_kind": "GPU max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }
    print(f"{result['seconds_per_volume']:.3f} s per {args.grid}^3 volume, {result['slices_per_second']:.0f} slices/s, "
          f"{tflops:.1f} TFLOP/s, peak memory {result['peak_memory_gb']:.2f} GB ({result['peak_memory_kind']})")

    if not args.skip_real_ct and SHARED_CT.exists():
        ct = read_volume(str(SHARED_CT))
        timings = {}
        vectors = {}
        for dedup in (False, True):
            e = Embedder(EmbedSettings(model=encoder.name, k=args.k, grid=args.grid, batch_size=args.batch_size,
                                       dedup_constant_slices=dedup), encoder=encoder)
            run(e, [ct])  # warm the constant-slice cache like a long batch would
            e.triaxial.encoded_slices = e.triaxial.reused_slices = 0
            timings[dedup] = run(e, [ct])
            vectors[dedup] = e.embed_volume(ct).vector
            counts = (e.triaxial.encoded_slices, e.triaxial.reused_slices)
        diff = float(np.abs(vectors[True] - vectors[False]).max() / np.abs(vectors[False]).max())
        result.update(real_ct_seconds_all_slices=timings[False], real_ct_seconds_dedup=timings[True],
                      real_ct_speedup=timings[False] / timings[True], real_ct_reused_slices=counts[1] // 2,
                      real_ct_max_relative_difference=diff)
        print(f"real CT (134x512x512 -> {args.grid}^3): {timings[False]:.3f} s encoding every slice, "
              f"{timings[True]:.3f} s with constant slices encoded once ({counts[1] // 2} of {3 * args.grid} reused), "
              f"speed-up x{timings[False] / timings[True]:.2f}, max relative difference {diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
