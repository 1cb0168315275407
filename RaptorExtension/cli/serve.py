"""``raptor serve``: run a Raptor server, on this computer for the Slicer modules or on a GPU machine.

Examples::

    raptor serve                                   # loopback, random port printed on the first line
    raptor serve --host 0.0.0.0 --port 8765 --token-file ~/.raptor-token \\
        --tls-cert cert.pem --tls-key key.pem --allow-root /data/cohorts
"""

from __future__ import annotations

import argparse
import os

from ..errors import RaptorError
from .options import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="run a Raptor server (embed, explain, fit and batch jobs over HTTP)",
        description="Run a Raptor server. The first line printed is its URL. Jobs keep the model loaded between requests.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed on the first line)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token clients must send (else env RAPTOR_TOKEN); required off loopback")
    p.add_argument("--allow-root", action="append", default=[], metavar="FOLDER",
                   help="a folder whose files jobs may name by path (batch sources and outputs); repeatable. "
                        "Without it, clients upload their files")
    p.add_argument("--max-upload-mb", type=positive_int, default=None, help="largest upload accepted (default 4096)")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM) to serve https")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default: RAPTOR_MODEL_CACHE, else the hub's)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("--work-dir", default=None, help="folder for uploads and results (default: a temporary one)")
    p.add_argument("--url-file", default=None, help="also write the URL to this file once listening")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="exit when standard input closes (for a parent that starts the server and may die)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..server.protocol import DEFAULT_MAX_UPLOAD_MB, TOKEN_ENV
    from ..server.serve import ServeOptions, read_token_file, serve

    token = read_token_file(args.token_file) if args.token_file else (os.environ.get(TOKEN_ENV) or None)
    if token is not None and not args.token_file and len(token.strip()) < 16:
        raise RaptorError(f"{TOKEN_ENV}: the token must be at least 16 characters")
    options = ServeOptions(
        host=args.host, port=args.port, token=token, allow_roots=list(args.allow_root), work_dir=args.work_dir,
        max_upload_mb=args.max_upload_mb or DEFAULT_MAX_UPLOAD_MB, tls_cert=args.tls_cert, tls_key=args.tls_key,
        exit_with_stdin=args.exit_with_stdin, url_file=args.url_file, cache_dir=args.cache_dir,
        threads=args.threads,
    )
    return serve(options)
