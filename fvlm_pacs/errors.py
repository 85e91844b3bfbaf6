"""The exception family.

Errors are raised inside the service and turned into statuses only at the edges: DIMSE status
codes in ``ingest/scp.py``, HTTP codes in ``api.py``, job states in ``jobs/``. ``retryable`` tells the
job queue whether a later attempt can succeed.
"""

from __future__ import annotations

from typing import Any


class FvlmPacsError(Exception):
    """Base of every error this package raises on purpose."""

    retryable: bool = False


class ConfigError(FvlmPacsError):
    """Settings are missing or wrong; the message names the key."""


class InvalidInstance(FvlmPacsError):
    """A received object cannot be stored: unparseable, missing or malformed UIDs.

    ``status`` is the DIMSE failure status (0xC000 class, "cannot understand") the SCP returns.
    """

    def __init__(self, message: str, status: int = 0xC000) -> None:
        super().__init__(message)
        self.status = status


class StorageFailure(FvlmPacsError):
    """Disk or database refused a write; the peer should try again later (0xA700)."""

    retryable = True


class PipelineError(FvlmPacsError):
    """A stage failed. Subclasses say whether a retry can help.

    ``detail`` is JSON-able context kept with the job (e.g. why each series was rejected), so a
    failed job explains itself over the API.
    """

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class TransientPipelineError(PipelineError):
    """A stage failed for a reason that may pass (I/O, a busy resource)."""

    retryable = True


class NoUsableSeries(PipelineError):
    """No series in the study passes the selection rules; retrying cannot change that."""

    retryable = False


class GeometryError(PipelineError):
    """The chosen series cannot be assembled into a regular volume."""

    retryable = False


class OutputError(PipelineError):
    """An SR/SEG/summary object could not be written or failed validation; never exported."""

    retryable = False


class ExportError(FvlmPacsError):
    """Sending results to one destination failed.

    ``retryable`` is set per instance: a refused connection, a timeout, a 0xA7xx status or HTTP
    5xx/429 may pass (back off and retry); an association rejection, an unsupported SOP class or
    HTTP 4xx will not (dead-letter at once, no retry storm).
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
