"""``raptor probe fit|apply|info`` and ``raptor explain``.

Registered by :mod:`.cli` through ``add_parser``.  Every output is written
atomically; every user-facing failure is one ``raptor: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RaptorError
from ..outputs import check_outputs
from .options import add_server_options, device, input_files, non_negative_int, positive_int


def _floats(text: str) -> tuple[float, ...]:
    from ..probes.probe import parse_grid

    try:
        return parse_grid(text)
    except RaptorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _threshold(text: str) -> str:
    from ..probes.metrics import parse_threshold

    try:
        parse_threshold(text)
    except RaptorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (got {text!r})") from None
    if not 1 <= len(values) <= 2 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("one or two positive hidden-layer widths, e.g. 256 or 256,64")
    return values


def add_parser(sub) -> None:
    from .dicom_outputs import add_stow_option
    from .options import add_dicomweb_credentials

    probe = sub.add_parser("probe", help="fit, apply and inspect probes on embeddings",
                           description="Probes: small models on Raptor embeddings (logistic, ridge, MLP).")
    psub = probe.add_subparsers(dest="probe_command", required=True, metavar="ACTION")

    fit = psub.add_parser("fit", help="fit a probe on embeddings and a labels CSV",
                          description="Fit a probe. LABELS is a CSV with id, split (train/val/test) and label column(s).")
    fit.add_argument("embeddings", help="embedding CSV (raptor embed --csv), an .npz, or a folder of .npz")
    fit.add_argument("labels", help="labels CSV: id, split, then one or more label columns")
    fit.add_argument("-o", "--output", default="probe.raptorprobe", help="probe file to write (default probe.raptorprobe)")
    fit.add_argument("--task", default="auto", choices=("auto", "binary", "multiclass", "multilabel", "regression"),
                     help="default auto: from the label values")
    fit.add_argument("--probe-model", default="auto", choices=("auto", "logistic", "ridge", "mlp"),
                     help="logistic for classification; ridge (default) or mlp for regression")
    fit.add_argument("--label-column", action="append", default=None, help="use only this label column (repeatable)")
    fit.add_argument("--select", default="val", choices=("val", "cv"),
                     help="choose C on the val split (paper, default) or by stratified k-fold CV on train+val")
    fit.add_argument("--folds", type=positive_int, default=5, help="folds for --select cv (default 5)")
    fit.add_argument("--c-grid", type=_floats, default=None, help="C values for logistic regression (default 0.01,0.1,1,10,100)")
    fit.add_argument("--alpha-grid", type=_floats, default=None, help="penalties for ridge/mlp")
    fit.add_argument("--hidden", type=_ints, default=(256,), help="MLP hidden widths, one or two layers (default 256)")
    fit.add_argument("--positive", default=None, help="positive class of a binary task (default: the second sorted)")
    fit.add_argument("--threshold", type=_threshold, default=None,
                     help="operating threshold of binary and multi-label probes, chosen on val (or on out-of-fold "
                          "predictions with --select cv): youden (default), sensitivity:0.95, specificity:0.90, a "
                          "probability such as 0.3, or none (0.5)")
    fit.add_argument("--class-weight", default="none", choices=("none", "balanced"),
                     help="balanced: weight classes by inverse frequency (default none)")
    fit.add_argument("--calibrate", default="none", choices=("none", "sigmoid", "isotonic"),
                     help="calibrated probabilities, fitted on out-of-fold predictions (default none)")
    fit.add_argument("--bootstrap", type=non_negative_int, default=1000,
                     help="bootstrap resamples for the 95%% confidence intervals (default 1000, seeded by --seed; 0: none)")
    fit.add_argument("--seed", type=non_negative_int, default=0, help="seed for CV folds and the MLP (default 0)")
    fit.add_argument("--max-iter", type=positive_int, default=3000, help="solver iterations (default 3000)")
    fit.add_argument("--report", default=None, help="metrics JSON (default OUTPUT stem + _metrics.json)")
    fit.add_argument("--plot", default=None, help="ROC / predicted-vs-true PNG (default OUTPUT stem + _roc.png or _pred.png)")
    fit.add_argument("--reliability-plot", default=None,
                     help="reliability diagram PNG of a classification probe (default OUTPUT stem + _reliability.png)")
    fit.add_argument("--quiet", "-q", action="store_true", help="print only the metrics table")
    fit.set_defaults(func=run_fit)

    apply = psub.add_parser("apply", help="score embeddings with a probe (CSV out)")
    apply.add_argument("probe", help="a .raptorprobe file")
    apply.add_argument("embeddings", nargs="+", help="embedding CSV(s), .npz file(s) or folder(s) of .npz")
    apply.add_argument("-o", "--output", default=None, help="scores CSV (default: print to standard output)")
    apply.add_argument("--dicom-sr", default=None, metavar="OUTDIR",
                       help="also write one DICOM SR (TID 1500 measurement report) per series, referencing it, into OUTDIR "
                            "(embeddings of DICOM series: a folder or a DICOMweb series as their source)")
    add_stow_option(apply)
    add_dicomweb_credentials(apply)
    apply.set_defaults(func=run_apply)

    info = psub.add_parser("info", help="print what a probe predicts, its metrics and embedding settings")
    info.add_argument("probe", help="a .raptorprobe file")
    info.add_argument("--json", action="store_true", help="print the whole metadata as JSON")
    info.set_defaults(func=run_info)

    explain = sub.add_parser("explain", help="explain a probe's decision on one volume (PNG, heatmap, slice curves)",
                             description="Exact decomposition of a linear probe's logit over planes, slices and patches.")
    explain.add_argument("probe", help="a .raptorprobe file (logistic or ridge)")
    explain.add_argument("volume", help="NRRD, NIfTI, MetaImage, DICOM folder, .npy, file.npz#test_3, or a DICOMweb series "
                                        "URL (ROOT/studies/STUDY_UID/series/SERIES_UID)")
    explain.add_argument("-o", "--output", default="explanation.png", help="PNG to write (default explanation.png)")
    explain.add_argument("--model", default=None,
                         help="model id or local folder (default: the one recorded in the probe; weights must match)")
    explain.add_argument("--class", dest="output_name", default=None,
                         help="class, label or target to explain (default: positive / most likely)")
    explain.add_argument("--slices", default="top", choices=("top", "mid"),
                         help="the figure shows each plane's highest-contributing slice among those that are not "
                              "empty (top, the default) or its middle slice (mid)")
    explain.add_argument("--baseline", default="background", choices=("background", "mean"),
                         help="measure contributions against an empty slice, so air and padding count 0 "
                              "(background, the default), or against the average training volume (mean)")
    explain.add_argument("--quiet", "-q", action="store_true", help="do not print the model being loaded")
    explain.add_argument("--heatmap", default=None, help="also write the heatmap in the input's geometry (.nrrd or .nii.gz)")
    explain.add_argument("--curves", default=None, help="also write the slice curves as CSV")
    explain.add_argument("--dicom-pm", default=None, metavar="FILE.dcm",
                         help="also write the heatmap as a DICOM Parametric Map in the series' geometry (DICOM input)")
    explain.add_argument("--dicom-sr", default=None, metavar="FILE.dcm",
                         help="also write the scores and the slice curves as a DICOM SR (TID 1500) (DICOM input)")
    add_stow_option(explain)
    add_dicomweb_credentials(explain)
    explain.add_argument("--device", default="auto", type=device, help="auto, cuda, cuda:N or cpu")
    explain.add_argument("--batch-size", type=positive_int, default=None, help="slices per forward pass")
    explain.add_argument("--cache-dir", default=None, help="Hugging Face model cache folder")
    explain.add_argument("--projection-file", default=None, metavar="R.npy",
                         help="the projector file the probe's embeddings were made with (when they were)")
    add_server_options(explain)
    explain.set_defaults(func=run_explain)


def run_fit(args: argparse.Namespace) -> int:
    from ..probes.fit_outputs import decision_lines, default_paths, write_fit_outputs
    from ..probes.metrics import metrics_table
    from ..probes.probe import (
        PAPER_C_GRID,
        FitOptions,
        fit_probe,
        load_embeddings,
        read_labels,
    )

    output = Path(args.output)
    defaults = default_paths(output)
    report = Path(args.report) if args.report else defaults["metrics"]
    # The task (classification or regression) decides which plots are written; every name it may use is kept free.
    plots = [("--plot", Path(args.plot))] if args.plot else [("the plot", defaults["roc"]), ("the plot", defaults["pred"])]
    plots.append(("--reliability-plot", Path(args.reliability_plot)) if args.reliability_plot
                 else ("the reliability plot", defaults["reliability"]))
    check_outputs([("-o/--output", output), ("--report" if args.report else "the metrics report", report), *plots],
                  input_files(args.embeddings, "the embeddings") + input_files(args.labels, "the labels"))
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    embeddings = load_embeddings([args.embeddings])
    labels = read_labels(args.labels, args.label_column)
    options = FitOptions(
        task=args.task, model=args.probe_model, select=args.select, folds=args.folds,
        c_grid=args.c_grid or PAPER_C_GRID, alpha_grid=args.alpha_grid, hidden=tuple(args.hidden),
        seed=args.seed, max_iter=args.max_iter, positive=args.positive, threshold=args.threshold,
        class_weight=None if args.class_weight == "none" else args.class_weight,
        calibrate=None if args.calibrate == "none" else args.calibrate, bootstrap=args.bootstrap,
    )
    result = fit_probe(embeddings, labels, options, progress=say)
    probe = result.probe
    written = write_fit_outputs(result, output, metrics=args.report, plot=args.plot,
                                reliability_plot=args.reliability_plot)
    selection = probe.training["selection"]
    print(f"{probe.task} probe ({probe.model}), {selection['parameter']}={selection['chosen']} "
          f"chosen by {'validation' if selection['method'] == 'val' else 'cross-validation'}")
    for line in decision_lines(probe):
        print(line)
    print(metrics_table(probe.metrics, probe.task, in_sample=probe.training.get("fitted_on", ())))
    for warning in result.warnings:  # shown even with --quiet: they say the probe may be improvable
        print(f"raptor: warning: {warning}", file=sys.stderr)
    print(f"raptor: wrote {', '.join(str(w) for w in written.all())}", file=sys.stderr)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..probes.probe import Probe, load_embeddings

    check_outputs([("-o/--output", args.output)], input_files(args.probe, "the probe")
                  + [entry for spec in args.embeddings for entry in input_files(spec, "the embeddings")])
    probe = Probe.load(args.probe)
    for note in probe.notes:
        print(f"raptor: note: {note}", file=sys.stderr)
    embeddings = load_embeddings(args.embeddings)
    scores = probe.apply(embeddings)
    text = scores.to_csv()
    if args.output:
        atomic_write_text(args.output, text)
        print(f"raptor: scored {len(scores.ids)} volume(s) -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.dicom_sr:
        from .dicom_outputs import write_score_reports

        return write_score_reports(args, probe, scores)
    if args.stow is not None:
        raise RaptorError("--stow sends DICOM results: give --dicom-sr OUTDIR too")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..probes.fit_outputs import decision_lines, rate_text
    from ..probes.metrics import metrics_table
    from ..probes.probe import Probe
    from ..probes.probe_file import read_probe_file

    probe = Probe.load(args.probe)  # checks every field, also for --json
    if args.json:
        meta, _ = read_probe_file(args.probe)
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    e = probe.embedding
    selection = probe.training.get("selection", {})
    print(args.probe)
    print(f"  task        {probe.task} ({probe.model}); {', '.join(probe.classes)}")
    print(f"  labels      {', '.join(probe.label_columns)} from {probe.training.get('labels_file', '?')}")
    print(f"  selection   {selection.get('parameter', '?')}={selection.get('chosen')} by {selection.get('method')}")
    print(f"  embedding   {e.get('encoder')} (weights {str(e.get('weight_sha256'))[:12]}), K={e.get('k')}, "
          f"seed={e.get('seed')}, grid={e.get('grid')}, preset={e.get('preset')}, planes={'|'.join(e.get('planes') or [])}, "
          f"keep_cls={e.get('keep_cls')}, preprocess={e.get('preprocess') or 'direct'}, {probe.n_features} features")
    for line in decision_lines(probe):
        print(f"  decision    {line}")
    for name, point in probe.operating_points().items():
        if point["split"] is None:
            continue
        marked = " (in-sample)" if point["in_sample"] else ""
        print(f"  at p({name}) >= {point['threshold']:.4g}: sensitivity {rate_text(point, 'sensitivity')}, specificity "
              f"{rate_text(point, 'specificity')} on {point['split']}{marked}, n={point['n']}")
    for note in probe.notes:
        print(f"  note        {note}")
    # older files do not mark in-sample splits themselves: their fitted_on record does
    print(metrics_table(probe.metrics, probe.task, in_sample=probe.training.get("fitted_on") or ()))
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..probes.figure import curves_csv
    from ..probes.probe import Probe
    from .dicom_outputs import check_explain_source, write_explain_results

    check_outputs([("-o/--output", args.output), ("--heatmap", args.heatmap), ("--curves", args.curves),
                   ("--dicom-pm", args.dicom_pm), ("--dicom-sr", args.dicom_sr)],
                  input_files(args.probe, "the probe") + input_files(args.volume, "the volume"))
    probe = Probe.load(args.probe)
    if not probe.is_linear:
        raise RaptorError(f"{args.probe}: is an MLP probe; only linear probes (logistic, ridge) can be explained exactly")
    if args.stow is not None and not (args.dicom_pm or args.dicom_sr):
        raise RaptorError("--stow sends DICOM results: give --dicom-pm FILE.dcm and/or --dicom-sr FILE.dcm too")
    source, came_from = check_explain_source(args)  # before the model loads: a NRRD has no series to reference
    if args.server:
        volume_id, ex, scores = _explain_on_server(args, probe)
    else:
        volume_id, ex, scores = _explain_here(args, probe)
    written = [args.output]
    if args.heatmap:
        from ..volumes.slicer_io import write_volume_file

        write_volume_file(ex.heatmap, ex.input_ijk_to_ras, args.heatmap, what="heatmap")
        written.append(args.heatmap)
    if args.curves:
        atomic_write_text(args.curves, curves_csv(ex))
        written.append(args.curves)
    if source is not None:
        written += write_explain_results(args, probe, scores, ex, source, came_from)
    kind = "logit" if probe.task != "regression" else "value"
    reference = "an empty slice" if ex.baseline == "background" else "the training mean"
    print(f"{ex.title or volume_id} score {ex.score:.4f}; {kind} {ex.decision:+.4f} = bias {ex.bias:+.4f} "
          f"+ contributions {ex.total:+.4f} against {reference} (residual {ex.residual:.1e})")
    for i, plane in enumerate(ex.planes):
        top = ex.top_slice(i)
        print(f"  {plane:9s} sum {ex.slice_curves[i].sum():+.4f}; top slice {top} ({ex.slice_curves[i][top]:+.4f})")
    print(f"raptor: wrote {', '.join(written)}", file=sys.stderr)
    return 0


def _explain_here(args: argparse.Namespace, probe):
    """In this process: returns the volume id, the explanation and every class's score."""
    from ..encoding.model import model_summary
    from ..encoding.pipeline import Embedder
    from ..probes.explain import explain_volume
    from ..probes.figure import render_explanation
    from ..probes.probe_settings import embed_settings_for

    volume = _read_explained_volume(args)
    settings = embed_settings_for(probe, model=args.model, device=args.device, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir, projection_file=args.projection_file)
    if not settings.model:
        raise RaptorError(f"{args.probe}: records no model; pass --model")
    if not args.quiet:
        print(f"raptor: loading model {settings.model}", file=sys.stderr)
    embedder = Embedder(settings)
    if not args.quiet:
        print(f"raptor: {model_summary(embedder.encoder)}", file=sys.stderr)
    explained = explain_volume(probe, embedder, volume)
    ex = explained.explain(args.output_name, baseline=args.baseline)
    render_explanation(ex, args.output, slices=args.slices)
    return volume.id, ex, explained.scores


def _explain_on_server(args: argparse.Namespace, probe):
    """Send the probe and the volume to a Raptor server; fetch the explanation and its figure."""
    import tempfile

    import numpy as np

    from ..atomic import atomic_write
    from ..cohort.dicomweb import is_series_url
    from ..probes.explanation import load_explanation
    from ..server.client import finished_or_raise
    from ..server.remote import file_sender, projection_upload, send_volume, volume_info, volume_sender
    from ..volumes.readers import expand_input
    from .options import client_from_args

    client = client_from_args(args)
    client.health()
    if is_series_url(args.volume):  # retrieved here from the PACS, then sent like any volume
        volume = _read_explained_volume(args)
        name, sent = volume.id, {"volume": {"upload": volume_sender(volume).run(client)}, "volume_info": volume_info(volume)}
    else:
        refs = expand_input(args.volume)
        if len(refs) != 1:
            raise RaptorError(f"{args.volume}: holds {len(refs)} volumes; pick one with {args.volume}#test_0")
        name, sent = refs[0].id, send_volume(client, refs[0])
    print(f"raptor: sending the probe and {name} to {client.url}", file=sys.stderr)
    request = {"kind": "explain", "probe": {"upload": file_sender(args.probe, "probe").run(client)}, **sent,
               "output": args.output_name, "model": args.model, "device": args.device, "slices": args.slices,
               "batch_size": args.batch_size, "baseline": args.baseline,
               **projection_upload(client, args.projection_file)}
    job = client.submit(request)
    snapshot = finished_or_raise(client.wait(job["id"]), name)
    result = snapshot["result"]
    files = result["files"]
    with tempfile.TemporaryDirectory() as folder:  # everything fetched before anything is written
        ex = load_explanation(client.fetch_to(job["id"], files["explanation"], f"{folder}/explanation.npz"))
        figure = client.fetch(job["id"], files["figure"])
    client.forget(job["id"])
    with atomic_write(args.output) as handle:
        handle.write(figure)
    scores = np.array([float(result["scores"][name]) for name in probe.classes])
    return result["id"], ex, scores


def _read_explained_volume(args: argparse.Namespace):
    """A file or folder as ``raptor embed`` reads it, or a series retrieved from a DICOMweb server."""
    from ..cohort.dicomweb import is_series_url, load_series, parse_series_url, series_item
    from ..volumes.readers import read_volume
    from ..volumes.volume import validate_volume
    from .options import dicomweb_access

    if not is_series_url(args.volume):
        return read_volume(args.volume)
    root, _study, series_uid = parse_series_url(args.volume)
    access = dicomweb_access(args, root)
    volume = load_series(access, series_item(access, args.volume), series_uid)
    validate_volume(volume)
    return volume
