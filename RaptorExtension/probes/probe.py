"""Probes: small models fitted on Raptor embeddings, saved safely, applied anywhere.

A probe turns an embedding into an answer: class probabilities (binary,
multi-class, multi-label) or numbers (regression, one or many targets).

Models
  ``logistic``  L2 logistic regression; C chosen from {0.01, 0.1, 1, 10, 100}
                on the validation split as in the Raptor paper, or by stratified
                k-fold cross-validation on train+val (``select="cv"``), which is
                less noisy when the validation split is small.
  ``ridge``     ridge regression; alpha chosen the same way.
  ``mlp``       a small MLP (one or two hidden ReLU layers, so at most three
                weight layers) for regression, fixed seed; its L2 penalty is
                chosen the same way.
Features are standardized with the statistics of the rows the final model is
fitted on (train, or train+val with ``select="cv"``).  Every step is seeded
and single-valued, so the same inputs give the same probe bit for bit.

Decisions a clinician can act on
  A binary probe decides "positive" when its probability reaches an
  operating threshold chosen for the task (``threshold``: Youden's J by
  default, a sensitivity or specificity target, or a fixed number), and a
  multi-label probe has one threshold per label; a multi-class probe takes
  the most likely class.  The threshold is chosen on rows the final model
  was not fitted on: the validation split (``select="val"``), or the
  out-of-fold predictions of the cross-validation at the chosen C
  (``select="cv"``, where the final model is refitted on train+val).
  Optional class weighting (``class_weight="balanced"``) and calibrated
  probabilities (``calibrate``, see :mod:`.calibration`) complete it; the
  metrics at the threshold carry bootstrap intervals (:mod:`.metrics`).

Why the stored model is plain arrays: applying a probe needs only NumPy (no
scikit-learn inside Slicer, no pickle), and a linear probe's weights are what
the explainer (:mod:`.explain`) decomposes over slices and patches.

The embedding settings a probe was fitted on travel inside it; applying it to
embeddings made with other settings is refused naming what differs.
"""

from __future__ import annotations

import csv
import io
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..embeddings.embedding import METADATA_SCHEMA, Embedding
from ..embeddings.settings import REQUIRED_SETTINGS_KEYS, SETTINGS_KEYS, describe_differences
from ..errors import Cancelled, InputError, MetadataMismatch, RaptorError
from ..fields import BOOL, DICT, EITHER, INT, LIST, NULLABLE, NUMBER, ONE_OF, SCHEMA, STR, check_fields
from .calibration import CALIBRATION_METHODS, Calibration, fit_calibration
from .metrics import (
    BOOTSTRAP_RESAMPLES,
    CLASSIFICATION_TASKS,
    THRESHOLD_CRITERIA,
    ThresholdRule,
    choose_threshold,
    classification_metrics,
    parse_threshold,
    regression_metrics,
)
from .probe_file import PROBE_SUFFIX, read_probe_file, write_probe_file

TASKS = ("binary", "multiclass", "multilabel", "regression")
MODELS = ("logistic", "ridge", "mlp")
SPLITS = ("train", "val", "test")
PAPER_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
RIDGE_ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
MLP_ALPHA_GRID = (1e-4, 1e-2, 1.0)
EMBEDDING_KEYS = SETTINGS_KEYS + (
    "encoder",
    "encoder_type",
    "hidden_size",
    "patch_size",
    "patch_grid",
    "shape",
    "n_features",
    "projection",
    "layout",
)
"""What a probe records about the embeddings it was fitted on."""


# ---------------------------------------------------------------------------
# Inputs: embeddings and labels


@dataclass
class EmbeddingSet:
    """Embeddings of many volumes with one set of settings."""

    ids: list[str]
    features: np.ndarray  # (n, n_features) float32
    metadata: dict  # EMBEDDING_KEYS of the set
    sources: list[str]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        index = {v: i for i, v in enumerate(self.ids)}
        return self.features[[index[i] for i in ids]]


def embedding_description(metadata: dict) -> dict:
    """The part of an embedding's metadata a probe records and compares."""
    return {k: metadata[k] for k in EMBEDDING_KEYS if k in metadata}


def load_embeddings(inputs: Iterable[str | Path]) -> EmbeddingSet:
    """Read embeddings from CSV tables, ``.npz`` files or folders of ``.npz``; refuse mixed settings."""
    ids: list[str] = []
    rows: list[np.ndarray] = []
    sources: list[str] = []
    meta: dict | None = None
    first_source = ""

    def add(identifier: str, vector: np.ndarray, description: dict, source: str) -> None:
        nonlocal meta, first_source
        if meta is None:
            meta, first_source = description, source
        else:
            diffs = describe_differences(meta, description)
            if diffs:
                raise MetadataMismatch(f"{source}: embedding settings differ from {first_source}: " + "; ".join(diffs))
            if vector.size != rows[0].size:
                raise MetadataMismatch(f"{source}: has {vector.size} features, {first_source} {rows[0].size}")
        ids.append(identifier)
        rows.append(vector)
        sources.append(source)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz")
            if not files:
                raise InputError(f"{path}: folder holds no .npz embeddings")
        elif path.suffix.lower() == ".csv":
            from ..embeddings.table import read_table

            table = read_table(path)
            description = dict(table.settings or {})
            description["n_features"] = int(table.features.shape[1])
            for i, identifier in enumerate(table.ids):
                add(identifier, table.features[i], description, f"{path}#{identifier}")
            continue
        elif path.exists():
            files = [path]
        else:
            raise InputError(f"{path}: no such file or folder")
        for f in files:
            e = Embedding.load(f)
            add(e.id or f.stem, e.vector, embedding_description(e.metadata), str(f))
    if not ids:
        raise InputError("no embeddings given")
    seen: dict[str, str] = {}
    for identifier, source in zip(ids, sources):
        if identifier in seen:
            raise InputError(f"{source}: id {identifier!r} appears twice (also in {seen[identifier]})")
        seen[identifier] = source
    return EmbeddingSet(ids=ids, features=np.stack(rows).astype(np.float32), metadata=meta or {}, sources=sources)


def _files_of(sources: Sequence[str]) -> str:
    """The files embeddings came from (a CSV row's source is ``FILE#id``), for messages."""
    files = list(dict.fromkeys(s.split("#", 1)[0] if "#" in s and not Path(s).exists() else s for s in sources))
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "") if files else "embeddings"


@dataclass
class Labels:
    """A labels CSV: ``id``, ``split`` in {train, val, test}, one or more label columns."""

    path: Path
    ids: list[str]
    splits: list[str]
    columns: dict[str, list[str]]


def read_labels(path: str | Path, label_columns: Sequence[str] | None = None) -> Labels:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "id" not in header or "split" not in header:
        raise InputError(f"{path}: needs 'id' and 'split' columns (found {', '.join(header) or 'none'})")
    available = [h for h in header if h not in ("id", "split")]
    wanted = list(label_columns) if label_columns else available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise InputError(f"{path}: no label column {missing[0]!r} (columns: {', '.join(available)})")
    if not wanted:
        raise InputError(f"{path}: no label column besides id and split")
    ids, splits, columns = [], [], {c: [] for c in wanted}
    try:
        rows = list(enumerate(reader, start=2))
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    for line_no, row in rows:
        if None in row:  # csv.DictReader keeps the fields beyond the header under None
            raise InputError(f"{path}: line {line_no} has {len(header) + len(row[None])} fields, the header {len(header)}")
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        identifier, split = row.get("id", ""), row.get("split", "").lower()
        if not identifier:
            raise InputError(f"{path}: line {line_no} has no id")
        if split not in SPLITS:
            raise InputError(f"{path}: line {line_no} has split {row.get('split')!r}; use train, val or test")
        for c in wanted:
            value = row.get(c, "")
            if value == "":
                raise InputError(f"{path}: line {line_no} ({identifier}) has no value for {c!r}")
            if _missing_marker(value):
                raise InputError(f"{path}: line {line_no} ({identifier}) has {value!r} for {c!r}, a missing or "
                                 "non-finite value; remove the row or give it a label")
            columns[c].append(value)
        ids.append(identifier)
        splits.append(split)
    if not ids:
        raise InputError(f"{path}: has no rows")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: id {dup!r} appears more than once")
    return Labels(path=path, ids=ids, splits=splits, columns=columns)


def _missing_marker(value: str) -> bool:
    """NaN, infinity, or a spreadsheet's mark for a missing value: never a class or a target."""
    if value.upper() in ("NA", "N/A", "#N/A"):
        return True
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


MAX_TARGET = 1e30
"""Regression targets beyond this cannot be standardized and fitted in float64 without overflow."""


def _as_float(values: Sequence[str]) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None
    return out if np.isfinite(out).all() else None


def _sorted_classes(values: Sequence[str]) -> list[str]:
    unique = sorted(set(values))
    numbers = _as_float(unique)
    if numbers is not None:
        unique = [v for _, v in sorted(zip(numbers, unique))]
    return unique


def infer_task(labels: Labels, task: str = "auto") -> str:
    """Binary, multi-class, multi-label or regression, from the label values unless given."""
    if task not in ("auto",) + TASKS:
        raise RaptorError(f"unknown task {task!r} (choose from auto, {', '.join(TASKS)})")
    names = list(labels.columns)
    numeric = {c: _as_float(v) for c, v in labels.columns.items()}
    binary01 = {c: numeric[c] is not None and set(np.unique(numeric[c])) <= {0.0, 1.0} for c in names}
    if task == "auto":
        if len(names) > 1:
            if all(binary01.values()):
                task = "multilabel"
            elif all(v is not None for v in numeric.values()):
                task = "regression"
            else:
                raise InputError(
                    f"{labels.path}: several label columns must be all 0/1 (multi-label) or all numbers (regression)"
                )
        else:
            values = numeric[names[0]]
            integral = values is not None and np.all(values == np.round(values))
            distinct = len(set(labels.columns[names[0]]))
            if values is not None and (not integral or distinct > 20):
                task = "regression"
            else:
                task = "binary" if distinct <= 2 else "multiclass"
    if task in ("binary", "multiclass"):
        if len(names) != 1:
            raise InputError(f"{labels.path}: a {task} task takes one label column (found {', '.join(names)}); pass --label-column")
        distinct = len(set(labels.columns[names[0]]))
        if distinct < 2:
            raise InputError(f"{labels.path}: column {names[0]!r} has a single class; nothing to learn")
        if task == "binary" and distinct != 2:
            raise InputError(f"{labels.path}: column {names[0]!r} has {distinct} classes, not 2; use --task multiclass")
    if task == "multilabel" and not all(binary01.values()):
        bad = next(c for c in names if not binary01[c])
        raise InputError(f"{labels.path}: multi-label column {bad!r} must hold only 0 and 1")
    if task == "regression":
        for c in names:
            for n, value in enumerate(labels.columns[c]):
                try:
                    number = float(value)
                except ValueError:
                    number = None
                if number is None or not math.isfinite(number):
                    raise InputError(f"{labels.path}: regression target {c!r} holds {value!r} for {labels.ids[n]!r}, "
                                     "not a number")
                if abs(number) > MAX_TARGET:
                    raise InputError(f"{labels.path}: regression target {c!r} holds {value} for {labels.ids[n]!r}, "
                                     f"beyond ±{MAX_TARGET:g}; rescale the column (e.g. to other units)")
    return task


# ---------------------------------------------------------------------------
# The probe


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Probe:
    """A fitted probe: what it predicts, the arrays that compute it, and where it is valid."""

    task: str
    model: str
    classes: list[str]
    """Score names: the classes (binary: [negative, positive]; multi-class), the labels (multi-label) or the targets."""
    label_columns: list[str]
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    weight: np.ndarray | None = None
    """(outputs, n_features), acting on standardized features (linear models)."""
    bias: np.ndarray | None = None
    mlp_weights: list[np.ndarray] = field(default_factory=list)
    mlp_biases: list[np.ndarray] = field(default_factory=list)
    target_mean: np.ndarray | None = None
    target_scale: np.ndarray | None = None
    embedding: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    name: str = ""
    path: Path | None = None
    checksum: str = ""
    """The ``content_sha256`` of the probe file it was loaded from (identifies it in DICOM results)."""
    threshold: list[float] | None = None
    """Operating threshold on the probability, one per output (binary: of the positive class; multi-label: per
    label); ``None`` decides at 0.5.  Multi-class and regression probes have none."""
    threshold_info: dict = field(default_factory=dict)
    """How the threshold was set: ``criterion``, ``target``, ``chosen_on``, ``rows``."""
    calibration: Calibration | None = None
    """Calibrators from the logits to the probabilities (``None``: the model's own sigmoid or softmax)."""
    notes: list[str] = field(default_factory=list)
    """What a user of this probe should know that is not an error (e.g. a file from before operating thresholds)."""

    # -- what it computes ------------------------------------------------
    @property
    def is_linear(self) -> bool:
        return self.model in ("logistic", "ridge")

    @property
    def n_features(self) -> int:
        return int(self.feature_mean.size)

    @property
    def output_names(self) -> list[str]:
        """Names of the decision values: the logit of the positive class for a binary probe."""
        return [self.classes[1]] if self.task == "binary" else list(self.classes)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.n_features:
            raise MetadataMismatch(
                f"probe {self.label()} expects {self.n_features} features, the embedding has {x.shape[1]}"
            )
        return (x - self.feature_mean) / self.feature_scale

    def decision(self, features: np.ndarray) -> np.ndarray:
        """Logits (classification) or predicted values (regression), shape (n, outputs)."""
        z = self.standardize(features)
        if self.is_linear:
            return z @ self.weight.T + self.bias
        h = z
        for i, (w, b) in enumerate(zip(self.mlp_weights, self.mlp_biases)):
            h = h @ w + b
            if i < len(self.mlp_weights) - 1:
                h = np.maximum(h, 0.0)
        return h * self.target_scale + self.target_mean

    def probabilities(self, decision: np.ndarray) -> np.ndarray:
        """Decision values (n, outputs) to probabilities, through the calibration when the probe has one."""
        d = np.asarray(decision, dtype=np.float64)
        if self.task == "regression":
            return d
        if self.calibration is not None:
            return self.calibration.probabilities(self.task, d)
        if self.task == "binary":
            p = _sigmoid(d[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        if self.task == "multiclass":
            return _softmax(d)
        return _sigmoid(d)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes), label probabilities, or regression values."""
        return self.probabilities(self.decision(features))

    @property
    def thresholds(self) -> list[float] | None:
        """The operating threshold of each thresholded output (binary: the positive class; multi-label: each label)."""
        if self.task == "binary":
            return list(self.threshold) if self.threshold is not None else [0.5]
        if self.task == "multilabel":
            return list(self.threshold) if self.threshold is not None else [0.5] * len(self.classes)
        return None

    @property
    def threshold_names(self) -> list[str]:
        """What each threshold decides: the positive class of a binary probe, or each label."""
        if self.task == "binary":
            return [self.classes[1]]
        return list(self.classes) if self.task == "multilabel" else []

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Decisions from probabilities: (n, classes) for binary and multi-class (one True per row), (n, labels)."""
        s = np.atleast_2d(scores)
        if self.task == "binary":
            positive = s[:, 1] >= self.thresholds[0]
            return np.stack([~positive, positive], axis=1)
        if self.task == "multiclass":
            return np.eye(s.shape[1], dtype=bool)[np.argmax(s, axis=1)]
        if self.task == "multilabel":
            return s >= np.asarray(self.thresholds)
        raise RaptorError("a regression probe makes no decisions")

    def predict(self, features: np.ndarray) -> list[str]:
        s = self.scores(features)
        if self.task in ("binary", "multiclass"):
            return [self.classes[i] for i in np.argmax(self.decide(s), axis=1)]
        if self.task == "multilabel":
            return ["|".join(c for c, on in zip(self.classes, row) if on) for row in self.decide(s)]
        return [";".join(format(v, ".6g") for v in row) for row in s]

    def operating_points(self) -> dict[str, dict]:
        """Per thresholded output: the threshold and the sensitivity and specificity measured there.

        Taken from the best split the probe's metrics hold: test (held out), else
        the rows the threshold was chosen on (val, or the out-of-fold predictions),
        else train (in-sample, marked so).  Each entry: ``threshold``, ``split``,
        ``in_sample``, ``n``, ``sensitivity``, ``specificity`` and their 95% intervals
        (``sensitivity_ci95``, ``specificity_ci95``: ``[low, high]`` or ``None``).
        """
        out: dict[str, dict] = {}
        for i, name in enumerate(self.threshold_names):
            entry = {"threshold": float(self.thresholds[i]), "split": None, "in_sample": None, "n": None,
                     "sensitivity": None, "specificity": None, "sensitivity_ci95": None, "specificity_ci95": None}
            for split in ("test", "val", "oof", "train"):
                values = self.metrics.get(split)
                if not isinstance(values, dict):
                    continue
                if self.task == "multilabel":
                    values = dict((values.get("per_label") or {}).get(name) or {}, in_sample=values.get("in_sample"))
                if values.get("sensitivity") is None and values.get("specificity") is None:
                    continue
                ci = values.get("ci95") or {}
                entry.update(split=split, in_sample=bool(values.get("in_sample", split == "train")), n=values.get("n"),
                             sensitivity=values.get("sensitivity"), specificity=values.get("specificity"),
                             sensitivity_ci95=ci.get("sensitivity"), specificity_ci95=ci.get("specificity"))
                break
            out[name] = entry
        return out

    def folded_linear(self, output: int) -> tuple[np.ndarray, float]:
        """``(w', b')`` with ``decision[output] = w' . x + b'`` on raw (unstandardized) features."""
        if not self.is_linear:
            raise RaptorError(f"probe {self.label()} is an MLP; only linear probes decompose exactly")
        w = self.weight[output] / self.feature_scale
        return w, float(self.bias[output] - np.dot(w, self.feature_mean))

    # -- where it is valid -----------------------------------------------
    def label(self) -> str:
        return str(self.path) if self.path else (self.name or "(unsaved probe)")

    def check_embedding(self, metadata: dict, what: str) -> None:
        """Refuse embeddings made with other settings than the probe's, naming each difference."""
        diffs = describe_differences(self.embedding, metadata)
        if diffs:
            raise MetadataMismatch(
                f"{what}: cannot apply probe {self.label()}: embedding settings differ (probe vs embedding): "
                + "; ".join(diffs)
            )
        n = metadata.get("n_features")
        if n is not None and int(n) != self.n_features:
            raise MetadataMismatch(f"{what}: has {n} features, probe {self.label()} expects {self.n_features}")

    def apply(self, embeddings: EmbeddingSet) -> "ProbeScores":
        self.check_embedding(embeddings.metadata, _files_of(embeddings.sources))
        finite = np.isfinite(embeddings.features).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise InputError(f"{embeddings.sources[bad]}: the embedding of {embeddings.ids[bad]!r} holds NaN or "
                             "infinite values; it cannot be scored")
        return ProbeScores(ids=list(embeddings.ids), names=self.classes, scores=self.scores(embeddings.features),
                           predicted=self.predict(embeddings.features), task=self.task,
                           thresholds=self.thresholds, threshold_names=self.threshold_names)

    # -- files -------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"feature_mean": self.feature_mean, "feature_scale": self.feature_scale}
        if self.is_linear:
            arrays.update(weight=self.weight, bias=self.bias)
        else:
            for i, (w, b) in enumerate(zip(self.mlp_weights, self.mlp_biases)):
                arrays[f"mlp_weight_{i}"] = w
                arrays[f"mlp_bias_{i}"] = b
            arrays.update(target_mean=self.target_mean, target_scale=self.target_scale)
        if self.calibration is not None:
            arrays.update(self.calibration.arrays())
        return arrays

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {
            "name": self.name or path.name.removesuffix(PROBE_SUFFIX),
            "task": self.task,
            "model": self.model,
            "classes": list(self.classes),
            "label_columns": list(self.label_columns),
            "embedding": self.embedding,
            "metrics": self.metrics,
            "training": self.training,
            "mlp_layers": len(self.mlp_weights),
        }
        if self.thresholds is not None:
            info = dict(self.threshold_info) or {"criterion": "none" if self.threshold is None else "fixed",
                                                 "target": None, "chosen_on": None}
            meta["threshold"] = {**info, "values": [float(t) for t in self.thresholds]}
        if self.calibration is not None:
            meta["calibration"] = {"method": self.calibration.method, "outputs": self.calibration.outputs}
        write_probe_file(path, meta, self.arrays())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Probe":
        path = Path(path)
        meta, arrays = read_probe_file(path)
        return _probe_from_file(path, meta, arrays)


def _any_number(value) -> str | None:  # selection scores may be -inf or NaN for a degenerate candidate
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"


_METRICS = SCHEMA({**{k: NULLABLE(NUMBER) for k in ("auc", "accuracy", "aupr", "exact_match", "r2", "mae", "rmse")},
                   "n": INT(0), "classes_in_auc": INT(0), "labels_in_auc": INT(0),
                   "per_target": DICT(SCHEMA({k: NULLABLE(NUMBER) for k in ("r2", "mae", "rmse")}))},
                  required=("n",))
_SELECTION = SCHEMA({
    "method": ONE_OF("val", "cv"), "parameter": ONE_OF("C", "alpha"), "grid": LIST(NUMBER),
    "chosen": EITHER(NUMBER, DICT(NUMBER), problem="must be a number, or one number per label"),
    "scores": DICT(EITHER(_any_number, DICT(_any_number), problem="must be numbers")),
})
PROBE_SCHEMA = {
    "name": STR,
    "task": ONE_OF(*TASKS),
    "model": ONE_OF(*MODELS),
    "classes": LIST(STR, min_len=1),
    "label_columns": LIST(STR),
    "embedding": SCHEMA({k: NULLABLE(METADATA_SCHEMA[k]) for k in EMBEDDING_KEYS}, required=REQUIRED_SETTINGS_KEYS),
    "metrics": DICT(_METRICS),
    "training": SCHEMA({
        "selection": _SELECTION, "fitted_on": LIST(STR), "rows": DICT(INT(0)), "labels_file": STR, "seed": INT(),
        "max_iter": INT(), "converged": BOOL, "standardization": STR, "hidden_layers": LIST(INT(1)),
        "positive_class": STR, "scikit_learn": STR, "seconds": NUMBER, "created": STR, "warnings": LIST(STR),
    }),
    "mlp_layers": INT(0, 3),
}
"""The type of every ``probe.json`` field a probe uses; checked before any of them is used."""


def _probe_from_file(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> Probe:
    """Rebuild a probe and check that its parts fit together."""

    def bad(reason: str) -> InputError:
        return InputError(f"{path}: invalid probe ({reason})")

    check_fields(meta, PROBE_SCHEMA, str(path), required=("task", "model", "classes", "embedding"), what="probe.json")
    task, model = meta.get("task"), meta.get("model")
    if task not in TASKS:
        raise bad(f"unknown task {task!r}")
    if model not in MODELS:
        raise bad(f"unknown model {model!r}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("no class or target names")
    embedding = meta.get("embedding")
    if not isinstance(embedding, dict) or any(k not in embedding for k in REQUIRED_SETTINGS_KEYS):
        raise bad("no embedding settings")
    for name in ("feature_mean", "feature_scale"):
        if name not in arrays or arrays[name].ndim != 1:
            raise bad(f"missing or malformed {name}")
    n = arrays["feature_mean"].size
    if arrays["feature_scale"].shape != (n,) or not (arrays["feature_scale"] > 0).all():
        raise bad("feature_scale must be positive and match feature_mean")
    if int(embedding.get("n_features", n)) != n:
        raise bad(f"{n} features but the embedding settings say {embedding.get('n_features')}")
    outputs = 1 if task == "binary" else len(classes)
    if task == "binary" and len(classes) != 2:
        raise bad("a binary probe needs exactly 2 class names")
    probe = Probe(
        task=task,
        model=model,
        classes=list(classes),
        label_columns=list(meta.get("label_columns") or []),
        feature_mean=arrays["feature_mean"],
        feature_scale=arrays["feature_scale"],
        embedding=embedding,
        metrics=meta.get("metrics") or {},
        training=meta.get("training") or {},
        name=str(meta.get("name") or path.name),
        path=path,
        checksum=str(meta.get("content_sha256") or ""),
    )
    if model in ("logistic", "ridge"):
        w, b = arrays.get("weight"), arrays.get("bias")
        if w is None or b is None or w.shape != (outputs, n) or b.shape != (outputs,):
            raise bad(f"weights must be ({outputs}, {n}) with {outputs} biases")
        probe.weight, probe.bias = w, b
    else:
        layers = meta.get("mlp_layers")
        if not isinstance(layers, int) or not 1 <= layers <= 3:
            raise bad("an MLP probe needs 1 to 3 layers")
        width = n
        for i in range(layers):
            w, b = arrays.get(f"mlp_weight_{i}"), arrays.get(f"mlp_bias_{i}")
            if w is None or b is None or w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise bad(f"MLP layer {i} does not fit the previous one")
            probe.mlp_weights.append(w)
            probe.mlp_biases.append(b)
            width = w.shape[1]
        if width != outputs:
            raise bad(f"MLP gives {width} outputs for {outputs} targets")
        tm, ts = arrays.get("target_mean"), arrays.get("target_scale")
        if tm is None or ts is None or tm.shape != (outputs,) or ts.shape != (outputs,):
            raise bad("MLP target scaling is missing")
        probe.target_mean, probe.target_scale = tm, ts
    _read_threshold(probe, meta, bad)
    _read_calibration(probe, meta, arrays, bad)
    return probe


def _read_threshold(probe: Probe, meta: dict, bad: Callable[[str], InputError]) -> None:
    """The operating threshold(s): validated; absent in files from before thresholds (then 0.5, with a note)."""
    thresholded = probe.task in ("binary", "multilabel")
    info = meta.get("threshold")
    if info is None:
        if thresholded:
            probe.notes.append(f"{probe.label()}: made before operating thresholds; decisions use p >= 0.5 "
                               f"(refit it to choose a threshold on held-out data)")
        return
    if not thresholded:
        raise bad(f"a {probe.task} probe has no operating threshold")
    if not isinstance(info, dict):
        raise bad("threshold must be an object")
    criterion, target, values = info.get("criterion"), info.get("target"), info.get("values")
    if criterion not in THRESHOLD_CRITERIA:
        raise bad(f"unknown threshold criterion {criterion!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0.0 < float(target) <= 1.0):
        raise bad(f"threshold target {target!r} is not a rate in (0, 1]")
    if criterion in ("sensitivity", "specificity") and target is None:
        raise bad(f"threshold criterion {criterion} needs a target")
    if criterion in ("youden", "none") and target is not None:
        raise bad(f"threshold criterion {criterion} takes no target")
    outputs = 1 if probe.task == "binary" else len(probe.classes)
    if (not isinstance(values, list) or len(values) != outputs
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
                       for v in values)):
        raise bad(f"threshold values must be {outputs} probabilities in [0, 1]")
    for key in ("chosen_on", "rows"):
        if key in info and info[key] is not None and not isinstance(info[key], (str, int)):
            raise bad(f"threshold {key} is malformed")
    probe.threshold = [float(v) for v in values]
    probe.threshold_info = {k: v for k, v in info.items() if k != "values"}


def _read_calibration(probe: Probe, meta: dict, arrays: dict[str, np.ndarray], bad: Callable[[str], InputError]) -> None:
    """The calibrators, when the probe has them: the method named in probe.json, the knots or slopes as arrays."""
    info = meta.get("calibration")
    calibration_arrays = {k: v for k, v in arrays.items() if k.startswith("calibration_")}
    if info is None:
        if calibration_arrays:
            raise bad(f"array {sorted(calibration_arrays)[0]!r} without calibration settings")
        return
    if probe.task == "regression":
        raise bad("a regression probe cannot be calibrated")
    if not isinstance(info, dict) or info.get("method") not in CALIBRATION_METHODS:
        raise bad(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}")
    outputs = 1 if probe.task == "binary" else len(probe.classes)
    try:
        calibration = Calibration.from_arrays(info["method"], arrays, outputs)
    except ValueError as exc:
        raise bad(str(exc)) from None
    extra = sorted(set(calibration_arrays) - set(calibration.arrays()))
    if extra:
        raise bad(f"unexpected calibration array {extra[0]!r}")
    probe.calibration = calibration


@dataclass
class ProbeScores:
    ids: list[str]
    names: list[str]
    scores: np.ndarray
    predicted: list[str]
    """The decision: the class at the operating threshold (binary), the most likely class, the labels at their thresholds."""
    task: str
    thresholds: list[float] | None = None
    """The operating threshold of each of ``threshold_names`` (binary: the positive class; multi-label: each label)."""
    threshold_names: list[str] = field(default_factory=list)

    def header(self, prefix: str = "") -> list[str]:
        column = "p_" if self.task in CLASSIFICATION_TASKS else ""
        head = ["id", f"{prefix}predicted", *(f"{prefix}{column}{n}" for n in self.names)]
        if self.thresholds is not None:
            head += ([f"{prefix}threshold"] if self.task == "binary"
                     else [f"{prefix}threshold_{n}" for n in self.threshold_names])
        return head

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.header())
        extra = [format(float(t), ".6g") for t in self.thresholds] if self.thresholds is not None else []
        for identifier, pred, row in zip(self.ids, self.predicted, self.scores):
            writer.writerow([identifier, pred, *(format(float(v), ".6g") for v in row), *extra])
        return buffer.getvalue()


# ---------------------------------------------------------------------------
# Fitting


@dataclass
class FitOptions:
    task: str = "auto"
    model: str = "auto"
    """``logistic`` for classification, ``ridge`` (default) or ``mlp`` for regression."""
    select: str = "val"
    """``val``: fit on train, choose on val (the paper); ``cv``: stratified k-fold on train+val, refit on both."""
    folds: int = 5
    c_grid: tuple[float, ...] = PAPER_C_GRID
    alpha_grid: tuple[float, ...] | None = None
    hidden: tuple[int, ...] = (256,)
    seed: int = 0
    max_iter: int = 3000
    positive: str | None = None
    """The positive class of a binary task (default: the second in sorted order, e.g. 1)."""
    threshold: str | None = None
    """Operating threshold of binary and multi-label probes (:func:`~.metrics.parse_threshold`): ``youden`` (the
    default), ``sensitivity:0.95``, ``specificity:0.90``, a probability such as ``0.3``, or ``none`` (0.5)."""
    class_weight: str | None = None
    """``balanced``: weight each class by the inverse of its frequency in the rows fitted on."""
    calibrate: str | None = None
    """``sigmoid`` or ``isotonic``: calibrated probabilities, fitted on out-of-fold decision values."""
    bootstrap: int = BOOTSTRAP_RESAMPLES
    """Bootstrap resamples for the 95% intervals of the metrics (0: none); seeded with ``seed``."""


@dataclass
class FitResult:
    probe: Probe
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per split: (truth, scores) as used for the metrics and plots; ``oof`` holds the out-of-fold predictions (CV)."""
    warnings: list[str] = field(default_factory=list)
    """One line each: what the user should know about this fit (chosen value at the grid's edge, no convergence)."""
    threshold_rows: dict = field(default_factory=dict)
    """The rows the threshold was chosen on: ``source`` (``val`` or ``oof``), ``ids``, ``truth`` and ``scores``
    (the probabilities the choice saw). Empty when no threshold was chosen on data."""


ProgressFn = Callable[[str], None]


def _encode_targets(task: str, labels: Labels, positive: str | None) -> tuple[np.ndarray, list[str]]:
    columns = list(labels.columns)
    if task in ("binary", "multiclass"):
        values = labels.columns[columns[0]]
        classes = _sorted_classes(values)
        if task == "binary" and positive is not None:
            if positive not in classes:
                raise InputError(f"{labels.path}: positive class {positive!r} is not among {', '.join(classes)}")
            classes = [c for c in classes if c != positive] + [positive]
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[v] for v in values], dtype=np.int64), classes
    if task == "multilabel":
        return np.stack([_as_float(labels.columns[c]) for c in columns], axis=1).astype(np.int64), columns
    return np.stack([_as_float(labels.columns[c]) for c in columns], axis=1), columns


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0, dtype=np.float64)
    scale = x.std(axis=0, dtype=np.float64)
    scale[~(scale > 1e-12)] = 1.0  # a constant feature carries nothing; keep it finite
    return mean, scale


@dataclass
class _Fitted:
    """One fitted model in standardized space."""

    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    mlp_weights: list[np.ndarray] = field(default_factory=list)
    mlp_biases: list[np.ndarray] = field(default_factory=list)
    target_mean: np.ndarray | None = None
    target_scale: np.ndarray | None = None
    converged: bool = True


class _Design:
    """Standardized training features; for more features than rows, the kernel trick's factors.

    Why: Raptor embeddings are wide (76,800 features for K=100) and cohorts
    small (about a thousand volumes), so the L2-regularized solution lies in
    the span of the training rows (representer theorem).  With Z Z^T = U S U^T,
    logistic regression on the n x r features G = U S^(1/2) with the same C has
    the same optimum, mapped back as w = Z^T U S^(-1/2) beta: each solver
    iteration costs O(n^2) instead of O(n p), which turns hours into seconds.
    The factorization is computed once and shared by every C of the grid.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.mean, self.scale = _standardizer(x)
        self.z = (x - self.mean) / self.scale
        self._factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def wide(self) -> bool:
        return self.z.shape[1] > self.z.shape[0]

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(G, B): the n x r kernel features and the map back, w = (beta @ B.T) @ Z."""
        if self._factors is None:
            s, u = np.linalg.eigh(self.z @ self.z.T)
            keep = s > max(float(s.max()), 0.0) * 1e-12
            root = np.sqrt(s[keep])
            self._factors = (u[:, keep] * root, u[:, keep] / root)
        return self._factors


def _fit_one(model: str, task: str, design: _Design, y: np.ndarray, strength: float, options: FitOptions) -> _Fitted:
    """Fit one model with one regularization strength on standardized features."""
    from sklearn.exceptions import ConvergenceWarning

    z = design.z
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if model == "logistic":
            from sklearn.linear_model import LogisticRegression

            m = LogisticRegression(C=strength, max_iter=options.max_iter, random_state=options.seed,
                                   class_weight=options.class_weight)
            if design.wide:
                # Iterations are cheap here (n x r), so solve tightly: large-C fits are nearly flat.
                m.set_params(tol=1e-8, max_iter=max(options.max_iter, 10000))
                features, back = design.factors()
                m.fit(features, y)
                weight = (m.coef_.astype(np.float64) @ back.T) @ z
            else:
                m.fit(z, y)
                weight = m.coef_.astype(np.float64)
            bias = m.intercept_.astype(np.float64)
            if task == "multiclass" and weight.shape[0] != int(y.max()) + 1:
                raise InputError("a class has no training example; every class needs some in the train split")  # guarded by _check_fit_rows
            out = _Fitted(weight=weight, bias=bias)
        elif model == "ridge":
            from sklearn.linear_model import Ridge

            m = Ridge(alpha=strength)
            m.fit(z, y)
            out = _Fitted(weight=np.atleast_2d(m.coef_).astype(np.float64), bias=np.atleast_1d(m.intercept_).astype(np.float64))
        else:
            from sklearn.neural_network import MLPRegressor

            t_mean, t_scale = _standardizer(y)
            m = MLPRegressor(hidden_layer_sizes=tuple(options.hidden), activation="relu", alpha=strength,
                             max_iter=options.max_iter, random_state=options.seed, early_stopping=False)
            target = (y - t_mean) / t_scale
            m.fit(z, target if target.shape[1] > 1 else target[:, 0])
            out = _Fitted(mlp_weights=[w.astype(np.float64) for w in m.coefs_],
                          mlp_biases=[b.astype(np.float64) for b in m.intercepts_],
                          target_mean=t_mean, target_scale=t_scale)
    out.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return out


def _as_probe_parts(f: _Fitted) -> dict:
    return dict(weight=f.weight, bias=f.bias, mlp_weights=f.mlp_weights, mlp_biases=f.mlp_biases,
                target_mean=f.target_mean, target_scale=f.target_scale)


def _temporary_probe(task: str, model: str, classes: list[str], mean, scale, fitted: _Fitted) -> Probe:
    return Probe(task=task, model=model, classes=classes, label_columns=[], feature_mean=mean, feature_scale=scale,
                 **_as_probe_parts(fitted))


def _selection_score(task: str, y: np.ndarray, scores: np.ndarray) -> float:
    """Higher is better: AUC (ties broken by log-loss) for classification, -MSE for regression."""
    if task in ("binary", "multiclass"):
        m = classification_metrics(task, y, scores)
        p = np.clip(scores[np.arange(len(y)), y], 1e-12, 1.0)
        auc = m["auc"] if m["auc"] is not None else (m["accuracy"] or 0.0)
        return float(auc) - 1e-6 * float(np.mean(-np.log(p)))
    if task == "multilabel":  # called per label: y (n,), scores (n, 2)
        return _selection_score("binary", y, scores)
    return -float(np.mean((scores - y) ** 2 / np.maximum(np.var(y, axis=0), 1e-12)))


def selection_metric(task: str) -> str:
    """The name of what :func:`_selection_score` measures, for progress lines."""
    return "AUC" if task in ("binary", "multiclass", "multilabel") else "-MSE/variance"


def parse_grid(text: str) -> tuple[float, ...]:
    """A regularization grid from text such as "0.0001,0.001,0.01" (the CLI's and the Fit panel's form)."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise RaptorError(f"expected comma-separated positive numbers for the regularization grid (got {text!r})")
    return values


def grid_edge_warning(parameter: str, chosen: float, grid: Sequence[float], label: str = "") -> str | None:
    """A one-line warning when the chosen regularization is the grid's smallest or largest value.

    Why: the best value may then lie beyond the grid.  On AdrenalMNIST3D the paper's C grid
    (0.01 ... 100) chose its smallest value for every wide Raptor embedding, and extending it to
    0.0001 lifted K=100's test AUC by 0.03-0.05, so a fit that stops at the edge says so.
    """
    values = sorted(set(float(g) for g in grid))
    if len(values) < 2 or chosen not in (values[0], values[-1]):
        return None
    low = chosen == values[0]
    more = ("stronger" if parameter == "C" else "weaker") if low else ("weaker" if parameter == "C" else "stronger")
    beyond = [chosen / 100, chosen / 10] if low else [chosen * 10, chosen * 100]
    suggestion = ",".join(format(v, "g") for v in (beyond + [chosen] if low else [chosen] + beyond))
    flag = "--c-grid" if parameter == "C" else "--alpha-grid"
    return (f"{label}{parameter}={chosen:g} is the {'smallest' if low else 'largest'} value of the grid, so the best "
            f"may be beyond it ({more} regularization); try {parameter} values {suggestion} ({flag})")


def _folds(task: str, y: np.ndarray, n_folds: int, seed: int, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if task in ("binary", "multiclass"):
        smallest = int(np.bincount(y).min()) if len(y) else 0
        if smallest < 2:
            raise InputError(f"{where}: a class has fewer than 2 examples in train+val; cross-validation needs more")
        k = min(n_folds, smallest)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y))
    if len(y) < 2 * n_folds:
        raise InputError(f"{where}: only {len(y)} train+val rows for {n_folds}-fold cross-validation")
    return list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y))))


def _select(model: str, task: str, design: _Design, x_fit: np.ndarray, y_fit: np.ndarray, x_val, y_val, grid,
            options: FitOptions, where: str, say: ProgressFn, cancel) -> tuple[float, dict, np.ndarray | None]:
    """Pick the regularization strength; returns it, the score of every candidate and, with CV, the
    out-of-fold decision values at the chosen strength (each row scored by the fold model that did not see it)."""
    scores: dict[str, float] = {}
    out_of_fold: dict[str, np.ndarray] = {}
    score_task = "binary" if task == "multilabel" else task
    if score_task == "binary":
        names = ["0", "1"]
    elif score_task == "multiclass":
        names = [str(i) for i in range(int(max(y_fit.max(), y_val.max() if len(y_val) else 0)) + 1)]
    else:
        names = [str(i) for i in range(y_fit.shape[1])]
    folds = []
    if options.select == "cv":
        folds = [(_Design(x_fit[train_idx]), train_idx, test_idx)
                 for train_idx, test_idx in _folds(score_task, y_fit, options.folds, options.seed, where)]
    for strength in grid:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if options.select == "val":
            fitted = _fit_one(model, score_task, design, y_fit, strength, options)
            probe = _temporary_probe(score_task, model, names, design.mean, design.scale, fitted)
            value = _selection_score(score_task, y_val, probe.scores(x_val))
        else:
            fold_values, decisions = [], None
            for fold_design, train_idx, test_idx in folds:
                fitted = _fit_one(model, score_task, fold_design, y_fit[train_idx], strength, options)
                probe = _temporary_probe(score_task, model, names, fold_design.mean, fold_design.scale, fitted)
                decision = probe.decision(x_fit[test_idx])
                if decisions is None:
                    decisions = np.zeros((len(y_fit), decision.shape[1]))
                decisions[test_idx] = decision
                fold_values.append(_selection_score(score_task, y_fit[test_idx], probe.probabilities(decision)))
            value = float(np.mean(fold_values))
            if score_task != "regression":
                out_of_fold[format(strength, "g")] = decisions
        scores[format(strength, "g")] = round(value, 6)
        say(f"  {'C' if model == 'logistic' else 'alpha'}={strength:g}: {'val' if options.select == 'val' else 'cv'} "
            f"{selection_metric(score_task)} {value:.4f}")
    best = max(grid, key=lambda s: (scores[format(s, "g")], -abs(math.log10(s))))
    return best, scores, out_of_fold.get(format(best, "g"))


def _check_fit_rows(task: str, y: np.ndarray, classes: list[str], where: str, rows: str) -> None:
    """Every class (every label's two values) must occur in the rows the probe is fitted on."""
    if task in ("binary", "multiclass"):
        seen = set(np.unique(y).tolist())
        lacking = [c for i, c in enumerate(classes) if i not in seen]
        if lacking:
            raise InputError(f"{where}: class {lacking[0]!r} has no example in the {rows} rows; every class needs "
                             "some to be learned (or drop it, or set --task regression for numbers)")
    elif task == "multilabel":
        for c, name in enumerate(classes):
            values = set(np.unique(y[:, c]).tolist())
            if len(values) < 2:
                raise InputError(f"{where}: label {name!r} is {int(next(iter(values), 0))} in every {rows} row; a label "
                                 "needs both 0 and 1 to be learned (drop the column with --label-column)")


def fit_probe(
    embeddings: EmbeddingSet,
    labels: Labels,
    options: FitOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel=None,
) -> FitResult:
    """Fit a probe on the labelled embeddings; metrics for every split present.

    Inputs are checked first, each problem one line naming the labels file;
    a solver that still fails (scikit-learn raises ``ValueError`` for
    whatever it cannot fit) is reported the same way, never as a traceback.
    """
    try:
        return _fit_probe(embeddings, labels, options, progress=progress, cancel=cancel)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        raise InputError(f"{labels.path}: the probe could not be fitted ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None


def _fit_probe(
    embeddings: EmbeddingSet,
    labels: Labels,
    options: FitOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel=None,
) -> FitResult:
    options = options or FitOptions()
    say = progress or (lambda message: None)
    start = time.perf_counter()
    if options.select not in ("val", "cv"):
        raise RaptorError(f"select must be 'val' or 'cv' (got {options.select!r})")
    if not 2 <= options.folds <= 50:
        raise RaptorError(f"folds must be between 2 and 50 (got {options.folds})")
    if not 1 <= options.max_iter <= 10_000_000:
        raise RaptorError(f"max-iter must be a whole number of solver iterations from 1 (got {options.max_iter})")
    if not 0 <= options.seed < 2**32:
        raise RaptorError(f"seed must be between 0 and 4294967295 (got {options.seed})")
    if options.hidden and not 1 <= len(options.hidden) <= 2:
        raise RaptorError("an MLP probe has one or two hidden layers (at most three weight layers)")
    if options.class_weight not in (None, "balanced"):
        raise RaptorError(f"class weight must be 'balanced' or none (got {options.class_weight!r})")
    if options.calibrate not in (None,) + CALIBRATION_METHODS:
        raise RaptorError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)} (got {options.calibrate!r})")
    if options.bootstrap < 0:
        raise RaptorError(f"bootstrap resamples must be 0 or more (got {options.bootstrap})")
    explicit_rule = options.threshold is not None
    rule = parse_threshold(options.threshold) if explicit_rule else None
    known = set(embeddings.ids)
    missing = [i for i in labels.ids if i not in known]
    if missing:
        raise InputError(
            f"{labels.path}: {len(missing)} labelled id(s) have no embedding, e.g. {missing[0]!r} "
            f"(embeddings hold {len(known)} ids such as {embeddings.ids[0]!r})"
        )
    task = infer_task(labels, options.task)
    model = options.model
    if model == "auto":
        model = "ridge" if task == "regression" else "logistic"
    if model not in MODELS:
        raise RaptorError(f"unknown probe model {model!r} (choose from {', '.join(MODELS)})")
    if task == "regression" and model == "logistic":
        raise RaptorError("logistic regression is for classification; use --probe-model ridge or mlp for regression")
    if task != "regression" and model != "logistic":
        raise RaptorError(f"{model} is for regression; classification uses the logistic probe")
    if explicit_rule and task not in ("binary", "multilabel"):
        raise RaptorError(f"--threshold is for binary and multi-label probes; a {task} probe "
                          + ("decides by the most likely class" if task == "multiclass" else "predicts numbers"))
    if task == "regression" and (options.class_weight or options.calibrate):
        raise RaptorError("class weighting and calibration are for classification probes")
    if rule is None and task in ("binary", "multilabel"):
        rule = ThresholdRule("youden")
    y_all, classes = _encode_targets(task, labels, options.positive)
    split = np.array(labels.splits)
    x_all = embeddings.rows(labels.ids).astype(np.float64)
    where = str(labels.path)
    if not (split == "train").any():
        raise InputError(f"{where}: has no train rows")
    if options.select == "val" and not (split == "val").any():
        raise InputError(f"{where}: has no val rows to choose the regularization on; add some or use --select cv")
    fit_rows = split == "train" if options.select == "val" else np.isin(split, ("train", "val"))
    val_rows = split == "val"
    _check_fit_rows(task, y_all[fit_rows], classes, where, "train" if options.select == "val" else "train+val")
    grid = tuple(options.alpha_grid or (RIDGE_ALPHA_GRID if model == "ridge" else MLP_ALPHA_GRID)) if model != "logistic" else tuple(options.c_grid)
    if not grid or any(not (g > 0) for g in grid):
        raise RaptorError("the regularization grid must hold positive numbers")
    say(f"raptor: {task} probe ({model}) on {int(fit_rows.sum())} rows x {x_all.shape[1]} features, "
        f"choosing {'C' if model == 'logistic' else 'alpha'} by {'validation' if options.select == 'val' else f'{options.folds}-fold CV'}")

    x_fit = x_all[fit_rows]
    design = _Design(x_fit)  # the rows the final model is fitted on (and, with select=val, the candidates)
    mean, scale = design.mean, design.scale
    parameter = "C" if model == "logistic" else "alpha"
    selection: dict = {"method": options.select, "grid": list(grid), "parameter": parameter,
                       "metric": selection_metric("binary" if task == "multilabel" else task)}
    converged = True
    # One group per separately fitted model: the task itself, or each label of a multi-label task.
    groups = [(name, c) for c, name in enumerate(classes)] if task == "multilabel" else [(None, None)]
    group_task = "binary" if task == "multilabel" else task
    weights, biases, chosen, per_label, out_of_fold, strengths = [], [], {}, {}, [], []
    final = None
    for name, c in groups:
        if name is not None:
            say(f" label {name}:")
        y_fit_g = y_all[fit_rows] if c is None else y_all[fit_rows, c]
        y_val_g = y_all[val_rows] if c is None else y_all[val_rows, c]
        strength, table, oof = _select(model, task, design, x_fit, y_fit_g, x_all[val_rows], y_val_g, grid, options,
                                       where, say, cancel)
        fitted = _fit_one(model, group_task, design, y_fit_g, strength, options)
        converged &= fitted.converged
        strengths.append(strength)
        out_of_fold.append(oof)
        if c is None:
            final = fitted
            selection.update(chosen=strength, scores=table)
        else:
            weights.append(fitted.weight[0])
            biases.append(fitted.bias[0])
            chosen[name], per_label[name] = strength, table
    if task == "multilabel":
        final = _Fitted(weight=np.stack(weights), bias=np.array(biases))
        selection.update(chosen=chosen, scores=per_label)
    per_choice = selection["chosen"].items() if task == "multilabel" else [(None, selection["chosen"])]
    warnings_out = [w for name, value in per_choice
                    if (w := grid_edge_warning(parameter, value, grid, label=f"label {name}: " if name else ""))]
    if not converged:
        warnings_out.append("the solver did not fully converge for the chosen setting (raise --max-iter)")
    warnings_out += _imbalance_warnings(task, classes, y_all[fit_rows], rule, options.class_weight)

    probe = Probe(task=task, model=model, classes=classes, label_columns=list(labels.columns), feature_mean=mean,
                  feature_scale=scale, embedding=dict(embeddings.metadata), **_as_probe_parts(final))
    fitted_on = "train" if options.select == "val" else "train+val"
    if options.calibrate:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        say(f"raptor: calibrating ({options.calibrate}) on out-of-fold decision values of {options.folds}-fold CV "
            f"on {fitted_on}")
        parts = [_calibrate_group(options.calibrate, model, group_task, x_fit,
                                  y_all[fit_rows] if c is None else y_all[fit_rows, c], strength, options, where)
                 for (name, c), strength in zip(groups, strengths)]
        probe.calibration = _join_calibrations(parts)

    # The rows the threshold is chosen on: never those the final model was fitted on.
    if options.select == "cv" and task in CLASSIFICATION_TASKS:
        oof_truth = y_all[fit_rows]
        oof_scores = probe.probabilities(np.concatenate(out_of_fold, axis=1))
    threshold_rows: dict = {}
    if rule is not None:
        if options.select == "val":
            source, ids = "val", [i for i, keep in zip(labels.ids, val_rows) if keep]
            truth, probabilities = y_all[val_rows], probe.scores(x_all[val_rows])
        else:
            source, ids = "oof", [i for i, keep in zip(labels.ids, fit_rows) if keep]
            truth, probabilities = oof_truth, oof_scores
        if rule.chosen_on_data:
            threshold_rows = {"source": source, "ids": ids, "truth": truth, "scores": probabilities}
        values = []
        for i, (name, c) in enumerate(groups):
            y_sel = truth if c is None else truth[:, c]
            p_sel = probabilities[:, 1] if task == "binary" else probabilities[:, c]
            try:
                values.append(choose_threshold(y_sel, p_sel, rule))
            except ValueError:
                what = (f"{'label ' + name + ': ' if name else ''}the {'validation split' if source == 'val' else 'train+val rows'} "
                        f"hold a single class, so no threshold can be chosen there")
                if explicit_rule:
                    raise InputError(f"{where}: {what}; use --select cv, more rows, or a fixed --threshold") from None
                warnings_out.append(f"{what}; deciding at 0.5")
                values.append(0.5)
        probe.threshold = values
        probe.threshold_info = {
            "criterion": rule.criterion, "target": rule.target,
            "chosen_on": (None if not rule.chosen_on_data else
                          "val" if source == "val" else f"out-of-fold predictions of {options.folds}-fold CV on train+val"),
            "rows": len(ids) if rule.chosen_on_data else None,
        }

    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics: dict[str, dict] = {}
    in_sample = ("train",) if options.select == "val" else ("train", "val")
    chose = "C and threshold" if rule is not None and rule.chosen_on_data else parameter

    def classification(truth, scores):
        return classification_metrics(task, truth, scores, probe.thresholds, names=classes, resamples=options.bootstrap,
                                      seed=options.seed)

    for name in SPLITS:
        rows = split == name
        if not rows.any():
            continue
        truth, scores = y_all[rows], probe.scores(x_all[rows])
        predictions[name] = (truth, scores)
        metrics[name] = regression_metrics(truth, scores, classes) if task == "regression" else classification(truth, scores)
        metrics[name]["in_sample"] = name in in_sample
        metrics[name]["role"] = ("fitted on (in-sample)" if name in in_sample else
                                 f"{chose} chosen here" if name == "val" else "held out")
    if options.select == "cv" and task in CLASSIFICATION_TASKS:
        predictions["oof"] = (oof_truth, oof_scores)
        metrics["oof"] = classification(oof_truth, oof_scores)
        metrics["oof"].update(in_sample=False, role=f"out-of-fold predictions on train+val; {chose} chosen here")
    probe.metrics = metrics
    import sklearn

    probe.training = {
        "selection": selection,
        "fitted_on": ["train"] if options.select == "val" else ["train", "val"],
        "rows": {s: int((split == s).sum()) for s in SPLITS},
        "labels_file": labels.path.name,
        "seed": options.seed,
        "max_iter": options.max_iter,
        "converged": bool(converged),
        "standardization": "mean/std of the rows fitted on",
        **({"hidden_layers": list(options.hidden)} if model == "mlp" else {}),
        **({"positive_class": classes[1]} if task == "binary" else {}),
        **({"class_weight": options.class_weight} if task != "regression" else {}),
        **({"calibration": {"method": options.calibrate, "fitted_on": f"out-of-fold decision values of "
                                                                     f"{options.folds}-fold CV on {fitted_on}",
                            "by": "sklearn.calibration.CalibratedClassifierCV(ensemble=False)"}}
           if options.calibrate else {}),
        **({"bootstrap": {"resamples": options.bootstrap, "seed": options.seed, "confidence": 0.95,
                          "method": "percentile"}} if task != "regression" else {}),
        "scikit_learn": sklearn.__version__,
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warnings": list(warnings_out),
    }
    return FitResult(probe=probe, predictions=predictions, warnings=warnings_out, threshold_rows=threshold_rows)


def _imbalance_warnings(task: str, classes: list[str], y: np.ndarray, rule: ThresholdRule | None,
                        class_weight: str | None) -> list[str]:
    """Warn when the minority class is under 20% of the rows fitted on and nothing accounts for it.

    A threshold chosen on data or class weighting accounts for it; ``--threshold none`` (0.5) does not.  For more
    than two classes, "under 20%" means the rarest class has under a quarter of the commonest one's rows (the same
    ratio as 20:80 for two classes), and only class weighting helps, since the decision is the most likely class.
    """
    if task == "regression" or class_weight is not None or (rule is not None and rule.criterion != "none"):
        return []
    advice = ("decisions at p=0.5 will favour the majority class; choose an operating threshold (--threshold youden) "
              "or weight the classes (--class-weight balanced)")
    if task == "binary":
        share = float(np.mean(y == 1))
        minority, fraction = (classes[1], share) if share <= 0.5 else (classes[0], 1.0 - share)
        return [f"class {minority!r} is {fraction:.0%} of the rows fitted on; {advice}"] if fraction < 0.2 else []
    if task == "multilabel":
        out = []
        for c, name in enumerate(classes):
            share = float(np.mean(y[:, c] == 1))
            fraction = min(share, 1.0 - share)
            if fraction < 0.2:
                out.append(f"label {name}: {'positives' if share <= 0.5 else 'negatives'} are {fraction:.0%} of the "
                           f"rows fitted on; {advice}")
        return out
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < 0.25 * counts.max():
        rare = classes[int(np.argmin(counts))]
        common = classes[int(np.argmax(counts))]
        message = (f"class {rare!r} has {int(counts.min())} of the rows fitted on, under a quarter of class {common!r} "
                   f"({int(counts.max())}); the most likely class will rarely be {rare!r}: weight the classes "
                   f"(--class-weight balanced)")
        return [message]
    return []


def _calibrate_group(method: str, model: str, task: str, x_fit: np.ndarray, y: np.ndarray, strength: float,
                     options: FitOptions, where: str) -> Calibration:
    """Calibrators for one fitted model (the probe, or one label), through scikit-learn's CalibratedClassifierCV."""
    names = ["0", "1"] if task == "binary" else [str(i) for i in range(int(y.max()) + 1)]
    folds = _folds(task, y, options.folds, options.seed, where)

    def fit_rows(rows: np.ndarray, y_part: np.ndarray):
        design = _Design(x_fit[rows])
        fitted = _fit_one(model, task, design, y_part, strength, options)
        probe = _temporary_probe(task, model, names, design.mean, design.scale, fitted)
        return lambda wanted: probe.decision(x_fit[wanted])

    return fit_calibration(method, y, folds, fit_rows)


def _join_calibrations(parts: list[Calibration]) -> Calibration:
    """One calibration from one per label (multi-label) or the probe's own."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].method == "sigmoid":
        return Calibration(method="sigmoid", a=np.concatenate([p.a for p in parts]),
                           b=np.concatenate([p.b for p in parts]))
    return Calibration(method="isotonic", knots_x=[x for p in parts for x in p.knots_x],
                       knots_y=[y for p in parts for y in p.knots_y])


__all__ = [
    "EmbeddingSet",
    "FitOptions",
    "FitResult",
    "Labels",
    "Probe",
    "ProbeScores",
    "fit_probe",
    "grid_edge_warning",
    "parse_grid",
    "infer_task",
    "load_embeddings",
    "read_labels",
    "PAPER_C_GRID",
]
