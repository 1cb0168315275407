"""What the Raptor Probe panel prints about a probe and its scores: decisions at the operating threshold, not 0.5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import imbalanced_task, synthetic_embeddings

from RaptorExtension.probes.probe import FitOptions, Labels, fit_probe
from RaptorExtension.slicerlogic.probe import ProbeLogic, probeResult


def fitted_probe(**options):
    x, y = imbalanced_task(240, prevalence=0.2, shift=3.0, seed=4)
    splits = ["train"] * 140 + ["val"] * 50 + ["test"] * 50
    embeddings = synthetic_embeddings(x)
    labels = Labels(path=Path("labels.csv"), ids=embeddings.ids, splits=splits, columns={"finding": [str(v) for v in y]})
    probe = fit_probe(embeddings, labels, FitOptions(c_grid=(0.1, 1.0), bootstrap=200, **options)).probe
    probe.name = "finding"
    return probe, x, y


def test_the_panel_shows_the_decision_at_the_threshold_with_its_measured_rates():
    probe, x, _ = fitted_probe()
    threshold = probe.thresholds[0]
    assert threshold != 0.5  # Youden on 20% prevalence: the threshold the panel must show, not 0.5
    p = probe.scores(x)[:, 1]
    between = int(np.argmin(np.where((p >= threshold) & (p < 0.5), p, np.inf)))  # "yes" here, "no" at 0.5
    assert threshold <= p[between] < 0.5
    result = probeResult(probe, x[between])
    text = ProbeLogic.describeResults([result])
    first, line = text.splitlines()[:2]
    assert first == "finding:"
    assert line.strip().startswith(f"1: p={p[between]:.3f} >= {threshold:.3f}: yes; sensitivity ")
    assert "on test (n=50)" in line and "specificity" in line
    assert any(line.startswith("decides p(1) >= ") and "Youden" in line for line in ProbeLogic.describeDecisions(probe))


def test_calibrated_and_weighted_probes_say_so():
    probe, x, _ = fitted_probe(class_weight="balanced", calibrate="sigmoid")
    text = ProbeLogic.describeResults([probeResult(probe, x[0])])
    assert text.splitlines()[0] == "finding (calibrated probabilities):"
    lines = ProbeLogic.describeDecisions(probe)
    assert any("class weight balanced" in line and "sigmoid calibration" in line for line in lines)


def test_a_probe_made_with_a_projector_file_is_refused_in_slicer_terms(tmp_path):
    """The panels cannot send a projector file: say what works instead, before any volume is sent."""
    import pytest
    import slicer

    from RaptorExtension.errors import RaptorError

    probe, _, _ = fitted_probe()
    probe.embedding = dict(probe.embedding, projection="file", seed=None)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6), np.int16))
    logic = ProbeLogic(scene, embedHook=lambda n, s: pytest.fail("nothing may be embedded"))
    for attempt in (lambda: logic.explain(node, probe), lambda: logic.embeddingFor(node, probe)):
        with pytest.raises(RaptorError, match="projector file .*raptor explain PROBE VOLUME --projection-file"):
            attempt()
