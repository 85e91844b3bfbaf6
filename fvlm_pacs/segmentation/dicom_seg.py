"""Provider ``dicom-seg``: use a DICOM Segmentation that arrived with the study.

Many sites already run a whole-body segmenter (or a PACS-side AI) that stores a SEG in the study;
using it costs nothing and keeps fVLM consistent with what the radiologist sees.

Which SEG, and which segments:

* Candidates are the study's files with SOP Class Segmentation Storage whose Frame of Reference
  UID is the CT volume's (a SEG in another frame of reference cannot be placed on the CT). If the
  CT has no Frame of Reference UID, a SEG must instead reference one of the volume's instances.
* A segment belongs to an anatomy when its Segmented Property Type (Code Value + Coding Scheme
  Designator, SRT read as SCT; Code Meaning is free text and ignored) equals the anatomy's code
  in ``mappings/anatomies.yaml``. A SEG that codes the anatomy only in parts gives it when one
  of the anatomy's ``part_sets`` is complete (left + right lung; the five lobes, the side read
  from the Segmented Property Type Modifier): one lobe alone is not the lung, so the anatomy
  then stays absent (not assessable) and the reason is logged and recorded. ``additions`` (the
  left atrial appendage) are united into an anatomy once found, never standing for it.
  Fallback (``match_segment_labels``, on by default): a segment whose code matches no anatomy but
  whose Segment Label, normalised (case, spaces, hyphens), equals an anatomy name ("Lung",
  "heart") counts for that anatomy — segmenters that use private or finer codes still label
  segments readably. A code match always wins over a label match.
* SEGs whose Manufacturer is ours (:data:`fvlm_pacs.writers.equipment.MANUFACTURER`) are
  ignored: they are our own outputs, sent back by the PACS.
* Of several usable SEGs, the newest wins: Content Date/Time, then Instance Number, then Series
  Number. If it cannot be decoded, the next newest is tried.

Placement: highdicom builds the SEG's volume (``Segmentation.get_volume``) and
:func:`~fvlm_pacs.segmentation.grid.place_on_grid` puts it on the CT grid (exact when only axis
order, flips or cropping differ; nearest neighbour otherwise). When the SEG's frames do not form a
regular volume (e.g. a single frame), frames are fetched per referenced CT instance instead.
Overlaps between anatomies follow :func:`~fvlm_pacs.segmentation.grid.merge_anatomy_masks`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from fvlm_pacs.codes import AnatomyTable, CodedConcept
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.segmentation.base import SegmentationUnavailable
from fvlm_pacs.segmentation.grid import merge_anatomy_masks, place_on_grid
from fvlm_pacs.writers.equipment import MANUFACTURER as OUR_MANUFACTURER

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = SegmentationStorage
"""SOP Class UID of Segmentation Storage."""

_NOT_NAME = re.compile(r"[^a-z0-9]+")


def _normalise_label(label: str) -> str:
    return _NOT_NAME.sub("_", label.strip().lower()).strip("_")


_SCHEME_ALIASES = {"SRT": "SCT"}
"""Legacy designator of SNOMED CT (older DICOM SEGs write SRT)."""

_SIDES = {("7771000", "SCT"): "left", ("24028007", "SCT"): "right"}
"""Laterality modifiers (SNOMED CT Left / Right, DICOM PS3.16 CID 244)."""


def _laterality(code_item: Dataset) -> str | None:
    for mod in code_item.get("SegmentedPropertyTypeModifierCodeSequence", []):
        scheme = str(mod.get("CodingSchemeDesignator", ""))
        side = _SIDES.get((str(mod.get("CodeValue", "")), _SCHEME_ALIASES.get(scheme, scheme)))
        if side is not None:
            return side
    return None


@dataclass(frozen=True)
class SegmentMatch:
    """How one SEG's segments map to anatomies.

    ``segments``: anatomy → segment numbers united into it; ``how``: anatomy → ``code``,
    ``part set N`` or ``segment label``; ``incomplete``: anatomy → why parts that were present
    were not used (no complete set: the anatomy stays absent, i.e. not assessable).
    """

    segments: dict[str, tuple[int, ...]]
    how: dict[str, str]
    incomplete: dict[str, str]


@dataclass(frozen=True)
class _Candidate:
    path: Path
    match: SegmentMatch
    order_key: tuple[str, str, int, int, str]


class DicomSegProvider:
    """Anatomy label map from the newest usable DICOM SEG among the study's files."""

    name = "dicom-seg"

    def __init__(self, table: AnatomyTable, *, match_segment_labels: bool = True) -> None:
        self.table = table
        self.match_segment_labels = match_segment_labels
        self._by_label = {a.name: a.name for a in table.anatomies}

    # -- choosing ---------------------------------------------------------------------------

    def match(self, header: Dataset) -> SegmentMatch:
        """Which of the SEG's segments give which anatomy, and how (see module docstring)."""
        coded: list[tuple[int, tuple[str, str], str | None, str]] = []
        for item in header.get("SegmentSequence", []):
            number = int(item.get("SegmentNumber", 0))
            codes = item.get("SegmentedPropertyTypeCodeSequence", [])
            key, side = ("", ""), None
            if codes:
                value = str(codes[0].get("CodeValue") or codes[0].get("LongCodeValue") or "")
                scheme = str(codes[0].get("CodingSchemeDesignator", ""))
                key = (value, _SCHEME_ALIASES.get(scheme, scheme))
                side = _laterality(codes[0])
            coded.append((number, key, side, str(item.get("SegmentLabel", ""))))

        def numbers(code: CodedConcept, laterality: str | None = None) -> list[int]:
            return [
                n
                for n, key, side, _ in coded
                if key == (code.value, code.scheme) and (laterality is None or side == laterality)
            ]

        segments: dict[str, tuple[int, ...]] = {}
        how: dict[str, str] = {}
        incomplete: dict[str, str] = {}
        for anatomy in self.table.anatomies:
            found = numbers(anatomy.code)
            via = "code" if found else ""
            for i, part_set in enumerate(anatomy.part_sets):
                members = [numbers(p.code, p.laterality) for p in part_set]
                if all(members):
                    found += [n for m in members for n in m]
                    via = via or f"part set {i + 1}"
            if found:
                found += [n for p in anatomy.additions for n in numbers(p.code, p.laterality)]
                segments[anatomy.name] = tuple(sorted(set(found)))
                how[anatomy.name] = via
                continue
            parts = [
                str(p)
                for p in (*(q for ps in anatomy.part_sets for q in ps), *anatomy.additions)
                if numbers(p.code, p.laterality)
            ]
            if parts:
                incomplete[anatomy.name] = (
                    f"only part(s) {', '.join(parts)}: no complete set of parts, not used"
                )
        if self.match_segment_labels:
            # only segments whose code means nothing to the table: a lobe labelled "Lung" must
            # not become the lung through the back door
            known = {(c.value, c.scheme) for a in self.table.anatomies for c in a.matching_codes}
            by_label: dict[str, list[int]] = {}
            for number, key, _, label in coded:
                anatomy_name = self._by_label.get(_normalise_label(label))
                if anatomy_name is not None and key not in known:
                    by_label.setdefault(anatomy_name, []).append(number)
            for anatomy_name, label_numbers in by_label.items():
                if anatomy_name in segments:
                    logger.info(
                        "anatomy %s: coded segments found, label-only segments ignored",
                        anatomy_name,
                    )
                    continue
                segments[anatomy_name] = tuple(sorted(label_numbers))
                how[anatomy_name] = "segment label"
                incomplete.pop(anatomy_name, None)
        return SegmentMatch(segments=segments, how=how, incomplete=incomplete)

    def _candidates(
        self, volume: Volume, study_paths: Sequence[Path]
    ) -> tuple[list[_Candidate], list[str]]:
        """Usable SEGs, newest first, and why the others were not used."""
        rejected: list[str] = []
        found: list[_Candidate] = []
        for path in study_paths:
            try:
                head = pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Manufacturer"]
                )
            except (InvalidDicomError, OSError, ValueError) as exc:
                logger.debug("skipping unreadable file %s: %s", path.name, exc)
                continue
            if str(head.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
                continue
            if str(head.get("Manufacturer", "") or "") == OUR_MANUFACTURER:
                # our own output sent back by the PACS: segmenting from it would feed a previous
                # run's anatomies into this one instead of the site's segmentation
                rejected.append(f"SEG {path.name}: written by fvlm_pacs itself (ignored)")
                continue
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError) as exc:
                rejected.append(f"SEG {path.name}: unreadable ({exc})")
                continue
            sop = str(header.get("SOPInstanceUID", path.name))
            if not self._same_frame(header, volume):
                rejected.append(
                    f"SEG {sop}: Frame of Reference {header.get('FrameOfReferenceUID', '(none)')} "
                    f"is not the CT's {volume.frame_of_reference_uid or '(none)'}"
                )
                continue
            match = self.match(header)
            for name, why in match.incomplete.items():
                logger.info("SEG %s: anatomy %s: %s", sop, name, why)
            if not match.segments:
                codes = sorted(
                    {
                        f"({c.get('CodeValue', '')}, {c.get('CodingSchemeDesignator', '')})"
                        for item in header.get("SegmentSequence", [])
                        for c in item.get("SegmentedPropertyTypeCodeSequence", [])
                    }
                )
                partial = "; ".join(f"{n}: {w}" for n, w in match.incomplete.items())
                rejected.append(
                    f"SEG {sop}: no segment codes an anatomy of profile {self.table.profile} "
                    f"(segment codes: {', '.join(codes) or 'none'})"
                    + (f"; {partial}" if partial else "")
                )
                continue
            key = (
                str(header.get("ContentDate", "") or ""),
                str(header.get("ContentTime", "") or ""),
                int(header.get("InstanceNumber", 0) or 0),
                int(header.get("SeriesNumber", 0) or 0),
                path.name,
            )
            found.append(_Candidate(path, match, key))
        found.sort(key=lambda c: c.order_key, reverse=True)
        return found, rejected

    @staticmethod
    def _same_frame(header: Dataset, volume: Volume) -> bool:
        seg_for = str(header.get("FrameOfReferenceUID", "") or "")
        if volume.frame_of_reference_uid:
            return seg_for == str(volume.frame_of_reference_uid)
        wanted = set(volume.source_instances)
        return any(
            str(inst.get("ReferencedSOPInstanceUID", "")) in wanted
            for series in header.get("ReferencedSeriesSequence", [])
            for inst in series.get("ReferencedInstanceSequence", [])
        )

    # -- placing ----------------------------------------------------------------------------

    def segment(self, volume: Volume, study_paths: Sequence[Path]) -> LabelMap:
        candidates, rejected = self._candidates(volume, study_paths)
        if not candidates:
            why = "; ".join(rejected) if rejected else "the study holds no DICOM SEG"
            raise SegmentationUnavailable(
                f"dicom-seg: no usable DICOM SEG for series {volume.series_instance_uid}: {why}",
                detail={"rejected": rejected},
            )
        errors: list[str] = []
        for cand in candidates:
            try:
                labelmap = self._read(cand, volume)
            except (ValueError, RuntimeError, KeyError, AttributeError, IndexError) as exc:
                logger.warning("SEG %s cannot be placed on the CT grid: %s", cand.path.name, exc)
                errors.append(f"SEG {cand.path.name}: {exc}")
                continue
            if not labelmap.array.any():
                errors.append(f"SEG {cand.path.name}: its segments cover none of the CT volume")
                continue
            return labelmap
        raise SegmentationUnavailable(
            f"dicom-seg: no DICOM SEG could be placed on series {volume.series_instance_uid}: "
            + "; ".join(errors),
            detail={"rejected": rejected + errors},
        )

    def _read(self, cand: _Candidate, volume: Volume) -> LabelMap:
        seg = hd.seg.segread(cand.path)
        segments = cand.match.segments
        numbers = sorted({n for nums in segments.values() for n in nums})
        channels = self._channels_on_grid(seg, numbers, volume)
        masks = {
            name: np.logical_or.reduce([channels[n] for n in nums])
            for name, nums in segments.items()
        }
        merged = merge_anatomy_masks(masks, self.table, volume.array.shape[:3], self.name)
        merged.provenance.update(
            {
                "seg_sop_instance_uid": str(seg.SOPInstanceUID),
                "seg_series_instance_uid": str(seg.SeriesInstanceUID),
                "segments": {name: list(nums) for name, nums in segments.items()},
                "matched_by": dict(cand.match.how),
                **({"not_used": dict(cand.match.incomplete)} if cand.match.incomplete else {}),
            }
        )
        return merged

    @staticmethod
    def _channels_on_grid(
        seg: hd.seg.Segmentation, numbers: list[int], volume: Volume
    ) -> dict[int, np.ndarray]:
        """Segment number → bool mask on the CT grid."""
        try:
            seg_volume = seg.get_volume(segment_numbers=numbers, combine_segments=False)
        except (RuntimeError, ValueError) as exc:
            logger.info("SEG is not a regular volume (%s); reading it per CT instance", exc)
        else:
            data = np.asarray(seg_volume.array)
            out = {}
            for i, number in enumerate(numbers):
                channel = hd.Volume(
                    _binary(data[..., i]).astype(np.uint8),
                    seg_volume.affine,
                    "PATIENT",
                    frame_of_reference_uid=seg_volume.frame_of_reference_uid,
                )
                out[number] = place_on_grid(channel, volume) > 0
            return out
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.source_instances),
            segment_numbers=numbers,
            combine_segments=False,
        )
        return {number: _binary(pixels[..., i]) for i, number in enumerate(numbers)}


def _binary(values: np.ndarray) -> np.ndarray:
    """BINARY/LABELMAP channels are 0/1; FRACTIONAL ones (rescaled to 0..1) count from 0.5."""
    if values.dtype.kind == "f":
        return values >= 0.5
    return values > 0
