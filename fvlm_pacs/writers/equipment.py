"""Who made an output object: the General Equipment values and series labels every writer stamps.

One place for them because they are also *read*: the dicom-seg segmentation provider recognises
our own SEGs by :data:`MANUFACTURER` when a PACS sends them back into the spool, and the validator
checks the AI-generated series descriptions. Nothing here touches patient data.
"""

from __future__ import annotations

import uuid

from fvlm_pacs import __version__
from fvlm_pacs.domain import ModelInfo

MANUFACTURER = "fvlm_pacs"
"""Manufacturer (0008,0070) of every object we write. Compared for equality (not as a prefix), so
test fixtures and phantoms labelled e.g. "fvlm_pacs synthetic" still count as foreign SEGs."""

AI_MARK = "AI-generated"
"""Every Series Description of ours starts with this; viewers show the series description in the
study browser, so a reader sees what the object is before opening it."""

SEG_SERIES_DESCRIPTION = f"{AI_MARK} anatomy SEG - not for diagnosis alone"
SR_SERIES_DESCRIPTION = f"{AI_MARK} findings SR - not for diagnosis alone"
SC_SERIES_DESCRIPTION = f"{AI_MARK} findings summary - not for diagnosis alone"

SEG_SERIES_NUMBER = 9701
SR_SERIES_NUMBER = 9702
SC_SERIES_NUMBER = 9703
"""High series numbers sort our series after the acquired ones in a viewer's series list."""

DEVICE_SERIAL_NUMBER = "0"
"""Type 1 in the Enhanced General Equipment module of SEG; a software device has no serial."""


def manufacturer_model_name(model: ModelInfo) -> str:
    """Manufacturer's Model Name (LO, 64 chars): the product and the model that ran."""
    return f"fvlm_pacs {model.name}"[:64]


def software_versions(model: ModelInfo) -> tuple[str, str]:
    """Software Versions (LO, multi-valued): our package version, then the model's weights."""
    return (f"fvlm_pacs {__version__}"[:64], f"{model.name} {model.version}"[:64])


_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "fvlm-pacs.invalid")
"""Namespace of our name-based UUIDs (the name is ours alone; .invalid never resolves)."""


def stable_uid(*parts: str) -> str:
    """A UID derived from ``parts`` alone: ``2.25.`` + a name-based (SHA-1, version 5) UUID as an
    integer (PS3.5 B.2). Same parts, same UID — no stored state, survives restarts.

    (pydicom's ``generate_uid(prefix=None, …)`` ignores its entropy sources and is random.)
    """
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


def device_observer_uid(model: ModelInfo, installation: str = "") -> str:
    """Device Observer UID of the SR observer context: the same for every report of one model
    (name, version, weights) on one installation, so reports of one device can be grouped.
    ``installation`` distinguishes sites that run the same weights (the AE title).
    """
    return stable_uid("device", installation, model.name, model.version, model.sha256)
