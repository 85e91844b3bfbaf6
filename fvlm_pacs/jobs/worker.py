"""Worker pool: threads that claim jobs, run the pipeline, and record the outcome.

One heartbeat thread (:class:`~fvlm_pacs.jobs.lease.LeaseKeeper`) renews the leases of all jobs
this pool is running, so a long stage never loses its lease while a crashed process's jobs are
reclaimed after ``job_lease_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fvlm_pacs.jobs.lease import LeaseKeeper
from fvlm_pacs.jobs.queue import ClaimedJob, JobQueue
from fvlm_pacs.metrics import Metrics

log = logging.getLogger(__name__)

RunJob = Callable[[ClaimedJob], dict[str, Any]]


def worker_identity() -> str:
    """host:pid:random — unique across hosts and restarts, readable in the job record."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkerPool:
    """``threads`` workers polling ``queue``; :meth:`stop` finishes or releases running jobs."""

    def __init__(
        self,
        queue: JobQueue,
        run: RunJob,
        *,
        threads: int,
        lease_seconds: float,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.run = run
        self.n_threads = threads
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.identity = worker_identity()
        self.leases = LeaseKeeper(
            queue.renew, queue.release, lease_seconds=lease_seconds, what="job"
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.n_threads):
            t = threading.Thread(target=self._loop, args=(f"{self.identity}/{i}",), daemon=True)
            t.start()
            self._threads.append(t)
        self.leases.start()
        log.info("worker pool %s started with %d threads", self.identity, self.n_threads)

    def stop(self, grace_seconds: float) -> None:
        """Stop claiming; wait up to ``grace_seconds`` for running jobs, then release them."""
        self._stop.set()
        deadline = time.monotonic() + grace_seconds
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.leases.stop()  # releases jobs still running, then stops renewing

    def _loop(self, owner: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim(owner)
            except Exception:
                log.exception("claiming a job failed; retrying shortly")
                self._stop.wait(self.poll_seconds)
                continue
            if job is None:
                self._stop.wait(self.poll_seconds)
                continue
            self._execute(job)

    def _execute(self, job: ClaimedJob) -> None:
        started = time.monotonic()
        outcome = "succeeded"
        with self.leases.holding(job):
            try:
                log.info("job %d: running attempt %d", job.id, job.attempt)
                payload = self.run(job)
                if self.queue.succeed(job, payload) is None:
                    outcome = "fenced"
            except Exception as exc:
                outcome = "error"
                try:
                    self.queue.fail(job, exc)
                except Exception:
                    log.exception(
                        "job %d: could not record its failure; the lease will expire", job.id
                    )
        if self.metrics:
            self.metrics.job_duration.labels(outcome).observe(time.monotonic() - started)
