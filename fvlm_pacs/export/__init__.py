"""Sending results out: destinations (``dimse``, ``dicomweb``, ``folder``, ``hl7``), the durable
export queue and its worker.

:func:`make_destination` turns one entry of the ``destinations`` setting into a
:class:`~fvlm_pacs.export.base.Destination`. Modules are imported only for the kinds in use, so
a process loads only the senders it is configured for.
"""

from __future__ import annotations

from typing import Any

from fvlm_pacs.config import Settings
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.export.base import Destination


def make_destination(cfg: Any, settings: Settings) -> Destination:
    """The destination for one configured entry, dispatched on ``cfg.kind``.

    Our calling AE title and the network timeout come from ``settings``. A kind whose module is
    missing is a :class:`~fvlm_pacs.errors.ConfigError` at start, naming the destination.
    """
    kind = getattr(cfg, "kind", None)
    if kind == "dimse":
        from fvlm_pacs.export.dimse import DimseDestination

        return DimseDestination(
            cfg, calling_ae_title=settings.ae_title, timeout=settings.export_timeout_seconds
        )
    if kind == "dicomweb":
        from fvlm_pacs.export.dicomweb import DicomwebDestination

        return DicomwebDestination(cfg, timeout=settings.export_timeout_seconds)
    if kind == "folder":
        from fvlm_pacs.export.folder import FolderDestination

        return FolderDestination(cfg)
    if kind == "hl7":
        from fvlm_pacs.export.hl7 import Hl7Destination

        return Hl7Destination(cfg)  # its timeouts are in its own settings
    raise ConfigError(f"destinations: {getattr(cfg, 'name', '?')!r} has unknown kind {kind!r}")
