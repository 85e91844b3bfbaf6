"""Small value objects passed between stages.

They carry identifiers and geometry, never patient demographics, so any of them can be logged or
stored in the job record without leaking PHI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import highdicom as hd
import numpy as np


@dataclass(frozen=True)
class InstanceRef:
    """The four UIDs that place one SOP instance in the DICOM information model."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Volume:
    """An HU volume assembled from one CT series.

    ``voxels`` is a highdicom :class:`~highdicom.Volume` whose array is float32 Hounsfield units
    indexed (slice, row, column) and whose affine maps those indices to patient coordinates (LPS,
    mm). ``source_instances`` lists the SOP Instance UIDs in slice order, so every later output
    (SEG frames, SR evidence) can reference exactly the images it was computed from.
    """

    voxels: hd.Volume
    study_instance_uid: str
    series_instance_uid: str
    source_instances: tuple[str, ...]
    sop_class_uid: str

    @property
    def array(self) -> np.ndarray:
        return self.voxels.array

    @property
    def affine(self) -> np.ndarray:
        return self.voxels.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        s = self.voxels.spacing
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def frame_of_reference_uid(self) -> str | None:
        return self.voxels.frame_of_reference_uid

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for the job record and the API (no pixel data)."""
        arr = self.array
        return {
            "series_instance_uid": self.series_instance_uid,
            "shape": [int(n) for n in arr.shape],
            "spacing_mm": [round(v, 4) for v in self.spacing],
            "affine": [[round(float(v), 4) for v in row] for row in self.affine],
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "hu_range": [float(arr.min()), float(arr.max())] if arr.size else None,
            "instances": len(self.source_instances),
        }


@dataclass(frozen=True)
class SeriesChoice:
    """Which series assembly chose and why; every candidate series gets its verdict."""

    chosen_series_uid: str | None
    reasons: dict[str, list[str]] = field(default_factory=dict)
    ranking: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen_series_uid": self.chosen_series_uid,
            "candidates": self.reasons,
            "ranking": self.ranking,
        }


@dataclass(frozen=True)
class LabelMap:
    """Anatomy labels on a volume's voxel grid: same shape and voxel order as ``Volume.array``.

    0 is background, k the k-th name of ``anatomies`` (the model's index order). ``source`` says
    which segmentation provider made it (e.g. ``"dicom-seg"``) and ``provenance`` exactly what
    it used (the SEG's UIDs, the network's sha256), for the job record: findings are only as
    good as the masks they were pooled under, so a result must name its masks. No patient
    demographics; UIDs are identifiers, kept like the study's own UIDs in the same record.
    """

    array: np.ndarray
    anatomies: tuple[str, ...]
    source: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """Which weights produced a result; stamped into every finding and output object."""

    name: str
    version: str
    sha256: str


FindingStatus = Literal["present", "absent", "not_assessable"]


@dataclass(frozen=True)
class Finding:
    """One scored (anatomy, finding) pair. ``score`` is None when not assessable, never 0."""

    anatomy: str
    finding: str
    code_value: str
    code_scheme: str
    code_meaning: str
    score: float | None
    threshold: float
    status: FindingStatus
    model: ModelInfo

    def as_dict(self) -> dict[str, Any]:
        return {
            "anatomy": self.anatomy,
            "finding": self.finding,
            "code": [self.code_value, self.code_scheme, self.code_meaning],
            "score": self.score,
            "threshold": self.threshold,
            "status": self.status,
            "model": {"name": self.model.name, "version": self.model.version},
        }
