"""What the writers hand to the rest of the pipeline: a file on disk plus its identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputObject:
    """One DICOM object (or PNG) written for a result.

    ``kind`` is ``seg`` | ``sr`` | ``summary`` | ``summary-png``; UIDs are None for the PNG.
    ``path`` is relative to the outputs root so the result JSON stays valid if the data
    directory moves.
    """

    kind: str
    path: Path
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
        }
