"""Probe fitting, files and settings checks on synthetic embeddings (fast: no model)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from RaptorExtension.embeddings.embedding import Embedding, build_metadata
from RaptorExtension.embeddings.table import write_table
from RaptorExtension.errors import InputError, MetadataMismatch, RaptorError
from RaptorExtension.probes.probe import (
    EmbeddingSet,
    FitOptions,
    Probe,
    fit_probe,
    infer_task,
    load_embeddings,
    read_labels,
)
from RaptorExtension.probes.probe_file import content_digest, write_probe_file

N, F = 96, 48
SPLITS = ["train"] * 56 + ["val"] * 20 + ["test"] * 20


def settings_meta(**overrides) -> dict:
    meta = build_metadata(
        encoder="tiny", weight_sha256="a" * 64, k=4, seed=0, projection_sha256="b" * 64, planes=["axial", "coronal", "sagittal"],
        grid=16, image_size=56, preset="minmax", keep_cls=False, shape=[3, 4, 2, 2], n_features=F,
    )
    meta.update(overrides)
    return meta


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, F)).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings(features) -> EmbeddingSet:
    return EmbeddingSet(ids=[f"v{i}" for i in range(N)], features=features, metadata=settings_meta(), sources=["synthetic"])


def write_labels(path: Path, columns: dict[str, list], splits=SPLITS, ids=None) -> Path:
    ids = ids or [f"v{i}" for i in range(len(splits))]
    lines = ["id,split," + ",".join(columns)]
    for i, identifier in enumerate(ids):
        lines.append(",".join([identifier, splits[i], *(str(v[i]) for v in columns.values())]))
    path.write_text("\n".join(lines) + "\n")
    return path


def binary_labels(features, noise=0.7, seed=1):
    rng = np.random.default_rng(seed)
    return (features[:, 0] + features[:, 1] + noise * rng.normal(size=len(features)) > 0).astype(int)


def test_binary_probe_beats_chance_and_records_everything(tmp_path, embeddings, features):
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"diagnosis": binary_labels(features)}))
    result = fit_probe(embeddings, labels)
    probe = result.probe
    assert probe.task == "binary" and probe.model == "logistic" and probe.classes == ["0", "1"]
    assert probe.metrics["test"]["auc"] > 0.8 and probe.metrics["train"]["n"] == 56
    selection = probe.training["selection"]
    assert selection["method"] == "val" and selection["grid"] == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert selection["chosen"] in selection["grid"] and set(selection["scores"]) == {"0.01", "0.1", "1", "10", "100"}
    assert probe.training["fitted_on"] == ["train"]
    # The stored arrays reproduce what scikit-learn would predict, through the standardizer.
    from sklearn.linear_model import LogisticRegression

    train = np.array(SPLITS) == "train"
    x = features[train].astype(np.float64)
    z = (x - x.mean(0)) / x.std(0)
    reference = LogisticRegression(C=selection["chosen"], max_iter=3000).fit(z, labels_array(labels)[train])
    zt = (features.astype(np.float64) - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(probe.scores(features)[:, 1], reference.predict_proba(zt)[:, 1], atol=1e-9)


def labels_array(labels):
    return np.array([int(v) for v in next(iter(labels.columns.values()))])


@pytest.mark.slow
def test_fit_is_deterministic_bit_for_bit(tmp_path, embeddings, features):
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"y": binary_labels(features)}))
    a = fit_probe(embeddings, labels, FitOptions(select="cv", folds=4)).probe
    b = fit_probe(embeddings, labels, FitOptions(select="cv", folds=4)).probe
    for name, array in a.arrays().items():
        assert np.array_equal(array, b.arrays()[name]), name
    assert a.training["selection"] == b.training["selection"]
    assert a.training["fitted_on"] == ["train", "val"]


@pytest.mark.slow
def test_multiclass_multilabel_and_regression(tmp_path, embeddings, features):
    rng = np.random.default_rng(2)
    grade = np.digitize(features[:, 2] + 0.3 * rng.normal(size=N), [-0.6, 0.6])
    names = np.array(["low", "mid", "high"])[grade]
    probe = fit_probe(embeddings, read_labels(write_labels(tmp_path / "mc.csv", {"grade": list(names)}))).probe
    assert probe.task == "multiclass" and probe.classes == ["high", "low", "mid"] and probe.weight.shape == (3, F)
    assert probe.metrics["test"]["auc"] > 0.7
    scores = probe.scores(features)
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-12)
    assert probe.predict(features[:3]) == [probe.classes[i] for i in scores[:3].argmax(1)]

    multi = {"a": (features[:, 3] > 0).astype(int), "b": (features[:, 4] > 0.5).astype(int)}
    ml = fit_probe(embeddings, read_labels(write_labels(tmp_path / "ml.csv", multi))).probe
    assert ml.task == "multilabel" and ml.classes == ["a", "b"] and set(ml.training["selection"]["chosen"]) == {"a", "b"}
    assert ml.metrics["test"]["auc"] > 0.8

    targets = {"volume_ml": list(2.0 * features[:, 5] + 10 + 0.1 * rng.normal(size=N)),
               "age": list(features[:, 6] - features[:, 7] + 50)}
    ridge = fit_probe(embeddings, read_labels(write_labels(tmp_path / "reg.csv", targets))).probe
    assert ridge.task == "regression" and ridge.model == "ridge" and ridge.weight.shape == (2, F)
    assert ridge.metrics["test"]["r2"] > 0.9
    assert abs(ridge.scores(features).mean(0)[1] - 50) < 1.0  # values come back in the target's units

    mlp_options = FitOptions(model="mlp", hidden=(16,), max_iter=400, alpha_grid=(1e-2, 1.0))
    one_target = {"volume_ml": targets["volume_ml"]}
    m1 = fit_probe(embeddings, read_labels(write_labels(tmp_path / "r1.csv", one_target)), mlp_options).probe
    m2 = fit_probe(embeddings, read_labels(write_labels(tmp_path / "r1.csv", one_target)), mlp_options).probe
    assert m1.model == "mlp" and len(m1.mlp_weights) == 2
    assert m1.metrics["test"]["r2"] > 0.5
    assert all(np.array_equal(a, b) for a, b in zip(m1.mlp_weights, m2.mlp_weights))
    saved = Probe.load(m1.save(tmp_path / "mlp.raptorprobe"))
    np.testing.assert_array_equal(saved.scores(features), m1.scores(features))


def test_round_trip_keeps_every_bit_and_the_metadata(tmp_path, embeddings, features):
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"y": binary_labels(features)}))
    probe = fit_probe(embeddings, labels).probe
    path = probe.save(tmp_path / "p.raptorprobe")
    loaded = Probe.load(path)
    np.testing.assert_array_equal(loaded.scores(features), probe.scores(features))
    assert loaded.embedding == json.loads(json.dumps(settings_meta()))
    assert loaded.metrics == json.loads(json.dumps(probe.metrics)) and loaded.classes == ["0", "1"]
    # The file is a plain ZIP: readable without Raptor, no pickle anywhere.
    with zipfile.ZipFile(path) as archive:
        assert set(archive.namelist()) == {"probe.json", "arrays/feature_mean.npy", "arrays/feature_scale.npy",
                                           "arrays/weight.npy", "arrays/bias.npy"}
        meta = json.loads(archive.read("probe.json"))
        weight = np.lib.format.read_array(io.BytesIO(archive.read("arrays/weight.npy")), allow_pickle=False)
    assert meta["format"] == "raptor-probe" and meta["task"] == "binary" and meta["embedding"]["k"] == 4
    np.testing.assert_array_equal(weight, probe.weight)


def _rewrite(path: Path, out: Path, change) -> Path:
    """Copy a probe ZIP member by member, letting ``change(name, data)`` alter the bytes."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, change(name, src.read(name)))
    return out


@pytest.fixture
def saved_probe(tmp_path, embeddings, features) -> Path:
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"y": binary_labels(features)}))
    return fit_probe(embeddings, labels).probe.save(tmp_path / "good.raptorprobe")


def test_truncated_probe_is_rejected(saved_probe, tmp_path):
    data = saved_probe.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 10):
        bad = tmp_path / "cut.raptorprobe"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"cut\.raptorprobe: not a Raptor probe \(not a ZIP archive, or truncated\)"):
            Probe.load(bad)


def test_flipped_byte_in_weights_is_rejected(saved_probe, tmp_path):
    data = bytearray(saved_probe.read_bytes())
    with zipfile.ZipFile(saved_probe) as archive:
        info = archive.getinfo("arrays/weight.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200  # inside the stored array bytes
    data[offset] ^= 0x40
    bad = tmp_path / "flip.raptorprobe"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"flip\.raptorprobe: array 'weight'.* corrupt"):
        Probe.load(bad)


def test_edited_weights_or_metadata_are_rejected(saved_probe, tmp_path):
    def new_weight(name, data):
        if name != "arrays/weight.npy":
            return data
        w = np.lib.format.read_array(io.BytesIO(data))
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, w * 2)
        return buffer.getvalue()

    with pytest.raises(InputError, match=r"array 'weight' checksum does not match"):
        Probe.load(_rewrite(saved_probe, tmp_path / "w.raptorprobe", new_weight))

    def rename_class(name, data):
        return data.replace(b'"1"\n', b'"cancer"\n') if name == "probe.json" else data

    with pytest.raises(InputError, match=r"metadata checksum does not match"):
        Probe.load(_rewrite(saved_probe, tmp_path / "m.raptorprobe", rename_class))

    with pytest.raises(InputError, match=r"unexpected member 'arrays/evil.npy'"):
        out = _rewrite(saved_probe, tmp_path / "x.raptorprobe", lambda n, d: d)
        with zipfile.ZipFile(out, "a") as archive:
            archive.writestr("arrays/evil.npy", b"")
        Probe.load(out)


def test_files_that_are_not_probes(tmp_path):
    (tmp_path / "text.raptorprobe").write_text("hello")
    with pytest.raises(InputError, match="not a ZIP archive"):
        Probe.load(tmp_path / "text.raptorprobe")
    embedding = Embedding(vector=np.zeros(4, np.float32), metadata=build_metadata(n_features=4))
    embedding.save(tmp_path / "e.npz")
    with pytest.raises(InputError, match=r"e\.npz: not a Raptor probe \(no probe\.json inside\)"):
        Probe.load(tmp_path / "e.npz")
    with pytest.raises(InputError, match="no such probe file"):
        Probe.load(tmp_path / "missing.raptorprobe")
    # Consistent checksums but inconsistent parts: refused by the structural checks.
    meta = {"task": "binary", "model": "logistic", "classes": ["0", "1"], "embedding": settings_meta()}
    arrays = {"feature_mean": np.zeros(F), "feature_scale": np.ones(F), "weight": np.zeros((2, F)), "bias": np.zeros(2)}
    write_probe_file(tmp_path / "shape.raptorprobe", meta, arrays)
    with pytest.raises(InputError, match=r"invalid probe \(weights must be \(1, 48\) with 1 biases\)"):
        Probe.load(tmp_path / "shape.raptorprobe")
    # A pickled array is never loaded.
    arrays = {"feature_mean": np.zeros(F), "feature_scale": np.ones(F), "weight": np.zeros((1, F)), "bias": np.zeros(1)}
    good = write_probe_file(tmp_path / "ok.raptorprobe", meta, arrays)
    assert Probe.load(good).n_features == F

    def pickled(name, data):
        if name != "arrays/bias.npy":
            return data
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.array([object()], dtype=object), allow_pickle=True)
        return buffer.getvalue()

    with pytest.raises(InputError, match=r"array 'bias': holds Python objects, which Raptor never unpickles"):
        Probe.load(_rewrite(good, tmp_path / "pickle.raptorprobe", pickled))


def test_content_digest_covers_every_field():
    meta = {"a": 1, "arrays": {"w": {"sha256": "x"}}}
    assert content_digest(meta) != content_digest({**meta, "a": 2})
    assert content_digest(meta) != content_digest({**meta, "arrays": {"w": {"sha256": "y"}}})
    assert content_digest({**meta, "content_sha256": "anything"}) == content_digest(meta)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 10, "n_features": 120, "shape": [3, 10, 2, 2]}, r"k 4 vs 10"),
        ({"seed": 3}, r"seed 0 vs 3"),
        ({"weight_sha256": "c" * 64, "encoder": "other"}, r"encoder weights differ \(tiny aaaaaaaaaaaa vs other cccccccccccc\)"),
        ({"grid": "native"}, r"grid 16 vs 'native'"),
        ({"keep_cls": True, "n_features": F + 3 * 8}, r"keep_cls False vs True"),
    ],
)
def test_mismatched_embeddings_are_refused_naming_the_difference(tmp_path, saved_probe, change, message):
    probe = Probe.load(saved_probe)
    other = Embedding(vector=np.zeros(int(change.get("n_features", F)), np.float32), metadata=settings_meta(**change, id="scan7"))
    other.save(tmp_path / "scan7.npz")
    with pytest.raises(MetadataMismatch, match=r"scan7\.npz: cannot apply probe .*good\.raptorprobe: embedding settings differ \(probe vs embedding\): " + message):
        probe.apply(load_embeddings([tmp_path / "scan7.npz"]))


@pytest.mark.slow
def test_embeddings_from_csv_and_npz_folder_agree(tmp_path, features):
    embeddings = [Embedding(vector=features[i], metadata=settings_meta(id=f"v{i}")) for i in range(N)]
    write_table(tmp_path / "emb.csv", embeddings)
    folder = tmp_path / "npz"
    for e in embeddings:
        e.save(folder / f"{e.id}.npz")
    from_csv, from_npz = load_embeddings([tmp_path / "emb.csv"]), load_embeddings([folder])
    assert from_csv.ids == [f"v{i}" for i in range(N)] and sorted(from_npz.ids) == sorted(from_csv.ids)
    np.testing.assert_array_equal(from_csv.features, features)
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"y": binary_labels(features)}))
    a, b = fit_probe(from_csv, labels).probe, fit_probe(from_npz, labels).probe
    np.testing.assert_array_equal(a.weight, b.weight)
    a.check_embedding(from_npz.metadata, "npz")  # CSV-fitted probes accept .npz embeddings and vice versa
    b.check_embedding(from_csv.metadata, "csv")
    mixed = Embedding(vector=features[0], metadata=settings_meta(id="odd", seed=5))
    mixed.save(folder / "zz_odd.npz")
    with pytest.raises(MetadataMismatch, match=r"zz_odd\.npz: embedding settings differ from .*v0\.npz: seed 0 vs 5"):
        load_embeddings([folder])


def test_label_problems_are_one_clear_line(tmp_path, embeddings, features):
    y = binary_labels(features)
    with pytest.raises(InputError, match=r"line 3 has split 'training'; use train, val or test"):
        read_labels(write_labels(tmp_path / "a.csv", {"y": y}, splits=["train", "training"] + SPLITS[2:]))
    with pytest.raises(InputError, match=r"1 labelled id\(s\) have no embedding, e\.g\. 'ghost'"):
        fit_probe(embeddings, read_labels(write_labels(tmp_path / "b.csv", {"y": y}, ids=["ghost"] + [f"v{i}" for i in range(1, N)])))
    with pytest.raises(InputError, match=r"column 'y' has a single class"):
        infer_task(read_labels(write_labels(tmp_path / "c.csv", {"y": [1] * N})))
    with pytest.raises(InputError, match=r"has no val rows .* use --select cv"):
        fit_probe(embeddings, read_labels(write_labels(tmp_path / "d.csv", {"y": y}, splits=["train"] * 76 + ["test"] * 20)))
    with pytest.raises(InputError, match=r"needs 'id' and 'split' columns"):
        (tmp_path / "e.csv").write_text("name,y\nv0,1\n")
        read_labels(tmp_path / "e.csv")
    with pytest.raises(RaptorError, match="ridge is for regression"):
        fit_probe(embeddings, read_labels(write_labels(tmp_path / "f.csv", {"y": y})), FitOptions(model="ridge"))


def test_positive_class_and_cv_option(tmp_path, embeddings, features):
    names = np.where(binary_labels(features) == 1, "benign", "malignant")  # sorted order would make 'malignant' positive
    labels = read_labels(write_labels(tmp_path / "l.csv", {"finding": list(names)}))
    default = fit_probe(embeddings, labels).probe
    assert default.classes == ["benign", "malignant"]
    flipped = fit_probe(embeddings, labels, FitOptions(positive="benign")).probe
    assert flipped.classes == ["malignant", "benign"]
    np.testing.assert_allclose(flipped.scores(features)[:, 1], default.scores(features)[:, 0], atol=1e-6)


@pytest.mark.parametrize("classes", [2, 3])
def test_wide_features_use_the_kernel_form_with_the_same_optimum(classes):
    """More features than rows (Raptor's usual case) is solved in the n x n kernel form; same weights as the primal."""
    from sklearn.linear_model import LogisticRegression

    from RaptorExtension.probes.probe import _Design, _fit_one

    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 400))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) if classes == 2 else np.digitize(x[:, 0], [-0.5, 0.5])
    design = _Design(x)
    assert design.wide
    for c in (0.01, 1.0, 100.0):
        fitted = _fit_one("logistic", "binary" if classes == 2 else "multiclass", design, y, c, FitOptions())
        primal = LogisticRegression(C=c, max_iter=20000, tol=1e-10).fit(design.z, y)
        np.testing.assert_allclose(fitted.weight, primal.coef_, atol=1e-4)
        np.testing.assert_allclose(fitted.bias, primal.intercept_, atol=1e-3)


def test_grid_edge_warning_says_which_way_to_extend_the_grid():
    from RaptorExtension.probes.probe import grid_edge_warning

    low = grid_edge_warning("C", 0.01, (0.01, 0.1, 1.0, 10.0, 100.0))
    assert low == ("C=0.01 is the smallest value of the grid, so the best may be beyond it (stronger "
                   "regularization); try C values 0.0001,0.001,0.01 (--c-grid)")
    high = grid_edge_warning("C", 100.0, (0.01, 0.1, 1.0, 10.0, 100.0))
    assert "largest" in high and "weaker regularization" in high and high.endswith("C values 100,1000,10000 (--c-grid)")
    assert "weaker regularization" in grid_edge_warning("alpha", 0.1, (0.1, 1.0, 10.0)) and "--alpha-grid" in \
        grid_edge_warning("alpha", 0.1, (0.1, 1.0, 10.0))
    assert "stronger regularization" in grid_edge_warning("alpha", 10.0, (10.0, 0.1, 1.0))  # grid order does not matter
    assert grid_edge_warning("C", 1.0, (0.01, 0.1, 1.0, 10.0, 100.0)) is None  # inside the grid
    assert grid_edge_warning("C", 1.0, (1.0,)) is None  # a one-value grid is the user's explicit choice


@pytest.mark.slow
def test_a_choice_at_the_edge_of_the_grid_is_reported(tmp_path):
    """Separable wide data: validation AUC rises with C, so a grid that stops at 0.1 chooses its edge and says so."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, 400)).astype(np.float32)
    y = (x[:, :200].sum(axis=1) > 0).astype(int)
    wide = EmbeddingSet(ids=[f"v{i}" for i in range(N)], features=x, metadata=settings_meta(n_features=400),
                        sources=["synthetic"])
    labels = read_labels(write_labels(tmp_path / "labels.csv", {"y": list(y)}))
    inside = fit_probe(wide, labels)
    assert inside.probe.training["selection"]["chosen"] == 1.0 and inside.warnings == []
    edge = fit_probe(wide, labels, FitOptions(c_grid=(0.0001, 0.001, 0.01, 0.1)))
    scores = edge.probe.training["selection"]["scores"]
    assert scores["0.1"] > scores["0.0001"] and edge.probe.training["selection"]["chosen"] == 0.1
    assert edge.warnings == ["C=0.1 is the largest value of the grid, so the best may be beyond it (weaker "
                             "regularization); try C values 0.1,1,10 (--c-grid)"]
    assert edge.probe.training["warnings"] == edge.warnings  # kept in the probe file's metadata too


def test_parse_grid_accepts_comma_separated_positive_numbers():
    from RaptorExtension.probes.probe import parse_grid

    assert parse_grid("0.0001, 0.001,0.01,") == (0.0001, 0.001, 0.01)
    for bad in ("", "0.1,x", "0,1", "-1", "nan", "inf"):
        with pytest.raises(RaptorError, match="expected comma-separated positive numbers"):
            parse_grid(bad)


def test_multilabel_edge_warnings_name_their_label(tmp_path, embeddings, features):
    columns = {"a": list((features[:, 0] > 0).astype(int)), "b": list((features[:, 1] > 0).astype(int))}
    result = fit_probe(embeddings, read_labels(write_labels(tmp_path / "m.csv", columns)), FitOptions(c_grid=(0.001, 0.01)))
    chosen = result.probe.training["selection"]["chosen"]
    assert result.probe.task == "multilabel" and chosen == {"a": 0.01, "b": 0.01}
    assert [w.split(":")[0] for w in result.warnings] == ["label a", "label b"]
    assert all("C=0.01 is the largest value of the grid" in w for w in result.warnings)
