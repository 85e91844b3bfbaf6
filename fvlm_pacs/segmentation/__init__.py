"""Anatomy label maps for fVLM: a :class:`SegmentationProvider` protocol and its providers.

* ``dicom-seg`` (:class:`~fvlm_pacs.segmentation.dicom_seg.DicomSegProvider`): a DICOM SEG that
  arrived with the study and codes the anatomies;
* ``totalsegmentator``
  (:class:`~fvlm_pacs.segmentation.totalsegmentator.TotalSegmentatorProvider`): TotalSegmentator v2
  ``total`` with locally installed weights (extra ``totalseg``), never downloading;
* ``builtin`` (:class:`~fvlm_pacs.segmentation.builtin.BuiltinSegmenter`): a small MONAI U-Net
  shipped in the demo model folder, trained on synthetic phantoms only
  (:mod:`~fvlm_pacs.segmentation.builtin_train`); for demonstrations and as a last resort, its
  Dice is measured on phantoms, not on patients.
"""

from fvlm_pacs.segmentation.base import (
    PROVIDER_NAMES,
    SegmentationProvider,
    SegmentationUnavailable,
    make_provider,
)

__all__ = [
    "PROVIDER_NAMES",
    "SegmentationProvider",
    "SegmentationUnavailable",
    "make_provider",
]
