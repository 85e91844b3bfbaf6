"""The segmentation seam: a protocol, its error, and the factory that picks a provider by name.

fVLM pools image tokens inside each anatomy's mask, so every study needs an anatomy label map on
the CT volume's voxel grid. Where that map comes from is a site decision (an existing DICOM SEG in
the study, a local TotalSegmentator install, or the small network shipped with the package and
trained on synthetic phantoms); the pipeline only sees :class:`SegmentationProvider`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fvlm_pacs.codes import AnatomyTable
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.errors import ConfigError, PipelineError

PROVIDER_NAMES = ("dicom-seg", "totalsegmentator", "builtin")
"""Names :func:`make_provider` knows (the value of the ``segmentation_provider`` setting)."""


class SegmentationUnavailable(PipelineError):
    """No anatomy label map can be made for this study with this provider.

    Not retryable: a retry sees the same study and the same installation. The message names the
    cause and, where a site can fix it, the setting or package extra to change.
    """

    retryable = False


@runtime_checkable
class SegmentationProvider(Protocol):
    """Makes the anatomy :class:`~fvlm_pacs.domain.LabelMap` of one CT volume.

    ``segment`` returns a label map with the same shape and voxel order as ``volume.array``,
    labels 1..K of the anatomy table (0 background), ``anatomies`` in table order and ``source``
    equal to the provider's ``name``. ``study_paths`` are all spooled files of the study, so a
    provider can use objects that arrived with it (an existing DICOM SEG). An anatomy the provider
    cannot find stays absent (all 0) — downstream it is "not assessable", never guessed. Raises
    :class:`SegmentationUnavailable` when it cannot produce a map at all.
    """

    name: str

    def segment(self, volume: Volume, study_paths: Sequence[Path]) -> LabelMap: ...


def make_provider(name: str, table: AnatomyTable, **options: Any) -> SegmentationProvider:
    """The provider called ``name`` for the anatomies of ``table``.

    ``options`` go to the provider's constructor: ``dicom-seg`` takes ``match_segment_labels``
    (bool); ``totalsegmentator`` takes ``weights_dir`` (the ``totalsegmentator_weights`` setting),
    ``device``, ``fast`` and ``runner``; ``builtin`` takes ``model_dir`` (the
    ``builtin_segmentation_dir`` setting; None = the network shipped in the demo model) and
    ``device``. Providers load their weights lazily; call their ``check()`` to fail early. An
    unknown name raises :class:`~fvlm_pacs.errors.ConfigError`.
    """
    if name == "dicom-seg":
        from fvlm_pacs.segmentation.dicom_seg import DicomSegProvider

        return DicomSegProvider(table, **options)
    if name == "totalsegmentator":
        from fvlm_pacs.segmentation.totalsegmentator import TotalSegmentatorProvider

        return TotalSegmentatorProvider(table, **options)
    if name == "builtin":
        from fvlm_pacs.segmentation.builtin import BuiltinSegmenter

        return BuiltinSegmenter(table, **options)
    raise ConfigError(
        f"segmentation_provider: unknown provider {name!r} (known: {', '.join(PROVIDER_NAMES)})"
    )
