"""Leases held while working: one heartbeat thread renews them, shutdown gives them back.

The job queue and the export queue both hand out claims under a lease that runs out after
``lease_seconds``, so a crashed process's work is claimed again. A live worker must therefore
renew the leases of everything it is still working on — a long stage or a slow PACS can outlast
a lease — and, on a clean shutdown, give back what it could not finish instead of leaving it
blocked until the lease expires. :class:`LeaseKeeper` is that bookkeeping, shared by
:class:`~fvlm_pacs.jobs.worker.WorkerPool` and :class:`~fvlm_pacs.export.worker.ExportWorker`;
what a claim is, and what renewing or releasing it means, stays with each queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Claim(Protocol):
    """A claimed row: its id names it in logs (never anything about the patient)."""

    @property
    def id(self) -> int: ...


C = TypeVar("C", bound=Claim)


class LeaseKeeper(Generic[C]):
    """The claims a worker holds, renewed every ``lease_seconds / 3`` (at least every 0.5 s).

    ``renew`` and ``release`` are the queue's own methods: each returns False when the claim
    is no longer ours (fenced out), and either may raise on a database error — a failed renewal
    is retried at the next beat, a failed release leaves the row to its expiring lease.
    ``what`` ("job", "export") labels the log lines.
    """

    def __init__(
        self,
        renew: Callable[[C], bool],
        release: Callable[[C], bool],
        *,
        lease_seconds: float,
        what: str,
    ) -> None:
        self.renew = renew
        self.release = release
        self.what = what
        self.interval = max(0.5, lease_seconds / 3)
        self._held: dict[int, C] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat thread."""
        self._thread = threading.Thread(
            target=self._beat, name=f"{self.what}-heartbeat", daemon=True
        )
        self._thread.start()

    @contextmanager
    def holding(self, claim: C) -> Iterator[C]:
        """Keep ``claim``'s lease renewed while the block runs (recording its outcome included)."""
        with self._lock:
            self._held[claim.id] = claim
        try:
            yield claim
        finally:
            with self._lock:
                self._held.pop(claim.id, None)

    def held(self) -> list[C]:
        """The claims held now."""
        with self._lock:
            return list(self._held.values())

    def stop(self) -> None:
        """Release every claim still held, then stop renewing.

        In this order because the workers' grace period comes before: until a claim is given
        back its lease must stay fresh, or another worker could take it while it still runs.
        """
        for claim in self.held():
            try:
                if self.release(claim):
                    log.warning(
                        "%s %d released at shutdown; it is claimed again later",
                        self.what,
                        claim.id,
                    )
            except Exception:
                log.exception("%s %d: release failed; its lease will expire", self.what, claim.id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for claim in self.held():
                try:
                    if not self.renew(claim):
                        log.warning("%s %d: lease lost", self.what, claim.id)
                except Exception:
                    log.exception("%s %d: lease renewal failed", self.what, claim.id)
