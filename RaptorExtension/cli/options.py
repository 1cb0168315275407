"""Command-line options shared by the commands that make embeddings (embed, batch, explain), and their parsers."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def input_files(spec: str, what: str = "an input") -> list[tuple[str, Path]]:
    """The files an input names, for the output checks: ``file.npz#test_3`` -> ``file.npz``; a folder -> it and its files."""
    path = Path(spec.split("#", 1)[0] if "#" in spec and not Path(spec).exists() else spec)
    found = [(what, path)]
    if path.is_dir():
        try:
            found += [(f"a file of {what} {path}", child) for child in path.iterdir() if child.is_file()]
        except OSError:
            pass
    return found


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _window(text: str) -> tuple[float, float]:
    from ..names import window_problem

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU (got {text!r})") from None
    problem = window_problem((lo, hi))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return lo, hi


def device(text: str) -> str:
    from ..names import device_problem

    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text.strip()


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that makes embeddings (embed, batch, explain)."""
    from ..names import DEFAULT_MODEL, OFFLINE_MODEL, PLANES, PREPROCESS_CHOICES, PRESETS, PROJECTIONS

    g = parser.add_argument_group("embedding settings (recorded in every embedding)")
    g.add_argument("--model", default=os.environ.get("RAPTOR_MODEL", DEFAULT_MODEL),
                   help=f"Hugging Face id or local folder (default {DEFAULT_MODEL}; short names dinov2-s/b/l/g, dinov3-s/b/l, "
                        f"and {OFFLINE_MODEL} for the DINOv2-S/14 setup.sh builds without the hub)")
    g.add_argument("--k", type=positive_int, default=None,
                   help="projected token width K (default 100 = Raptor; 10 = Raptor-B; with --projection-file, the file's)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the Gaussian projection (default 0)")
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
    s.add_argument("--device", default="auto", type=device, help="auto, cuda, cuda:N or cpu (default auto)")
    s.add_argument("--batch-size", type=positive_int, default=None, help="slices per forward pass (default 128 on GPU, 16 on CPU)")
    s.add_argument("--no-dedup", action="store_true", help="encode constant slices every time instead of once")
    s.add_argument("--cache-dir", default=None, help="Hugging Face model cache folder (default: the hub's; env RAPTOR_MODEL_CACHE)")


def settings_from_args(args: argparse.Namespace):
    from ..encoding.settings import EmbedSettings

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


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server``: run the heavy work on a Raptor server (``raptor serve``) instead of in this process."""
    g = parser.add_argument_group("Raptor server (the model runs there; default: in this process)")
    g.add_argument("--server", default=os.environ.get("RAPTOR_SERVER") or None, metavar="URL",
                   help="a Raptor server, e.g. https://gpu-host:8765 (default: env RAPTOR_SERVER, else none)")
    g.add_argument("--token-file", default=None, help="file holding the server's token (default: env RAPTOR_TOKEN)")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="certificate authority to trust for an https server")


def client_from_args(args: argparse.Namespace):
    from ..server.client import RaptorClient, token_from

    return RaptorClient(args.server, token_from(args.token_file), cafile=args.tls_ca)


def add_dicomweb_credentials(parser: argparse.ArgumentParser) -> None:
    """How to log in to a DICOMweb server; never a secret in clear on the command line."""
    g = parser.add_argument_group("DICOMweb credentials (secrets come from files or the environment, never the command line)")
    g.add_argument("--dicomweb-user", default=None, metavar="USER",
                   help="user for HTTP basic authentication (default $RAPTOR_DICOMWEB_USER); the password comes from "
                        "--dicomweb-password-file or $RAPTOR_DICOMWEB_PASSWORD")
    g.add_argument("--dicomweb-password-file", default=None, metavar="FILE", help="a file holding the password (one line)")
    g.add_argument("--dicomweb-token-file", default=None, metavar="FILE",
                   help="a file holding a bearer token (OAuth2/OpenID Connect); or set $RAPTOR_DICOMWEB_TOKEN")


def _secret_file(path: str, what: str) -> str:
    from ..errors import InputError

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} file ({type(exc).__name__})") from None
    value = text.strip("\r\n")
    if not value.strip():
        raise InputError(f"{path}: the {what} file is empty")
    return value


def dicomweb_access(args: argparse.Namespace, url: str):
    """A :class:`..cohort.dicomweb.DicomWebAccess` for ``url`` from the credential options and environment."""
    from ..cohort.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, DicomWebAccess

    user = getattr(args, "dicomweb_user", None) or os.environ.get(USER_ENV, "")
    password = token = ""
    if getattr(args, "dicomweb_password_file", None):
        password = _secret_file(args.dicomweb_password_file, "password")
    elif user:
        password = os.environ.get(PASSWORD_ENV, "")
    if getattr(args, "dicomweb_token_file", None):
        token = _secret_file(args.dicomweb_token_file, "token")
    elif not user:
        token = os.environ.get(TOKEN_ENV, "")
    if password and not user:
        from ..errors import RaptorError

        raise RaptorError("--dicomweb-password-file needs --dicomweb-user")
    return DicomWebAccess(url=url, user=user, password=password, token=token)
