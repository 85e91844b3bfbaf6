"""DICOM Storage SCP (C-STORE, C-ECHO) on pynetdicom.

The C-STORE handler is deliberately thin: hand the encoded bytes to :class:`Intake`, which
spools and records them, and turn the outcome into a DIMSE status. Anything heavy happens behind
the job queue. Every exception is caught here, so nothing a peer sends can stop the server.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.config import Settings
from fvlm_pacs.db import audit
from fvlm_pacs.errors import InvalidInstance, StorageFailure
from fvlm_pacs.ingest.intake import Intake
from fvlm_pacs.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised (PS3.8 9.3.4)
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters
    return ds


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS context from settings (PS3.15 B.1 secure transport), or None."""
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.require_client_cert and tls.ca is None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageSCP:
    """Accepts associations, stores instances through :class:`Intake`, answers C-ECHO."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        sessions: sessionmaker[Session],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.sessions = sessions
        self.metrics = metrics
        self._server: ThreadedAssociationServer | None = None
        self._received: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            block=False,
            evt_handlers=handlers,
            ssl_context=tls_context(self.settings),
        )
        log.info("DICOM SCP %s listening on %s:%d", self.settings.ae_title, *self.address)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("SCP not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; give open associations ``grace_seconds`` to finish, then abort them.

        An instance whose C-STORE response was not sent is not acknowledged, so aborting loses
        nothing the peer believes stored; it will resend.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        for assoc in server.active_associations:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("aborting an association still open at shutdown")
                assoc.abort()

    # -- event handlers ------------------------------------------------------------------------

    def is_allowed(self, calling_ae_title: str, host: str) -> bool:
        callers = self.settings.allowed_callers
        if not callers:
            return True
        return any(
            c.ae_title == calling_ae_title and (c.host is None or c.host == host) for c in callers
        )

    def _on_requested(self, event: Any) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        host = event.assoc.requestor.address
        if not self.is_allowed(calling, host):
            log.warning("rejected association from unknown caller %r at %s", calling, host)
            if self.metrics:
                self.metrics.associations.labels("rejected").inc()
            event.assoc.acse.send_reject(*_REJECT_CALLING_AE)

    def _on_established(self, event: Any) -> None:
        if self.metrics:
            self.metrics.associations.labels("accepted").inc()
            self.metrics.associations_active.inc()
        with self._lock:
            self._received[id(event.assoc)] = Counter()

    def _on_closed(self, event: Any) -> None:
        if self.metrics:
            self.metrics.associations_active.dec()
        with self._lock:
            received = self._received.pop(id(event.assoc), Counter())
        if not received:
            return
        try:
            with self.sessions.begin() as session:
                for study_uid, count in received.items():
                    audit(
                        session,
                        "instances_received",
                        actor=f"dimse:{event.assoc.requestor.ae_title}",
                        study_instance_uid=study_uid,
                        detail={"instances": count, "peer": event.assoc.requestor.address},
                    )
        except Exception:
            log.exception("could not write the association's audit events")

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int | Dataset:
        requestor = event.assoc.requestor
        try:
            data = event.encoded_dataset(include_meta=True)
            receipt = self.intake.receive(
                data,
                source="dimse",
                calling_ae_title=requestor.ae_title.strip(),
                peer_host=requestor.address,
                expected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID or "") or None,
            )
        except InvalidInstance as exc:
            return _status(exc.status, str(exc))
        except StorageFailure as exc:
            return _status(STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # never let a peer's data take the handler down
            log.exception("unexpected error storing an instance")
            return _status(STATUS_OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        with self._lock:
            counter = self._received.get(id(event.assoc))
            if counter is not None:
                counter[receipt.ref.study_instance_uid] += 1
        return STATUS_SUCCESS
