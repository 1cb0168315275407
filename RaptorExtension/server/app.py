"""The HTTP API of ``raptor serve`` (FastAPI): health, uploads, jobs, result files, model unloading.

Every request needs ``Authorization: Bearer <token>`` when the server has a
token (compared in constant time; a wrong token does no work at all).
Every error is a JSON body ``{"error": "<one line>"}`` with a fitting status
(400 bad request, 401 token, 403 path outside ``--allow-root``, 404, 409,
413 upload too large, 500 a bug), never a traceback, and the server goes on
serving.  Status requests only read a job's snapshot, so they answer at once
while the GPU works.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, RaptorError
from ..version import __version__
from .jobs import JobManager
from .model_pool import devices
from .protocol import API_VERSION, FINISHED, KINDS, PREFIX, UPLOAD_SIZE_HEADER
from .tasks import Forbidden, ServerContext, prepare
from .uploads import UploadNotFound, UploadTooLarge

log = logging.getLogger("raptor.server")
MAX_JSON_BYTES = 16 << 20


class Unauthorized(RaptorError):
    pass


class NotFound(RaptorError):
    pass


class Conflict(RaptorError):
    pass


STATUS = {Unauthorized: 401, Forbidden: 403, NotFound: 404, UploadNotFound: 404, Conflict: 409, UploadTooLarge: 413}


def _status_of(exc: RaptorError) -> int:
    for kind, status in STATUS.items():
        if isinstance(exc, kind):
            return status
    return 400


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_app(ctx: ServerContext, jobs: JobManager, token: str | None) -> FastAPI:
    app = FastAPI(title="Raptor", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    device_list: list[dict] = []

    def find_devices() -> None:  # importing PyTorch and starting CUDA take seconds: not inside a request
        device_list.extend(devices())

    threading.Thread(target=find_devices, name="raptor-devices", daemon=True).start()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if token is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
                return _error(401, "missing or wrong token (send Authorization: Bearer <token>)")
        try:
            return await call_next(request)
        except Exception as exc:  # anything a handler did not turn into a response
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return _error(500, f"internal error ({type(exc).__name__}); the server goes on")

    @app.exception_handler(RaptorError)
    async def raptor_error(_request: Request, exc: RaptorError):
        return _error(_status_of(exc), ctx.uploads.redact(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"bad request: {where}: {first.get('msg', 'invalid')}")

    async def json_body(request: Request) -> dict:
        # A web page can send a "simple" cross-site POST (text/plain) to a token-less loopback server without
        # asking first; application/json it cannot.
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise InputError("send the request as JSON (Content-Type: application/json)")
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_JSON_BYTES:
            raise UploadTooLarge(f"a JSON request is limited to {MAX_JSON_BYTES >> 20} MB")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise UploadTooLarge(f"a JSON request is limited to {MAX_JSON_BYTES >> 20} MB")
        try:
            data = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise InputError("the request body must be a JSON object")
        return data

    # -- health and models ------------------------------------------------------
    @app.get(f"{PREFIX}/health")
    def health():
        return {
            "service": "raptor", "version": __version__, "api": API_VERSION, "pid": os.getpid(),
            "devices": list(device_list), "devices_ready": bool(device_list), "models": ctx.models.loaded(), "queue": jobs.queue_lengths(),
            "running": [j.snapshot()["kind"] for j in jobs.running()],
            "allow_roots": [str(r) for r in ctx.allow_roots], "max_upload_mb": ctx.uploads.max_bytes >> 20,
        }

    @app.post(f"{PREFIX}/models/unload")
    def unload():
        if jobs.running():
            raise Conflict("a job is running; the model stays loaded until it ends")
        return {"unloaded": ctx.models.unload()}

    # -- uploads --------------------------------------------------------------------
    @app.post(f"{PREFIX}/uploads")
    async def create_upload(request: Request, purpose: str = "volume", name: str = ""):
        declared = request.headers.get(UPLOAD_SIZE_HEADER)
        try:
            size = int(declared) if declared is not None else int(request.headers.get("content-length") or -1)
        except ValueError:
            raise InputError(f"{UPLOAD_SIZE_HEADER} must be a whole number of bytes") from None
        if size < 0:
            raise InputError(f"say the upload's size in {UPLOAD_SIZE_HEADER}")
        upload = ctx.uploads.create(purpose, size, name)
        await _receive(request, upload, 0)
        return upload.describe()

    @app.put(f"{PREFIX}/uploads/{{upload_id}}")
    async def continue_upload(upload_id: str, request: Request, offset: int = 0):
        upload = ctx.uploads.get(upload_id)
        await _receive(request, upload, offset)
        return upload.describe()

    async def _receive(request: Request, upload, offset: int) -> None:
        length = request.headers.get("content-length")
        if length is not None and offset + int(length) > upload.size:
            ctx.uploads.remove(upload.id)
            raise UploadTooLarge(f"upload {upload.id}: more bytes than the {upload.size} declared")
        buffer = bytearray()
        try:
            async for chunk in request.stream():
                buffer += chunk
                if offset + len(buffer) > upload.size:
                    raise UploadTooLarge(f"upload {upload.id}: more bytes than the {upload.size} declared")
                if len(buffer) >= 8 << 20:
                    ctx.uploads.write(upload, offset, bytes(buffer))
                    offset += len(buffer)
                    buffer.clear()
            if buffer or upload.size == 0:
                ctx.uploads.write(upload, offset, bytes(buffer))
        except UploadTooLarge:
            ctx.uploads.remove(upload.id)
            raise

    @app.delete(f"{PREFIX}/uploads/{{upload_id}}")
    def delete_upload(upload_id: str):
        ctx.uploads.get(upload_id)
        ctx.uploads.remove(upload_id)
        return {"deleted": upload_id}

    # -- jobs ----------------------------------------------------------------------
    @app.post(f"{PREFIX}/jobs")
    async def submit(request: Request):
        data = await json_body(request)
        kind = data.get("kind")
        if kind not in KINDS:
            raise InputError(f"'kind' must be one of {', '.join(KINDS)}")
        run = await run_in_threadpool(prepare, ctx, kind, data)  # checks the inputs: off the event loop
        consumed = _uploads_named(data)
        job = jobs.submit(kind, run, start=False,
                          on_finish=lambda: [ctx.uploads.remove(upload_id) for upload_id in consumed])
        # The job starts once this answer has left: a running job can hold the GIL for a while (VTK reading
        # a volume does), and the Slicer modules wait for this answer on their main thread.
        return JSONResponse(job.snapshot(), background=BackgroundTask(jobs.start, job))

    @app.get(f"{PREFIX}/jobs")
    def list_jobs():
        return {"jobs": [j.snapshot() for j in list(jobs.jobs.values())]}

    def job_or_404(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} on this server (finished jobs are kept for a while; the server may have restarted)")
        return job

    @app.get(f"{PREFIX}/jobs/{{job_id}}")
    def status(job_id: str):
        return job_or_404(job_id).snapshot()

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel")
    def cancel(job_id: str):
        job_or_404(job_id)
        return jobs.cancel(job_id).snapshot()

    @app.delete(f"{PREFIX}/jobs/{{job_id}}")
    def forget(job_id: str):
        job_or_404(job_id)
        jobs.delete(job_id)
        return {"deleted": job_id}

    @app.get(f"{PREFIX}/jobs/{{job_id}}/files/{{name}}")
    def result_file(job_id: str, name: str):
        job = job_or_404(job_id)
        snapshot = job.snapshot()
        if snapshot["state"] not in FINISHED:
            raise Conflict(f"job {job_id} is still {snapshot['state']}")
        files = snapshot["result"].get("files", {})
        if name not in files.values():
            raise NotFound(f"job {job_id} has no result file {name!r}")
        return FileResponse(job.folder / name, media_type="application/octet-stream", filename=name)

    return app


def _uploads_named(request, key: str = "") -> list[str]:
    """The upload ids a job request names, which the job consumes: the server removes them when it ends.

    A projector file is the exception: a client embedding many volumes sends it
    once and names it in every job (it goes when no job has named it for a day).
    """
    if isinstance(request, dict):
        if key != "projection_file" and set(request) == {"upload"} and isinstance(request["upload"], str):
            return [request["upload"]]
        return [u for k, v in request.items() for u in _uploads_named(v, k)]
    if isinstance(request, list):
        return [u for v in request for u in _uploads_named(v, key)]
    return []


__all__ = ["create_app"]
