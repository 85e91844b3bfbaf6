"""The durable export queue: one row per (result, destination), each with its own retries.

States: ``pending → sending → done | dead``. A stored result with DICOM outputs gets one
``pending`` row per configured destination, in the transaction that stores the result (see
:meth:`ExportQueue.enqueue_result`), so a result is never stored without its exports or the
other way round. A result whose outputs hold no DICOM object (only a PNG, or none) gets none.

Rows are independent: each destination's rows are claimed by that destination's own worker
thread, so a dead or slow PACS only delays its own rows. A row is claimed under a lease
(``lease_owner``, ``lease_expires_at``) that the worker renews while it sends; a row left in
``sending`` by a crashed process is claimed again once its lease has run out. Every outcome is
fenced by (row id, lease owner), as in :mod:`fvlm_pacs.jobs.queue`, whose backoff and lease
steps (:class:`~fvlm_pacs.jobs.claims.LeasedTable`: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL)
this queue shares.

Retryable errors back off exponentially (``export_backoff_seconds`` doubling per attempt, at most
``export_backoff_max_seconds``) until ``export_max_attempts``; a permanent error is ``dead`` at
once. :meth:`ExportQueue.retry` re-drives a dead row, or a pending one that is waiting out a
backoff, with a fresh attempt budget.

A superseded result's pending exports are still sent: the newer SR names its predecessor, so
the PACS holds the history, and a row for the newer result follows on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.config import Settings
from fvlm_pacs.db import Export, Result, audit, utcnow
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.jobs.claims import LeasedTable, error_text, is_retryable
from fvlm_pacs.jobs.queue import backoff_delay

log = logging.getLogger(__name__)

STATES = ("pending", "sending", "done", "dead")
_LEASES = LeasedTable(Export, waiting="pending", active="sending", what="export")

# Sent first to last: a SEG before the SR that references its segments.
_SEND_ORDER = {"seg": 0, "summary": 1, "sr": 2}


def dicom_outputs(payload: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The entries of ``payload["outputs"]`` that are DICOM objects to send (have a SOP UID)."""
    outputs = (payload or {}).get("outputs") or []
    dicom = [o for o in outputs if isinstance(o, dict) and o.get("sop_instance_uid")]
    return sorted(dicom, key=lambda o: _SEND_ORDER.get(str(o.get("kind")), 1))


@dataclass(frozen=True)
class ClaimedExport:
    """One attempt at one delivery, with what to send."""

    id: int
    result_id: int
    destination: str
    study_instance_uid: str
    attempt: int
    owner: str
    outgoing: Outgoing


class ExportQueue:
    """Export state transitions; every method is one short transaction."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        destinations: Iterable[str],
        outputs_dir: Path,
        max_attempts: int,
        backoff_seconds: float,
        backoff_max_seconds: float,
        lease_seconds: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.destinations = tuple(destinations)
        self.outputs_dir = outputs_dir
        self.max_attempts = max_attempts
        self.backoff = backoff_seconds
        self.backoff_max = backoff_max_seconds
        self.lease = timedelta(seconds=lease_seconds)
        self.clock = clock

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings) -> ExportQueue:
        """The queue for the configured destinations. Output paths in result payloads are
        relative to ``<data_dir>/outputs``; a sending row's lease is ``export_lease_seconds``."""
        return cls(
            sessions,
            destinations=[d.name for d in settings.destinations],
            outputs_dir=settings.outputs_dir,
            max_attempts=settings.export_max_attempts,
            backoff_seconds=settings.export_backoff_seconds,
            backoff_max_seconds=settings.export_backoff_max_seconds,
            lease_seconds=settings.export_lease_seconds,
        )

    def enqueue_result(self, session: Session, result: Result) -> None:
        """Add a pending row per destination for a new result (in the caller's transaction).

        Called by :meth:`fvlm_pacs.jobs.queue.JobQueue.succeed`; the rows are due at the
        result's creation time.
        """
        if not self.destinations or not dicom_outputs(result.payload):
            return
        now = result.created_at
        for name in self.destinations:
            session.add(
                Export(
                    result_id=result.id,
                    destination=name,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        audit(
            session,
            "export_queued",
            study_instance_uid=result.study_instance_uid,
            job_id=result.job_id,
            detail={"result_id": result.id, "destinations": list(self.destinations)},
        )

    def claim(self, owner: str, destination: str) -> ClaimedExport | None:
        """Take ``destination``'s next due row (pending and due, or sending with a lapsed lease)."""
        for _ in range(100):  # bounded: each pass either claims or dead-letters one row
            now = self.clock()
            with self.sessions.begin() as session:
                row = _LEASES.next_due(session, now, Export.destination == destination)
                if row is None:
                    return None
                result = session.get(Result, row.result_id)
                assert result is not None  # foreign key
                if row.state == "sending":
                    log.warning(
                        "export %d: lease of %s expired; reclaiming", row.id, row.lease_owner
                    )
                    row.last_error = f"lease of worker {row.lease_owner} expired while sending"
                    if row.attempts >= self.max_attempts:
                        self._settle(
                            session,
                            row,
                            "dead",
                            None,
                            now,
                            event="export_dead",
                            actor=owner,
                            study_instance_uid=result.study_instance_uid,
                            error=row.last_error,
                        )
                        continue
                row.state = "sending"
                row.attempts += 1
                row.lease_owner = owner
                row.lease_expires_at = now + self.lease
                row.updated_at = now
                return ClaimedExport(
                    id=row.id,
                    result_id=row.result_id,
                    destination=row.destination,
                    study_instance_uid=result.study_instance_uid,
                    attempt=row.attempts,
                    owner=owner,
                    outgoing=Outgoing(
                        result_id=result.id,
                        study_instance_uid=result.study_instance_uid,
                        files=tuple(
                            self.outputs_dir / str(o["path"]) for o in dicom_outputs(result.payload)
                        ),
                        payload=result.payload,
                    ),
                )
        return None

    def renew(self, claimed: ClaimedExport) -> bool:
        """Extend the lease; False if it was lost (the row belongs to someone else now)."""
        with self.sessions.begin() as session:
            return _LEASES.renew(session, claimed.id, claimed.owner, self.clock() + self.lease)

    def succeed(self, claimed: ClaimedExport) -> bool:
        """Mark delivered; False if fenced out (another worker owns the row now)."""
        now = self.clock()
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, claimed.id, claimed.owner)
            if row is None:
                return False
            row.last_error = None
            self._settle(
                session,
                row,
                "done",
                None,
                now,
                event="export_done",
                actor=claimed.owner,
                study_instance_uid=claimed.study_instance_uid,
            )
        return True

    def fail(self, claimed: ClaimedExport, error: BaseException) -> str | None:
        """Record a failed attempt; returns the new state (pending/dead) or None if fenced."""
        now = self.clock()
        retryable = is_retryable(error)
        message = error_text(error)
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, claimed.id, claimed.owner)
            if row is None:
                return None
            row.last_error = message
            if not retryable or row.attempts >= self.max_attempts:
                state, due, when = "dead", None, {}
            else:
                state = "pending"
                due = now + backoff_delay(self.backoff, row.attempts, self.backoff_max)
                when = {"next_attempt_at": due.isoformat()}
            self._settle(
                session,
                row,
                state,
                due,
                now,
                event="export_dead" if state == "dead" else "export_retry_scheduled",
                actor=claimed.owner,
                study_instance_uid=claimed.study_instance_uid,
                error=message,
                **when,
            )
        log.warning(
            "export %d to %s attempt %d failed (%s): %s",
            claimed.id,
            claimed.destination,
            claimed.attempt,
            state,
            message,
        )
        return state

    def release(self, claimed: ClaimedExport) -> bool:
        """Give a row back without counting the attempt (clean shutdown mid-send)."""
        now = self.clock()
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, claimed.id, claimed.owner)
            if row is None:
                return False
            row.attempts = max(0, row.attempts - 1)
            self._settle(
                session,
                row,
                "pending",
                now,
                now,
                event="export_released",
                actor=claimed.owner,
                study_instance_uid=claimed.study_instance_uid,
            )
            return True

    def retry(self, export_id: int, actor: str) -> Export:
        """Re-drive a dead row, or a pending one waiting out a backoff, now and afresh.

        Raises KeyError if there is no such row, ValueError if it is done, being sent, or
        pending without a failed attempt (already due).
        """
        now = self.clock()
        with self.sessions.begin() as session:
            row = session.get(Export, export_id)
            if row is None:
                raise KeyError(export_id)
            if not (row.state == "dead" or (row.state == "pending" and row.attempts > 0)):
                raise ValueError(
                    f"export {export_id} is {row.state}"
                    + (" and not yet attempted" if row.state == "pending" else "")
                    + "; only dead exports or pending ones that failed can be retried"
                )
            row.state = "pending"
            row.attempts = 0
            row.next_attempt_at = now
            self._clear_lease(row, now)
            _audit_operator_action(session, row, "export_retried", actor)
            return row

    def cancel(self, export_id: int, actor: str) -> Export:
        """Stop a pending row from being sent: it becomes ``dead`` with the reason, so the
        result stays on record and :meth:`retry` can still send it later.

        For exports waiting on a destination that was removed from the configuration, or a
        send an operator does not want any more. Raises KeyError if there is no such row,
        ValueError unless it is pending (a row being sent cannot be recalled mid-association).
        """
        now = self.clock()
        with self.sessions.begin() as session:
            row = session.get(Export, export_id)
            if row is None:
                raise KeyError(export_id)
            if row.state != "pending":
                raise ValueError(
                    f"export {export_id} is {row.state}; only pending ones can be cancelled"
                )
            row.state = "dead"
            row.last_error = f"cancelled by {actor}"
            self._clear_lease(row, now)
            _audit_operator_action(session, row, "export_cancelled", actor)
            return row

    def depth(self) -> dict[tuple[str, str], int]:
        """Rows per (destination, state); every configured destination has all four states."""
        with self.sessions() as session:
            rows = session.execute(
                select(Export.destination, Export.state, func.count()).group_by(
                    Export.destination, Export.state
                )
            ).all()
        counts = {(d, s): 0 for d in self.destinations for s in STATES}
        counts.update({(d, s): int(n) for d, s, n in rows})
        return counts

    def unconfigured(self) -> dict[str, int]:
        """Pending rows whose destination is no longer configured (they wait until it is)."""
        with self.sessions() as session:
            rows = session.execute(
                select(Export.destination, func.count())
                .where(Export.state == "pending", Export.destination.not_in(self.destinations))
                .group_by(Export.destination)
            ).all()
        return {d: int(n) for d, n in rows}

    def _settle(
        self,
        session: Session,
        row: Export,
        state: str,
        due: datetime | None,
        now: datetime,
        *,
        event: str,
        actor: str,
        study_instance_uid: str,
        **detail: Any,
    ) -> None:
        """End an attempt: the row is ``state``, due again at ``due`` (None: never), its lease
        given up; audit ``event`` naming the row, result, destination and attempt (+ ``detail``)."""
        row.state = state
        row.next_attempt_at = due
        self._clear_lease(row, now)
        audit(
            session,
            event,
            actor=actor,
            study_instance_uid=study_instance_uid,
            detail={
                "export_id": row.id,
                "result_id": row.result_id,
                "destination": row.destination,
                "attempt": row.attempts,
                **detail,
            },
        )

    @staticmethod
    def _clear_lease(row: Export, now: datetime) -> None:
        row.lease_owner = None
        row.lease_expires_at = None
        row.updated_at = now


def _audit_operator_action(session: Session, row: Export, kind: str, actor: str) -> None:
    """One audit event for an operator's action on an export row (retry, cancel)."""
    result = session.get(Result, row.result_id)
    audit(
        session,
        kind,
        actor=actor,
        study_instance_uid=result.study_instance_uid if result else None,
        detail={"export_id": row.id, "result_id": row.result_id, "destination": row.destination},
    )
