"""Does the batch keep the encoder busy?  End-to-end volumes/s versus the encoder-only rate.

Writes N on-disk DICOM series derived from the shared CT (full 512 x 512
slices, a different run of slices per series, some mirrored, new UIDs), then
measures with one loaded model:

``encoder only``  the same volumes already in memory: intensity preset,
                  resampling and encoding on the device, no disk, no decoding.
                  This is the rate the hardware allows.
``end to end``    ``run_batch`` over the folder: header scan, loader processes
                  reading and decoding DICOM, embedding, one fsync'ed CSV row
                  per series.

Both are reported over the whole run and in steady state (from the first
finished volume to the last, i.e. without the start of the loader processes
and the first batch's warm-up); the target on one H100 is an end-to-end
steady rate of at least 90% of the encoder-only one.

    python bench/batch_pipeline.py                                     # CPU, tiny random model (a smoke run)
    python bench/batch_pipeline.py --arch L --grid 256 --device cuda \\
        --series 24 --readers 8                                         # the real measurement, on a GPU
                                                                        # (--model facebook/dinov2-large: same speed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))


def write_series(folder: Path, count: int, slices: int, step: int) -> None:
    import numpy as np
    from conftest import DICOM_SERIES
    from derived_dicom import StoredCT, read_stored_ct, write_axial

    ct = read_stored_ct(DICOM_SERIES)
    total = ct.stored.shape[0]
    slices = min(slices, total)
    dx, dy, dz = ct.spacing
    for n in range(count):
        offset = (n * 7) % max(1, total - slices + 1)
        stored = ct.stored[offset : offset + slices, ::step, ::step]
        if n % 2:
            stored = stored[:, :, ::-1]
        part = StoredCT(np.ascontiguousarray(stored), ct.origin + np.array([0.0, 0.0, offset * dz]),
                        (dx * step, dy * step, dz), ct.template)
        write_axial(part, folder / f"series{n:03d}", patient_id=f"BENCH-{n:03d}", description=f"bench {n}")


def steady_rate(stamps: list[float]) -> float:
    """Volumes per second between the first and the last finished volume."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=96, help="slices per series (of 134)")
    parser.add_argument("--step", type=int, default=1, help="in-plane subsampling (1 keeps 512 x 512)")
    parser.add_argument("--model", default=None, help="model id or folder (default: a tiny random DINOv2, offline)")
    parser.add_argument("--arch", default=None, choices=("S", "B", "L", "G"),
                        help="instead of --model: a random-init DINOv2 of this size (no hub needed; speed does not depend on weights)")
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--k", type=int, default=None, help="K (default 100, or 16 for the tiny model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--readers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--loader", default="processes", choices=("processes", "threads"))
    parser.add_argument("--work-dir", default=None, help="keep the derived series here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--torch-threads", type=int, default=None, help="CPU threads for the encoder (default: PyTorch's)")
    args = parser.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from RaptorExtension.cohort.job import BatchJob, BatchSources
    from RaptorExtension.cohort.run import run_batch
    from RaptorExtension.cohort.sources import discover_folder
    from RaptorExtension.encoding.model import model_summary
    from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
    from RaptorExtension.volumes.volume import VolumeRef

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="raptor-bench-pipeline-"))
    cohort = work / f"cohort{args.series}x{args.slices}s{args.step}"
    if not cohort.exists():
        t = time.perf_counter()
        write_series(cohort, args.series, args.slices, args.step)
        print(f"wrote {args.series} series in {time.perf_counter() - t:.1f}s to {cohort}", file=sys.stderr)
    model = args.model
    if args.arch:
        from RaptorExtension.encoding.model import save_random_dinov2

        model = str(save_random_dinov2(work / f"random-dinov2-{args.arch}", args.arch))
    elif model is None:
        from conftest import make_tiny_model_dir

        model = str(make_tiny_model_dir(work / "tiny-model"))
    k = args.k or (100 if args.model or args.arch else 16)
    settings = EmbedSettings(model=model, k=k, grid=args.grid, device=args.device, batch_size=args.batch_size)
    embedder = Embedder(settings)
    print(model_summary(embedder.encoder), file=sys.stderr)

    # Encoder only: the volumes are already in memory.
    items = sorted(discover_folder(cohort).items, key=lambda it: it.key)
    volumes = [item.ref(f"v{n}").load() for n, item in enumerate(items)]
    in_memory = [VolumeRef(id=v.id, source=v.source, loader=(lambda v=v: v)) for v in volumes]
    list(embedder.embed_many(in_memory[:1], readers=0))  # warm-up (CUDA context, kernels)
    sync = torch.cuda.synchronize if embedder.encoder.device.type == "cuda" else (lambda: None)
    sync()
    stamps: list[float] = []
    start = time.perf_counter()
    for _ in embedder.embed_many(in_memory, readers=0):
        sync()
        stamps.append(time.perf_counter())
    encoder_total = len(volumes) / (stamps[-1] - start)
    encoder_steady = steady_rate(stamps)
    voxels = sum(v.array.size for v in volumes) / len(volumes)
    del volumes, in_memory

    # End to end: the batch job over the folder, same loaded model.
    out = work / "pipeline.csv"
    for path in (out, work / "pipeline_errors.csv", work / "pipeline.batch.json"):
        path.unlink(missing_ok=True)
    done_stamps: list[float] = []

    def progress(p) -> None:
        if p.phase == "embedding" and p.finished > len(done_stamps):
            done_stamps.append(time.perf_counter())

    job = BatchJob(csv=out, sources=BatchSources(folders=[str(cohort)]), settings=settings, readers=args.readers,
                   loader=args.loader)
    wall = time.perf_counter()
    summary = run_batch(job, progress=progress, embedder=embedder)
    wall = time.perf_counter() - wall
    if summary.done != args.series:
        raise SystemExit(f"expected {args.series} series embedded, got {summary.line()}")
    end_to_end_total = summary.done / summary.seconds
    end_to_end_steady = steady_rate(done_stamps)
    result = {
        "device": str(embedder.encoder.device) + (f" ({torch.cuda.get_device_name()})" if embedder.encoder.device.type == "cuda" else f" ({os.cpu_count()} cores)"),
        "model": model if args.model else (f"random-init DINOv2-{args.arch}" if args.arch else "tiny random DINOv2 (d=32, 56px)"),
        "grid": args.grid,
        "series": args.series,
        "voxels_per_series": int(voxels),
        "readers": f"{args.readers} {args.loader}",
        "torch_threads": torch.get_num_threads(),
        "encoder_only_volumes_per_s": round(encoder_total, 3),
        "encoder_only_steady_volumes_per_s": round(encoder_steady, 3),
        "end_to_end_volumes_per_s": round(end_to_end_total, 3),
        "end_to_end_steady_volumes_per_s": round(end_to_end_steady, 3),
        "end_to_end_wall_s_with_discovery": round(wall, 2),
        "steady_ratio": round(end_to_end_steady / encoder_steady, 3),
        "total_ratio": round(end_to_end_total / encoder_total, 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
