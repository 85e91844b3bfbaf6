"""The database side of a lease, the same for jobs and exports.

Both queues hand out rows under a lease. A row waits (a ``queued`` job, a ``pending`` export)
until its ``next_attempt_at``; the worker that claims it makes it active (``running``,
``sending``) and owns it until ``lease_expires_at``, renewing as it works. If the worker dies, the
lease runs out and the row is due again. Three steps are the same on both tables and live here:
picking the next due row without two claimers taking the same one, renewing a lease, and fencing
an outcome by lease owner. What a claim or an outcome means (attempt budgets, dead-letter,
results, audit events) stays with each queue: :mod:`fvlm_pacs.jobs.queue`,
:mod:`fvlm_pacs.export.queue`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from fvlm_pacs.db import Export, Job, skip_locked
from fvlm_pacs.errors import FvlmPacsError

log = logging.getLogger(__name__)

Row = TypeVar("Row", Job, Export)


@dataclass(frozen=True)
class LeasedTable(Generic[Row]):
    """A table whose rows are claimed under a lease: the model, the state a row waits in, the
    state it is in while a worker holds it, and what a row is called in log lines."""

    model: type[Row]
    waiting: str
    active: str
    what: str

    def next_due(self, session: Session, now: datetime, *where: ColumnElement[bool]) -> Row | None:
        """The row to claim next, earliest due first: waiting and due, or active with a lapsed
        lease (its worker died). ``where`` narrows the choice (one destination's exports).

        PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so claimers on many hosts each take a different
        row without waiting; SQLite: the ``BEGIN IMMEDIATE`` write lock serialises claimers.
        """
        m = self.model
        query = (
            select(m)
            .where(
                *where,
                or_(
                    and_(m.state == self.waiting, m.next_attempt_at <= now),
                    and_(m.state == self.active, m.lease_expires_at < now),
                ),
            )
            .order_by(m.next_attempt_at, m.id)
            .limit(1)
        )
        return session.scalars(skip_locked(session, query)).first()

    def renew(self, session: Session, row_id: int, owner: str, expires: datetime) -> bool:
        """Extend ``owner``'s lease to ``expires``; False if it lost the lease (fenced out)."""
        m = self.model
        res = session.execute(
            update(m)
            .where(m.id == row_id, m.state == self.active, m.lease_owner == owner)
            .values(lease_expires_at=expires)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    def owned(self, session: Session, row_id: int, owner: str) -> Row | None:
        """The row, locked on PostgreSQL, if ``owner`` still holds its lease; None if not.

        Every outcome goes through here: a worker whose lease ran out and was taken over must
        not overwrite the work of the one that took over.
        """
        query = select(self.model).where(self.model.id == row_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        row = session.scalars(query).first()
        if row is None or row.state != self.active or row.lease_owner != owner:
            log.warning(
                "%s %d: lease lost by %s; its outcome is discarded", self.what, row_id, owner
            )
            return None
        return row


def is_retryable(error: BaseException) -> bool:
    """Whether another attempt can help: our own errors say; anything unexpected is given the
    benefit of the doubt (its attempts are bounded by the queue's budget)."""
    return error.retryable if isinstance(error, FvlmPacsError) else True


def error_text(error: BaseException) -> str:
    """A failed attempt as stored in ``last_error`` and the audit log: type and message."""
    return f"{type(error).__name__}: {error}"[:4000]
