"""A PACS against a folder: listing and retrieving over DICOMweb, building DICOM results, batch throughput.

Starts Debian's Orthanc with its DICOMweb plugin on a free loopback port
(``Testing/orthanc_server.py``; needs ``apt-get install orthanc orthanc-dicomweb``),
stores the shared CT and a cohort of derived series in it, then measures
(median of ``--repeat`` runs):

``list``      QIDO-RS (studies, then series) vs a header scan of the folder;
``retrieve``  WADO-RS of the 134-slice CT into the loader and Slicer's reader vs
              reading the folder (header scan, Slicer's reader);
``results``   building and writing the SR (scores only, as ``probe apply`` writes it;
              scores and slice curves, as ``explain`` does) and the
              Parametric Map of the CT (an explanation by a tiny random model:
              the build does not depend on the model, only on the grid and the
              series);
``batch``     ``run_batch`` over ``--series`` derived series (every 2nd pixel,
              a 60-slice run each) from the PACS and from the folder, with the
              same tiny model, loaders and grid: series per second.

    nice -n 10 .venv/bin/python bench/dicomweb.py --json out/dicomweb.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_cohort(folder: Path, count: int) -> list:
    import numpy as np
    from conftest import DICOM_SERIES
    from derived_dicom import StoredCT, read_stored_ct, write_axial

    ct = read_stored_ct(DICOM_SERIES)
    dx, dy, dz = ct.spacing
    written = []
    for n in range(count):
        offset = (n * 5) % (ct.stored.shape[0] - 60)
        stored = np.ascontiguousarray(ct.stored[offset : offset + 60, ::2, ::2])
        part = StoredCT(stored, ct.origin + np.array([0.0, 0.0, offset * dz]), (dx * 2, dy * 2, dz), ct.template)
        written.append(write_axial(part, folder / f"series{n:03d}", patient_id=f"BENCH-{n:03d}", description=f"bench {n}"))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--series", type=int, default=12, help="derived series in the batch cohort (default 12)")
    parser.add_argument("--grid", type=int, default=64, help="cube of the batch and of the explanation (default 64)")
    parser.add_argument("--sr-grid", type=int, default=256, help="cube of the explanation whose curves go into the SR (default 256)")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from conftest import DICOM_SERIES, make_tiny_model_dir
    from orthanc_server import OrthancServer, orthanc_missing

    from RaptorExtension.cohort.dicomweb import DicomWebAccess, discover_dicomweb, load_series, store
    from RaptorExtension.cohort.job import BatchJob, BatchSources
    from RaptorExtension.cohort.run import run_batch
    from RaptorExtension.cohort.sources import SeriesFilter, discover_folder
    from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
    from RaptorExtension.probes.dicom_results import parametric_map, read_source_folder, score_report, write_dicom
    from RaptorExtension.probes.explain import explain_volume
    from RaptorExtension.volumes.readers import read_volume

    missing = orthanc_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if not DICOM_SERIES.exists():
        print(f"shared CT not found at {DICOM_SERIES}", file=sys.stderr)
        return 2
    report: dict = {"repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="raptor-dicomweb-bench-") as tmp:
        tmp = Path(tmp)
        server = OrthancServer.start(tmp / "orthanc")
        try:
            access = DicomWebAccess(server.dicomweb, server.user, server.password)
            import pydicom

            ct_files = sorted(DICOM_SERIES.glob("*.dcm"))
            datasets = [pydicom.dcmread(str(f)) for f in ct_files]
            start = time.perf_counter()
            for n in range(0, len(datasets), 20):
                store(access, datasets[n : n + 20])
            report["stow_ct_seconds"] = time.perf_counter() - start
            del datasets
            only_ct = SeriesFilter(modalities=("CT",))

            # -- list and retrieve the shared CT
            report["list_dicomweb_seconds"], (found, _) = timed(lambda: discover_dicomweb(access, only_ct), args.repeat)
            item = found.items[0]
            report["list_disk_seconds"], _ = timed(lambda: discover_folder(DICOM_SERIES), args.repeat)
            report["retrieve_dicomweb_seconds"], from_web = timed(lambda: load_series(access, item, "ct"), args.repeat)
            report["read_disk_seconds"], from_disk = timed(lambda: read_volume(str(DICOM_SERIES)), args.repeat)
            import numpy as np

            assert np.array_equal(from_web.array, from_disk.array), "retrieved voxels differ from the files'"
            report["ct"] = {"slices": int(from_disk.array.shape[0]), "shape": list(from_disk.array.shape),
                            "megabytes": round(sum(f.stat().st_size for f in ct_files) / 1e6, 1)}

            # -- build the SR and the Parametric Map of the CT
            model = make_tiny_model_dir(tmp / "model")
            sys.path.insert(0, str(ROOT / "Testing"))
            from helpers import random_probe

            embedder = Embedder(EmbedSettings(model=str(model), k=4, grid=args.sr_grid, preset="minmax", device="cpu"))
            probe = random_probe(embedder, classes=("normal", "abnormal"), task="binary")
            probe.name = "bench"
            probe.save(tmp / "bench.raptorprobe")
            explained = explain_volume(probe, embedder, from_disk)
            explanation = explained.explain("abnormal")
            source = read_source_folder(DICOM_SERIES)
            report["sr_scores_build_seconds"], _ = timed(lambda: score_report(source, probe, explained.scores),
                                                         args.repeat)
            report["sr_build_seconds"], sr = timed(lambda: score_report(source, probe, explained.scores,
                                                                        explanation=explanation), args.repeat)
            report["pm_build_seconds"], pm = timed(lambda: parametric_map(source, probe, explanation), args.repeat)
            start = time.perf_counter()
            write_dicom(sr, tmp / "sr.dcm")
            write_dicom(pm, tmp / "pm.dcm")
            report["results_write_seconds"] = time.perf_counter() - start
            report["sr_megabytes"] = round((tmp / "sr.dcm").stat().st_size / 1e6, 2)
            report["pm_megabytes"] = round((tmp / "pm.dcm").stat().st_size / 1e6, 1)
            report["sr_grid"] = args.sr_grid

            # -- batch throughput, PACS vs folder
            cohort = write_cohort(tmp / "cohort", args.series)
            server.upload([f for w in cohort for f in w.files])
            settings = EmbedSettings(model=str(model), k=4, grid=args.grid, preset="minmax", device="cpu")
            pacs_only = SeriesFilter(modalities=("CT",), description="^bench ")
            for name, sources in (("disk", BatchSources(folders=[str(tmp / "cohort")])),
                                  ("dicomweb", BatchSources(dicomweb=[access]))):
                job = BatchJob(csv=tmp / f"{name}.csv", sources=sources, settings=settings, filters=pacs_only,
                               readers=args.readers, loader="processes")
                start = time.perf_counter()
                summary = run_batch(job)
                wall = time.perf_counter() - start
                assert summary.done == args.series and summary.failed == 0, summary.line()
                report[f"batch_{name}"] = {"series": summary.done, "wall_seconds": round(wall, 2),
                                           "embedding_seconds": round(summary.seconds, 2),
                                           "series_per_second": round(summary.volumes_per_second, 3)}
            report["batch"] = {"grid": args.grid, "readers": args.readers, "slices_per_series": 60, "pixels": "256x256"}
        finally:
            server.stop()
    for key, value in report.items():
        print(f"{key:28s} {value if not isinstance(value, float) else round(value, 3)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
