"""A PACS as a cohort source and as a destination, over DICOMweb (``dicomweb-client``).

* **Listing** (QIDO-RS): studies, then their series, with the filters the
  server can apply (study and series UIDs, study date range, one modality);
  the rest (several modalities, minimum slices from
  ``NumberOfSeriesRelatedInstances``, the description pattern) is applied here
  by :class:`.sources.SeriesFilter`, as for every source.  Each series becomes a
  :class:`.sources.SeriesItem` of kind ``dicomweb``: plain data that a loader
  process can receive.
* **Retrieving** (WADO-RS): a loader streams the series' instances to a
  private folder on the RAM disk (``/dev/shm`` when it has room), reads them
  with the same readers as a DICOM folder (header scan, slice order, Slicer's
  reader) and deletes the folder, so a series from a PACS and the same files
  on disk give the same embedding, bit for bit.
* **Storing** (STOW-RS): :func:`store` sends SRs and Parametric Maps back.

Credentials (HTTP basic or a bearer token) travel inside
:class:`DicomWebAccess`, which never shows them in a ``repr`` or a message and
is never written to a batch record.  Every HTTP failure becomes one
:class:`~RaptorExtension.errors.RaptorError` line that names the server or
the series and the reason (refused credentials, unreachable, gone).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import InputError, RaptorError
from ..volumes.dicom import read_dicom_series, scan_dicom_files
from ..volumes.prefetch import HANDOFF_PREFIX, handoff_base
from ..volumes.volume import Volume
from .sources import Discovery, SeriesFilter, SeriesItem

SERIES_URL = re.compile(r"^(https?://.+?)/studies/([0-9.]+)/series/([0-9.]+)/?$")
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
TOKEN_ENV = "RAPTOR_DICOMWEB_TOKEN"
PASSWORD_ENV = "RAPTOR_DICOMWEB_PASSWORD"
USER_ENV = "RAPTOR_DICOMWEB_USER"

# DICOM JSON keywords of the QIDO-RS answers we read.
_STUDY_FIELDS = ("StudyInstanceUID", "PatientID", "StudyDate")
_SERIES_FIELDS = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances",
                  "PatientID", "StudyDate")

_clients: dict = {}


def require_client() -> None:
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        raise RaptorError("DICOMweb needs the dicomweb-client package: pip install dicomweb-client") from None


def normalize_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise RaptorError(f"{url or '(empty)'}: a DICOMweb URL starts with http:// or https:// (e.g. https://pacs/dicom-web)")
    if "@" in url.split("/")[2]:
        raise RaptorError("a DICOMweb URL must not hold credentials; use --dicomweb-user with a password file, or a token")
    return url


@dataclass
class DicomWebAccess:
    """A DICOMweb server and how to log in to it.  Picklable, so loader processes can retrieve."""

    url: str
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)
        if self.user and self.token:
            raise RaptorError("give DICOMweb credentials as a user and password or as a token, not both")
        if self.user and not self.password:
            raise RaptorError(f"DICOMweb user {self.user!r} has no password: give --dicomweb-password-file FILE "
                              f"or set ${PASSWORD_ENV}")

    def describe(self) -> str:
        how = f" as {self.user}" if self.user else (" with a bearer token" if self.token else "")
        return f"{self.url}{how}"

    def client(self, retry: bool = True):
        """A ``DICOMwebClient`` for this server (one per process, credentials and retry policy).

        With ``retry`` (the default) a failed request is tried five times over
        about half a minute, as ``dicomweb-client`` does, so a PACS that hiccups
        mid-batch costs nothing; without, one attempt.
        """
        require_client()
        key = (os.getpid(), self.url, self.user, self.password, self.token, retry)
        client = _clients.get(key)
        if client is None:
            from dicomweb_client.api import DICOMwebClient
            from dicomweb_client.session_utils import create_session, create_session_from_user_pass

            session = create_session_from_user_pass(self.user, self.password) if self.user else create_session()
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            client = DICOMwebClient(self.url, session=session, headers=headers, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            if not retry:
                client.set_http_retry_params(retry=False)
            _clients[key] = client
        return client

    # -- what a loader process calls ---------------------------------------
    def load_series(self, item: SeriesItem, id: str) -> Volume:
        return load_series(self, item, id)


def http_reason(exc: BaseException) -> str:
    """One short phrase for an HTTP failure (no URL, no credentials)."""
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return f"the server refused the credentials (HTTP {status})"
        if status == 404:
            return "not found on the server (HTTP 404)"
        return f"the server answered HTTP {status} {exc.response.reason or ''}".rstrip()
    if isinstance(exc, requests.exceptions.Timeout):
        return "the server did not answer in time"
    if isinstance(exc, requests.exceptions.SSLError):
        return "the TLS connection failed (certificate?)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "cannot reach the server (connection refused or no route)"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"the request failed ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _is_http_failure(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.RequestException)


def _value(entry: dict, keyword: str) -> str:
    """A value of a DICOM JSON (QIDO-RS) answer by keyword, as text."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    item = entry.get(f"{tag:08X}") if tag is not None else None
    values = (item or {}).get("Value") or []
    if not values:
        return ""
    value = values[0]
    if isinstance(value, dict):  # a person name
        value = value.get("Alphabetic", "")
    return " ".join(str(value).split())


# ---------------------------------------------------------------------------
# Listing (QIDO-RS)


def discover_dicomweb(access: DicomWebAccess, filters: SeriesFilter | None = None, *, cancel=None) -> tuple[Discovery, list[tuple[SeriesItem, str]]]:
    """Every series the server lists for these filters, and those left out with the reason.

    A server that refuses the credentials or cannot be reached raises one
    :class:`RaptorError` naming it.
    """
    filters = filters or SeriesFilter()
    _check_reachable(access)
    client = access.client()
    try:
        entries = _series_entries(client, filters, cancel)
    except RaptorError:
        raise
    except Exception as exc:
        if _is_http_failure(exc):
            raise RaptorError(f"{access.url}: cannot list series: {http_reason(exc)}") from None
        raise RaptorError(f"{access.url}: cannot list series ({type(exc).__name__}: {exc})") from None
    found = Discovery()
    excluded: list[tuple[SeriesItem, str]] = []
    for entry, study in entries:
        item = _item(access, entry, study)
        reason = filters.exclusion(item)
        if reason:
            excluded.append((item, reason))
        else:
            found.items.append(item)
    return found, excluded


def _check_reachable(access: DicomWebAccess) -> None:
    """One request, not retried: a wrong address or a PACS that is down is named at once.

    Otherwise the client's retries would keep the user waiting half a minute for
    that one line.  Only a failure to connect ends the listing here; an HTTP
    error (401, 503...) is left to the listing itself, which retries what is
    worth retrying and reports the rest.
    """
    import requests

    try:
        access.client(retry=False).search_for_studies(limit=1, fields=["StudyInstanceUID"])
    except requests.exceptions.ConnectionError as exc:
        raise RaptorError(f"{access.url}: cannot list series: {http_reason(exc)}") from None
    except Exception:  # noqa: BLE001 - reported by the listing, with its retries
        return


def _series_entries(client, filters: SeriesFilter, cancel) -> list[tuple[dict, dict]]:
    """(series entry, study entry) pairs from QIDO-RS, with the server-side filters."""
    from ..errors import Cancelled

    series_filters = {}
    if len(filters.modalities) == 1:
        series_filters["Modality"] = filters.modalities[0]
    pairs: list[tuple[dict, dict]] = []
    if filters.series_uids:
        studies: dict[str, dict] = {}
        for uid in filters.series_uids:
            found = _paged(client.search_for_series, "SeriesInstanceUID",
                           search_filters={**series_filters, "SeriesInstanceUID": uid}, fields=list(_SERIES_FIELDS))
            for entry in found:
                study_uid = _value(entry, "StudyInstanceUID")
                if study_uid not in studies:
                    studies[study_uid] = _study(client, study_uid, filters)
                if studies[study_uid] is not None:
                    pairs.append((entry, studies[study_uid]))
        return pairs
    study_filters = {}
    if filters.date_range:
        study_filters["StudyDate"] = filters.date_range
    if len(filters.modalities) == 1:
        study_filters["ModalitiesInStudy"] = filters.modalities[0]
    studies_found: list[dict] = []
    for uid in filters.study_uids or (None,):
        search = dict(study_filters, **({"StudyInstanceUID": uid} if uid else {}))
        studies_found += _paged(client.search_for_studies, "StudyInstanceUID", search_filters=search,
                                fields=list(_STUDY_FIELDS))
    for study in studies_found:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        study_uid = _value(study, "StudyInstanceUID")
        for entry in _paged(client.search_for_series, "SeriesInstanceUID", study_instance_uid=study_uid,
                            search_filters=dict(series_filters), fields=list(_SERIES_FIELDS)):
            pairs.append((entry, study))
    return pairs


QIDO_PAGE = 500


def _paged(search, key: str, **kwargs) -> list[dict]:
    """Every match of a QIDO-RS search, a page (``limit``/``offset``) at a time.

    Not ``dicomweb-client``'s ``get_remaining``: it stops only on an empty
    page, and a server that ignores ``offset`` for some queries (Orthanc 1.10
    does with ``ModalitiesInStudy``) answers the same page for ever.  Here a
    short page, or a page with nothing new (by ``key``), ends the listing.
    """
    results: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = search(limit=QIDO_PAGE, offset=offset, **kwargs)
        new = []
        for entry in page:
            uid = _value(entry, key)
            if uid not in seen:
                seen.add(uid)
                new.append(entry)
        results += new
        if len(page) < QIDO_PAGE or not new:
            return results
        offset += len(page)


def _study(client, study_uid: str, filters: SeriesFilter) -> dict | None:
    search = {"StudyInstanceUID": study_uid}
    if filters.date_range:
        search["StudyDate"] = filters.date_range
    found = client.search_for_studies(search_filters=search, fields=list(_STUDY_FIELDS))
    return found[0] if found else None


def _item(access: DicomWebAccess, entry: dict, study: dict) -> SeriesItem:
    count = _value(entry, "NumberOfSeriesRelatedInstances")
    series_uid = _value(entry, "SeriesInstanceUID")
    study_uid = _value(entry, "StudyInstanceUID") or _value(study, "StudyInstanceUID")
    info = {k: v for k, v in (("StudyDate", _value(study, "StudyDate") or _value(entry, "StudyDate")),) if v}
    return SeriesItem(
        key=series_uid,
        kind="dicomweb",
        paths=[],
        patient_id=_value(study, "PatientID") or _value(entry, "PatientID"),
        study_uid=study_uid,
        series_uid=series_uid,
        modality=_value(entry, "Modality").upper(),
        description=_value(entry, "SeriesDescription"),
        n_slices=int(count) if count.isdigit() else None,
        info=info,
        url=access.url,
        access=access,
    )


# ---------------------------------------------------------------------------
# Retrieving (WADO-RS)


def load_series(access: DicomWebAccess, item: SeriesItem, id: str) -> Volume:
    """Retrieve one series into a private folder, read it as a DICOM folder is read, delete the folder."""
    folder = tempfile.mkdtemp(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-wado-", dir=handoff_base(1 << 30))
    try:
        paths = retrieve_series_files(access, item.study_uid, item.series_uid, folder, where=item.source)
        series, skipped = scan_dicom_files(paths)
        series = [s for s in series if s.uid == item.series_uid]
        if not series:
            reason = skipped[0][1] if skipped else "no image instances"
            raise InputError(f"{item.source}: the server sent no readable DICOM image ({reason})")
        volume = read_dicom_series(series[0], item.source, id=id)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    volume.source = item.source
    return volume


def retrieve_series_files(access: DicomWebAccess, study_uid: str, series_uid: str, folder: str, *, where: str) -> list:
    """Stream a series' instances (WADO-RS) into ``folder``, one file each; returns their paths."""
    from pathlib import Path

    client = access.client()
    paths = []
    try:
        for n, dataset in enumerate(client.iter_series(study_uid, series_uid)):
            path = Path(folder) / f"{n:06d}.dcm"
            dataset.save_as(str(path), enforce_file_format=True)
            paths.append(path)
    except Exception as exc:
        if _is_http_failure(exc):
            reason = http_reason(exc)
            if "HTTP 404" in reason:
                reason = "the series is no longer on the server (HTTP 404)"
            raise InputError(f"{where}: cannot retrieve: {reason}") from None
        raise InputError(f"{where}: cannot retrieve ({type(exc).__name__}: {exc})") from None
    if not paths:
        raise InputError(f"{where}: the server holds no instance of this series any more")
    return paths


def series_metadata(access: DicomWebAccess, study_uid: str, series_uid: str) -> list:
    """The instances' headers (WADO-RS metadata, no pixels) as pydicom datasets."""
    from pydicom import Dataset

    where = f"{access.url}/studies/{study_uid}/series/{series_uid}"
    try:
        entries = access.client().retrieve_series_metadata(study_uid, series_uid)
    except Exception as exc:
        if _is_http_failure(exc):
            raise InputError(f"{where}: cannot read its metadata: {http_reason(exc)}") from None
        raise
    return [Dataset.from_json(entry, bulk_data_uri_handler=lambda *_: b"") for entry in entries]


def parse_series_url(url: str) -> tuple[str, str, str]:
    """``ROOT/studies/S/series/X`` -> (ROOT, S, X)."""
    match = SERIES_URL.match((url or "").strip())
    if not match:
        raise RaptorError(f"{url}: not a DICOMweb series URL (ROOT/studies/STUDY_UID/series/SERIES_UID)")
    return match.group(1), match.group(2), match.group(3)


def is_series_url(text: str) -> bool:
    return bool(SERIES_URL.match((text or "").strip()))


def series_item(access: DicomWebAccess, url: str) -> SeriesItem:
    """The item for one series named by its URL (``raptor explain ROOT/studies/S/series/X``)."""
    _root, study_uid, series_uid = parse_series_url(url)
    return SeriesItem(key=series_uid, kind="dicomweb", paths=[], study_uid=study_uid, series_uid=series_uid,
                      url=access.url, access=access)


# ---------------------------------------------------------------------------
# Storing (STOW-RS)


def store(access: DicomWebAccess, datasets: Sequence | Iterable) -> int:
    """Send DICOM objects to the server; returns how many it stored, or raises one line naming what failed."""
    datasets = list(datasets)
    if not datasets:
        return 0
    try:
        response = access.client().store_instances(datasets)
    except Exception as exc:
        if _is_http_failure(exc):
            raise RaptorError(f"{access.url}: cannot store {len(datasets)} object(s): {http_reason(exc)}") from None
        raise RaptorError(f"{access.url}: cannot store ({type(exc).__name__}: {exc})") from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise RaptorError(f"{access.url}: the server refused {len(failed)} of {len(datasets)} object(s) sent with STOW-RS")
    return len(datasets)


__all__ = [
    "DicomWebAccess",
    "discover_dicomweb",
    "load_series",
    "retrieve_series_files",
    "series_metadata",
    "series_item",
    "parse_series_url",
    "is_series_url",
    "store",
    "http_reason",
    "normalize_url",
]
