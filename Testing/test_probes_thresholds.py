"""Operating thresholds, class weighting, calibration and the metrics a clinician reads (fast: synthetic, no model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import imbalanced_task, synthetic_embeddings

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.embeddings.table import write_table
from RaptorExtension.errors import InputError, RaptorError
from RaptorExtension.probes.calibration import fit_calibration
from RaptorExtension.probes.metrics import (
    ThresholdRule,
    _auc_rows,
    choose_threshold,
    operating_metrics,
    parse_threshold,
)
from RaptorExtension.probes.probe import FitOptions, Labels, Probe, fit_probe
from RaptorExtension.probes.probe_file import read_probe_file, write_probe_file

DATA = Path(__file__).resolve().parent / "data"


def split_list(train: int, val: int, test: int) -> list[str]:
    return ["train"] * train + ["val"] * val + ["test"] * test


def fit(x, y, splits, options=None, columns=None):
    embeddings = synthetic_embeddings(x)
    labels = Labels(path=Path("labels.csv"), ids=list(embeddings.ids), splits=list(splits),
                    columns=columns or {"finding": [str(int(v)) for v in y]})
    return fit_probe(embeddings, labels, options or FitOptions())


def imbalance_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "of the rows fitted on" in w]


def balanced_accuracy(y, decided):
    return 0.5 * (np.mean(decided[y == 1]) + np.mean(~decided[y == 0]))


def auc(y, p):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, p)


# ---------------------------------------------------------------------------
# Choosing the threshold


def test_youden_finds_the_known_best_threshold_and_the_rate_targets_hold():
    """Two unit-variance Gaussians 2 apart, 10% positives, scored by the true posterior: Youden's best is 0.1."""
    rng = np.random.default_rng(0)
    y = (rng.random(40000) < 0.1).astype(int)
    x = rng.normal(size=y.size) + 2.0 * y
    p = 1.0 / (1.0 + np.exp(-(np.log(0.1 / 0.9) + 2.0 * x - 2.0)))
    assert choose_threshold(y, p, ThresholdRule("youden")) == pytest.approx(0.1, abs=0.02)
    for criterion, target in (("sensitivity", 0.95), ("specificity", 0.9)):
        t = choose_threshold(y, p, ThresholdRule(criterion, target))
        positives, negatives = p[y == 1], p[y == 0]
        rate = np.mean(positives >= t) if criterion == "sensitivity" else np.mean(negatives < t)
        assert rate >= target
        # ... and it is the best such threshold: one more positive missed (or negative flagged) breaks the target.
        if criterion == "sensitivity":
            assert np.mean(positives > positives[positives >= t].min()) < target
        else:
            assert np.mean(negatives < negatives[negatives < t].max()) < target
    assert choose_threshold(y, p, ThresholdRule("fixed", 0.3)) == 0.3
    assert choose_threshold(y, p, ThresholdRule("none")) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.zeros(5), np.linspace(0, 1, 5), ThresholdRule("youden"))


def test_threshold_rules_parse_or_say_what_is_accepted():
    assert parse_threshold("youden") == ThresholdRule("youden")
    assert parse_threshold("Sensitivity:0.95") == ThresholdRule("sensitivity", 0.95)
    assert parse_threshold("specificity:0.90") == ThresholdRule("specificity", 0.9)
    assert parse_threshold("0.3") == ThresholdRule("fixed", 0.3)
    assert parse_threshold("none") == ThresholdRule("none")
    for bad in ("sensitivity:1.5", "sensitivity:", "recall:0.9", "1.2", "0", "best"):
        with pytest.raises(RaptorError, match="youden, sensitivity:0.95"):
            parse_threshold(bad)


def test_on_an_imbalanced_task_the_chosen_threshold_beats_one_half():
    """10% positives: at p >= 0.5 the probe misses most positives; the Youden threshold (near 0.1) finds them."""
    x, y = imbalanced_task(1200, seed=1)
    splits = split_list(600, 300, 300)
    test = np.array(splits) == "test"
    result = fit(x, y, splits)
    probe = result.probe
    assert probe.threshold_info["criterion"] == "youden" and probe.threshold_info["chosen_on"] == "val"
    t = probe.thresholds[0]
    assert 0.03 < t < 0.3  # the population optimum is the prevalence, 0.1
    p = probe.scores(x[test])[:, 1]
    gain = balanced_accuracy(y[test], p >= t) - balanced_accuracy(y[test], p >= 0.5)
    assert gain > 0.05
    m = probe.metrics["test"]
    assert m["threshold"] == pytest.approx(t, abs=1e-6) and m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(y[test], p >= t), abs=1e-6)
    assert m["accuracy_at_0.5"] == pytest.approx(np.mean((p >= 0.5) == y[test]), abs=1e-6)
    assert probe.predict(x[test]) == [str(int(v)) for v in (p >= t)]
    assert not imbalance_warnings(result.warnings)  # the threshold accounts for the imbalance


@pytest.mark.slow
@pytest.mark.parametrize("select, chosen_on", [("val", "val"), ("cv", "oof")])
def test_a_sensitivity_target_holds_where_the_threshold_was_chosen(select, chosen_on):
    x, y = imbalanced_task(1200, seed=2)
    result = fit(x, y, split_list(600, 300, 300), FitOptions(select=select, threshold="sensitivity:0.95"))
    probe = result.probe
    assert probe.threshold_info["criterion"] == "sensitivity" and probe.threshold_info["target"] == 0.95
    assert result.threshold_rows["source"] == chosen_on
    assert probe.metrics[chosen_on]["sensitivity"] >= 0.95
    assert probe.metrics[chosen_on]["in_sample"] is False
    spec = fit(x, y, split_list(600, 300, 300), FitOptions(select=select, threshold="specificity:0.9")).probe
    assert spec.metrics[chosen_on]["specificity"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("select", ["val", "cv"])
def test_the_threshold_is_never_chosen_on_rows_the_final_model_was_fitted_on(select):
    """Pure-noise, wide features mark every row: a model fitted on a row memorizes it (AUC ~1 there), while rows it
    was not fitted on score at chance.  The scores the threshold was chosen on must look like the latter."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(150, 400)).astype(np.float32)
    y = np.tile([1, 0, 0], 50)  # a third positive, spread over every split
    splits = split_list(90, 30, 30)
    result = fit(x, y, splits, FitOptions(select=select, c_grid=(100.0,), folds=3))
    probe, rows = result.probe, result.threshold_rows
    ids = [f"v{i}" for i in range(150)]
    fitted = {i for i, s in zip(ids, splits) if s in probe.training["fitted_on"]}
    assert rows["source"] == ("val" if select == "val" else "oof")
    if select == "val":
        assert set(rows["ids"]) == {i for i, s in zip(ids, splits) if s == "val"} and not set(rows["ids"]) & fitted
    else:
        assert set(rows["ids"]) == fitted  # the right rows, but each scored by a fold model that never saw it
    index = [ids.index(i) for i in rows["ids"]]
    np.testing.assert_array_equal(rows["truth"], y[index])
    in_sample = probe.scores(x[np.isin(ids, list(fitted))])[:, 1]
    assert auc(y[np.isin(ids, list(fitted))], in_sample) > 0.99  # the final model memorized its rows
    assert auc(rows["truth"], rows["scores"][:, 1]) < 0.8  # the threshold saw held-out-like scores
    youden = ThresholdRule("youden")
    assert probe.thresholds == [choose_threshold(rows["truth"], rows["scores"][:, 1], youden)]
    if select == "cv":
        # The final model's in-sample scores of the same rows would have given another threshold.
        assert choose_threshold(rows["truth"], probe.scores(x[index])[:, 1], youden) != probe.thresholds[0]
        np.testing.assert_allclose(result.predictions["oof"][1], rows["scores"])


# ---------------------------------------------------------------------------
# Bootstrap intervals


def test_bootstrap_intervals_are_deterministic_and_contain_the_point_estimate():
    x, y = imbalanced_task(400, prevalence=0.2, seed=3)
    p = 1.0 / (1.0 + np.exp(-(2.0 * x[:, 0] - 3.0)))
    a = operating_metrics(y, p, 0.3, resamples=1000, seed=0)
    b = operating_metrics(y, p, 0.3, resamples=1000, seed=0)
    c = operating_metrics(y, p, 0.3, resamples=1000, seed=1)
    assert a == b and a["ci95"] != c["ci95"]
    assert a["bootstrap"] == {"resamples": 1000, "seed": 0, "method": "percentile"}
    point = dict(a, auc=auc(y, p))
    for key in ("auc", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "accuracy"):
        low, high = a["ci95"][key]
        assert low <= point[key] <= high and high - low < 0.3, key
        assert 0 < a["se"][key] < 0.1
    tp, fp, fn, tn = a["tp"], a["fp"], a["fn"], a["tn"]
    assert a["sensitivity"] == pytest.approx(tp / (tp + fn), abs=1e-6) and a["npv"] == pytest.approx(tn / (tn + fn), abs=1e-6)
    # The vectorized bootstrap AUC is scikit-learn's AUC, ties included.
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=(5, 60))
    scores = np.round(rng.random((5, 60)), 1)  # many ties
    np.testing.assert_allclose(_auc_rows(labels, scores), [auc(labels[i], scores[i]) for i in range(5)], atol=1e-12)


def test_binary_metrics_json_has_every_rate_with_its_interval(tmp_path):
    x, y = imbalanced_task(600, seed=5)
    probe = fit(x, y, split_list(300, 150, 150)).probe
    for split in ("train", "val", "test"):
        m = probe.metrics[split]
        for key in ("auc", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy"):
            assert m["ci95"][key] is not None and len(m["ci95"][key]) == 2, (split, key)
        assert m["in_sample"] == (split == "train") and m["brier"] is not None
    assert Probe.load(probe.save(tmp_path / "p.raptorprobe")).metrics == json.loads(json.dumps(probe.metrics))


# ---------------------------------------------------------------------------
# Class weighting and calibration


@pytest.mark.slow
def test_calibration_lowers_the_brier_score_of_a_miscalibrated_probe(tmp_path):
    """Balanced class weights on 10% positives inflate every probability; calibration brings them back."""
    x, y = imbalanced_task(1500, seed=6)
    splits = split_list(900, 300, 300)
    test = np.array(splits) == "test"
    plain = fit(x, y, splits, FitOptions(select="cv")).probe
    weighted = fit(x, y, splits, FitOptions(select="cv", class_weight="balanced")).probe
    assert weighted.training["class_weight"] == "balanced"
    assert weighted.metrics["test"]["brier"] > plain.metrics["test"]["brier"] + 0.02  # miscalibrated
    for method in ("sigmoid", "isotonic"):
        calibrated = fit(x, y, splits, FitOptions(select="cv", class_weight="balanced", calibrate=method)).probe
        assert calibrated.calibration.method == method
        assert calibrated.metrics["test"]["brier"] < weighted.metrics["test"]["brier"] - 0.02, method
        assert calibrated.metrics["test"]["auc"] > 0.85
        # The calibrated probe round-trips through its file, and applies with NumPy alone.
        loaded = Probe.load(calibrated.save(tmp_path / f"{method}.raptorprobe"))
        np.testing.assert_array_equal(loaded.scores(x[test]), calibrated.scores(x[test]))
        meta, arrays = read_probe_file(tmp_path / f"{method}.raptorprobe")
        assert meta["calibration"] == {"method": method, "outputs": 1} and meta["format_version"] == 2
        assert any(name.startswith("calibration_") for name in arrays)


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
@pytest.mark.parametrize("classes", [2, 3])
def test_stored_calibrators_reproduce_scikit_learns_calibrated_probabilities(method, classes):
    """fit_calibration runs CalibratedClassifierCV(ensemble=False); re-applying its calibrators with NumPy
    gives what scikit-learn's own predict_proba gives."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 5))
    y = np.digitize(x[:, 0] + 0.8 * rng.normal(size=300), [0.0] if classes == 2 else [-0.5, 0.5])
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(x, y))

    def fit_rows(rows, y_part):
        model = LogisticRegression(C=0.05).fit(x[rows], y_part)
        return lambda wanted: np.atleast_2d(model.decision_function(x[wanted]).T).T.reshape(len(wanted), -1)

    calibration = fit_calibration(method, y, folds, fit_rows)
    reference = CalibratedClassifierCV(LogisticRegression(C=0.05), method=method, cv=folds, ensemble=False).fit(x, y)
    decision = LogisticRegression(C=0.05).fit(x, y).decision_function(x).reshape(len(x), -1)
    task = "binary" if classes == 2 else "multiclass"
    np.testing.assert_allclose(calibration.probabilities(task, decision), reference.predict_proba(x), atol=1e-12)


@pytest.mark.slow
def test_multilabel_gets_one_threshold_per_label_and_multiclass_keeps_the_arg_max(tmp_path):
    x, y = imbalanced_task(900, seed=9)
    rng = np.random.default_rng(9)
    other = (x[:, 1] + 0.5 * rng.normal(size=900) > 1.0).astype(int)
    splits = split_list(500, 200, 200)
    columns = {"lesion": [str(v) for v in y], "cyst": [str(v) for v in other]}
    result = fit(x, None, splits, FitOptions(calibrate="sigmoid", class_weight="balanced"), columns=columns)
    probe = result.probe
    assert probe.task == "multilabel" and len(probe.thresholds) == 2 and probe.threshold_names == ["lesion", "cyst"]
    assert probe.thresholds[0] != probe.thresholds[1]
    val = np.array(splits) == "val"
    scores = probe.scores(x[val])
    for c, truth in enumerate((y[val], other[val])):
        assert probe.thresholds[c] == choose_threshold(truth, scores[:, c], ThresholdRule("youden"))
    per_label = probe.metrics["test"]["per_label"]
    assert set(per_label) == {"lesion", "cyst"} and per_label["cyst"]["ci95"]["sensitivity"] is not None
    decided = probe.decide(probe.scores(x[:5]))
    assert probe.predict(x[:5]) == ["|".join(n for n, on in zip(probe.classes, row) if on) for row in decided]
    loaded = Probe.load(probe.save(tmp_path / "ml.raptorprobe"))
    assert loaded.thresholds == probe.thresholds and loaded.calibration.a.shape == (2,)
    np.testing.assert_array_equal(loaded.scores(x), probe.scores(x))

    grade = np.digitize(x[:, 0] + x[:, 1], [-0.5, 1.5])
    mc_columns = {"grade": [str(v) for v in grade]}
    multiclass = fit(x, None, splits, FitOptions(calibrate="isotonic"), columns=mc_columns).probe
    assert multiclass.thresholds is None and multiclass.threshold_names == []
    s = multiclass.scores(x[:20])
    np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-9)
    assert multiclass.predict(x[:20]) == [multiclass.classes[i] for i in s.argmax(axis=1)]
    with pytest.raises(RaptorError, match="--threshold is for binary and multi-label probes; a multiclass probe "
                                          "decides by the most likely class"):
        fit(x, None, splits, FitOptions(threshold="youden"), columns=mc_columns)


@pytest.mark.slow
def test_imbalance_warning_when_nothing_accounts_for_a_rare_class():
    x, y = imbalanced_task(600, seed=10)
    splits = split_list(300, 150, 150)
    bare = imbalance_warnings(fit(x, y, splits, FitOptions(threshold="none")).warnings)
    assert len(bare) == 1 and bare[0].startswith("class '1' is ") and "%" in bare[0]
    assert "--threshold youden" in bare[0] and "--class-weight balanced" in bare[0]
    assert not imbalance_warnings(fit(x, y, splits, FitOptions(threshold="none", class_weight="balanced")).warnings)
    assert not imbalance_warnings(fit(x, y, splits, FitOptions(threshold="0.2")).warnings)
    assert not imbalance_warnings(fit(x, y, splits).warnings)  # the default Youden threshold accounts for it
    grade = np.where(y == 1, "rare", np.where(x[:, 1] > 0, "a", "b"))
    multiclass = imbalance_warnings(fit(x, None, splits, FitOptions(), columns={"grade": [str(g) for g in grade]}).warnings)
    assert len(multiclass) == 1 and "class 'rare' has" in multiclass[0] and "--class-weight balanced" in multiclass[0]


def test_a_validation_split_with_one_class_cannot_choose_a_threshold():
    x, y = imbalanced_task(300, seed=11)
    y = y.copy()
    splits = split_list(200, 50, 50)
    y[200:250] = 0  # no positive in val
    with pytest.raises(InputError, match="the validation split hold a single class, so no threshold can be chosen there; "
                                         "use --select cv"):
        fit(x, y, splits, FitOptions(threshold="youden"))
    result = fit(x, y, splits)  # the default rule falls back to 0.5 and says so
    assert result.probe.thresholds == [0.5] and any("deciding at 0.5" in w for w in result.warnings)


# ---------------------------------------------------------------------------
# Probe files


def test_old_probe_files_still_load_and_decide_at_one_half(tmp_path, capsys):
    """Files written before thresholds (probe format 1, Testing/data) apply at 0.5, with a note."""
    x = np.load(DATA / "probe_format1_features.npy")
    binary = Probe.load(DATA / "probe_format1_binary.raptorprobe")
    assert binary.threshold is None and binary.thresholds == [0.5] and binary.calibration is None
    assert len(binary.notes) == 1 and "made before operating thresholds; decisions use p >= 0.5" in binary.notes[0]
    p = binary.scores(x)[:, 1]
    assert binary.predict(x) == [binary.classes[int(v)] for v in (p >= 0.5)]
    assert 0 < np.sum(p >= 0.5) < len(p)
    multilabel = Probe.load(DATA / "probe_format1_multilabel.raptorprobe")
    assert multilabel.thresholds == [0.5, 0.5] and multilabel.notes
    decided = multilabel.scores(x) >= 0.5
    assert multilabel.predict(x) == ["|".join(n for n, on in zip(multilabel.classes, row) if on) for row in decided]
    # Through the command line: the note on standard error, the threshold column says 0.5.
    write_table(tmp_path / "emb.csv", [Embedding(vector=x[i], metadata=dict(binary.embedding, id=f"v{i}"))
                                       for i in range(len(x))])
    out = tmp_path / "scores.csv"
    assert main(["probe", "apply", str(DATA / "probe_format1_binary.raptorprobe"), str(tmp_path / "emb.csv"),
                 "-o", str(out)]) == 0
    assert "raptor: note: " in capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["id", "predicted", "p_0", "p_1", "threshold"] and {r["threshold"] for r in rows} == {"0.5"}
    assert [r["predicted"] for r in rows] == binary.predict(x)
    # Saved again, it is a current file that says how it decides.
    meta, _ = read_probe_file(binary.save(tmp_path / "resaved.raptorprobe"))
    assert meta["format_version"] == 2 and meta["threshold"]["criterion"] == "none" and meta["threshold"]["values"] == [0.5]
    assert Probe.load(tmp_path / "resaved.raptorprobe").notes == []
    binary.threshold = [0.3]  # set by hand: saved as a fixed threshold
    again = Probe.load(binary.save(tmp_path / "fixed.raptorprobe"))
    assert again.thresholds == [0.3] and again.threshold_info["criterion"] == "fixed"


def _rewritten(path: Path, out: Path, change) -> Path:
    """The probe with its metadata and arrays changed by ``change(meta, arrays)``, checksums recomputed."""
    meta, arrays = read_probe_file(path)
    change(meta, arrays)
    for key in ("format", "format_version", "software", "arrays", "content_sha256"):
        meta.pop(key, None)
    return write_probe_file(out, meta, arrays)


@pytest.fixture(scope="module")
def calibrated_file(tmp_path_factory) -> Path:
    x, y = imbalanced_task(400, seed=12)
    probe = fit(x, y, split_list(200, 100, 100), FitOptions(calibrate="sigmoid", bootstrap=0)).probe
    return probe.save(tmp_path_factory.mktemp("probe") / "p.raptorprobe")


@pytest.mark.parametrize("change, message", [
    (lambda m, a: m["threshold"].update(values=[1.5]), r"threshold values must be 1 probabilities in \[0, 1\]"),
    (lambda m, a: m["threshold"].update(values=[0.2, 0.3]), r"threshold values must be 1 probabilities"),
    (lambda m, a: m["threshold"].update(values=["0.2"]), r"threshold values must be 1 probabilities"),
    (lambda m, a: m["threshold"].update(criterion="magic"), r"unknown threshold criterion 'magic'"),
    (lambda m, a: m["threshold"].update(criterion="sensitivity", target=None), r"threshold criterion sensitivity needs a target"),
    (lambda m, a: m["threshold"].update(target=7), r"threshold target 7 is not a rate"),
    (lambda m, a: m["threshold"].update(target=0.5), r"threshold criterion youden takes no target"),
    (lambda m, a: m.update(threshold="0.3"), r"threshold must be an object"),
    (lambda m, a: (m.update(task="multiclass", classes=["a", "b"]), a.update(weight=np.vstack([a["weight"]] * 2),
                                                                          bias=np.concatenate([a["bias"]] * 2))),
     r"a multiclass probe has no operating threshold"),
    (lambda m, a: m["calibration"].update(method="platt"), r"calibration method must be one of sigmoid, isotonic"),
    (lambda m, a: a.pop("calibration_a"), r"sigmoid calibration needs calibration_a and calibration_b of shape \(1,\)"),
    (lambda m, a: m.pop("calibration"), r"array 'calibration_a' without calibration settings"),
    (lambda m, a: a.update(calibration_x_0=np.zeros(2)), r"unexpected calibration array 'calibration_x_0'"),
])
def test_threshold_and_calibration_fields_are_validated(calibrated_file, tmp_path, change, message):
    bad = _rewritten(calibrated_file, tmp_path / "bad.raptorprobe", change)
    with pytest.raises(InputError, match=r"bad\.raptorprobe: invalid probe \(" + message):
        Probe.load(bad)


@pytest.mark.slow
def test_isotonic_knots_are_validated(tmp_path):
    x, y = imbalanced_task(400, seed=13)
    good = fit(x, y, split_list(200, 100, 100), FitOptions(calibrate="isotonic", bootstrap=0)).probe.save(
        tmp_path / "iso.raptorprobe")
    assert Probe.load(good).calibration.method == "isotonic"

    def backwards(meta, arrays):
        arrays["calibration_x_0"] = arrays["calibration_x_0"][::-1].copy()
        arrays["calibration_y_0"] = arrays["calibration_y_0"][::-1].copy()

    with pytest.raises(InputError, match=r"isotonic calibration 0 must increase, with probabilities in \[0, 1\]"):
        Probe.load(_rewritten(good, tmp_path / "bad.raptorprobe", backwards))


@pytest.mark.slow
def test_cli_fit_writes_thresholds_intervals_and_a_reliability_diagram(tmp_path, capsys):
    x, y = imbalanced_task(500, seed=14)
    splits = split_list(250, 125, 125)
    ids = [f"v{i}" for i in range(500)]
    meta = synthetic_embeddings(x).metadata
    write_table(tmp_path / "emb.csv", [Embedding(vector=x[i], metadata=dict(meta, id=ids[i])) for i in range(500)])
    (tmp_path / "labels.csv").write_text("id,split,lesion\n" + "".join(f"{i},{s},{v}\n" for i, s, v in zip(ids, splits, y)))
    probe_path = tmp_path / "lesion.raptorprobe"
    assert main(["probe", "fit", str(tmp_path / "emb.csv"), str(tmp_path / "labels.csv"), "-o", str(probe_path),
                 "--select", "cv", "--threshold", "sensitivity:0.9", "--calibrate", "sigmoid", "-q"]) == 0
    out = capsys.readouterr().out
    assert "decides p(1) >= " in out and "sensitivity at least 0.9, chosen on out-of-fold predictions" in out
    assert "sigmoid calibration on out-of-fold decision values of 5-fold CV on train+val" in out
    assert "train*" in out and "val*" in out and "* in-sample: the final model was fitted on these rows" in out
    assert "95% bootstrap CI, 1000 resamples, seed 0" in out
    report = json.loads((tmp_path / "lesion_metrics.json").read_text())
    assert report["threshold"]["criterion"] == "sensitivity" and report["threshold"]["names"] == ["1"]
    assert report["metrics"]["oof"]["sensitivity"] >= 0.9 and report["metrics"]["test"]["ci95"]["npv"] is not None
    assert report["operating_points"]["1"]["split"] == "test" and report["calibration"]["method"] == "sigmoid"
    for png in ("lesion_roc.png", "lesion_reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["probe", "info", str(probe_path)]) == 0
    info = capsys.readouterr().out
    assert "at p(1) >= " in info and " on test, n=125" in info
    assert main(["probe", "apply", str(probe_path), str(tmp_path / "emb.csv"), "-o", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    t = float(rows[0]["threshold"])
    assert all((r["predicted"] == "1") == (float(r["p_1"]) >= t) for r in rows if abs(float(r["p_1"]) - t) > 1e-5)
    with pytest.raises(SystemExit) as refused:  # argparse refuses it, naming the accepted forms
        main(["probe", "fit", str(tmp_path / "emb.csv"), str(tmp_path / "labels.csv"), "-o", str(probe_path),
              "--threshold", "sensitivity:2"])
    assert refused.value.code == 2 and "youden, sensitivity:0.95" in capsys.readouterr().err
