"""DICOM Segmentation of the anatomies fVLM looked at (highdicom ``Segmentation``).

Why a SEG at all: the SR's findings are per anatomy, and a reader (or a viewer's hanging protocol)
needs to see *which voxels* the model pooled for "lung" or "heart". The SR's measurement groups
point at this object's segments (Referenced Segment), so both must agree on numbers and codes.

Choices, each made for viewers and validators:

* ``BINARY`` segmentation (no fractional values): every viewer that reads SEG reads BINARY; our
  label map has exactly one anatomy per voxel, so nothing is lost. Frames that hold no segment are
  omitted (highdicom's default), which keeps a whole-CT SEG small.
* One segment per anatomy *present* in the label map, in the anatomy table's label order, numbered
  1..n without gaps (the standard requires it). An anatomy the segmenter did not find gets no
  segment: an empty segment would claim a structure that is not there.
* Segmented Property Category / Type: the anatomy's ``segmentation_category`` and SNOMED CT
  ``code`` from ``mappings/anatomies.yaml``; Segment Label = :func:`anatomy_label` (the SR's
  tracking identifiers start with the same text); Segment Algorithm Type AUTOMATIC with an
  Algorithm Identification naming the segmentation provider and the model the anatomies serve.
* Same study, same Frame of Reference, per-frame Derivation Image references to the CT instances
  the label map was computed on (the order of ``Volume.source_instances``); a new series whose
  description says the object is AI-generated (:mod:`.equipment`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

from fvlm_pacs.codes import Anatomy, AnatomyTable, CodedConcept
from fvlm_pacs.domain import LabelMap, ModelInfo, Volume
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers.equipment import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    manufacturer_model_name,
    software_versions,
)

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = SegmentationStorage
"""SOP Class UID of Segmentation Storage."""

PALETTE: tuple[str, ...] = (
    "tomato",
    "dodgerblue",
    "gold",
    "orchid",
    "limegreen",
    "orange",
    "turquoise",
    "hotpink",
)
"""Display colours (CSS names) by anatomy label order; the summary image draws outlines in the
same colours, so SEG overlay and summary agree."""


def anatomy_label(anatomy: Anatomy) -> str:
    """Segment Label of an anatomy, and the first part of the SR tracking identifiers."""
    return anatomy.name


def display_rgb(anatomy: Anatomy) -> tuple[int, int, int]:
    """The anatomy's display colour as 8-bit RGB (deterministic by label)."""
    color = hd.color.CIELabColor.from_string(PALETTE[(anatomy.label - 1) % len(PALETTE)])
    r, g, b = color.to_rgb()
    return (int(r), int(g), int(b))


def hd_code(code: CodedConcept) -> hd.sr.CodedConcept:
    """Our mapping-table concept as a highdicom coded concept."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


@dataclass(frozen=True)
class SegOutput:
    """A built SEG and what the SR needs from it: the segment number of each anatomy."""

    dataset: hd.seg.Segmentation
    segment_numbers: Mapping[str, int]


def present_anatomies(labelmap: LabelMap, table: AnatomyTable) -> list[tuple[Anatomy, int]]:
    """(anatomy, its value in ``labelmap``) for every anatomy of ``table`` with at least one voxel,
    in the table's label order."""
    arr = np.asarray(labelmap.array)
    k = len(labelmap.anatomies)
    counts = np.bincount(arr.ravel().astype(np.int64, copy=False), minlength=k + 1)
    out = []
    for anatomy in table.anatomies:
        if anatomy.name not in labelmap.anatomies:
            continue
        value = labelmap.anatomies.index(anatomy.name) + 1
        if counts[value] > 0:
            out.append((anatomy, value))
    return out


PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type 2 Patient / General Study attributes highdicom copies from the first source header."""


def with_patient_study_attributes(sources: Sequence[Dataset]) -> list[Dataset]:
    """``sources`` with the first header completed: a Type 2 patient/study attribute it lacks is
    added empty (what Type 2 allows). highdicom copies these from the first source and fails on
    a missing one; real (e.g. de-identified) CTs sometimes drop them. The originals stay as read.
    """
    if not sources:
        return []
    first = sources[0]
    missing = [kw for kw in PATIENT_STUDY_TYPE2 if kw not in first]
    if not missing:
        return list(sources)
    completed = copy.deepcopy(first)
    for keyword in missing:
        setattr(completed, keyword, None)
    return [completed, *sources[1:]]


def check_sources(volume: Volume, sources: Sequence[Dataset]) -> None:
    """The source headers must be the volume's instances in its slice order (frame k of the SEG
    is slice k of the label map)."""
    got = tuple(str(ds.SOPInstanceUID) for ds in sources)
    if got != tuple(volume.source_instances):
        raise OutputError(
            f"source datasets ({len(got)}) are not the {len(volume.source_instances)} instances "
            f"of series {volume.series_instance_uid} in slice order"
        )


def build_seg(
    volume: Volume,
    labelmap: LabelMap,
    sources: Sequence[Dataset],
    table: AnatomyTable,
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> SegOutput | None:
    """The SEG of the anatomies present in ``labelmap``; ``None`` when it holds none.

    ``sources`` are the CT headers (pixel data not needed) in the volume's slice order.
    Raises :class:`OutputError` when the inputs do not fit together or highdicom refuses them.
    """
    arr = np.asarray(labelmap.array)
    if arr.shape != tuple(volume.array.shape):
        raise OutputError(
            f"label map shape {arr.shape} differs from the volume's {tuple(volume.array.shape)}"
        )
    check_sources(volume, sources)
    sources = with_patient_study_attributes(sources)
    present = present_anatomies(labelmap, table)
    if not present:
        log.info("series %s: no anatomy in the label map, no SEG", volume.series_instance_uid)
        return None

    numbers = {anatomy.name: i + 1 for i, (anatomy, _) in enumerate(present)}
    lut = np.zeros(len(labelmap.anatomies) + 1, dtype=np.uint8)
    for anatomy, value in present:
        lut[value] = numbers[anatomy.name]
    pixels = lut[arr.astype(np.int64, copy=False)]  # label-map style: value = segment number

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{labelmap.source} anatomies for {model.name}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version[:64],
        source=MANUFACTURER,
        parameters={"segmentation_provider": labelmap.source, "model": model.name},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=numbers[anatomy.name],
            segment_label=anatomy_label(anatomy),
            segmented_property_category=hd_code(anatomy.segmentation_category),
            segmented_property_type=hd_code(anatomy.code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_string(
                PALETTE[(anatomy.label - 1) % len(PALETTE)]
            ),
        )
        for anatomy, _ in present
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=manufacturer_model_name(model),
            software_versions=list(software_versions(model)),  # type: ignore[arg-type]
            device_serial_number=DEVICE_SERIAL_NUMBER,
            series_description=SEG_SERIES_DESCRIPTION,
            content_label="ANATOMY",
            content_description="anatomies scored by fVLM",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"SEG: highdicom refused the segmentation: {exc}") from exc
    log.info(
        "series %s: SEG with %d segment(s) (%s)",
        volume.series_instance_uid,
        len(present),
        ", ".join(numbers),
    )
    return SegOutput(dataset=seg, segment_numbers=numbers)
