"""RaptorProbe logic against a real MRML scene (slicer-core) and a real Raptor server: scores, charts, heatmaps, fits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import blob_volume, oblique_matrix, random_probe

from RaptorExtension.encoding.pipeline import Embedder
from RaptorExtension.encoding.settings import EmbedSettings
from RaptorExtension.errors import MetadataMismatch, RaptorError
from RaptorExtension.slicerlogic.node_attributes import read_embedding, write_embedding
from RaptorExtension.slicerlogic.probe import (
    HEATMAP_ATTRIBUTE,
    PLANE_ATTRIBUTE,
    ProbeLogic,
)
from RaptorExtension.volumes.slicer_io import (
    matrix_to_numpy,
    numpy_to_matrix,
    volume_from_node,
)


@pytest.fixture
def settings(tiny_model_dir) -> EmbedSettings:
    return EmbedSettings(model=str(tiny_model_dir), k=8, grid=16, preset="minmax", device="cpu")


def add_volume(scene, name="scan", seed=3):
    import slicer

    array, centre = blob_volume(np.random.default_rng(seed), with_blob=True)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array[:, :18, :16].copy())
    node.SetIJKToRASMatrix(numpy_to_matrix(oblique_matrix()))
    return node


def embed_node(node, embedder: Embedder):
    embedding = embedder.embed_volume(volume_from_node(node, id=node.GetName(), source=node.GetName()))
    write_embedding(node, embedding)
    return embedding


def test_apply_makes_a_scores_table_and_a_bar_chart(scene, settings, tiny_encoder, tmp_path):
    embedder = Embedder(settings, encoder=tiny_encoder)
    node = add_volume(scene)
    embedding = embed_node(node, embedder)
    logic = ProbeLogic(scene)
    with pytest.raises(RaptorError, match="load a probe file first"):
        logic.apply(node)
    probe_a = random_probe(embedder, classes=("liver", "spleen", "kidney"))
    probe_b = random_probe(embedder, task="binary", classes=("normal", "lesion"), seed=4)
    for name, probe in (("organ", probe_a), ("lesion", probe_b)):
        probe.name = name
        logic.loadProbe(probe.save(tmp_path / f"{name}.raptorprobe"))
    logic.loadProbe(tmp_path / "organ.raptorprobe")  # loading the same file again replaces it
    assert [p.name for p in logic.probes] == ["lesion", "organ"]
    results = logic.apply(node)
    assert [r.probe.name for r in results] == ["lesion", "organ"]
    np.testing.assert_allclose(results[1].scores, probe_a.scores(embedding.vector)[0], atol=1e-12)
    table = scene.GetFirstNodeByName("Raptor scores: scan")
    assert table.IsA("vtkMRMLTableNode") and table.GetNumberOfRows() == 5
    assert [table.GetCellText(r, 1) for r in range(5)] == ["normal", "lesion", "liver", "spleen", "kidney"]
    assert float(table.GetCellText(3, 4)) == pytest.approx(results[1].scores[1], abs=1e-6)
    chart = [scene.GetNthNodeByClass(i, "vtkMRMLPlotChartNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode"))]
    assert len(chart) == 1 and chart[0].GetNumberOfPlotSeriesNodes() == 1
    series = chart[0].GetNthPlotSeriesNode(0)
    assert series.GetPlotType() == series.PlotTypeBar and series.GetTableNodeID() == table.GetID()
    assert series.GetYColumnName() == "Score" and series.GetLabelColumnName() == "Label"
    assert not chart[0].GetYAxisRangeAuto()  # else qMRMLPlotView ignores the 0-1 range
    assert (chart[0].GetYAxisRange()[0], chart[0].GetYAxisRange()[1]) == (0.0, 1.0)
    assert logic.scoresNodes == (table, chart[0])
    logic.apply(node)  # applying again updates the same nodes instead of piling up new ones
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 1


def fitted_probe(embedder, columns: dict, n: int = 240, seed: int = 5):
    """A probe really fitted (C on val, Youden threshold on val) on synthetic features shaped like ``embedder``'s."""
    from pathlib import Path

    from RaptorExtension.probes.probe import EmbeddingSet, Labels, embedding_description, fit_probe

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, embedder.n_features)).astype(np.float32)
    values = {}
    for c, name in enumerate(columns):
        y = (rng.random(n) < columns[name]).astype(int)
        x[:, c] += 2.5 * y
        values[name] = [str(v) for v in y]
    ids = [f"v{i}" for i in range(n)]
    splits = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    embeddings = EmbeddingSet(ids=ids, features=x, sources=["synthetic"],
                              metadata=embedding_description(embedder.settings_metadata("minmax")))
    return fit_probe(embeddings, Labels(path=Path("labels.csv"), ids=ids, splits=splits, columns=values)).probe


@pytest.mark.slow
def test_apply_reports_the_decision_at_the_threshold_and_the_operating_point(scene, settings, tiny_encoder, tmp_path):
    """ProbeResult carries what the panel shows beside the bar chart: threshold, decision, sensitivity, specificity."""
    from pathlib import Path

    from RaptorExtension.probes.probe import Probe
    from RaptorExtension.slicerlogic.probe import probeResult

    embedder = Embedder(settings, encoder=tiny_encoder)
    node = add_volume(scene)
    embedding = embed_node(node, embedder)
    binary = fitted_probe(embedder, {"lesion": 0.15})
    binary.name = "lesion"
    labels = fitted_probe(embedder, {"cyst": 0.3, "calcified": 0.2}, seed=6)
    labels.name = "findings"
    logic = ProbeLogic(scene)
    for probe in (binary, labels):
        logic.loadProbe(probe.save(tmp_path / f"{probe.name}.raptorprobe"))
    first, second = logic.apply(node)

    t = binary.thresholds[0]
    p = float(first.scores[1])
    assert first.thresholds == {"1": t}
    assert first.decisions == {"0": p < t, "1": p >= t} and first.predicted == ("1" if p >= t else "0")
    point = first.operating_points["1"]
    test = binary.metrics["test"]
    assert point["split"] == "test" and point["in_sample"] is False and point["n"] == test["n"]
    assert (point["sensitivity"], point["specificity"]) == (test["sensitivity"], test["specificity"])
    assert point["sensitivity_ci95"] == test["ci95"]["sensitivity"] and len(point["specificity_ci95"]) == 2
    assert first.calibrated is False and first.notes == []
    line = first.describe()[0]
    assert line.startswith(f"1: p={p:.3f} ") and f"{t:.3f}" in line and "sensitivity" in line and "on test" in line

    scores = labels.scores(embedding.vector[None])[0]
    assert second.thresholds == dict(zip(["cyst", "calcified"], labels.thresholds))
    assert second.decisions == {name: bool(scores[c] >= labels.thresholds[c]) for c, name in enumerate(["cyst", "calcified"])}
    assert set(second.operating_points) == {"cyst", "calcified"}
    assert second.operating_points["calcified"]["specificity"] == labels.metrics["test"]["per_label"]["calcified"]["specificity"]

    # The scores table has the threshold, the decision and the rates beside each score.
    table = scene.GetFirstNodeByName("Raptor scores: scan")
    header = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert header[:6] == ["Probe", "Class", "Label", "Index", "Score", "Predicted"]
    assert header[6:] == ["Threshold", "Decision", "Sensitivity", "Specificity"]
    assert table.GetNumberOfRows() == 4
    assert float(table.GetCellText(1, 6)) == pytest.approx(t, abs=1e-5) and table.GetCellText(1, 7) == ("yes" if p >= t else "no")
    assert table.GetCellText(0, 7) == ("no" if p >= t else "yes") and np.isnan(float(table.GetCellText(0, 6)))
    assert float(table.GetCellText(1, 8)) == pytest.approx(point["sensitivity"], abs=1e-5)
    assert float(table.GetCellText(3, 9)) == pytest.approx(second.operating_points["calcified"]["specificity"], abs=1e-5)

    # A probe file from before thresholds decides at 0.5 and says so.
    data = Path(__file__).resolve().parent / "data"
    old = Probe.load(data / "probe_format1_binary.raptorprobe")
    vector = np.load(data / "probe_format1_features.npy")[0]
    result = probeResult(old, vector)
    assert result.thresholds == {"1": 0.5} and result.decisions["1"] == (result.scores[1] >= 0.5)
    assert len(result.notes) == 1 and "decisions use p >= 0.5" in result.notes[0]


def test_a_volume_without_an_embedding_is_embedded_by_the_embed_logic_on_the_server(scene, raptor_server, settings,
                                                                                      tiny_model_dir, tiny_encoder,
                                                                                      tmp_path):
    """Apply on a node with no embedding: the probe's settings go to the Raptor Embed logic, which embeds the node on
    the server with the tiny model folder (as the panel's Apply does, minus its confirmation dialog)."""
    from RaptorExtension.slicerlogic.embed import EmbedLogic

    embedder = Embedder(settings, encoder=tiny_encoder)
    probe = random_probe(embedder)
    probe.save(tmp_path / "p.raptorprobe")
    node = add_volume(scene, "fresh")
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    logic.loadProbe(tmp_path / "p.raptorprobe")
    with pytest.raises(RaptorError, match="fresh: has no Raptor embedding yet; embed it with RaptorEmbed first"):
        logic.apply(node)
    embed_logic = EmbedLogic(scene, compute=raptor_server.compute())
    asked = []

    def with_the_embed_logic(volume_node, wanted: EmbedSettings):
        asked.append(wanted)
        return embed_logic.embed(volume_node, wanted, waitForCompletion=True)

    logic.embedHook = with_the_embed_logic
    result = logic.apply(node)[0]
    assert len(asked) == 1 and (asked[0].k, asked[0].grid, asked[0].preset, asked[0].model) == (8, 16, "minmax",
                                                                                                 str(tiny_model_dir))
    stored = read_embedding(node)  # written on the node by the embed logic
    assert stored.metadata["encoder"] == str(tiny_model_dir) and stored.metadata["weight_sha256"] == tiny_encoder.weight_sha256
    here = embedder.embed_volume(volume_from_node(node, id="fresh", source="fresh"))
    np.testing.assert_array_equal(stored.vector, here.vector)  # the server's embedding, bit for bit
    np.testing.assert_allclose(result.scores, probe.scores(here.vector[None])[0], rtol=0, atol=1e-12)
    logic.apply(node)  # the stored embedding is used from now on
    assert len(asked) == 1
    other = add_volume(scene, "k4")
    embed_node(other, Embedder(EmbedSettings(model=settings.model, k=4, grid=16, preset="minmax"), encoder=tiny_encoder))
    with pytest.raises(MetadataMismatch, match=r"k4: cannot apply probe .*p\.raptorprobe: .*k 8 vs 4"):
        logic.apply(other)


def test_explain_makes_an_aligned_heatmap_curves_and_jumps(scene, raptor_server, settings, tiny_encoder, tmp_path):
    import slicer
    import vtk

    embedder = Embedder(settings, encoder=tiny_encoder)
    node = add_volume(scene)
    probe = random_probe(embedder)
    probe.name = "organ"
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    job = logic.explain(node, probe, "b")
    ex = job.explanation
    # The unsaved probe went to the server as a file in the logic's scratch folder, which cleanup removes.
    scratch = Path(logic._scratch.name)
    assert Path(probe.path).is_file() and scratch in Path(probe.path).parents
    heat = job.nodes["heatmap"]
    assert heat.GetName() == "scan b heatmap" and heat.GetAttribute(HEATMAP_ATTRIBUTE) == node.GetID()
    m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m1)
    heat.GetIJKToRASMatrix(m2)
    np.testing.assert_allclose(matrix_to_numpy(m1), matrix_to_numpy(m2), atol=1e-12)  # spacing/directions split: 1 ulp
    heat_array = slicer.util.arrayFromVolume(heat)
    assert heat_array.shape == slicer.util.arrayFromVolume(node).shape
    np.testing.assert_array_equal(heat_array, ex.heatmap)
    display = heat.GetDisplayNode()
    color = scene.GetNodeByID(display.GetColorNodeID())
    assert color is not None and "diverging" in color.GetName().lower()
    assert display.GetLevel() == 0.0 and display.GetWindow() == pytest.approx(2 * np.abs(ex.heatmap).max(), rel=1e-6)
    # Curve tables: the contributions of every slice plus the bias give the logit.
    tables = job.nodes["tables"]
    assert [t.GetAttribute(PLANE_ATTRIBUTE) for t in tables] == ["axial", "coronal", "sagittal"]
    total = sum(float(t.GetCellText(r, 4)) for t in tables for r in range(t.GetNumberOfRows()))
    assert abs(ex.decision - (ex.bias + total)) < 1e-4
    chart = job.nodes["chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    series = chart.GetNthPlotSeriesNode(1)
    assert series.GetAttribute(PLANE_ATTRIBUTE) == "coronal" and series.GetXColumnName() == "Slice"
    # Foreground layer in every slice view, and a click on a curve point moves the views to that slice.
    for name in ("Red", "Green", "Yellow"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
        slice_node = slicer.vtkMRMLSliceNode()
        slice_node.SetName(name)
        slice_node.SetLayoutName(name)
        scene.AddNode(slice_node)
    assert logic.showHeatmap(node, heat, opacity=0.4) == 3
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetBackgroundVolumeID() == node.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    logic.setHeatmapOpacity(0.7)
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    ras = logic.jumpToSlice(series, 5)
    np.testing.assert_allclose(ras, ex.slice_ras(1, 5))
    assert float(tables[1].GetCellText(5, 2)) == pytest.approx(ras[1], abs=1e-3)
    red = scene.GetNthNodeByClass(0, "vtkMRMLSliceNode")
    np.testing.assert_allclose([red.GetSliceToRAS().GetElement(i, 3) for i in range(3)], ras, atol=1e-6)
    with pytest.raises(RaptorError, match="slice 99 is outside the axial curve"):
        logic.jumpToSlice("axial", 99)
    # Explaining again updates the same nodes.
    again = logic.explain(node, probe, "b")
    assert again.nodes["heatmap"] is heat and scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    # The overlay measures against an empty slice unless asked for the training mean; both add up to the logit.
    assert ex.baseline == "background"
    against_mean = logic.explain(node, probe, "b", baseline="mean").explanation
    assert against_mean.baseline == "mean" and against_mean.decision == ex.decision and against_mean.bias != ex.bias
    assert abs(against_mean.residual) < 1e-4
    with pytest.raises(RaptorError, match="unknown explanation baseline"):
        logic.explain(node, probe, "b", baseline="zero")
    logic.cleanup()
    assert not scratch.exists()


def test_explanation_nodes_survive_saving_the_scene(scene, raptor_server, settings, tiny_encoder, tmp_path):
    import slicer

    node = add_volume(scene)
    probe = random_probe(Embedder(settings, encoder=tiny_encoder))
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    heat = logic.explain(node, probe, "a").nodes["heatmap"]
    for n in (node, heat):
        storage = n.CreateDefaultStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(tmp_path / f"{n.GetName().replace(' ', '_')}.nrrd"))
        assert storage.WriteData(n)
        n.SetAndObserveStorageNodeID(storage.GetID())
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
        table = scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
        storage = table.CreateDefaultStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(tmp_path / f"table{i}.tsv"))
        assert storage.WriteData(table)
        table.SetAndObserveStorageNodeID(storage.GetID())
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    heat2 = reloaded.GetFirstNodeByName("scan a heatmap")
    assert heat2 is not None and heat2.GetAttribute(HEATMAP_ATTRIBUTE) == node.GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat2), slicer.util.arrayFromVolume(heat), atol=1e-6)
    axial = reloaded.GetFirstNodeByName("scan a slice attention (axial)")
    assert axial is not None and axial.GetAttribute(PLANE_ATTRIBUTE) == "axial" and axial.GetNumberOfRows() == 16
    assert reloaded.GetFirstNodeByName("scan a slice attention").GetNumberOfPlotSeriesNodes() == 3


def scene_counts(scene) -> dict:
    return {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLScalarVolumeNode", "vtkMRMLTableNode",
                                                          "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")}


def test_cancelled_explanation_leaves_no_nodes(scene, raptor_server, settings, tiny_encoder):
    """Cancelled before anything was sent: nothing on the server, nothing in the scene."""
    node = add_volume(scene)
    probe = random_probe(Embedder(settings, encoder=tiny_encoder))
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    finished = []
    job = logic.explain(node, probe, waitForCompletion=False, completionCallback=finished.append)
    job.cancel()
    while logic.poll():
        pass
    assert job.status == "cancelled" and finished == [job] and job.remote.job_id is None  # nothing was even sent
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    mlp = random_probe(Embedder(settings, encoder=tiny_encoder))
    mlp.model = "mlp"
    with pytest.raises(RaptorError, match="is an MLP"):
        logic.explain(node, mlp)


def test_an_explanation_cancelled_mid_run_on_the_server_leaves_no_heatmap_table_or_chart(scene, raptor_server,
                                                                                         slow_model_dir):
    """Cancelled while the server encodes the slices: the job stops there and the scene gets none of its nodes."""
    import time

    slow = EmbedSettings(model=str(slow_model_dir), k=8, grid=96, preset="minmax", device="cpu")  # 288 slices
    probe = random_probe(Embedder(slow))
    node = add_volume(scene)
    before = scene_counts(scene)
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    seen, finished = [], []
    job = logic.explain(node, probe, "b", waitForCompletion=False, progressCallback=lambda d, t: seen.append((d, t)),
                        completionCallback=finished.append)
    deadline = time.monotonic() + 120
    while not (seen and seen[-1][0] > 0):  # the main thread's timer, until the server has encoded some slices
        assert logic.poll(), (job.status, job.error)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    logic.cancel()
    while logic.poll():
        time.sleep(0.005)
    assert job.status == "cancelled" and finished == [job] and job.remote.job_id is not None
    state = job.remote.snapshot  # the server's last word on the job
    assert state["state"] == "cancelled" and 0 < state["done"] < state["total"] == 3 * 96
    assert job.explanation is None and job.nodes == {} and logic.lastExplanation is None
    assert scene_counts(scene) == before  # no heatmap volume, no curve tables, no chart or series


def test_fit_on_the_server_writes_the_probe_its_metrics_and_its_plot(scene, raptor_server, tmp_path):
    """The panel's Fit: the files land beside the chosen output, as `raptor probe fit` names them."""
    import csv

    from RaptorExtension.embeddings.embedding import Embedding, build_metadata
    from RaptorExtension.embeddings.table import write_table
    from RaptorExtension.probes.probe import Probe

    rng = np.random.default_rng(0)
    embeddings, labels = [], []
    for i in range(60):
        y = i % 2
        meta = build_metadata(encoder="tiny", weight_sha256="0" * 64, k=2, seed=0, projection_sha256="1" * 64,
                              planes=["axial"], grid=16, image_size=56, preset="minmax", keep_cls=False, n_features=6,
                              shape=[1, 2, 1, 3], id=f"v{i}")
        embeddings.append(Embedding(rng.normal(y * 1.5, 1.0, size=6).astype(np.float32), meta))
        labels.append([f"v{i}", ("train", "val", "test")[i % 3], str(y)])
    table, label_file = write_table(tmp_path / "emb.csv", embeddings), tmp_path / "labels.csv"
    with open(label_file, "w", newline="") as handle:
        csv.writer(handle).writerows([["id", "split", "finding"], *labels])
    logic = ProbeLogic(scene, compute=raptor_server.compute())
    for unset in ("", ".", None):  # what an unset path parameter shows in the panel
        with pytest.raises(RaptorError, match="choose an embedding CSV, a labels CSV and where to save the probe"):
            logic.fit(unset, label_file, tmp_path / "p.raptorprobe")
    job = logic.fit(table, label_file, tmp_path / "finding", select="cv", cGrid=[0.1, 1.0], waitForCompletion=True)
    assert job.status == "done", job.error
    names = sorted(p.name for p in job.files)
    assert names == ["finding.raptorprobe", "finding_metrics.json", "finding_reliability.png", "finding_roc.png"]
    probe = Probe.load(tmp_path / "finding.raptorprobe")
    assert probe.classes == ["0", "1"] and probe.name == "finding" and job.probe.classes == probe.classes
    assert "auc" in job.report.lower()
    assert (tmp_path / "finding_roc.png").read_bytes().startswith(b"\x89PNG")
    assert "decides p(1) >= " in job.report  # the operating threshold, chosen on out-of-fold predictions
    # The clinical options travel to the server; a bad one is refused there in one line.
    job = logic.fit(table, label_file, tmp_path / "sens", select="cv", cGrid=[1.0], threshold="sensitivity:0.9",
                    classWeight="balanced", calibrate="sigmoid", waitForCompletion=True)
    assert Probe.load(tmp_path / "sens.raptorprobe").threshold_info["criterion"] == "sensitivity"
    with pytest.raises(RaptorError, match="threshold 'sometimes'"):
        logic.fit(table, label_file, tmp_path / "bad", threshold="sometimes", waitForCompletion=True)


@pytest.mark.slow
def test_apply_on_a_volume_without_an_embedding_never_imports_torch(tmp_path):
    """Slicer builds Apply's path before PyTorch is installed: asking which embedding a probe needs stays torch-free."""
    import subprocess
    import sys
    import textwrap

    from RaptorExtension.embeddings.embedding import build_metadata
    from RaptorExtension.probes.probe import Probe, embedding_description

    meta = build_metadata(encoder="tiny", weight_sha256="0" * 64, k=2, seed=0, projection_sha256="1" * 64,
                          planes=["axial"], grid=8, image_size=56, preset="minmax", keep_cls=False, n_features=8,
                          shape=[1, 2, 2, 2])
    probe = Probe(task="binary", model="logistic", classes=["a", "b"], label_columns=["y"], feature_mean=np.zeros(8),
                  feature_scale=np.ones(8), weight=np.ones((1, 8)), bias=np.zeros(1), embedding=embedding_description(meta))
    path = probe.save(tmp_path / "p.raptorprobe")
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import slicer
        from RaptorExtension.errors import RaptorError
        from RaptorExtension.slicerlogic.probe import ProbeLogic
        scene = slicer.vtkMRMLScene()
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fresh")
        slicer.util.updateVolumeFromArray(node, np.arange(64, dtype=np.int16).reshape(4, 4, 4))
        asked = []
        logic = ProbeLogic(scene, embedHook=lambda n, s: asked.append(s) or (_ for _ in ()).throw(RaptorError("declined")))
        logic.loadProbe({str(path)!r})
        try:
            logic.apply(node)
        except RaptorError as exc:
            print("error:", exc)
        print("asked", asked[0].k, asked[0].grid)
        print("heavy", [m for m in ("torch", "transformers", "sklearn") if m in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error: declined" in done.stdout and "asked 2 8" in done.stdout
    assert "heavy []" in done.stdout, done.stdout
