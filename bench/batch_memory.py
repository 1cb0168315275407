"""Peak memory of a long batch: does RSS stay flat over hundreds of volumes?

Writes N small DICOM series derived from the shared CT (different slices of
it, new UIDs, 17 x 64 x 64 each) into a work folder, then runs one batch over
them with the real job code (discovery, loader processes, embedding, one
fsync'ed CSV row per series) and samples the resident memory of the batch
process after every finished series.  A leak shows as a slope; a flat run
shows the same RSS at volume 50 and at volume 200.

    python bench/batch_memory.py                        # tiny random model, CPU, 200 volumes, grid 32
    python bench/batch_memory.py --model facebook/dinov2-large --grid 256 --device cuda --volumes 500

Loader processes are separate processes: their peak is reported apart
(``children``), and it does not add to the batch process's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def write_cohort(folder: Path, count: int) -> None:
    from conftest import DICOM_SERIES
    from derived_dicom import read_stored_ct, subsample, write_axial

    ct = read_stored_ct(DICOM_SERIES)
    for n in range(count):
        small = subsample(ct, 8, 8, offset_k=n % 8)
        if n // 8 % 2:
            small.stored = small.stored[:, ::-1].copy()  # flipped copies: more distinct volumes
        write_axial(small, folder / f"patient{n // 4:04d}" / f"series{n:04d}", patient_id=f"BENCH-{n // 4:04d}",
                    description=f"bench {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--model", default=None, help="model id or folder (default: a tiny random DINOv2, offline)")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--loader", default="processes", choices=("processes", "threads"))
    parser.add_argument("--work-dir", default=None, help="keep the derived series here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from RaptorExtension.cohort.job import BatchJob, BatchSources
    from RaptorExtension.cohort.run import run_batch
    from RaptorExtension.encoding.settings import EmbedSettings

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="raptor-bench-memory-"))
    cohort = work / f"cohort{args.volumes}"
    if not cohort.exists():
        t = time.perf_counter()
        write_cohort(cohort, args.volumes)
        print(f"wrote {args.volumes} series in {time.perf_counter() - t:.1f}s to {cohort}", file=sys.stderr)
    model = args.model
    if model is None:
        from conftest import make_tiny_model_dir

        model = str(make_tiny_model_dir(work / "tiny-model"))
    out = work / "memory.csv"
    for path in (out, work / "memory_errors.csv", work / "memory.batch.json"):
        path.unlink(missing_ok=True)

    samples: list[tuple[int, float]] = []
    baseline = {"before_job": rss_mb()}

    def progress(p) -> None:
        if p.phase == "embedding" and p.finished > len(samples):
            samples.append((p.finished, rss_mb()))

    job = BatchJob(csv=out, sources=BatchSources(folders=[str(cohort)]),
                   settings=EmbedSettings(model=model, k=args.k, grid=args.grid, device=args.device),
                   readers=args.readers, loader=args.loader)
    start = time.perf_counter()
    summary = run_batch(job, progress=progress)
    seconds = time.perf_counter() - start
    if summary.done + summary.failed != args.volumes:
        raise SystemExit(f"expected {args.volumes} volumes, got {summary.line()}")

    def at(n: int) -> float:
        return next(r for k, r in samples if k >= n)

    marks = sorted({1, 10, 25, 50, 100, 150, args.volumes // 2, args.volumes})
    half = [(k, r) for k, r in samples if k >= args.volumes // 2]
    import numpy as np

    slope = float(np.polyfit([k for k, _ in half], [r for _, r in half], 1)[0]) * 100 if len(half) > 2 else float("nan")
    result = {
        "volumes": args.volumes,
        "model": model if args.model else "tiny random DINOv2 (d=32, 56px)",
        "grid": args.grid,
        "device": args.device,
        "readers": f"{args.readers} {args.loader}",
        "seconds": round(seconds, 1),
        "rss_mb_before_job": round(baseline["before_job"], 1),
        "rss_mb_after_volume": {str(k): round(at(k), 1) for k in marks if k <= args.volumes},
        "rss_growth_mb_second_half_per_100_volumes": round(slope, 2),
        "rss_mb_range_after_volume_10": [round(min(r for k, r in samples if k >= 10), 2),
                                          round(max(r for k, r in samples if k >= 10), 2)],
        "rss_samples": len(samples),
        "peak_rss_mb_batch_process": round(peak_mb(), 1),
        "peak_rss_mb_largest_child": round(peak_mb(resource.RUSAGE_CHILDREN), 1),
        "csv_mb": round(out.stat().st_size / 2**20, 2),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
