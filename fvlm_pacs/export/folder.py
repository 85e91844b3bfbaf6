"""Folder destination: copy a result's objects to ``<path>/<study>/<series>/<sop>.dcm``.

For dry runs, tests and sites whose PACS imports from a watched folder. Each file is written
like the intake spool writes (it reuses :class:`~fvlm_pacs.ingest.spool.FolderSpool`): a
temporary file in the target folder, fsync, atomic rename, fsync of the folder — a reader never
sees half a file under its real name, and an identical resend changes nothing.

Failures: missing permissions or a read-only file system are permanent (an operator must act,
then re-drive the export); other I/O errors (disk full, a network mount gone) are retryable; a
file whose UIDs are missing or malformed is permanent.
"""

from __future__ import annotations

import errno
import logging

from fvlm_pacs import config
from fvlm_pacs.domain import InstanceRef
from fvlm_pacs.errors import ExportError, InvalidInstance
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.ingest.header import parse_header
from fvlm_pacs.ingest.spool import FolderSpool

log = logging.getLogger(__name__)

_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class FolderDestination:
    """A local folder results are copied into, laid out by UIDs."""

    def __init__(self, cfg: config.FolderDestination) -> None:
        self.name = cfg.name
        self.root = cfg.path

    def send(self, outgoing: Outgoing) -> None:
        """Copy every file durably; raise :class:`ExportError` on the first one that fails."""
        try:
            spool = FolderSpool(self.root)
            for path in outgoing.files:
                data = path.read_bytes()
                try:
                    spool.store(_ref(path.name, data), data)
                except InvalidInstance as exc:  # a UID that cannot name a file
                    raise ExportError(f"{path.name}: {exc}", retryable=False) from exc
        except OSError as exc:
            raise ExportError(
                f"{self.name}: {exc.strerror or type(exc).__name__}",
                retryable=exc.errno not in _PERMANENT_ERRNOS,
            ) from exc
        log.info(
            "result %d: %d objects copied to folder %s",
            outgoing.result_id,
            len(outgoing.files),
            self.name,
        )


def _ref(file_name: str, data: bytes) -> InstanceRef:
    """The UIDs that place a file, read and checked as intake checks a received object: the
    same parser, so a file the folder accepts is one our own SCP would accept too."""
    try:
        return parse_header(data).ref
    except InvalidInstance as exc:
        raise ExportError(f"{file_name}: {exc}", retryable=False) from exc
