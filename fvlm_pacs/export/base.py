"""The seam between stored results and the places they are sent.

Every destination kind (``dimse``, ``dicomweb``, ``folder``, ``hl7``) implements
:class:`Destination`; the export queue calls ``send`` once per (result, destination) attempt and
decides from :class:`~fvlm_pacs.errors.ExportError` whether to back off or dead-letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Outgoing:
    """One result as it leaves: the DICOM objects written for it and its JSON payload.

    ``files`` are Part 10 files (SEG, SR, optional Secondary Capture) already validated.
    ``payload`` is the stored result JSON (findings, triage, model); it never holds patient
    demographics — a destination that needs them (HL7) reads them from the files.
    """

    result_id: int
    study_instance_uid: str
    files: tuple[Path, ...]
    payload: dict[str, Any]


class Destination(Protocol):
    """A place results are sent to. ``send`` returns only when every object was acknowledged."""

    name: str

    def send(self, outgoing: Outgoing) -> None:
        """Deliver all of ``outgoing`` or raise :class:`~fvlm_pacs.errors.ExportError`."""
        ...
