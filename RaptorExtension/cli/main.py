"""The ``raptor`` command line.

Subcommands live in small modules that each provide ``add_parser(subparsers)``
(which sets ``func``) so the command line grows without one giant file:
``embed`` and ``info`` here, ``probe`` and ``explain`` in :mod:`.cli_probe`,
``batch`` and ``merge`` in :mod:`.cli_batch`, ``models`` in :mod:`.cli_models`.

Every user-facing failure prints one line ``raptor: error: ...`` and exits
non-zero; there are no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, RaptorError

SUBCOMMAND_MODULES = (".cli_probe", ".cli_batch", ".cli_models")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU (got {text!r})") from None
    return lo, hi


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that makes embeddings (embed, batch, explain)."""
    from .names import DEFAULT_MODEL, PLANES, PRESETS

    g = parser.add_argument_group("embedding settings (recorded in every embedding)")
    g.add_argument("--model", default=os.environ.get("RAPTOR_MODEL", DEFAULT_MODEL),
                   help=f"Hugging Face id or local folder (default {DEFAULT_MODEL}; short names dinov2-s/b/l/g, dinov3-s/b/l)")
    g.add_argument("--k", type=_positive_int, default=100, help="projected token width K (100 = Raptor, 10 = Raptor-B)")
    g.add_argument("--seed", type=int, default=0, help="seed of the Gaussian projection (default 0)")
    g.add_argument("--grid", default="256", help="isotropic cube size in voxels, or 'native' to keep the array as is (default 256)")
    g.add_argument("--preset", default="auto", choices=PRESETS, help="intensity preset (default auto: ct for CT, mri for MR, else minmax)")
    g.add_argument("--ct-window", type=_window, default=None, metavar="LOW,HIGH", help="HU window of the ct preset (default -1000,1000)")
    g.add_argument("--planes", default=",".join(PLANES), help="planes to encode (default axial,coronal,sagittal)")
    g.add_argument("--keep-cls", action="store_true", help="append the mean CLS token of each plane as an extra feature block")
    g.add_argument("--image-size", type=_positive_int, default=None, help="slice size fed to the model (default: the model's, 224)")
    s = parser.add_argument_group("speed")
    s.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    s.add_argument("--batch-size", type=_positive_int, default=None, help="slices per forward pass (default 128 on GPU, 16 on CPU)")
    s.add_argument("--no-dedup", action="store_true", help="encode constant slices every time instead of once")
    s.add_argument("--cache-dir", default=None, help="Hugging Face model cache folder (default: the hub's; env RAPTOR_MODEL_CACHE)")


def settings_from_args(args: argparse.Namespace):
    from .pipeline import EmbedSettings

    return EmbedSettings(
        model=args.model,
        k=args.k,
        seed=args.seed,
        grid=args.grid,
        preset=args.preset,
        ct_window=args.ct_window,
        planes=tuple(p.strip() for p in args.planes.split(",") if p.strip()),
        keep_cls=args.keep_cls,
        image_size=args.image_size,
        device=args.device,
        batch_size=args.batch_size,
        dedup_constant_slices=not args.no_dedup,
        cache_dir=args.cache_dir,
    )


# ---------------------------------------------------------------------------
# embed


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed volumes (files, DICOM series folders, MedMNIST .npz)",
                       description="Embed CT/MR volumes with a frozen ViT along three planes.")
    p.add_argument("inputs", nargs="+", help="NRRD, NIfTI, MetaImage, a DICOM series folder, .npy, or .npz[#test_17]")
    p.add_argument("--out-dir", "-o", default=None, help="write one ID.npz per volume here (default ./raptor_embeddings unless --csv)")
    p.add_argument("--csv", default=None, help="also (or only) write one CSV row per volume to this file")
    p.add_argument("--skip-existing", action="store_true", help="skip volumes whose output already exists with the same settings (resume)")
    p.add_argument("--continue-on-error", action="store_true", help="log failing volumes to the errors file and go on")
    p.add_argument("--errors", default=None, help="errors CSV (default OUT_DIR/raptor_errors.csv or next to --csv)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--readers", type=_non_negative_int, default=2,
                   help="volumes read ahead while the encoder works (0: read in turn; default 2)")
    p.add_argument("--loader", default="auto", choices=("auto", "processes", "threads"),
                   help="how read-ahead runs (default: processes for several inputs outside Slicer, else threads)")
    add_embedding_options(p)
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from .model import model_summary
    from .pipeline import Embedder
    from .progress import Progress
    from .batch import resolve_loader
    from .readers import expand_input
    from .tables import TableAppender
    from .errorlog import ErrorLog

    out_dir = Path(args.out_dir) if args.out_dir else (None if args.csv else Path("raptor_embeddings"))
    errors_path = Path(args.errors) if args.errors else (
        (out_dir / "raptor_errors.csv") if out_dir else Path(args.csv).with_name(Path(args.csv).stem + "_errors.csv")
    )
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
    ids = [r.id for r in refs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RaptorError(f"two inputs would get the same id {dupes[0]!r}; rename one or embed them separately")

    settings = settings_from_args(args)
    print(f"raptor: loading model {settings.model}", file=sys.stderr)
    embedder = Embedder(settings)
    print(f"raptor: {model_summary(embedder.encoder)}", file=sys.stderr)
    table = TableAppender(args.csv) if args.csv else None

    todo = []
    skipped = 0
    for ref in refs:
        if args.skip_existing and _already_done(ref, out_dir, table, embedder):
            skipped += 1
            continue
        todo.append(ref)

    progress = Progress(total_volumes=len(todo), enabled=not args.quiet)
    done = failed = 0
    try:
        # Slicer's readers hold the GIL, so for several inputs read-ahead runs in processes.
        loader = "threads" if args.loader == "auto" and len(todo) < 2 else resolve_loader(args.loader, args.readers)
        for ref, embedding, error in embedder.embed_many(todo, progress=progress.slices, readers=args.readers,
                                                         loader=loader):
            if error is not None:
                failed += 1
                errors.add(ref.id, ref.source, error)
                progress.write(f"raptor: failed: {error}")
                progress.volume_done()
                if not args.continue_on_error:
                    break
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


def _already_done(ref, out_dir: Path | None, table, embedder) -> bool:
    """True when every requested output of this volume exists with this run's settings."""
    from .embedding import Embedding, describe_differences, settings_of
    from .intensity import resolve_preset

    s = embedder.settings
    # With --preset auto the preset depends on each volume's modality; otherwise it is fixed and must match.
    preset = "" if s.preset == "auto" else resolve_preset(s.preset, None, s.ct_window).describe()
    expected = settings_of(embedder.settings_metadata(preset=preset))
    if out_dir is not None:
        path = out_dir / f"{ref.id}.npz"
        if not path.exists():
            return False
        try:
            existing = Embedding.load(path)
        except RaptorError:
            return False
        diffs = [
            d for d in describe_differences(existing.settings(), expected) if preset or not d.startswith("preset")
        ]
        if diffs:
            raise RaptorError(
                f"{path}: exists with other settings (existing vs this run: {'; '.join(diffs)}); use another --out-dir"
            )
    return table is None or ref.id in table.ids


# ---------------------------------------------------------------------------
# info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print an embedding's metadata")
    p.add_argument("files", nargs="+", help=".npz embeddings or embedding CSV files")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from .embedding import Embedding
    from .tables import read_table

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


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raptor",
        description="Raptor: train-free 3D embeddings of CT/MR volumes with a frozen 2D foundation model.",
    )
    parser.add_argument("--version", action="version", version=f"raptor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_info(sub)
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name, __package__) is not None:
            importlib.import_module(name, __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("raptor: cancelled; nothing partial was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("raptor: interrupted; finished outputs are kept, nothing partial was written", file=sys.stderr)
        return 130
    except RaptorError as exc:
        print(f"raptor: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
