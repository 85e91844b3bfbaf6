"""A durable job queue in the database: claim under a lease, retry with backoff, dead-letter.

States: ``queued → running → succeeded | failed | dead`` (+ ``superseded`` for a queued job whose
study got a newer burst). ``failed`` is a permanent error (retrying cannot help, e.g. no usable
series); ``dead`` means the attempts ran out on transient errors. Both can be re-driven with
:meth:`JobQueue.retry`.

Claiming works on both backends: on PostgreSQL many workers (on many hosts) use
``FOR UPDATE SKIP LOCKED``; on SQLite the ``BEGIN IMMEDIATE`` write lock serialises claimers.
A running job holds a lease its worker renews; a crashed worker's lease runs out and the job is
claimed again. Every completion is fenced by (job id, lease owner), so a worker that lost its
lease cannot overwrite the work of the one that took over. Those three steps (claim, renew,
fence) are :class:`~fvlm_pacs.jobs.claims.LeasedTable`, shared with the export queue.

Work that must follow a stored result (its export rows, :mod:`fvlm_pacs.export.queue`) is added
by the ``on_result`` hook inside :meth:`JobQueue.succeed`'s transaction: both commit or neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.db import Job, Result, audit, utcnow
from fvlm_pacs.jobs.claims import LeasedTable, error_text, is_retryable

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "dead", "superseded")
_RETRIABLE_BY_USER = ("failed", "dead", "superseded")
_LEASES = LeasedTable(Job, waiting="queued", active="running", what="job")

#: Called inside :meth:`JobQueue.succeed`'s transaction with the new (flushed) result, so work
#: that must follow a result (its export rows) is committed with it or not at all.
OnResult = Callable[[Session, Result], None]


def backoff_delay(base_seconds: float, attempt: int, cap_seconds: float | None = None) -> timedelta:
    """Delay before retry number ``attempt`` (1-based): ``base · 2^(attempt-1)``, at most ``cap``.

    Shared by the job and export queues so both back off the same way.
    """
    seconds = base_seconds * 2 ** max(0, attempt - 1)
    if cap_seconds is not None:
        seconds = min(seconds, cap_seconds)
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one attempt."""

    id: int
    study_instance_uid: str
    study_revision: int
    pipeline_version: str
    attempt: int
    owner: str


class JobQueue:
    """Job state transitions; every method is one short transaction."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        lease_seconds: float,
        backoff_seconds: float,
        clock: Callable[[], datetime] = utcnow,
        on_result: OnResult | None = None,
    ) -> None:
        self.sessions = sessions
        self.lease = timedelta(seconds=lease_seconds)
        self.backoff = backoff_seconds
        self.clock = clock
        self.on_result = on_result

    def claim(self, owner: str) -> ClaimedJob | None:
        """Take the next due job (queued and due, or running with an expired lease)."""
        for _ in range(100):  # bounded: each pass either claims or dead-letters one job
            now = self.clock()
            with self.sessions.begin() as session:
                job = _LEASES.next_due(session, now)
                if job is None:
                    return None
                if job.state == "running":
                    log.warning("job %d: lease of %s expired; reclaiming", job.id, job.lease_owner)
                    job.last_error = f"lease of worker {job.lease_owner} expired"
                    if job.attempts >= job.max_attempts:
                        self._finish(session, job, "dead", now)
                        continue
                job.state = "running"
                job.attempts += 1
                job.lease_owner = owner
                job.lease_expires_at = now + self.lease
                job.started_at = now
                job.finished_at = None
                audit(
                    session,
                    "job_claimed",
                    actor=owner,
                    study_instance_uid=job.study_instance_uid,
                    job_id=job.id,
                    detail={"attempt": job.attempts},
                )
                return ClaimedJob(
                    id=job.id,
                    study_instance_uid=job.study_instance_uid,
                    study_revision=job.study_revision,
                    pipeline_version=job.pipeline_version,
                    attempt=job.attempts,
                    owner=owner,
                )
        return None

    def renew(self, job: ClaimedJob) -> bool:
        """Extend the lease; False if it was lost (the job belongs to someone else now)."""
        with self.sessions.begin() as session:
            return _LEASES.renew(session, job.id, job.owner, self.clock() + self.lease)

    def succeed(self, job: ClaimedJob, payload: dict[str, Any]) -> int | None:
        """Mark done and store the result; returns the result id, or None if fenced out."""
        now = self.clock()
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, job.id, job.owner)
            if row is None:
                return None
            previous = session.scalars(
                select(Result.id)
                .where(Result.study_instance_uid == job.study_instance_uid)
                .order_by(Result.id.desc())
                .limit(1)
            ).first()
            result = Result(
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                pipeline_version=job.pipeline_version,
                payload=payload,
                supersedes_result_id=previous,
                created_at=now,
            )
            session.add(result)
            row.detail = payload
            row.last_error = None
            self._finish(session, row, "succeeded", now)
            session.flush()
            if self.on_result is not None:
                self.on_result(session, result)
            audit(
                session,
                "job_succeeded",
                actor=job.owner,
                study_instance_uid=job.study_instance_uid,
                job_id=job.id,
                detail={"result_id": result.id, "supersedes_result_id": previous},
            )
            return int(result.id)

    def fail(self, job: ClaimedJob, error: BaseException) -> str | None:
        """Record a failed attempt; returns the new state (queued/failed/dead) or None if fenced."""
        now = self.clock()
        retryable = is_retryable(error)
        message = error_text(error)
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, job.id, job.owner)
            if row is None:
                return None
            row.last_error = message
            detail = getattr(error, "detail", None)
            if detail:
                row.detail = detail
            if not retryable:
                state = "failed"
                self._finish(session, row, state, now)
            elif row.attempts >= row.max_attempts:
                state = "dead"
                self._finish(session, row, state, now)
            else:
                state = "queued"
                row.state = state
                row.lease_owner = None
                row.lease_expires_at = None
                row.next_attempt_at = now + backoff_delay(self.backoff, row.attempts)
            audit(
                session,
                f"job_{state}" if state != "queued" else "job_retry_scheduled",
                actor=job.owner,
                study_instance_uid=job.study_instance_uid,
                job_id=job.id,
                detail={"error": message, "attempt": row.attempts},
            )
        log.warning("job %d attempt %d failed (%s): %s", job.id, job.attempt, state, message)
        return state

    def release(self, job: ClaimedJob) -> bool:
        """Give a running job back without counting the attempt (clean shutdown)."""
        with self.sessions.begin() as session:
            row = _LEASES.owned(session, job.id, job.owner)
            if row is None:
                return False
            row.state = "queued"
            row.attempts = max(0, row.attempts - 1)
            row.lease_owner = None
            row.lease_expires_at = None
            row.next_attempt_at = self.clock()
            audit(session, "job_released", actor=job.owner, job_id=job.id)
            return True

    def retry(self, job_id: int, actor: str) -> Job:
        """Re-drive a failed, dead or superseded job now, with a fresh attempt budget."""
        with self.sessions.begin() as session:
            row = session.get(Job, job_id)
            if row is None:
                raise KeyError(job_id)
            if row.state not in _RETRIABLE_BY_USER:
                raise ValueError(f"job {job_id} is {row.state}; only {_RETRIABLE_BY_USER} retry")
            row.state = "queued"
            row.attempts = 0
            row.next_attempt_at = self.clock()
            row.lease_owner = None
            row.lease_expires_at = None
            row.finished_at = None
            audit(
                session,
                "job_retried",
                actor=actor,
                study_instance_uid=row.study_instance_uid,
                job_id=job_id,
            )
            return row

    def depth(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self.sessions() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: int(n) for state, n in rows})
        return counts

    @staticmethod
    def _finish(session: Session, job: Job, state: str, now: datetime) -> None:
        job.state = state
        job.finished_at = now
        job.lease_owner = None
        job.lease_expires_at = None
