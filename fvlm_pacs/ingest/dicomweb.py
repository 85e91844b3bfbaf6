"""STOW-RS intake (PS3.18 §10.5): ``POST /dicomweb/studies[/{study}]``.

The body (``multipart/related; type="application/dicom"``) is parsed as it streams in, so memory
holds one part at a time; each part goes through the same :class:`Intake` as a C-STORE, so a
study may arrive partly by DIMSE and partly by STOW-RS and still end in one job. The response is
the PS3.18 Store Instances Response: Referenced SOP Sequence for what was stored, Failed SOP
Sequence (with Failure Reason) for what was not.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from fvlm_pacs.errors import InvalidInstance, StorageFailure
from fvlm_pacs.ingest.intake import Intake
from fvlm_pacs.ingest.spool import validate_uid

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

FAILURE_PROCESSING = 0xC000  # PS3.18 / PS3.4 "cannot understand" / processing failure
FAILURE_OUT_OF_RESOURCES = 0xA700
_DICOM = "application/dicom"


class StowRequestError(Exception):
    """The request as a whole is unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class StowOutcome:
    """Per-instance results of one STOW-RS request."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (class UID, instance UID)
    failed: list[tuple[str | None, str | None, int, str]] = field(default_factory=list)
    studies: Counter[str] = field(default_factory=Counter)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 Table 10.5.3-1)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self, base_url: str, study_uid: str | None) -> dict[str, Any]:
        """The Store Instances Response module as DICOM JSON."""
        ds = Dataset()
        studies = {study_uid} if study_uid else set(self.studies)
        if len(studies) == 1:
            ds.RetrieveURL = f"{base_url}/studies/{next(iter(studies))}"
        if self.stored:
            ds.ReferencedSOPSequence = []
            for cls, uid in self.stored:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = uid
                ds.ReferencedSOPSequence.append(item)
        if self.failed:
            ds.FailedSOPSequence = []
            for failed_cls, failed_uid, reason, _comment in self.failed:
                item = Dataset()
                if failed_cls:
                    item.ReferencedSOPClassUID = failed_cls
                if failed_uid:
                    item.ReferencedSOPInstanceUID = failed_uid
                item.FailureReason = reason
                ds.FailedSOPSequence.append(item)
        return ds.to_json_dict()


def boundary_of(content_type: str | None) -> bytes:
    """Check the request's media type and return its multipart boundary."""
    if not content_type:
        raise StowRequestError(415, "Content-Type is required")
    media, params = parse_options_header(content_type)
    if media.lower() != b"multipart/related":
        raise StowRequestError(415, "Content-Type must be multipart/related")
    part_type = params.get(b"type", b"").decode("latin-1").lower()
    if part_type and part_type != _DICOM:
        raise StowRequestError(415, f'only type="{_DICOM}" is accepted, not {part_type!r}')
    boundary = params.get(b"boundary")
    if not boundary:
        raise StowRequestError(400, "multipart boundary missing from Content-Type")
    return boundary


class _PartCollector:
    """python-multipart callbacks that collect whole parts (headers + bytes)."""

    def __init__(self) -> None:
        self.ready: list[tuple[dict[str, str], bytes]] = []
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data = bytearray()
        self.parts_seen = 0
        self.in_part = False  # a part began and its closing boundary has not come yet

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self._data.extend(d[s:e]),
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._data = bytearray()
        self.in_part = True

    def unfinished(self) -> bytes:
        """What arrived of a part the body ended inside of."""
        return bytes(self._data)

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode(
            "latin-1"
        ).strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self.in_part = False
        self.parts_seen += 1
        self.ready.append((self._headers, bytes(self._data)))
        self._data = bytearray()


async def store_instances(
    intake: Intake,
    body: AsyncIterator[bytes],
    content_type: str | None,
    *,
    max_bytes: int,
    study_uid: str | None,
    peer_host: str | None,
) -> StowOutcome:
    """Parse the streamed body and store every part; per-part failures go in the outcome."""
    boundary = boundary_of(content_type)
    collector = _PartCollector()
    parser = MultipartParser(boundary, collector.callbacks())
    outcome = StowOutcome()
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > max_bytes:
            raise StowRequestError(413, f"request body exceeds stow_max_bytes ({max_bytes})")
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise StowRequestError(400, f"malformed multipart body: {exc}") from None
        while collector.ready:
            headers, data = collector.ready.pop(0)
            await _store_part(intake, headers, data, outcome, study_uid, peer_host)
    parser.finalize()
    while collector.ready:
        headers, data = collector.ready.pop(0)
        await _store_part(intake, headers, data, outcome, study_uid, peer_host)
    if collector.parts_seen == 0:
        raise StowRequestError(400, "the multipart body has no complete parts")
    if collector.in_part:
        # The body ended without the part's closing boundary: that part was not stored, and
        # the response must not claim that everything was.
        cls, uid = _uids_if_readable(collector.unfinished())
        outcome.failed.append((cls, uid, FAILURE_PROCESSING, "body ends inside a part"))
    return outcome


async def _store_part(
    intake: Intake,
    headers: dict[str, str],
    data: bytes,
    outcome: StowOutcome,
    study_uid: str | None,
    peer_host: str | None,
) -> None:
    # Header bytes were decoded as latin-1 and parse_options_header re-encodes them so; a
    # part type that is not UTF-8 is just an unsupported type, not a server error.
    part_type = (
        parse_options_header(headers.get("content-type", _DICOM))[0].decode("latin-1").lower()
    )
    if part_type != _DICOM:
        outcome.failed.append((None, None, FAILURE_PROCESSING, f"part type {part_type}"))
        return
    try:
        receipt = await run_in_threadpool(
            intake.receive,
            data,
            source="stow",
            calling_ae_title=None,
            peer_host=peer_host,
            expected_study_instance_uid=study_uid,
        )
    except InvalidInstance as exc:
        cls, uid = _uids_if_readable(data)
        outcome.failed.append((cls, uid, FAILURE_PROCESSING, str(exc)))
        return
    except StorageFailure as exc:
        cls, uid = _uids_if_readable(data)
        outcome.failed.append((cls, uid, FAILURE_OUT_OF_RESOURCES, str(exc)))
        return
    outcome.stored.append((receipt.ref.sop_class_uid, receipt.ref.sop_instance_uid))
    outcome.studies[receipt.ref.study_instance_uid] += 1


def _uids_if_readable(data: bytes) -> tuple[str | None, str | None]:
    """Best effort: the failed part's SOP Class/Instance UID for the Failed SOP Sequence."""
    try:
        ds = pydicom.dcmread(
            BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
        )
        cls = validate_uid(ds.get("SOPClassUID"), "SOP Class UID")
        uid = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        return cls, uid
    except Exception:
        return None, None
