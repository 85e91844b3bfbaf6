"""Study completion: a study idle for ``stable_seconds`` becomes one job.

DICOM has no "end of study" message, so completion is an inactivity window per study. The sweep
runs periodically (APScheduler) in every process that wants it; it is safe to run concurrently
because the study row is claimed with a conditional UPDATE and the job row has a unique key
(study, pipeline version, study revision), so racing sweeps create exactly one job per burst.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.db import Job, Study, audit, insert_ignore, utcnow
from fvlm_pacs.metrics import Metrics

log = logging.getLogger(__name__)


class CompletionSweep:
    """Finds studies whose current revision is idle and enqueues their job."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        stable_seconds: float,
        pipeline_version: str,
        max_attempts: int,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.stable = timedelta(seconds=stable_seconds)
        self.pipeline_version = pipeline_version
        self.max_attempts = max_attempts
        self.metrics = metrics
        self.clock = clock

    def sweep(self) -> list[int]:
        """Create the jobs that are due; returns their ids."""
        now = self.clock()
        cutoff = now - self.stable
        with self.sessions() as session:
            due = session.execute(
                select(Study.study_instance_uid, Study.revision).where(
                    Study.completed_revision < Study.revision, Study.last_received_at <= cutoff
                )
            ).all()
        created = []
        for study_uid, revision in due:
            job_id = self._complete(study_uid, revision, cutoff, now)
            if job_id is not None:
                created.append(job_id)
        return created

    def _complete(
        self, study_uid: str, revision: int, cutoff: datetime, now: datetime
    ) -> int | None:
        with self.sessions.begin() as session:
            # Claim the burst: fails if an instance arrived since we looked, or another
            # process completed it first.
            claimed = session.execute(
                update(Study)
                .where(
                    Study.study_instance_uid == study_uid,
                    Study.revision == revision,
                    Study.completed_revision < revision,
                    Study.last_received_at <= cutoff,
                )
                .values(completed_revision=revision)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            previous = session.scalars(
                select(Job)
                .where(
                    Job.study_instance_uid == study_uid,
                    Job.pipeline_version == self.pipeline_version,
                )
                .order_by(Job.study_revision.desc())
                .limit(1)
            ).first()
            inserted = insert_ignore(
                session,
                Job,
                {
                    "study_instance_uid": study_uid,
                    "pipeline_version": self.pipeline_version,
                    "study_revision": revision,
                    "state": "queued",
                    "attempts": 0,
                    "max_attempts": self.max_attempts,
                    "next_attempt_at": now,
                    "supersedes_job_id": previous.id if previous else None,
                    "created_at": now,
                },
                ["study_instance_uid", "pipeline_version", "study_revision"],
            )
            if not inserted:
                return None
            job_id = session.scalars(
                select(Job.id).where(
                    Job.study_instance_uid == study_uid,
                    Job.pipeline_version == self.pipeline_version,
                    Job.study_revision == revision,
                )
            ).one()
            # An older burst still waiting in the queue would only produce a result that is
            # replaced at once: skip it.
            session.execute(
                update(Job)
                .where(
                    Job.study_instance_uid == study_uid,
                    Job.state == "queued",
                    Job.id != job_id,
                )
                .values(state="superseded", finished_at=now)
            )
            audit(
                session,
                "job_created",
                actor="completion-sweep",
                study_instance_uid=study_uid,
                job_id=job_id,
                detail={
                    "revision": revision,
                    "supersedes_job_id": previous.id if previous else None,
                },
            )
        log.info("study %s revision %d complete: job %d queued", study_uid, revision, job_id)
        if self.metrics:
            self.metrics.jobs_created.inc()
        return int(job_id)
