"""Sending results out: destinations (``dimse``, ``dicomweb``, ``folder``, ``hl7``), the durable
export queue and its worker.

:func:`make_destination` turns one entry of the ``destinations`` setting into a
:class:`~fvlm_pacs.export.base.Destination`. Modules are imported only for the kinds in use, so
an optional kind's dependencies (HL7) are needed only where it is configured.
"""

from __future__ import annotations

import importlib
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
        # Written separately; imported by name so this package works without it.
        try:
            module = importlib.import_module("fvlm_pacs.export.hl7")
        except ImportError as exc:
            raise ConfigError(
                f"destinations: {cfg.name!r} is kind hl7, but HL7 export is unavailable ({exc})"
            ) from None
        destination: Destination = module.Hl7Destination(cfg)  # timeouts are in its cfg
        return destination
    raise ConfigError(f"destinations: {getattr(cfg, 'name', '?')!r} has unknown kind {kind!r}")
