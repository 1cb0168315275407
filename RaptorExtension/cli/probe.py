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
    fit.add_argument("--folds", type=int, default=5, help="folds for --select cv (default 5)")
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
    fit.add_argument("--bootstrap", type=int, default=1000,
                     help="bootstrap resamples for the 95%% confidence intervals (default 1000, seeded by --seed; 0: none)")
    fit.add_argument("--seed", type=int, default=0, help="seed for CV folds and the MLP (default 0)")
    fit.add_argument("--max-iter", type=int, default=3000, help="solver iterations (default 3000)")
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
    apply.set_defaults(func=run_apply)

    info = psub.add_parser("info", help="print what a probe predicts, its metrics and embedding settings")
    info.add_argument("probe", help="a .raptorprobe file")
    info.add_argument("--json", action="store_true", help="print the whole metadata as JSON")
    info.set_defaults(func=run_info)

    explain = sub.add_parser("explain", help="explain a probe's decision on one volume (PNG, heatmap, slice curves)",
                             description="Exact decomposition of a linear probe's logit over planes, slices and patches.")
    explain.add_argument("probe", help="a .raptorprobe file (logistic or ridge)")
    explain.add_argument("volume", help="NRRD, NIfTI, MetaImage, DICOM folder, .npy, or file.npz#test_3")
    explain.add_argument("-o", "--output", default="explanation.png", help="PNG to write (default explanation.png)")
    explain.add_argument("--model", default=None,
                         help="model id or local folder (default: the one recorded in the probe; weights must match)")
    explain.add_argument("--class", dest="output_name", default=None,
                         help="class, label or target to explain (default: positive / most likely)")
    explain.add_argument("--slices", default="top", choices=("top", "mid"),
                         help="show each plane's highest-contribution slice (default) or the middle one")
    explain.add_argument("--heatmap", default=None, help="also write the heatmap in the input's geometry (.nrrd or .nii.gz)")
    explain.add_argument("--curves", default=None, help="also write the slice curves as CSV")
    explain.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    explain.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    explain.add_argument("--cache-dir", default=None, help="Hugging Face model cache folder")
    explain.set_defaults(func=run_explain)


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".raptorprobe", ".npz", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def run_fit(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..probes.metrics import (
        CLASSIFICATION_TASKS,
        metrics_table,
        plot_pred_vs_true,
        plot_reliability,
        plot_roc,
    )
    from ..probes.probe import (
        PAPER_C_GRID,
        FitOptions,
        fit_probe,
        load_embeddings,
        read_labels,
    )

    output = Path(args.output)
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
    probe.name = output.name.removesuffix(".raptorprobe")
    probe.save(output)
    report = Path(args.report) if args.report else Path(f"{_stem(output)}_metrics.json")
    summary = {"task": probe.task, "model": probe.model, "classes": probe.classes,
               "selection": probe.training.get("selection"), "metrics": probe.metrics, "warnings": result.warnings}
    if probe.thresholds is not None:
        summary["threshold"] = {**probe.threshold_info, "values": probe.thresholds, "names": probe.threshold_names}
        summary["operating_points"] = probe.operating_points()
    if probe.task in CLASSIFICATION_TASKS:
        summary["class_weight"] = probe.training.get("class_weight")
        summary["calibration"] = probe.training.get("calibration")
    atomic_write_text(report, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    written = [output, report]
    if probe.task in CLASSIFICATION_TASKS:
        plot = Path(args.plot) if args.plot else Path(f"{_stem(output)}_roc.png")
        in_sample = probe.training["fitted_on"]
        written.append(plot_roc(plot, probe.task, result.predictions, probe.classes, probe.thresholds, in_sample))
        reliability = Path(args.reliability_plot) if args.reliability_plot else Path(f"{_stem(output)}_reliability.png")
        written.append(plot_reliability(reliability, probe.task, result.predictions, probe.classes,
                                        in_sample=in_sample))
    else:
        plot = Path(args.plot) if args.plot else Path(f"{_stem(output)}_pred.png")
        written.append(plot_pred_vs_true(plot, result.predictions, probe.classes))
    selection = probe.training["selection"]
    print(f"{probe.task} probe ({probe.model}), {selection['parameter']}={selection['chosen']} "
          f"chosen by {'validation' if selection['method'] == 'val' else 'cross-validation'}")
    for line in _decision_lines(probe):
        print(line)
    print(metrics_table(probe.metrics, probe.task))
    for warning in result.warnings:  # shown even with --quiet: they say the probe may be improvable
        print(f"raptor: warning: {warning}", file=sys.stderr)
    print(f"raptor: wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


def _rate(point: dict, key: str) -> str:
    """A rate with its 95% interval, e.g. ``0.812 (0.710-0.900)``."""
    if point[key] is None:
        return "-"
    ci = point[f"{key}_ci95"]
    return f"{point[key]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _decision_lines(probe) -> list[str]:
    """How the probe decides: its threshold(s) and how they were set, its class weighting and calibration."""
    lines = []
    if probe.thresholds is not None:
        info = probe.threshold_info
        criterion = info.get("criterion", "none")
        how = {"youden": "Youden's J (sensitivity + specificity - 1) maximized",
               "sensitivity": f"sensitivity at least {info.get('target')}",
               "specificity": f"specificity at least {info.get('target')}",
               "fixed": "fixed", "none": "0.5, not chosen on data"}.get(criterion, str(criterion))
        where = f", chosen on {info['chosen_on']} ({info.get('rows')} rows)" if info.get("chosen_on") else ""
        values = ", ".join(f"p({name}) >= {t:.4g}" for name, t in zip(probe.threshold_names, probe.thresholds))
        lines.append(f"decides {values}: {how}{where}")
    weighting = probe.training.get("class_weight")
    calibration = probe.training.get("calibration") or ({"method": probe.calibration.method}
                                                         if probe.calibration is not None else None)
    if weighting or calibration:
        parts = ([f"class weight {weighting}"] if weighting else []) + (
            [f"{calibration['method']} calibration" + (f" on {calibration['fitted_on']}" if calibration.get("fitted_on")
                                                        else "")] if calibration else [])
        lines.append("; ".join(parts))
    return lines


def run_apply(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..probes.probe import Probe, load_embeddings

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
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..probes.metrics import metrics_table
    from ..probes.probe import Probe
    from ..probes.probe_file import read_probe_file

    if args.json:
        meta, _ = read_probe_file(args.probe)
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    probe = Probe.load(args.probe)
    e = probe.embedding
    selection = probe.training.get("selection", {})
    print(args.probe)
    print(f"  task        {probe.task} ({probe.model}); {', '.join(probe.classes)}")
    print(f"  labels      {', '.join(probe.label_columns)} from {probe.training.get('labels_file', '?')}")
    print(f"  selection   {selection.get('parameter', '?')}={selection.get('chosen')} by {selection.get('method')}")
    print(f"  embedding   {e.get('encoder')} (weights {str(e.get('weight_sha256'))[:12]}), K={e.get('k')}, "
          f"seed={e.get('seed')}, grid={e.get('grid')}, preset={e.get('preset')}, planes={'|'.join(e.get('planes') or [])}, "
          f"keep_cls={e.get('keep_cls')}, {probe.n_features} features")
    for line in _decision_lines(probe):
        print(f"  decision    {line}")
    for name, point in probe.operating_points().items():
        if point["split"] is None:
            continue
        marked = " (in-sample)" if point["in_sample"] else ""
        print(f"  at p({name}) >= {point['threshold']:.4g}: sensitivity {_rate(point, 'sensitivity')}, specificity "
              f"{_rate(point, 'specificity')} on {point['split']}{marked}, n={point['n']}")
    for note in probe.notes:
        print(f"  note        {note}")
    fitted_on = probe.training.get("fitted_on") or []  # older files do not mark in-sample splits themselves
    shown = {split: ({"in_sample": split in fitted_on, **values} if isinstance(values, dict) else values)
             for split, values in probe.metrics.items()}
    print(metrics_table(shown, probe.task))
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..encoding.model import model_summary
    from ..encoding.pipeline import Embedder
    from ..probes.explain import embed_settings_for, explain_volume
    from ..probes.figure import curves_csv, render_explanation
    from ..probes.probe import Probe
    from ..volumes.readers import read_volume

    probe = Probe.load(args.probe)
    if not probe.is_linear:
        raise RaptorError(f"{args.probe}: is an MLP probe; only linear probes (logistic, ridge) can be explained exactly")
    volume = read_volume(args.volume)
    settings = embed_settings_for(probe, model=args.model, device=args.device, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir)
    if not settings.model:
        raise RaptorError(f"{args.probe}: records no model; pass --model")
    print(f"raptor: loading model {settings.model}", file=sys.stderr)
    embedder = Embedder(settings)
    print(f"raptor: {model_summary(embedder.encoder)}", file=sys.stderr)
    explained = explain_volume(probe, embedder, volume)
    ex = explained.explain(args.output_name)
    render_explanation(ex, args.output, slices=args.slices)
    written = [args.output]
    if args.heatmap:
        from ..volumes.slicer_io import write_volume_file

        write_volume_file(ex.heatmap, ex.input_ijk_to_ras, args.heatmap, what="heatmap")
        written.append(args.heatmap)
    if args.curves:
        atomic_write_text(args.curves, curves_csv(ex))
        written.append(args.curves)
    kind = "logit" if probe.task != "regression" else "value"
    print(f"{volume.id}: {ex.output} score {ex.score:.4f}; {kind} {ex.decision:+.4f} = bias {ex.bias:+.4f} "
          f"+ contributions {ex.total:+.4f} (residual {ex.residual:.1e})")
    for i, plane in enumerate(ex.planes):
        top = ex.top_slice(i)
        print(f"  {plane:9s} sum {ex.slice_curves[i].sum():+.4f}; top slice {top} ({ex.slice_curves[i][top]:+.4f})")
    print(f"raptor: wrote {', '.join(written)}", file=sys.stderr)
    return 0
