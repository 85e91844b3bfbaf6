"""C-STORE SCU: send one result's objects to a DICOM peer over one association.

The association proposes exactly what the files need: per SOP class, one presentation context
with the uncompressed syntaxes (the file's own, Explicit VR Little Endian, Implicit VR Little
Endian — pynetdicom converts between them), and one context per compressed syntax a file is
encoded in (that syntax only: we never decompress to send). Every C-STORE status is checked;
the result counts as delivered only when every object got Success or a Warning.

How failures are classified (:class:`~fvlm_pacs.errors.ExportError` ``retryable``):

==========================================================  =========  =======================
what happened                                               retryable  why
==========================================================  =========  =======================
connection refused / timed out, A-ABORT, A-P-ABORT,         yes        peer down or busy
no response to a C-STORE (DIMSE timeout)
A-ASSOCIATE-RJ *rejected-transient* (e.g. too many          yes        PS3.8 says try later
associations)
A-ASSOCIATE-RJ *rejected-permanent* (calling/called AE      no         configuration; a retry
title not recognised, …), even when the peer then closes               storm cannot fix it
the connection at once
association accepted but no presentation context for a      no         the peer does not store
SOP class / transfer syntax we need                                    that kind of object
status 0xA7xx (out of resources), 0x0213 (resource          yes        disk full, busy
limitation)
status 0xA9xx (data set does not match SOP class),          no         the object or its class
0xCxxx (cannot understand), 0x0122 (SOP class not                      is refused
supported), 0x0124 (not authorised), 0x0110 (processing
failure), any other failure
status 0xBxxx, 0x0001, 0x0107, 0x0116 (warnings)            —          delivered; logged
status 0x0111 (duplicate SOP instance)                      —          delivered: the peer
                                                                       already holds the UID
                                                                       (a resend after a crash)
==========================================================  =========  =======================

When objects of one result fail differently, any permanent failure makes the whole attempt
permanent (retrying would fail on that object again).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from fvlm_pacs import config
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing

log = logging.getLogger(__name__)

StatusClass = Literal["success", "warning", "retryable", "permanent"]

_WARNINGS = {0x0001, 0x0107, 0x0116}
_ALREADY_STORED = 0x0111  # Duplicate SOP Instance: the peer has it (we resent after a crash)
_RESOURCE_LIMITATION = 0x0213
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


def classify_status(status: int) -> StatusClass:
    """Class of a C-STORE (or STOW-RS Failure Reason) status; see the module table."""
    if status == 0x0000:
        return "success"
    if status in _WARNINGS or status == _ALREADY_STORED or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xA700 <= status <= 0xA7FF or status == _RESOURCE_LIMITATION:
        return "retryable"
    return "permanent"


def describe_status(status: int) -> str:
    """A short English name for a status, for error messages and logs."""
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    return {
        0x0000: "success",
        0x0001: "warning",
        0x0107: "attribute list error",
        0x0110: "processing failure",
        0x0111: "duplicate SOP instance",
        0x0116: "attribute value out of range",
        0x0117: "invalid SOP instance",
        0x0122: "SOP class not supported",
        0x0124: "not authorised",
        0x0210: "duplicate invocation",
        0x0211: "unrecognised operation",
        0x0212: "mistyped argument",
        0x0213: "resource limitation",
    }.get(status, "failure")


@dataclass(frozen=True)
class _Failure:
    sop_instance_uid: str
    status: int
    retryable: bool
    comment: str


def read_files(outgoing: Outgoing) -> list[Dataset]:
    """Read every file of ``outgoing``; an unreadable file is a permanent export error."""
    datasets: list[Dataset] = []
    for path in outgoing.files:
        try:
            ds = dcmread(path)
        except OSError as exc:  # I/O trouble may pass; a missing file is caught before send
            raise ExportError(f"cannot read {path.name}: {exc.strerror}", retryable=True) from exc
        except Exception as exc:  # InvalidDicomError, truncated data, bad values
            raise ExportError(
                f"{path.name} is not a readable DICOM file: {exc}", retryable=False
            ) from exc
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise ExportError(f"{path.name} has no SOP Class/Instance UID", retryable=False)
        datasets.append(ds)
    return datasets


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsuid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return UID(tsuid) if tsuid else ExplicitVRLittleEndian


def requested_contexts(datasets: Iterable[Dataset]) -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) to propose: exactly what these data sets need."""
    native: dict[str, list[str]] = {}
    compressed: set[tuple[str, str]] = set()
    for ds in datasets:
        sop_class, tsuid = str(ds.SOPClassUID), _transfer_syntax(ds)
        if tsuid.is_compressed:
            compressed.add((sop_class, str(tsuid)))
            continue
        syntaxes = native.setdefault(sop_class, [])
        for ts in (str(tsuid), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
    contexts = [(sop, list(ts)) for sop, ts in sorted(native.items())]
    contexts += [(sop, [ts]) for sop, ts in sorted(compressed)]
    return contexts


def _has_context(assoc: Association, sop_class: str, tsuid: UID) -> bool:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class or not cx.as_scu:
            continue
        agreed = UID(cx.transfer_syntax[0])
        if agreed == tsuid or (not tsuid.is_compressed and not agreed.is_compressed):
            return True
    return False


_REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}
_REJECT_REASONS = {  # PS3.8 Table 9-21, by source
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognised",
        7: "called AE title not recognised",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}


def describe_rejection(result: Any, source: Any, reason: Any) -> str:
    """A-ASSOCIATE-RJ fields in words, e.g. "rejected-permanent by service-user: calling AE
    title not recognised" (numbers for values the standard does not name)."""
    kind = {1: "rejected-permanent", 2: "rejected-transient"}.get(result, f"rejected ({result})")
    who = _REJECT_SOURCES.get(source, f"source {source}")
    why = _REJECT_REASONS.get(source, {}).get(reason, f"reason {reason}")
    return f"{kind} by {who}: {why}"


def association_error(
    assoc: Association, where: str, rejection: A_ASSOCIATE_RJ | None = None
) -> ExportError:
    """Why an association was not established, classified (see the module table).

    ``rejection`` is the A-ASSOCIATE-RJ PDU as it arrived. A peer that closes the connection
    right after rejecting (Orthanc, DCMTK) sometimes makes pynetdicom report an abort instead of
    the rejection; the PDU itself still says what the peer meant, so a permanent rejection is
    dead-lettered on the first attempt rather than retried.
    """
    fields: tuple[Any, Any, Any] | None = None
    if rejection is not None:
        fields = (rejection.result, rejection.source, rejection.reason_diagnostic)
    elif assoc.is_rejected and assoc.acceptor.primitive is not None:
        p = assoc.acceptor.primitive
        fields = (p.result, p.result_source, p.diagnostic)
    if fields is not None and fields[0] in (0x01, 0x02):
        return ExportError(
            f"{where}: association {describe_rejection(*fields)}", retryable=fields[0] == 0x02
        )
    rsp = assoc.acceptor.primitive
    if rsp is not None and rsp.result == 0x00:
        # accepted, then aborted by pynetdicom because not one presentation context was accepted
        return ExportError(
            f"{where}: the peer accepted none of the proposed presentation contexts",
            retryable=False,
        )
    return ExportError(
        f"{where}: no association (connection refused, timed out or aborted)", retryable=True
    )


class DimseDestination:
    """A DICOM peer we C-STORE to, as ``settings.ae_title`` (the calling AE title)."""

    def __init__(
        self, cfg: config.DimseDestination, *, calling_ae_title: str, timeout: float
    ) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.calling_ae_title = calling_ae_title
        self.timeout = timeout

    @property
    def _where(self) -> str:
        return f"{self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port}"

    def send(self, outgoing: Outgoing) -> None:
        """C-STORE every file over one association; raise :class:`ExportError` unless all stored."""
        datasets = read_files(outgoing)
        if not datasets:
            return
        contexts = requested_contexts(datasets)
        if len(contexts) > _MAX_CONTEXTS:
            raise ExportError(
                f"{len(contexts)} presentation contexts needed, at most 128 fit", retryable=False
            )
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = self.timeout
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        rejections: list[A_ASSOCIATE_RJ] = []

        def on_pdu(event: Event) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejections.append(event.pdu)

        assoc = ae.associate(
            self.cfg.host,
            self.cfg.port,
            ae_title=self.cfg.ae_title,
            evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
        )
        if not assoc.is_established:
            raise association_error(assoc, self._where, rejections[0] if rejections else None)
        try:
            self._check_contexts(assoc, datasets)
            failures = self._store_all(assoc, datasets)
        finally:
            if assoc.is_established:
                assoc.release()
        if failures:
            raise self._failure_error(failures, len(datasets))
        log.info(
            "result %d: %d objects stored at %s", outgoing.result_id, len(datasets), self._where
        )

    def _check_contexts(self, assoc: Association, datasets: Sequence[Dataset]) -> None:
        missing = sorted(
            {
                f"{ds.SOPClassUID} in {_transfer_syntax(ds)}"
                for ds in datasets
                if not _has_context(assoc, str(ds.SOPClassUID), _transfer_syntax(ds))
            }
        )
        if missing:
            raise ExportError(
                f"{self._where} accepted no presentation context for {'; '.join(missing)}",
                retryable=False,
            )

    def _store_all(self, assoc: Association, datasets: Sequence[Dataset]) -> list[_Failure]:
        failures: list[_Failure] = []
        for msg_id, ds in enumerate(datasets, start=1):
            sop_uid = str(ds.SOPInstanceUID)
            rsp = assoc.send_c_store(ds, msg_id=msg_id)
            if "Status" not in rsp:
                raise ExportError(
                    f"{self._where}: no C-STORE response for {sop_uid} (timeout or abort)",
                    retryable=True,
                )
            status = int(rsp.Status)
            kind = classify_status(status)
            if kind == "warning":
                log.warning(
                    "%s stored %s with warning 0x%04X (%s)",
                    self._where,
                    sop_uid,
                    status,
                    describe_status(status),
                )
            elif kind != "success":
                comment = str(rsp.get("ErrorComment", "") or "")[:200]
                failures.append(_Failure(sop_uid, status, kind == "retryable", comment))
        return failures

    def _failure_error(self, failures: list[_Failure], total: int) -> ExportError:
        shown = "; ".join(
            f"{f.sop_instance_uid}: 0x{f.status:04X} {describe_status(f.status)}"
            + (f" ({f.comment})" if f.comment else "")
            for f in failures[:5]
        )
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        return ExportError(
            f"{self._where} refused {len(failures)} of {total} objects: {shown}{more}",
            retryable=all(f.retryable for f in failures),
        )
