"""Files clients send to the server: received in pieces, size-capped, checked before any reader sees them.

An upload declares its total size first (refused above the server's limit),
then arrives in one or more pieces at known offsets, so a Slicer client can
send a large volume one piece per timer tick.  When the last byte is in, the
file is checked for what it claims to be: a volume must hold its own voxels
(:func:`..volumes.transfer.self_contained_kind`), a probe must be a ZIP, a
table must be UTF-8 text.  Only then can a job name it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, RaptorError
from ..volumes.transfer import SUFFIXES, self_contained_kind
from .protocol import UPLOAD_PURPOSES


class UploadTooLarge(RaptorError):
    """Declared or received size above the server's limit (HTTP 413)."""


class UploadNotFound(RaptorError):
    """No such upload (HTTP 404)."""


@dataclass
class Upload:
    id: str
    purpose: str
    size: int
    path: Path
    received: int = 0
    complete: bool = False
    kind: str = ""
    name: str = ""
    """The client's file name, used in messages instead of the server's own path."""
    created: float = field(default_factory=time.time)
    used: float = field(default_factory=time.time)
    """When a job last named it (an upload nobody names for :data:`IDLE_SECONDS` is removed)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> dict:
        return {"upload": self.id, "purpose": self.purpose, "size": self.size, "received": self.received,
                "complete": self.complete, "kind": self.kind}


IDLE_SECONDS = 24 * 3600
"""An upload no job has named for this long is removed (a client that died before its job, say)."""


class Uploads:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # patients' scans: this server's user only, whatever the umask
        self.max_bytes = int(max_bytes)
        self._items: dict[str, Upload] = {}
        self._lock = threading.Lock()

    def create(self, purpose: str, size: int, name: str = "") -> Upload:
        if purpose not in UPLOAD_PURPOSES:
            raise InputError(f"upload purpose must be one of {', '.join(UPLOAD_PURPOSES)} (got {purpose!r})")
        if size < 0:
            raise InputError("upload size must be 0 or more")
        if size > self.max_bytes:
            raise UploadTooLarge(
                f"the upload is {size / 2**20:.0f} MB; this server accepts at most {self.max_bytes / 2**20:.0f} MB "
                "(raptor serve --max-upload-mb)"
            )
        self.sweep()
        upload_id = secrets.token_hex(16)
        name = os.path.basename(name.replace("\\", "/"))[:200] if name else ""
        if not name or name in (".", "..") or any(c in name for c in "\n\r\x00"):
            name = f"uploaded {purpose}"
        upload = Upload(id=upload_id, purpose=purpose, size=int(size), path=self.folder / f"{upload_id}.part", name=name)
        upload.path.touch()
        with self._lock:
            self._items[upload_id] = upload
        return upload

    def get(self, upload_id: str) -> Upload:
        with self._lock:
            upload = self._items.get(upload_id)
        if upload is None:
            raise UploadNotFound(f"no upload {upload_id!r} on this server (it may have been removed or the server restarted)")
        return upload

    def write(self, upload: Upload, offset: int, data: bytes) -> None:
        with upload.lock:
            if upload.complete:
                raise InputError(f"upload {upload.id} is already complete")
            if offset != upload.received:
                raise InputError(f"upload {upload.id}: piece at offset {offset}, expected {upload.received}")
            if upload.received + len(data) > upload.size:
                raise UploadTooLarge(f"upload {upload.id}: more bytes than the {upload.size} declared")
            with open(upload.path, "r+b") as handle:
                handle.seek(offset)
                handle.write(data)
            upload.received += len(data)
            if upload.received == upload.size:
                self._finish(upload)

    def _finish(self, upload: Upload) -> None:
        with open(upload.path, "rb") as handle:
            head = handle.read(1 << 16)
        what = upload.name
        try:
            if upload.purpose == "volume":
                upload.kind = self_contained_kind(head, what)
                final = upload.path.with_name(upload.id + SUFFIXES[upload.kind])
            elif upload.purpose == "probe":
                if not head.startswith(b"PK"):
                    raise InputError(f"{what}: is not a .raptorprobe file (not a ZIP)")
                upload.kind = "probe"
                final = upload.path.with_name(upload.id + ".raptorprobe")
            elif upload.purpose == "projection":
                if not head.startswith(b"\x93NUMPY"):
                    raise InputError(f"{what}: is not a projector file (a .npy array)")
                upload.kind = "npy"
                final = upload.path.with_name(upload.id + ".npy")
            else:
                try:
                    head.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if exc.start < len(head) - 4:  # a multi-byte character cut at the end of the peek is fine
                        raise InputError(f"{what}: is not UTF-8 text (a CSV)") from None
                upload.kind = "csv"
                final = upload.path.with_name(upload.id + ".csv")
        except InputError:
            self.remove(upload.id)
            raise
        os.replace(upload.path, final)
        upload.path = final
        upload.complete = True

    def path_of(self, upload_id: str, purpose: str) -> Path:
        upload = self.get(upload_id)
        if not upload.complete:
            raise InputError(f"upload {upload_id}: only {upload.received} of {upload.size} bytes received")
        if upload.purpose != purpose:
            raise InputError(f"upload {upload_id} is a {upload.purpose}, not a {purpose}")
        upload.used = time.time()
        return upload.path

    def find(self, path: Path) -> Upload | None:
        """The upload stored at ``path``, if any."""
        with self._lock:
            return next((u for u in self._items.values() if u.path == path), None)

    def sweep(self, idle_seconds: float = IDLE_SECONDS) -> None:
        """Remove the uploads no job has named for ``idle_seconds``."""
        cutoff = time.time() - idle_seconds
        with self._lock:
            stale = [u.id for u in self._items.values() if u.used < cutoff]
        for upload_id in stale:
            self.remove(upload_id)

    def redact(self, message: str) -> str:
        """A message with every upload's server path replaced by the client's file name."""
        with self._lock:
            items = list(self._items.values())
        for upload in items:
            message = message.replace(str(upload.path), upload.name)
        return message.replace(str(self.folder) + os.sep, "")

    def remove(self, upload_id: str) -> None:
        with self._lock:
            upload = self._items.pop(upload_id, None)
        if upload is not None:
            upload.path.unlink(missing_ok=True)


__all__ = ["Upload", "Uploads", "UploadTooLarge", "UploadNotFound"]
