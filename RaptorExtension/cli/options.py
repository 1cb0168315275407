"""Command-line options shared by the commands that make embeddings (embed, batch, explain), and their parsers."""

from __future__ import annotations

import argparse
import os


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def positive_int(text: str) -> int:
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
    from ..names import DEFAULT_MODEL, PLANES, PREPROCESS_CHOICES, PRESETS, PROJECTIONS

    g = parser.add_argument_group("embedding settings (recorded in every embedding)")
    g.add_argument("--model", default=os.environ.get("RAPTOR_MODEL", DEFAULT_MODEL),
                   help=f"Hugging Face id or local folder (default {DEFAULT_MODEL}; short names dinov2-s/b/l/g, dinov3-s/b/l)")
    g.add_argument("--k", type=positive_int, default=None,
                   help="projected token width K (default 100 = Raptor; 10 = Raptor-B; with --projection-file, the file's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the Gaussian projection (default 0)")
    g.add_argument("--projection", default="pcg64", choices=PROJECTIONS,
                   help="how R is drawn from the seed: pcg64 (default, Raptor's) or numpy-legacy "
                        "(np.random.seed(seed); np.random.randn(d, K), as the reference code's create_projector.py)")
    g.add_argument("--projection-file", default=None, metavar="R.npy",
                   help="use this projector instead of drawing one: the reference code's d x K .npy or a K x d one")
    g.add_argument("--grid", default="256", help="isotropic cube size in voxels, or 'native' to keep the array as is (default 256)")
    g.add_argument("--preset", default="auto", choices=PRESETS, help="intensity preset (default auto: ct for CT, mri for MR, else minmax)")
    g.add_argument("--ct-window", type=_window, default=None, metavar="LOW,HIGH", help="HU window of the ct preset (default -1000,1000)")
    g.add_argument("--planes", default=",".join(PLANES), help="planes to encode (default axial,coronal,sagittal)")
    g.add_argument("--keep-cls", action="store_true", help="append the mean CLS token of each plane as an extra feature block")
    g.add_argument("--image-size", type=positive_int, default=None, help="slice size fed to the model (default: the model's, 224)")
    g.add_argument("--preprocess", default="direct", choices=PREPROCESS_CHOICES,
                   help="how a slice becomes the model's image: direct (default: bilinear to 224, no crop) or "
                        "reference (as the authors' code: bicubic, 8-bit, resize to 256, centre crop 224)")
    s = parser.add_argument_group("speed")
    s.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    s.add_argument("--batch-size", type=positive_int, default=None, help="slices per forward pass (default 128 on GPU, 16 on CPU)")
    s.add_argument("--no-dedup", action="store_true", help="encode constant slices every time instead of once")
    s.add_argument("--cache-dir", default=None, help="Hugging Face model cache folder (default: the hub's; env RAPTOR_MODEL_CACHE)")


def settings_from_args(args: argparse.Namespace):
    from ..encoding.pipeline import EmbedSettings

    return EmbedSettings(
        model=args.model,
        k=args.k if args.k is not None or args.projection_file else 100,
        seed=args.seed,
        projection=args.projection,
        projection_file=args.projection_file,
        preprocess=args.preprocess,
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
