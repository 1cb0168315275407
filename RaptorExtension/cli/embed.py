"""``raptor embed`` (volumes to ``.npz`` files and/or CSV rows) and ``raptor info`` (what made an embedding)."""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from ..errors import RaptorError
from ..outputs import TableLocks, check_outputs, output_path
from .options import add_embedding_options, add_server_options, input_files, non_negative_int, positive_int, settings_from_args


def add_embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed volumes (files, DICOM series folders, MedMNIST .npz)",
                       description="Embed CT/MR volumes with a frozen ViT along three planes.")
    p.add_argument("inputs", nargs="+",
                   help="NRRD, NIfTI, MetaImage, a DICOM series folder, .npy, or .npz (#test, #test_17, #train[0:100])")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="embed only the first N volumes the inputs name (e.g. with file.npz#train)")
    p.add_argument("--out-dir", "-o", default=None, help="write one ID.npz per volume here (default ./raptor_embeddings unless --csv)")
    p.add_argument("--csv", default=None, help="also (or only) write one CSV row per volume to this file")
    p.add_argument("--skip-existing", action="store_true", help="skip volumes whose output already exists with the same settings (resume)")
    p.add_argument("--continue-on-error", action="store_true", help="log failing volumes to the errors file and go on")
    p.add_argument("--errors", default=None, help="errors CSV (default OUT_DIR/raptor_errors.csv or next to --csv)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress and no model lines, only the summary and errors")
    p.add_argument("--readers", type=non_negative_int, default=2,
                   help="volumes read ahead while the encoder works (0: read in turn; default 2)")
    p.add_argument("--loader", default="auto", choices=("auto", "processes", "threads"),
                   help="how read-ahead runs (default: processes for several inputs outside Slicer, else threads)")
    add_embedding_options(p)
    add_server_options(p)
    p.set_defaults(func=run_embed)


def open_embedder(args: argparse.Namespace, settings):
    """The model in this process, or, with ``--server``, on a Raptor server (same interface for the loop)."""
    if getattr(args, "server", None):
        from ..server.remote import RemoteEmbedder
        from .options import client_from_args

        client = client_from_args(args)
        health = client.health()
        where = ", ".join(d["name"] for d in health.get("devices", [])) or "?"
        embedder = RemoteEmbedder(client, settings)
        if not args.quiet:
            print(f"raptor: sending the work to {client.url} (raptor {health['version']}; {where})", file=sys.stderr)
            print(f"raptor: {embedder.summary()}", file=sys.stderr)
        return embedder
    from ..encoding.model import model_summary
    from ..encoding.pipeline import Embedder

    if not args.quiet:
        print(f"raptor: loading model {settings.model}", file=sys.stderr)
    embedder = Embedder(settings)
    if not args.quiet:
        print(f"raptor: {model_summary(embedder.encoder)}", file=sys.stderr)
    return embedder


def run_embed(args: argparse.Namespace) -> int:
    args.csv = str(output_path(args.csv)) if args.csv else None
    out_dir = Path(args.out_dir) if args.out_dir else (None if args.csv else Path("raptor_embeddings"))
    errors_path = Path(args.errors) if args.errors else (
        (out_dir / "raptor_errors.csv") if out_dir else Path(args.csv).with_name(Path(args.csv).stem + "_errors.csv")
    )
    outputs = [("--csv", args.csv), ("the errors file" if not args.errors else "--errors", errors_path)]
    inputs = [entry for spec in args.inputs for entry in input_files(spec)]
    check_outputs(outputs, inputs, folders=[("--out-dir", out_dir)])
    with TableLocks([("table", args.csv)]):
        return _run_embed(args, out_dir, errors_path, outputs, inputs)


def _run_embed(args: argparse.Namespace, out_dir: Path | None, errors_path: Path, outputs, inputs) -> int:
    from ..cohort.errorlog import ErrorLog
    from ..embeddings.stream import TableAppender
    from ..volumes.prefetch import resolve_loader
    from ..volumes.readers import expand_input
    from .progress import Progress

    errors = ErrorLog(errors_path)
    refs = []
    for spec in args.inputs:
        try:
            refs.extend(expand_input(spec))
        except RaptorError as exc:
            if not args.continue_on_error:
                raise
            errors.add(spec, spec, str(exc))
            print(f"raptor: skipped: {exc}", file=sys.stderr)
    if args.limit is not None:
        refs = refs[: args.limit]
    ids = [r.id for r in refs]
    counts = collections.Counter(ids)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise RaptorError(f"two inputs would get the same id {dupes[0]!r}; rename one or embed them separately")
    if out_dir is not None:
        check_outputs(outputs + [(f"the embedding of {r.id}", out_dir / f"{r.id}.npz") for r in refs], inputs)
    settings = settings_from_args(args)
    # What can be checked without the model is checked first: loading it takes a while, and embedding
    # a volume only to find that the CSV it goes to holds other settings wastes more.
    csv_ids = _check_csv_before_loading(args.csv, settings)
    table = TableAppender(args.csv) if args.csv else None
    if table is not None and not args.skip_existing:
        present = [i for i in ids if i in table.ids]
        if present:
            raise RaptorError(
                f"{args.csv}: already holds rows for {len(present)} of these volumes (e.g. {present[0]!r}); "
                "pass --skip-existing to embed only the others, or write to another --csv"
            )

    if args.skip_existing and all([_done_before_loading(ref, out_dir, csv_ids, settings) for ref in refs]):
        where = ", ".join(str(p) for p in (out_dir, args.csv) if p)
        print(f"raptor: embedded 0, skipped {len(refs)} already done, failed 0 -> {where}")
        if errors.count:
            print(f"raptor: errors logged to {errors.path}", file=sys.stderr)
        return 1 if errors.count else 0

    embedder = open_embedder(args, settings)
    if table is not None and table.settings is not None:
        _check_table_settings(table, embedder)

    todo = []
    skipped = 0
    for ref in refs:
        if args.skip_existing and _already_done(ref, out_dir, table, embedder):
            skipped += 1
            continue
        todo.append(ref)

    progress = Progress(total_volumes=len(todo), enabled=not args.quiet)
    embedder.notice = lambda text: progress.write(f"raptor: {text}")
    done = failed = 0
    try:
        # Slicer's readers hold the GIL, so for several inputs read-ahead runs in processes.
        loader = "threads" if args.loader == "auto" and (len(todo) < 2 or args.server) else resolve_loader(args.loader, args.readers)
        for ref, embedding, error in embedder.embed_many(todo, progress=progress.slices, readers=args.readers,
                                                         loader=loader):
            if error is not None:
                if not args.continue_on_error:  # stop at the first failure: one error line, like any bad input
                    raise RaptorError(_done_before(error, done, out_dir, args.csv))
                failed += 1
                errors.add(ref.id, ref.source, error)
                progress.write(f"raptor: failed: {error}")
                progress.volume_done()
                continue
            if out_dir is not None:
                embedding.save(out_dir / f"{ref.id}.npz")
            if table is not None:
                table.append(embedding, None)
            done += 1
            progress.volume_done()
    finally:
        progress.close()
    where = ", ".join(str(p) for p in (out_dir, args.csv) if p)
    print(f"raptor: embedded {done}, skipped {skipped} already done, failed {failed} -> {where}")
    if failed or errors.count:
        print(f"raptor: errors logged to {errors.path}", file=sys.stderr)
    return 1 if (failed or errors.count) else 0


def _fixed_preset(settings) -> str:
    """The preset every volume gets, or '' under ``auto`` (it then depends on each volume's modality)."""
    from ..volumes.intensity import resolve_preset

    return "" if (settings.preset or "auto").lower() == "auto" else resolve_preset(settings.preset, None, settings.ct_window).describe()


def _check_csv_before_loading(csv_path: str | None, settings) -> set[str] | None:
    """The ids already in ``--csv`` (None without ``--csv``), after refusing a table made with settings this run
    would not make."""
    from ..embeddings.stream import index_table
    from ..encoding.pipeline import check_known_settings

    if not csv_path:
        return None
    if not Path(csv_path).is_file() or Path(csv_path).stat().st_size == 0:
        return set()
    index = index_table(csv_path, allow_torn_tail=True)
    if index.settings is not None:
        check_known_settings(index.settings, settings, f"{csv_path} (existing rows) vs this run", _fixed_preset(settings) or None)
    return set(index.ids)


def _settings_differences(existing: dict, embedder) -> list[str]:
    """How ``existing`` settings differ from what this run's loaded model makes (a preset left to ``auto`` aside)."""
    from ..embeddings.settings import describe_differences, settings_of

    preset = _fixed_preset(embedder.settings)
    expected = settings_of(embedder.settings_metadata(preset=preset))
    return [d for d in describe_differences(existing, expected) if preset or not d.startswith("preset")]


def _check_table_settings(table, embedder) -> None:
    """With the model loaded, and before any volume is embedded: the weights and the projection too."""
    from ..errors import MetadataMismatch

    diffs = _settings_differences(table.settings, embedder)
    if diffs:
        raise MetadataMismatch(f"{table.path} (existing rows) vs this run: embedding settings differ: " + "; ".join(diffs))


def _existing_npz(out_dir: Path, ref):
    """This volume's path in ``--out-dir`` and the embedding already there, or None (none, or unreadable: redone)."""
    from ..embeddings.embedding import Embedding

    path = out_dir / f"{ref.id}.npz"
    if not path.exists():
        return path, None
    try:
        return path, Embedding.load(path)
    except RaptorError:
        return path, None


def _refuse_other_settings(path: Path, diffs: list[str]) -> None:
    if diffs:
        raise RaptorError(f"{path}: exists with other settings (existing vs this run: {'; '.join(diffs)}); use another --out-dir")


def _done_before_loading(ref, out_dir: Path | None, csv_ids: set[str] | None, settings) -> bool:
    """True when every output of this volume exists, made with the model asked for and the settings known so far.

    Conservative: when in doubt (another model name, an unreadable file) it says no,
    and :func:`_already_done` decides with the model loaded.
    """
    from ..embeddings.settings import describe_differences
    from ..encoding.pipeline import settings_known_before_loading
    from ..names import recorded_model_name

    if out_dir is not None:
        path, existing = _existing_npz(out_dir, ref)
        if existing is None:
            return False
        this_run = dict(existing.settings(), **settings_known_before_loading(settings, _fixed_preset(settings) or None))
        _refuse_other_settings(path, describe_differences(existing.settings(), this_run))
        if existing.metadata.get("encoder") != recorded_model_name(settings.model):
            return False
    return csv_ids is None or ref.id in csv_ids


def _done_before(error: str, done: int, out_dir: Path | None, csv: str | None) -> str:
    """The error of the volume that stopped the run, and what was kept."""
    if not done:
        return error
    where = " and ".join(str(p) for p in (out_dir, csv) if p)
    return f"{error} (the {done} volume(s) embedded before it are kept in {where}; --continue-on-error goes past failures)"


def _already_done(ref, out_dir: Path | None, table, embedder) -> bool:
    """True when every requested output of this volume exists with this run's settings."""
    if out_dir is not None:
        path, existing = _existing_npz(out_dir, ref)
        if existing is None:
            return False
        _refuse_other_settings(path, _settings_differences(existing.settings(), embedder))
    return table is None or ref.id in table.ids


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="print an embedding's metadata")
    p.add_argument("files", nargs="+", help=".npz embeddings or embedding CSV files")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ..embeddings.embedding import Embedding
    from ..embeddings.table import read_table

    for name in args.files:
        if name.lower().endswith(".csv"):
            table = read_table(name)
            info = {"file": name, "rows": len(table.ids), "features": int(table.features.shape[1]), "settings": table.settings}
        else:
            e = Embedding.load(name)
            info = dict(e.metadata, file=name)
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
            continue
        print(f"{name}")
        for key in sorted(info):
            if key in ("file",):
                continue
            value = info[key]
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            print(f"  {key:20s} {text}")
    return 0
