"""The client side of jobs: files sent piece by piece, and volumes embedded on a server for the command line.

:class:`PieceSender` sends one upload one piece per :meth:`~PieceSender.step`,
so a Slicer timer tick never blocks for more than one piece; the command
line simply steps until done.  :class:`RemoteEmbedder` has the part of
:class:`~..encoding.pipeline.Embedder`'s interface that ``raptor embed``
uses, so ``raptor embed --server URL`` runs the same loop (resume, CSV,
errors) with the model on another machine.  No PyTorch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ..embeddings.embedding import Embedding
from ..encoding.settings import EmbedSettings, settings_to_json
from ..errors import RaptorError
from ..volumes.transfer import nrrd_chunks, nrrd_size
from ..volumes.volume import Volume, VolumeRef
from .client import CHUNK_BYTES, RaptorClient, finished_or_raise

SELF_CONTAINED_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")


class PieceSender:
    """One upload in pieces: ``step()`` sends the next one; ``upload_id`` is set when the last is in."""

    def __init__(self, purpose: str, size: int, pieces: Iterator[bytes], name: str = "") -> None:
        self.purpose, self.size, self.name = purpose, int(size), name
        self._pieces = pieces
        self._pending = b""
        self.sent = 0
        self.upload_id: str | None = None
        self.done = False

    def step(self, client: RaptorClient, budget: int = CHUNK_BYTES) -> bool:
        """Send up to ``budget`` bytes; True once the whole file is on the server."""
        if self.done:
            return True
        data = self._take(budget)
        if self.upload_id is None:
            answer = client.start_upload(self.purpose, self.size, data, self.name)
            self.upload_id = answer["upload"]
        elif data:
            answer = client.continue_upload(self.upload_id, self.sent, data)
        else:
            answer = {"complete": self.sent == self.size}
        self.sent += len(data)
        self.done = bool(answer.get("complete")) or self.sent >= self.size
        return self.done

    def _take(self, budget: int) -> bytes:
        while len(self._pending) < budget:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._pending += piece
        data, self._pending = self._pending[:budget], self._pending[budget:]
        return data

    def run(self, client: RaptorClient) -> str:
        while not self.step(client):
            pass
        return self.upload_id


def file_sender(path: str | Path, purpose: str) -> PieceSender:
    path = Path(path)

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while True:
                piece = handle.read(CHUNK_BYTES)
                if not piece:
                    return
                yield piece

    return PieceSender(purpose, path.stat().st_size, pieces(), path.name)


def volume_sender(volume: Volume) -> PieceSender:
    """The volume as an attached raw NRRD, made piece by piece (nothing is written to disk)."""
    return PieceSender("volume", nrrd_size(volume.array, volume.ijk_to_ras), nrrd_chunks(volume.array, volume.ijk_to_ras),
                       f"{volume.id}.nrrd")


def volume_info(volume: Volume) -> dict:
    """What the server needs besides the voxels: names, provenance and the exact geometry."""
    return {
        "id": volume.id, "source": volume.source, "modality": volume.modality, "info": dict(volume.info or {}),
        "ijk_to_ras": [[float(v) for v in row] for row in volume.ijk_to_ras], "has_geometry": bool(volume.has_geometry),
    }


def is_self_contained_file(spec: str) -> bool:
    """A single volume file the server can read as it is (sending it unchanged keeps results bit-identical)."""
    path = Path(spec)
    return "#" not in spec and path.is_file() and path.name.lower().endswith(SELF_CONTAINED_SUFFIXES)


def send_volume(client: RaptorClient, ref: VolumeRef) -> dict:
    """Upload one volume; returns the ``volume`` and ``volume_info`` fields of a job request."""
    if is_self_contained_file(ref.source):
        upload = file_sender(ref.source, "volume").run(client)
        return {"volume": {"upload": upload}, "volume_info": {"id": ref.id, "source": ref.source}}
    volume = ref.load()
    upload = volume_sender(volume).run(client)
    return {"volume": {"upload": upload}, "volume_info": volume_info(volume)}


def server_settings(settings: EmbedSettings) -> dict:
    """The settings as a server takes them: its own model cache, so no ``cache_dir``.

    A ``projection_file`` stays a path, which the server reads from its own
    disk; :func:`settings_request` uploads it instead.
    """
    data = settings_to_json(settings)
    data.pop("cache_dir", None)
    return data


def projection_upload(client: RaptorClient, path: str | Path | None) -> dict:
    """The request field that carries a user's projector file to the server (empty when there is none)."""
    if path is None:
        return {}
    return {"projection_file": {"upload": file_sender(path, "projection").run(client)}}


def settings_request(client: RaptorClient, settings: EmbedSettings) -> dict:
    """The ``settings`` of a request, with the projector file (if any) uploaded rather than named."""
    data = server_settings(settings)
    if settings.projection_file is None:
        return {"settings": data}
    data["projection_file"] = None
    return {"settings": data, **projection_upload(client, settings.projection_file)}


class RemoteEmbedder:
    """What ``raptor embed`` needs of an :class:`Embedder`, with the model on a Raptor server."""

    def __init__(self, client: RaptorClient, settings: EmbedSettings) -> None:
        self.client = client
        self.settings = settings
        self._described: dict[str, dict] = {}
        self._settings_request: dict | None = None

    def _settings_fields(self) -> dict:
        """Sent with every job; a projector file is uploaded once and named by its upload id after that."""
        if self._settings_request is None:
            self._settings_request = settings_request(self.client, self.settings)
        return self._settings_request

    def describe(self, preset: str = "") -> dict:
        """The server's metadata for these settings (it loads the model once; later jobs reuse it)."""
        if preset not in self._described:
            job = self.client.submit({"kind": "describe", **self._settings_fields(), "preset": preset})
            snapshot = finished_or_raise(self.client.wait(job["id"]), "describe")
            self._described[preset] = snapshot["result"]
        return self._described[preset]

    def settings_metadata(self, preset: str) -> dict:
        return dict(self.describe(preset)["metadata"])

    @property
    def n_features(self) -> int:
        return int(self.describe("")["n_features"])

    def summary(self) -> str:
        return str(self.describe("")["summary"])

    def embed_many(self, refs: Iterable[VolumeRef], *, progress=None, cancel=None, readers: int = 0,
                   loader: str = "threads") -> Iterator[tuple[VolumeRef, Embedding | None, str | None]]:
        """Send each volume, embed it on the server, fetch the ``.npz``; a volume that fails yields its error."""
        for ref in refs:
            try:
                request = {"kind": "embed", **self._settings_fields(), **send_volume(self.client, ref)}
                job = self.client.submit(request)

                def report(snapshot: dict, volume_id: str = ref.id) -> None:
                    if progress is not None and snapshot.get("unit") == "slices" and snapshot.get("total"):
                        progress(volume_id, snapshot["done"], snapshot["total"])

                snapshot = self.client.wait(job["id"], progress=report, cancel=cancel)
                finished_or_raise(snapshot, ref.id)
                payload = self.client.fetch(job["id"], snapshot["result"]["files"]["embedding"])
                self.client.forget(job["id"])
                yield ref, embedding_from_bytes(payload, ref.id), None
            except RaptorError as exc:
                if _fatal(exc):
                    raise
                yield ref, None, str(exc)


def _fatal(exc: RaptorError) -> bool:
    """Errors of the connection or of the settings stop the run; a bad volume does not."""
    from ..errors import Cancelled
    from .client import ServerRefused, ServerUnreachable

    return isinstance(exc, (ServerUnreachable, ServerRefused, Cancelled))


def embedding_from_bytes(payload: bytes, what: str) -> Embedding:
    """An embedding ``.npz`` received from a server, validated like a file."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        embedding = Embedding.load(tmp)
    except RaptorError:
        raise RaptorError(f"{what}: the server sent an unreadable embedding") from None
    finally:
        os.unlink(tmp)
    return embedding


__all__ = ["PieceSender", "file_sender", "volume_sender", "volume_info", "send_volume", "server_settings",
           "projection_upload", "settings_request",
           "RemoteEmbedder", "embedding_from_bytes", "is_self_contained_file"]
