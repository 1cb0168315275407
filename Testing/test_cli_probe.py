"""`raptor probe fit|apply|info` and `raptor explain` end to end on small data with the tiny model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import blob_volume, oblique_matrix, write_volume

from RaptorExtension.cli import main
from RaptorExtension.probes.probe import Probe, load_embeddings

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

SPLIT_SIZES = {"train": 20, "val": 8, "test": 8}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_model_dir):
    """A MedMNIST-style .npz of blob / no-blob volumes, embedded with `raptor embed`, and its labels."""
    folder = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(5)
    arrays, rows, centres = {}, [], {}
    for split, count in SPLIT_SIZES.items():
        images = []
        for i in range(count):
            array, centre = blob_volume(rng, with_blob=i % 2 == 1)
            images.append(array.astype(np.uint8))
            rows.append((f"{split}_{i}", split, i % 2))
            centres[f"{split}_{i}"] = centre
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array([[i % 2] for i in range(count)])
    np.savez(folder / "cohort.npz", **arrays)
    (folder / "labels.csv").write_text("id,split,blob\n" + "".join(f"{i},{s},{y}\n" for i, s, y in rows))
    code = main(["embed", str(folder / "cohort.npz"), "--model", str(tiny_model_dir), "--k", "8", "--grid", "native",
                 "--preset", "uint8", "--device", "cpu", "--csv", str(folder / "emb.csv"), "-q"])
    assert code == 0
    return folder, centres


def embedding_rows(path) -> dict[str, np.ndarray]:
    """id -> feature row of an embedding CSV, read with the csv module (the e0... columns as float32)."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        columns = [i for i, name in enumerate(header) if name.startswith("e") and name[1:].isdigit()]
        return {row[0]: np.array([row[i] for i in columns], dtype=np.float32).astype(np.float64) for row in reader}


def independent_logit(probe_path, table, volume_id: str) -> float:
    """w . (x - mean) / scale + b from the probe file's own arrays and the CSV row, in numpy."""
    probe = Probe.load(probe_path)
    x = embedding_rows(table)[volume_id]
    return float(probe.weight[0] @ ((x - probe.feature_mean) / probe.feature_scale) + probe.bias[0])


def curve_values(path) -> dict[str, np.ndarray]:
    """plane -> its slice curve, from a ``--curves`` CSV (contributions in slice order)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["plane", "slice", "r", "a", "s", "contribution"]
    planes = {}
    for row in rows:
        planes.setdefault(row["plane"], []).append((int(row["slice"]), float(row["contribution"])))
    return {plane: np.array([v for _i, v in sorted(values)]) for plane, values in planes.items()}


def read_nrrd(path) -> np.ndarray:
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return slicer.util.arrayFromVolume(node).copy()


def test_fit_apply_info_explain(cohort, tiny_model_dir, capsys, tmp_path):
    folder, centres = cohort
    probe_path = tmp_path / "out" / "blob.raptorprobe"
    assert main(["probe", "fit", str(folder / "emb.csv"), str(folder / "labels.csv"), "-o", str(probe_path), "-q"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "binary probe (logistic), C=" in out and "chosen by validation" in out
    lines = out.splitlines()
    assert lines[1].startswith("decides p(1) >= ") and "Youden" in lines[1] and "chosen on val" in lines[1]
    first = next(i for i, line in enumerate(lines) if line.startswith("split"))
    rows = lines[first + 1: lines.index("", first)]
    table = {line.split()[0]: line.split() for line in rows}
    assert set(table) == {"train*", "val", "test"} and float(table["test"][2]) > 0.8  # test AUC; train is in-sample
    report = json.loads((tmp_path / "out" / "blob_metrics.json").read_text())
    assert report["metrics"]["test"]["n"] == 8 and report["selection"]["parameter"] == "C"
    at_edge = report["selection"]["chosen"] in (0.01, 100.0)  # the paper's grid
    assert len(report["warnings"]) == at_edge and ("raptor: warning: C=" in captured.err) == at_edge
    assert (tmp_path / "out" / "blob_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    scores_csv = tmp_path / "scores.csv"
    assert main(["probe", "apply", str(probe_path), str(folder / "emb.csv"), "-o", str(scores_csv)]) == 0
    with open(scores_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows][:2] == ["train_0", "train_1"] and len(rows) == sum(SPLIT_SIZES.values())
    assert list(rows[0]) == ["id", "predicted", "p_0", "p_1", "threshold"]
    probe = Probe.load(probe_path)
    expected = probe.scores(load_embeddings([folder / "emb.csv"]).features)[:, 1]
    np.testing.assert_allclose([float(r["p_1"]) for r in rows], expected, atol=1e-5)

    assert main(["probe", "info", str(probe_path)]) == 0
    info = capsys.readouterr().out
    assert "task        binary (logistic); 0, 1" in info and "K=8" in info and "grid=native" in info and "preset=uint8" in info
    assert main(["probe", "info", str(probe_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["embedding"]["k"] == 8

    # Explain one held-out positive read from the .npz (no geometry: native grid = the array itself).
    png, curves, heat = tmp_path / "ex.png", tmp_path / "curves.csv", tmp_path / "heat.nrrd"
    target = "test_3"
    code = main(["explain", str(probe_path), f"{folder / 'cohort.npz'}#{target}", "-o", str(png), "--curves", str(curves),
                 "--heatmap", str(heat), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{target}: blob = 1 score ") and "residual" in printed  # volume, label column, class
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plane_curves = curve_values(curves)
    assert list(plane_curves) == ["axial", "coronal", "sagittal"] and all(len(c) == 20 for c in plane_curves.values())
    # The files hold one decomposition: the heatmap's voxels (native grid: the cube itself) add up to the curves.
    total = sum(c.sum() for c in plane_curves.values())
    assert read_nrrd(heat).astype(np.float64).sum() == pytest.approx(total, rel=1e-5, abs=1e-5)
    # Against the training mean the bias is the probe's own, so the curves plus the saved probe's bias must give
    # the logit computed here from the saved probe's arrays and the embedding CSV's row, by plain numpy.
    mean_curves = tmp_path / "curves_mean.csv"
    assert main(["explain", str(probe_path), f"{folder / 'cohort.npz'}#{target}", "-o", str(tmp_path / "m.png"),
                 "--curves", str(mean_curves), "--baseline", "mean", "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    logit = independent_logit(probe_path, folder / "emb.csv", target)
    assert sum(c.sum() for c in curve_values(mean_curves).values()) + probe.bias[0] == pytest.approx(logit, abs=1e-4)


def test_explain_writes_an_aligned_heatmap(cohort, tmp_path, capsys):
    """A volume with real (oblique) geometry: the heatmap NRRD has the input's grid and IJK-to-RAS."""
    import slicer

    from RaptorExtension.volumes.slicer_io import matrix_to_numpy

    folder, _ = cohort
    probe_path = tmp_path / "p.raptorprobe"
    assert main(["probe", "fit", str(folder / "emb.csv"), str(folder / "labels.csv"), "-o", str(probe_path), "-q"]) == 0
    rng = np.random.default_rng(11)
    array, centre = blob_volume(rng, with_blob=True)
    matrix = oblique_matrix()
    volume_path = write_volume(tmp_path / "scan.nrrd", array.astype(np.int16), matrix)
    heat_path = tmp_path / "heat.nrrd"
    assert main(["explain", str(probe_path), str(volume_path), "-o", str(tmp_path / "x.png"), "--heatmap", str(heat_path),
                 "--slices", "mid", "--device", "cpu"]) == 0
    capsys.readouterr()
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(heat_path))
    assert storage.ReadData(node)
    heat = slicer.util.arrayFromVolume(node)
    assert heat.shape == array.shape
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(matrix_to_numpy(m), matrix, atol=1e-5)
    peak = np.array(np.unravel_index(np.argmax(heat), heat.shape))
    assert np.linalg.norm(peak - centre) <= 3.0
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_cli_refusals_are_one_line(cohort, tiny_model_dir, tmp_path, capsys):
    folder, _ = cohort
    probe_path = tmp_path / "p.raptorprobe"
    assert main(["probe", "fit", str(folder / "emb.csv"), str(folder / "labels.csv"), "-o", str(probe_path), "-q"]) == 0
    capsys.readouterr()
    # Embeddings made with another K.
    assert main(["embed", f"{folder / 'cohort.npz'}#test_0", "--model", str(tiny_model_dir), "--k", "4", "--grid", "native",
                 "--preset", "uint8", "--device", "cpu", "-o", str(tmp_path / "k4"), "-q"]) == 0
    capsys.readouterr()
    assert main(["probe", "apply", str(probe_path), str(tmp_path / "k4")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot apply probe" in err and "k 8 vs 4" in err
    # A truncated probe file.
    broken = tmp_path / "broken.raptorprobe"
    broken.write_bytes(probe_path.read_bytes()[:500])
    assert main(["probe", "info", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"raptor: error: {broken}: not a Raptor probe (not a ZIP archive, or truncated)"
    # Explaining with another encoder than the probe's is refused before encoding.
    from conftest import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other-model", seed=3)
    assert main(["explain", str(probe_path), f"{folder / 'cohort.npz'}#test_1", "--model", str(other), "--device", "cpu",
                 "-o", str(tmp_path / "no.png")]) == 1
    err = capsys.readouterr().err
    assert "encoder weights differ" in err and not (tmp_path / "no.png").exists()


def test_regression_fit_through_the_cli(cohort, tmp_path, capsys):
    """The saved ridge probe and its metrics equal a closed-form ridge written here in numpy from the same CSVs."""
    folder, centres = cohort
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    # Target: blob depth (slice of the centre), 10 for volumes without a blob.
    lines = ["id,split,depth"] + [f"{r['id']},{r['split']},{centres[r['id']][0] if centres[r['id']] is not None else 10}" for r in rows]
    (tmp_path / "reg.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "depth.raptorprobe"
    assert main(["probe", "fit", str(folder / "emb.csv"), str(tmp_path / "reg.csv"), "--task", "regression", "-o", str(out),
                 "-q"]) == 0
    printed = capsys.readouterr().out
    assert "regression probe (ridge), alpha=" in printed and "r2" in printed
    assert (tmp_path / "depth_pred.png").read_bytes()[:4] == b"\x89PNG"
    probe = Probe.load(out)
    report = json.loads((tmp_path / "depth_metrics.json").read_text())

    features = embedding_rows(folder / "emb.csv")
    x = {s: np.stack([features[r["id"]] for r in rows if r["split"] == s]) for s in SPLIT_SIZES}
    y = {s: np.array([float(line.split(",")[2]) for line in lines[1:] if line.split(",")[1] == s]) for s in SPLIT_SIZES}
    mean, scale = x["train"].mean(axis=0), x["train"].std(axis=0)
    scale[~(scale > 1e-12)] = 1.0  # constant features carry nothing
    z = {s: (x[s] - mean) / scale for s in SPLIT_SIZES}

    def ridge(alpha: float) -> tuple[np.ndarray, float]:
        """min |y - Zw - b|^2 + alpha |w|^2 in its dual form (20 rows, 3 * 8 * 4 features)."""
        zt, yt = z["train"], y["train"] - y["train"].mean()  # Z is centred on train by construction
        w = zt.T @ np.linalg.solve(zt @ zt.T + alpha * np.eye(len(zt)), yt)
        return w, float(y["train"].mean())

    def val_score(alpha: float) -> float:
        w, b = ridge(alpha)
        return -float(np.mean((z["val"] @ w + b - y["val"]) ** 2) / np.var(y["val"]))

    grid = report["selection"]["grid"]
    chosen = max(grid, key=val_score)  # alpha chosen on val, as the README says
    assert report["selection"]["chosen"] == chosen and report["selection"]["method"] == "val"
    w, b = ridge(chosen)
    np.testing.assert_allclose(probe.feature_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(probe.feature_scale, scale, rtol=1e-12)
    np.testing.assert_allclose(probe.weight[0], w, rtol=1e-6, atol=1e-9 * np.abs(w).max())
    assert probe.bias[0] == pytest.approx(b, rel=1e-9)
    for split in SPLIT_SIZES:
        pred, truth = z[split] @ w + b, y[split]
        np.testing.assert_allclose(probe.scores(x[split].astype(np.float32)), pred[:, None], rtol=1e-6, atol=1e-6)
        metrics = report["metrics"][split]
        assert metrics["n"] == len(truth)
        assert metrics["r2"] == pytest.approx(np.corrcoef(pred, truth)[0, 1] ** 2, rel=1e-6)  # Pearson r^2
        assert metrics["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), rel=1e-6)
        assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), rel=1e-6)


def test_fit_with_cv_marks_in_sample_splits_and_names_the_metric(cohort, tmp_path, capsys):
    """--select cv fits on train+val: val's numbers are in-sample and must not read as held out."""
    folder, _ = cohort
    probe_path = tmp_path / "cv.raptorprobe"
    assert main(["probe", "fit", str(folder / "emb.csv"), str(folder / "labels.csv"), "-o", str(probe_path),
                 "--select", "cv", "--folds", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("split"))
    rows = {line.split()[0] for line in lines[first + 1: lines.index("", first)]}
    assert rows == {"train*", "val*", "test", "oof"}  # oof: out-of-fold predictions, held out by construction
    assert "* in-sample: the final model was fitted on these rows" in lines
    assert "C=0.01: cv AUC " in captured.err and "score" not in captured.err.replace("scores", "")
    assert main(["probe", "info", str(probe_path)]) == 0
    assert "val*" in capsys.readouterr().out
    assert json.loads((tmp_path / "cv_metrics.json").read_text())["selection"]["metric"] == "AUC"
