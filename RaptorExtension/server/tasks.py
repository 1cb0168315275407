"""What each job kind does on the server: the engine's own functions, fed from a checked request.

Every request is checked before the job is queued (:func:`prepare`), so a
bad field is a 400 answered at once with one line, not a job that fails
later.  Inputs are either uploads (checked when they arrived) or paths on the
server's disk, which must lie under one of the ``--allow-root`` folders
(:class:`Forbidden`, a 403, otherwise).  Results are written into the job's
folder in the formats the command line writes: the embedding ``.npz``; the
explanation (``.npz``, heatmap NRRD, curves CSV, PNG); the probe file with
its metrics JSON and plot; a batch's CSV and Parquet stay where the request
put them, on the server's disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, RaptorError
from ..volumes.volume import Volume
from .jobs import Job
from .model_pool import ModelPool
from .uploads import Uploads


class Forbidden(RaptorError):
    """A path outside the folders this server may read or write (HTTP 403)."""


@dataclass
class ServerContext:
    uploads: Uploads
    models: ModelPool
    allow_roots: list[Path]
    work_dir: Path


# ---------------------------------------------------------------------------
# Request fields


def _field(request: dict, name: str, types, what: str, default=None, required: bool = False):
    if name not in request or request[name] is None:
        if required:
            raise InputError(f"{what}: missing {name!r}")
        return default
    value = request[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise InputError(f"{what}: {name!r} has the wrong type (boolean)")
    if not isinstance(value, types):
        raise InputError(f"{what}: {name!r} has the wrong type ({type(value).__name__})")
    return value


def allowed_path(ctx: ServerContext, text, what: str, *, must_exist: bool = True) -> Path:
    """A path on the server's disk, resolved (symlinks, ``..``) and inside an allowed root."""
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InputError(f"{what}: a path must be a non-empty string")
    path = Path(text)
    if not path.is_absolute():
        raise InputError(f"{what}: {text}: paths sent to a server must be absolute")
    resolved = path.resolve()
    if not any(resolved == root or root in resolved.parents for root in ctx.allow_roots):
        if not ctx.allow_roots:
            raise Forbidden(f"{what}: {text}: this server reads no paths of its own (start it with --allow-root FOLDER); upload the file instead")
        raise Forbidden(f"{what}: {text}: outside the folders this server may use ({', '.join(str(r) for r in ctx.allow_roots)})")
    if must_exist and not resolved.exists():
        raise InputError(f"{what}: {text}: no such file or folder on the server")
    return resolved


def input_path(ctx: ServerContext, ref, purpose: str, what: str) -> Path:
    """``{"upload": id}`` or ``{"path": "/on/the/server"}`` to a file the server may read."""
    if not isinstance(ref, dict) or len(ref) != 1 or not ({"upload", "path"} & set(ref)):
        raise InputError(f"{what}: must be {{\"upload\": ID}} or {{\"path\": PATH}}")
    if "upload" in ref:
        if not isinstance(ref["upload"], str):
            raise InputError(f"{what}: the upload id must be a string")
        return ctx.uploads.path_of(ref["upload"], purpose)
    return allowed_path(ctx, ref["path"], what)


@dataclass
class VolumeInfo:
    """What the client says about a volume it sends: names, provenance, and its exact geometry."""

    id: str | None = None
    source: str | None = None
    modality: str | None = None
    info: dict | None = None
    ijk_to_ras: np.ndarray | None = None
    has_geometry: bool | None = None


def volume_info(data, what: str = "volume_info") -> VolumeInfo:
    if data is None:
        return VolumeInfo()
    if not isinstance(data, dict):
        raise InputError(f"{what}: must be a JSON object")
    unknown = set(data) - {"id", "source", "modality", "info", "ijk_to_ras", "has_geometry"}
    if unknown:
        raise InputError(f"{what}: unknown field {sorted(unknown)[0]!r}")
    out = VolumeInfo()
    for name in ("id", "source", "modality"):
        value = _field(data, name, str, what)
        if value is not None and (len(value) > 1000 or "\n" in value):
            raise InputError(f"{what}: {name!r} must be one line of at most 1000 characters")
        setattr(out, name, value)
    info = _field(data, "info", dict, what)
    if info is not None:
        if len(info) > 50 or not all(isinstance(k, str) and isinstance(v, str) and len(v) < 1000 for k, v in info.items()):
            raise InputError(f"{what}: 'info' must map at most 50 names to short strings")
    out.info = info
    out.has_geometry = _field(data, "has_geometry", bool, what)
    matrix = data.get("ijk_to_ras")
    if matrix is not None:
        try:
            m = np.array(matrix, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{what}: 'ijk_to_ras' must be a 4x4 array of numbers") from None
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise InputError(f"{what}: 'ijk_to_ras' must be a 4x4 array of finite numbers")
        out.ijk_to_ras = m
    return out


def volume_loader(ctx: ServerContext, request: dict, what: str = "volume") -> Callable[[], Volume]:
    """Check the job's volume now, read it later: returns the function that reads it (in the job).

    Submitting must answer at once (the Slicer modules submit from their
    timer, and a slow answer freezes the interface), so only the checks that
    read no voxels run here: the upload or path, the client's names and
    geometry, and the file's header against its size (a corrupt or truncated
    file is a 400 now).  Reading the voxels with Slicer's reader happens when
    the job runs.  When the client declares the exact IJK-to-RAS it wrote (a
    Slicer node's geometry, say), the file's parsed geometry must agree to
    1e-6 mm and the declared one is used: so the server embeds exactly what
    the client would have embedded itself.
    """
    from ..volumes.headers import check_volume_file, declared
    from ..volumes.readers import expand_input, read_slicer_file

    ref = request.get("volume")
    path = input_path(ctx, ref, "volume", what)
    info = volume_info(request.get("volume_info"))
    uploaded = "upload" in ref
    if uploaded:
        found = declared(path)
        if found is not None and found.data_path is not None and Path(found.data_path).resolve() != path.resolve():
            raise InputError(f"{what}: its header names another file for its voxels; send one self-contained file")
        check_volume_file(path)
    else:
        refs = expand_input(str(path))
        if len(refs) != 1:
            raise InputError(f"{what}: {path} holds {len(refs)} volumes; name one")

    def load() -> Volume:
        volume = read_slicer_file(path, id=info.id or "volume") if uploaded else refs[0].load()
        if info.ijk_to_ras is not None:
            read = np.asarray(volume.ijk_to_ras, dtype=np.float64)
            if np.abs(read - info.ijk_to_ras).max() > 1e-6 * max(1.0, float(np.abs(info.ijk_to_ras).max())):
                raise InputError(f"{what}: the file's geometry differs from the geometry declared with it")
            volume.ijk_to_ras = info.ijk_to_ras
        if info.id:
            volume.id = info.id
        if info.source:
            volume.source = info.source
        elif uploaded:
            volume.source = f"upload:{volume.id}"  # never the server's own path
        if info.modality:
            volume.modality = info.modality
        if info.info:
            volume.info = dict(info.info)
        if info.has_geometry is not None:
            volume.has_geometry = info.has_geometry
        return volume

    return load


# ---------------------------------------------------------------------------
# The job kinds


def prepare(ctx: ServerContext, kind: str, request: dict) -> Callable[[Job], None]:
    """Check a request and return the function that runs it (raises InputError/Forbidden at once)."""
    if not isinstance(request, dict):
        raise InputError("a job request must be a JSON object")
    builder = {"embed": _prepare_embed, "explain": _prepare_explain, "fit": _prepare_fit, "batch": _prepare_batch,
               "describe": _prepare_describe, "import_model": _prepare_import_model}.get(kind)
    if builder is None:
        raise InputError(f"unknown job kind {kind!r} (embed, explain, fit, batch, describe or import_model)")
    return builder(ctx, request)


def _settings(ctx: ServerContext, request: dict, what: str = "settings"):
    from ..encoding.settings import settings_from_json

    settings = settings_from_json(request.get("settings") or {}, what)
    if settings.cache_dir is not None:
        raise InputError(f"{what}: cache_dir is the server's own choice (raptor serve --cache-dir)")
    _check_device(settings.device, what)
    _check_model(ctx, settings.model, what)
    settings.projection_file = _projection_file(ctx, request, settings.projection_file, what)
    return settings


def _projection_file(ctx: ServerContext, request: dict, in_settings: str | None, what: str) -> str | None:
    """A user's projector: an upload named by the request's ``projection_file``, or a path the server may read."""
    ref = request.get("projection_file")
    if ref is not None:
        if in_settings is not None:
            raise InputError(f"{what}: give the projector file once, in the request or in the settings")
        return str(input_path(ctx, ref, "projection", f"{what} projection_file"))
    if in_settings is not None:
        return str(allowed_path(ctx, in_settings, f"{what} projection_file"))
    return None


def _check_model(ctx: ServerContext, model: str | None, what: str) -> None:
    """A model folder on the server's disk must lie under an allowed root; hub ids and short names are fine."""
    if model and model.startswith(("/", "~", ".", "\\")) or (model and len(model) > 1 and model[1] == ":"):
        allowed_path(ctx, model, f"{what} model folder")


def _check_device(device: str, what: str) -> None:
    from ..names import device_problem

    problem = device_problem(device)
    if problem:
        raise InputError(f"{what}: {problem}")


def _prepare_embed(ctx: ServerContext, request: dict):
    settings = _settings(ctx, request)
    load = volume_loader(ctx, request)  # a corrupt or refused file is answered now, as a 400

    def run(job: Job) -> None:
        job.set_stage("reading the volume")
        volume = load()
        embedder = _embedder(job, ctx, settings)
        job.set_stage("encoding", f"{volume.id} on {embedder.encoder.device}")
        embedding = embedder.embed_volume(volume, progress=lambda _id, done, total: job.progress(done, total),
                                          cancel=job.cancel_event)
        job.check_cancel()
        embedding.save(job.folder / "embedding.npz")
        job.result = {"files": {"embedding": "embedding.npz"}, "id": embedding.id,
                      "n_features": int(embedding.vector.size), "settings_hash": embedding.metadata.get("settings_hash")}

    return run


def _prepare_describe(ctx: ServerContext, request: dict):
    """What embeddings these settings make (weights hash, projection, features), before sending any volume."""
    settings = _settings(ctx, request)
    preset = _field(request, "preset", str, "describe", "")

    def run(job: Job) -> None:
        from ..encoding.model import model_summary

        embedder = _embedder(job, ctx, settings)
        job.result = {"metadata": embedder.settings_metadata(preset), "n_features": int(embedder.n_features),
                      "summary": model_summary(embedder.encoder)}

    return run


def _prepare_import_model(ctx: ServerContext, request: dict):
    """Copy a model folder on the server's disk into its model cache, checked to load offline."""
    folder = allowed_path(ctx, _field(request, "folder", str, "import_model", required=True), "import_model folder")
    repo_id = _field(request, "repo_id", str, "import_model")

    def run(job: Job) -> None:
        from ..encoding.model_cache import import_model_folder

        job.set_stage("importing model", str(folder))
        job.result = {"repo_id": import_model_folder(folder, repo_id)}

    return run


def _embedder(job: Job, ctx: ServerContext, settings):
    """The pool's embedder for these settings; a hub model not cached yet is downloaded with byte progress."""
    from ..encoding.model_cache import download_model, hub_offline, is_cached

    if not Path(settings.model).expanduser().is_dir() and not hub_offline() and not is_cached(settings.model):
        job.set_stage("downloading model", settings.model)

        def report(done: int, total: int) -> None:
            job.check_cancel()
            job.progress(done >> 20, max(1, total >> 20), "MB")

        try:
            download_model(settings.model, None, report)
        except RaptorError:
            raise
        except Exception as exc:  # no network, gated model...: loading below says it in the user's terms
            job.set_stage("loading model", f"download failed ({type(exc).__name__}); trying the cache")
    job.set_stage("loading model", settings.model)
    embedder = ctx.models.embedder_for(_with_client_projector_name(job, ctx, settings))
    job.check_cancel()
    return embedder


def _with_client_projector_name(job: Job, ctx: ServerContext, settings):
    """An uploaded projector read under the client's file name (the metadata records it), never the upload's."""
    import dataclasses
    import os
    import shutil

    if settings.projection_file is None:
        return settings
    upload = ctx.uploads.find(Path(settings.projection_file))
    if upload is None:
        return settings
    named = job.folder / "projector" / upload.name
    named.parent.mkdir(exist_ok=True)
    try:
        os.link(upload.path, named)
    except OSError:
        shutil.copyfile(upload.path, named)
    return dataclasses.replace(settings, projection_file=str(named))


def _prepare_explain(ctx: ServerContext, request: dict):
    from ..probes.probe import Probe

    what = "explain"
    probe_path = input_path(ctx, request.get("probe"), "probe", "probe")
    probe = Probe.load(probe_path)
    if not probe.is_linear:
        raise InputError(f"probe {probe.label()} is an MLP; only linear probes (logistic, ridge) can be explained exactly")
    load = volume_loader(ctx, request)
    output = _field(request, "output", str, what)
    model = _field(request, "model", str, what)
    _check_model(ctx, model or probe.embedding.get("encoder"), what)
    device = _field(request, "device", str, what, "auto")
    _check_device(device, what)
    slices = _field(request, "slices", str, what, "top")
    if slices not in ("top", "mid"):
        raise InputError(f"{what}: 'slices' must be top or mid")
    batch_size = _field(request, "batch_size", int, what)
    baseline = _field(request, "baseline", str, what, "background")
    if baseline not in ("background", "mean"):
        raise InputError(f"{what}: 'baseline' must be background or mean")
    projection_file = _projection_file(ctx, request, None, what)

    def run(job: Job) -> None:
        from ..atomic import atomic_write_text
        from ..probes.explain import explain_volume
        from ..probes.explanation import save_explanation
        from ..probes.figure import curves_csv, render_explanation
        from ..probes.probe_settings import embed_settings_for
        from ..volumes.slicer_io import write_volume_file

        job.set_stage("reading the volume")
        volume = load()
        settings = embed_settings_for(probe, model=model, device=device, batch_size=batch_size,
                                      projection_file=projection_file)
        if not settings.model:
            raise InputError(f"probe {probe.label()}: records no model; pass one")
        embedder = _embedder(job, ctx, settings)
        job.set_stage("encoding", f"{volume.id} on {embedder.encoder.device}")
        explained = explain_volume(probe, embedder, volume, cancel=job.cancel_event,
                                   progress=lambda _id, done, total: job.progress(done, total))
        job.check_cancel()
        job.set_stage("writing results")
        ex = explained.explain(output, device=embedder.encoder.device, baseline=baseline)
        save_explanation(ex, job.folder / "explanation.npz")
        write_volume_file(ex.heatmap, ex.input_ijk_to_ras, job.folder / "heatmap.nrrd", what="heatmap")
        atomic_write_text(job.folder / "curves.csv", curves_csv(ex))
        render_explanation(ex, job.folder / "figure.png", slices=slices)
        job.result = {
            "files": {"explanation": "explanation.npz", "heatmap": "heatmap.nrrd", "curves": "curves.csv",
                      "figure": "figure.png"},
            "id": volume.id, "output": ex.output, "score": ex.score, "decision": ex.decision, "bias": ex.bias,
            "residual": ex.residual,
            "scores": {name: float(v) for name, v in zip(probe.classes, explained.scores)},
        }

    return run


FIT_OPTIONS = {"task": str, "model": str, "select": str, "folds": int, "c_grid": list, "alpha_grid": list,
               "hidden": list, "seed": int, "max_iter": int, "positive": str, "threshold": str, "class_weight": str,
               "calibrate": str, "bootstrap": int}


def _prepare_fit(ctx: ServerContext, request: dict):
    what = "fit"
    embeddings = request.get("embeddings")
    if not isinstance(embeddings, list) or not embeddings or len(embeddings) > 10000:
        raise InputError(f"{what}: 'embeddings' must be a non-empty list of inputs")
    tables = [input_path(ctx, ref, "table", "embeddings") for ref in embeddings]
    labels = input_path(ctx, request.get("labels"), "labels", "labels")
    fit_options = _fit_options(request.get("options") or {}, what)
    label_columns = _field(request, "label_columns", list, what)
    if label_columns is not None and not all(isinstance(c, str) for c in label_columns):
        raise InputError(f"{what}: label_columns must be names")
    name = _field(request, "name", str, what, "probe.raptorprobe")
    if "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"{what}: 'name' must be a plain file name")

    def run(job: Job) -> None:
        from ..probes.fit_outputs import decision_lines, write_fit_outputs
        from ..probes.metrics import metrics_table
        from ..probes.probe import fit_probe, load_embeddings, read_labels

        job.set_stage("reading embeddings")
        data = load_embeddings([str(t) for t in tables])
        labels_data = read_labels(labels, label_columns)
        job.set_stage("fitting")
        result = fit_probe(data, labels_data, fit_options, progress=lambda message: job.set_stage("fitting", message),
                           cancel=job.cancel_event)
        job.check_cancel()
        stem = name.removesuffix(".raptorprobe")
        written = write_fit_outputs(result, job.folder / f"{stem}.raptorprobe")
        probe = result.probe
        files = {"probe": written.probe.name, "metrics": written.metrics.name, "plot": written.plot.name}
        if written.reliability is not None:
            files["reliability"] = written.reliability.name
        table = metrics_table(probe.metrics, probe.task, in_sample=probe.training.get("fitted_on", ()))
        job.result = {"files": files, "table": "\n".join([*decision_lines(probe), table]),
                      "warnings": list(result.warnings),
                      "task": probe.task, "classes": list(probe.classes)}

    return run


def _is_errors_csv(head: bytes) -> bool:
    from ..cohort.errorlog import COLUMNS

    return head.split(b"\n", 1)[0].strip() == ",".join(COLUMNS).encode()


def _refuse_replacing_others(path: Path | None, what: str, is_ours: Callable[[bytes], bool]) -> None:
    """A batch replaces its errors CSV and its Parquet file: an existing file there must be one of those, so a
    client cannot make the server overwrite other files under its folders (labels, probes, scans)."""
    if path is None or not path.exists():
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise InputError(f"{what}: {path.name}: cannot be read ({exc.strerror})") from None
    if not path.is_file() or not is_ours(head):
        raise Forbidden(f"{what}: {path.name} exists and is not one Raptor wrote; the server replaces only its own "
                        "outputs there (choose a new file name)")


def _fit_options(options, what: str):
    from ..probes.probe import FitOptions

    if not isinstance(options, dict):
        raise InputError(f"{what}: 'options' must be a JSON object")
    unknown = set(options) - set(FIT_OPTIONS)
    if unknown:
        raise InputError(f"{what}: unknown option {sorted(unknown)[0]!r}")
    values = {}
    for name, kind in FIT_OPTIONS.items():
        value = _field(options, name, kind, f"{what} option")
        if value is None:
            continue
        if name in ("c_grid", "alpha_grid"):
            if not value or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
                                    for c in value):
                raise InputError(f"{what}: {name} must be positive numbers")
            value = tuple(float(c) for c in value)
        if name == "hidden":
            if not 1 <= len(value) <= 2 or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value):
                raise InputError(f"{what}: hidden must be one or two positive widths")
            value = tuple(value)
        if name == "threshold":
            from ..probes.metrics import parse_threshold

            parse_threshold(value)  # one line now rather than when the job runs
        if name == "bootstrap" and not 0 <= value <= 100_000:
            raise InputError(f"{what}: bootstrap must be between 0 and 100000 resamples")
        if name == "class_weight" and value not in ("none", "balanced"):
            raise InputError(f"{what}: class_weight must be none or balanced")
        if name == "calibrate" and value not in ("none", "sigmoid", "isotonic"):
            raise InputError(f"{what}: calibrate must be none, sigmoid or isotonic")
        values[name] = None if name in ("class_weight", "calibrate") and value == "none" else value
    return FitOptions(**values)


def _prepare_batch(ctx: ServerContext, request: dict):
    from ..cohort.anonymize import Anonymizer
    from ..cohort.job import BatchJob, BatchSources
    from ..cohort.sources import SeriesFilter, SeriesItem

    what = "batch"
    settings = _settings(ctx, request)
    sources = request.get("sources") or {}
    if not isinstance(sources, dict):
        raise InputError(f"{what}: 'sources' must be a JSON object")
    unknown = set(sources) - {"folders", "manifests", "dicom_databases", "items"}
    if unknown:
        raise InputError(f"{what}: unknown source {sorted(unknown)[0]!r}")

    def paths(name: str) -> list[str]:
        values = sources.get(name) or []
        if not isinstance(values, list):
            raise InputError(f"{what}: sources.{name} must be a list of paths")
        return [str(allowed_path(ctx, v, f"{what} {name[:-1]}")) for v in values]

    items = []
    for n, entry in enumerate(sources.get("items") or []):
        items.append(_series_item(ctx, entry, f"{what} series {n}", SeriesItem))
    batch_sources = BatchSources(folders=paths("folders"), manifests=paths("manifests"),
                                 dicom_databases=paths("dicom_databases"), items=items)
    if batch_sources.empty():
        raise InputError(f"{what}: no sources")
    csv = allowed_path(ctx, _field(request, "csv", str, what, required=True), f"{what} csv", must_exist=False)
    parquet = request.get("parquet")
    parquet = allowed_path(ctx, parquet, f"{what} parquet", must_exist=False) if parquet is not None else None
    errors_csv = request.get("errors_csv")
    errors_csv = allowed_path(ctx, errors_csv, f"{what} errors_csv", must_exist=False) if errors_csv is not None else None
    from ..cohort.job import errors_path_for

    _refuse_replacing_others(errors_csv or errors_path_for(csv), f"{what} errors_csv", _is_errors_csv)
    _refuse_replacing_others(parquet, f"{what} parquet", lambda head: head.startswith(b"PAR1"))
    filters_data = request.get("filters") or {}
    if not isinstance(filters_data, dict):
        raise InputError(f"{what}: 'filters' must be a JSON object")
    try:
        filters = SeriesFilter(
            modalities=tuple(_field(filters_data, "modalities", list, what, [])),
            min_slices=_field(filters_data, "min_slices", int, what, 0),
            description=_field(filters_data, "description", str, what),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: filters: {exc}") from None
    shard = request.get("shard", [0, 1])
    if not (isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            and 0 <= shard[0] < shard[1] <= 100_000):
        raise InputError(f"{what}: 'shard' must be [index, count] with 0 <= index < count")
    salt = _field(request, "anonymize_salt", str, what)
    anonymizer = Anonymizer(salt) if salt else None
    readers = _field(request, "readers", int, what, 2)
    if not 0 <= readers <= 64:
        raise InputError(f"{what}: readers must be 0 to 64")
    job_spec = BatchJob(csv=str(csv), sources=batch_sources, settings=settings, filters=filters, shard=tuple(shard),
                        readers=readers, anonymizer=anonymizer,
                        keep_descriptions=bool(_field(request, "keep_descriptions", bool, what, False)),
                        parquet=str(parquet) if parquet else None, errors_csv=str(errors_csv) if errors_csv else None,
                        read_roots=list(ctx.allow_roots))
    return _batch_runner(ctx, job_spec)


def _series_item(ctx: ServerContext, entry, what: str, item_class):
    """A series a client listed (Slicer's DICOM database): its files, checked to lie under an allowed root."""
    if not isinstance(entry, dict):
        raise InputError(f"{what}: must be a JSON object")
    unknown = set(entry) - {"paths", "kind", "key", "series_uid", "study_uid", "patient_id", "modality", "description",
                            "user_id", "sorted_files", "n_slices"}
    if unknown:
        raise InputError(f"{what}: unknown field {sorted(unknown)[0]!r}")
    files = entry.get("paths")
    if not isinstance(files, list) or not files or len(files) > 100000:
        raise InputError(f"{what}: 'paths' must be a non-empty list")
    checked = [str(allowed_path(ctx, f, what)) for f in files]
    fields = {}
    for name in ("series_uid", "study_uid", "patient_id", "modality", "description", "user_id", "key"):
        value = _field(entry, name, str, what)
        if value is not None:
            fields[name] = value
    kind = _field(entry, "kind", str, what, "dicom")
    if kind not in ("dicom", "path"):
        raise InputError(f"{what}: 'kind' must be dicom or path")
    n_slices = _field(entry, "n_slices", int, what)
    return item_class(key=fields.pop("key", None) or checked[0], kind=kind, paths=checked, n_slices=n_slices,
                      sorted_files=bool(_field(entry, "sorted_files", bool, what, False)), **fields)


def _batch_runner(ctx: ServerContext, spec):
    def run(job: Job) -> None:
        from ..cohort.run import run_batch

        def progress(p) -> None:
            with job.lock:
                job.stage = p.phase
                job.message = p.message or job.message
            if p.phase == "embedding":
                job.progress(p.finished, p.total, "series", failed=p.failed, skipped=p.skipped, current=p.current,
                             slices_done=p.slices_done, slices_total=p.slices_total)

        summary = run_batch(spec, progress=progress, cancel=job.cancel_event, load_embedder=ctx.models.embedder_for)
        job.result = {
            "summary": summary.line(), "done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
            "total": summary.total, "cancelled": summary.cancelled, "csv": str(summary.csv),
            "errors_csv": str(summary.errors_csv), "parquet": str(summary.parquet) if summary.parquet else None,
        }
        if summary.cancelled:
            job.cancel_event.set()

    return run



__all__ = ["ServerContext", "Forbidden", "prepare", "allowed_path", "input_path", "volume_loader", "volume_info"]
