"""Export worker: one thread per destination claims that destination's due rows and sends them.

A thread per destination is what keeps destinations independent: a PACS that hangs until the
network timeout, or refuses every association, holds up only its own thread, never another
destination's rows. A heartbeat (:class:`~fvlm_pacs.jobs.lease.LeaseKeeper`, as for jobs) renews
the leases of rows being sent (a large SEG over a slow link can outlast the lease); a process
that dies mid-send leaves its rows to be reclaimed when their leases run out.

Delivery is at least once: a send that completes after its row was released or reclaimed is
fenced out and sent again later. Receivers store by SOP Instance UID, so a second copy replaces
the first (and a C-STORE "duplicate SOP instance" status counts as delivered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Destination
from fvlm_pacs.export.queue import ClaimedExport, ExportQueue
from fvlm_pacs.jobs.lease import LeaseKeeper
from fvlm_pacs.jobs.worker import worker_identity
from fvlm_pacs.metrics import Metrics

log = logging.getLogger(__name__)


class ExportWorker:
    """Threads that deliver exports; :meth:`stop` finishes or releases rows being sent."""

    def __init__(
        self,
        queue: ExportQueue,
        destinations: Mapping[str, Destination],
        *,
        lease_seconds: float,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.destinations = dict(destinations)
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.identity = worker_identity()
        self.leases = LeaseKeeper(
            queue.renew, queue.release, lease_seconds=lease_seconds, what="export"
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start one sender thread per destination (none when no destination is configured)."""
        if not self.destinations:
            return
        try:
            waiting = self.queue.unconfigured()
        except Exception:
            log.exception("could not count exports for unconfigured destinations")
            waiting = {}
        for name, n in waiting.items():
            log.warning(
                "%d pending exports wait for destination %r, which is not configured: add it "
                "back, or cancel them (POST /api/exports/{id}/cancel; GET /api/exports?state="
                "pending lists them)",
                n,
                name,
            )
        for name in self.destinations:
            t = threading.Thread(
                target=self._loop, args=(name,), name=f"export-{name}", daemon=True
            )
            t.start()
            self._threads.append(t)
        self.leases.start()
        log.info(
            "export worker %s started for %s", self.identity, ", ".join(sorted(self.destinations))
        )

    def request_stop(self) -> None:
        """Stop claiming new rows (sends in progress go on); :meth:`stop` then waits for them."""
        self._stop.set()

    def stop(self, grace_seconds: float) -> None:
        """Stop claiming; wait up to ``grace_seconds`` for sends in progress, then release them."""
        self._stop.set()
        deadline = time.monotonic() + grace_seconds
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.leases.stop()  # releases rows still being sent (sent again later), then stops

    def deliver_one(self, destination: str) -> str | None:
        """Claim and send one due row of ``destination``; returns its new state, or None if
        nothing was due (or the outcome was fenced out). The sender threads loop over this."""
        claimed = self.queue.claim(f"{self.identity}/{destination}", destination)
        if claimed is None:
            return None
        return self._deliver(claimed)

    def _loop(self, destination: str) -> None:
        while not self._stop.is_set():
            try:
                state = self.deliver_one(destination)
            except Exception:
                log.exception(
                    "export worker for %s: claiming failed; retrying shortly", destination
                )
                state = None
            if state is None:
                self._stop.wait(self.poll_seconds)

    def _deliver(self, claimed: ClaimedExport) -> str | None:
        started = time.monotonic()
        state: str | None
        with self.leases.holding(claimed):
            try:
                missing = [p.name for p in claimed.outgoing.files if not p.is_file()]
                if missing:
                    raise ExportError(
                        f"output files are missing: {', '.join(missing[:5])}", retryable=False
                    )
                log.info(
                    "export %d: sending result %d to %s (attempt %d)",
                    claimed.id,
                    claimed.result_id,
                    claimed.destination,
                    claimed.attempt,
                )
                self.destinations[claimed.destination].send(claimed.outgoing)
            except Exception as exc:
                try:
                    state = self.queue.fail(claimed, exc)
                except Exception:
                    log.exception(
                        "export %d: could not record its failure; the lease will expire",
                        claimed.id,
                    )
                    state = None
            else:
                try:
                    state = "done" if self.queue.succeed(claimed) else None
                except Exception:
                    log.exception(
                        "export %d: delivered, but not recorded; it is sent again", claimed.id
                    )
                    state = None
        if self.metrics:
            outcome = {"pending": "retry"}.get(state or "", state or "fenced")
            self.metrics.export_duration.labels(claimed.destination, outcome).observe(
                time.monotonic() - started
            )
        return state
