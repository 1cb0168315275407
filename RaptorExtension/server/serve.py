"""``raptor serve``: bind, say where, serve until told to stop or until the parent process is gone.

The first line on standard output is the bound URL (``--port 0`` picks a free
port), so whoever started the server reads where it is; ``--url-file`` also
writes it to a file, which a Slicer module checks from its timer without
blocking.  Without a token the server listens only on loopback; a token
comes from ``--token-file`` or the ``RAPTOR_TOKEN`` environment variable,
never from the command line (``ps`` would show it).

``--exit-with-stdin``: the server exits when its standard input reaches end
of file.  A parent that starts it with a pipe on stdin and never writes to it
(the Slicer modules do) closes that pipe when it dies, however it dies, so
no orphan server keeps the GPU.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import RaptorError
from .protocol import DEFAULT_MAX_UPLOAD_MB, PREFIX

log = logging.getLogger("raptor.server")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    allow_roots: list[str] = field(default_factory=list)
    work_dir: str | None = None
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    tls_cert: str | None = None
    tls_key: str | None = None
    exit_with_stdin: bool = False
    url_file: str | None = None
    cache_dir: str | None = None
    threads: int | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> None:
    if not is_loopback(options.host) and not options.token:
        raise RaptorError(
            f"refusing to listen on {options.host} without a token: anyone who reaches the port could run jobs "
            "and read results; give one with --token-file FILE (or RAPTOR_TOKEN)"
        )
    if bool(options.tls_cert) != bool(options.tls_key):
        raise RaptorError("give both --tls-cert and --tls-key, or neither")
    for path in (options.tls_cert, options.tls_key):
        if path and not Path(path).is_file():
            raise RaptorError(f"{path}: no such file")
    if options.max_upload_mb < 1:
        raise RaptorError("--max-upload-mb must be at least 1")
    for root in options.allow_roots:
        if not Path(root).is_dir():
            raise RaptorError(f"{root}: --allow-root must be an existing folder")


def serve(options: ServeOptions) -> int:
    """Run the server in this process until stopped; returns the exit code."""
    check_options(options)
    import uvicorn

    from .app import create_app
    from .jobs import JobManager
    from .model_pool import ModelPool
    from .tasks import ServerContext
    from .uploads import Uploads

    if options.cache_dir:
        os.environ["RAPTOR_MODEL_CACHE"] = options.cache_dir
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    own_work_dir = options.work_dir is None
    work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="raptor-serve-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as exc:
        raise RaptorError(f"cannot listen on {options.host}:{options.port} ({exc.strerror or exc})") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"{scheme}://{host}:{port}"

    ctx = ServerContext(
        uploads=Uploads(work_dir / "uploads", options.max_upload_mb << 20),
        models=ModelPool(),
        allow_roots=[Path(r).resolve() for r in options.allow_roots],
        work_dir=work_dir,
    )
    jobs = JobManager(work_dir, redact=ctx.uploads.redact)
    app = create_app(ctx, jobs, options.token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)

    def stop(reason: str) -> None:
        log.warning("raptor serve: stopping (%s)", reason)
        server.should_exit = True

    if options.exit_with_stdin:
        threading.Thread(target=_watch_stdin, args=(stop,), name="raptor-parent-watch", daemon=True).start()
    if options.url_file:
        atomic_write_text(options.url_file, url + "\n")
    print(url, flush=True)
    print(f"raptor serve: {url}{PREFIX} ({'token required' if options.token else 'no token: loopback only'}; "
          f"work folder {work_dir})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        jobs.close(timeout=10.0)
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        if options.url_file:
            Path(options.url_file).unlink(missing_ok=True)
    return 0


def _watch_stdin(stop) -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    stop("the parent process closed standard input")


def read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RaptorError(f"{path}: cannot read the token ({exc.strerror or exc})") from None
    if len(token) < 16:
        raise RaptorError(f"{path}: the token must be at least 16 characters")
    return token


__all__ = ["ServeOptions", "serve", "check_options", "is_loopback", "read_token_file"]
