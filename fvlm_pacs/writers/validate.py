"""Our AI-result checklist (``PACS.md``) as named checks, plus ``dciodvfy`` when it is installed.

Why our own checks when highdicom validates on construction and ``dciodvfy`` checks the IOD:
neither knows what an AI result needs to be *useful* in a PACS — the Completion Flag, a device
observer, one measurement group per finding with a finding site, a probability NUM that is never
NaN and never inside a qualitative container, references to the SEG segment of the same anatomy,
evidence listing every referenced instance. Peers fail exactly there (PACS.md, pain point 4).

Each check has a stable name (``sr.completion_flag``, ``seg.frame_of_reference_matches_source``…)
and reports what is wrong in words; :data:`CHECKS` lists them all. A rule every object we write
must keep (same study, patient copied, equipment, AI series description) is one function
registered once per kind, so a report still names the object that broke it (``seg.equipment``).
Checks that compare with other objects (the CT series, the SEG an SR references) use a
:class:`Context`; given less context they check what the object alone can show. The writers
run every check (and ``dciodvfy``) before an object is returned to the pipeline: any error raises
:class:`~fvlm_pacs.errors.OutputError`, so an invalid object is never exported.
``fvlm-pacs validate FILE...`` runs the same checks on files.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import pydicom
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from fvlm_pacs.writers.equipment import AI_MARK
from fvlm_pacs.writers.sr import COMPREHENSIVE_3D_SR_STORAGE, STATUS_CODES
from fvlm_pacs.writers.summary import SECONDARY_CAPTURE_IMAGE_STORAGE

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = SegmentationStorage

Severity = Literal["error", "warning"]
Kind = Literal["sr", "seg", "sc"]
KINDS: tuple[Kind, ...] = get_args(Kind)


@dataclass(frozen=True)
class Issue:
    """One finding of the validator: which check, what is wrong, and how bad."""

    check: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.check}: {self.message}"


@dataclass(frozen=True)
class Context:
    """What an object is compared with: the CT headers it was made from and, for an SR, the SEG
    it references. Empty by default: then only what the object alone shows is checked."""

    sources: tuple[Dataset, ...] = ()
    seg: Dataset | None = None


CheckFn = Callable[[Dataset, Context], Iterable[str]]


@dataclass(frozen=True)
class Check:
    """A named check: ``run`` yields one message per problem (nothing when the object passes)."""

    name: str
    kind: Kind
    what: str
    run: CheckFn


CHECKS: list[Check] = []
"""Every check, in the order they run: those of every kind first, then SR, SEG and SC's own."""


def _check(kind: Kind, name: str, what: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check of one kind under its full name (``sr.completion_flag``)."""

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append(Check(name=name, kind=kind, what=what, run=fn))
        return fn

    return register


def _check_every_kind(name: str, what: str) -> Callable[[CheckFn], CheckFn]:
    """Register one rule for every kind, named per kind (``sr.equipment``, ``seg.equipment``,
    ``sc.equipment``) so that a report says which object broke it."""

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.extend(Check(name=f"{k}.{name}", kind=k, what=what, run=fn) for k in KINDS)
        return fn

    return register


def check_names(kind: Kind | None = None) -> list[str]:
    """The names of the checks (of one kind)."""
    return [c.name for c in CHECKS if kind is None or c.kind == kind]


# -- content tree helpers -----------------------------------------------------------------------
Concept = tuple[str, str]

REPORT_TITLE: Concept = ("126000", "DCM")
LANGUAGE: Concept = ("121049", "DCM")
OBSERVER_TYPE: Concept = ("121005", "DCM")
DEVICE: Concept = ("121007", "DCM")
DEVICE_OBSERVER_UID: Concept = ("121012", "DCM")
DEVICE_OBSERVER_NAME: Concept = ("121013", "DCM")
DEVICE_OBSERVER_MANUFACTURER: Concept = ("121014", "DCM")
DEVICE_OBSERVER_MODEL_NAME: Concept = ("121015", "DCM")
PROCEDURE_REPORTED: Concept = ("121058", "DCM")
IMAGE_LIBRARY: Concept = ("111028", "DCM")
IMAGING_MEASUREMENTS: Concept = ("126010", "DCM")
MEASUREMENT_GROUP: Concept = ("125007", "DCM")
TRACKING_IDENTIFIER: Concept = ("112039", "DCM")
TRACKING_UID: Concept = ("112040", "DCM")
FINDING_CATEGORY: Concept = ("276214006", "SCT")
FINDING: Concept = ("121071", "DCM")
FINDING_SITE: Concept = ("363698007", "SCT")
ALGORITHM_NAME: Concept = ("111001", "DCM")
ALGORITHM_VERSION: Concept = ("111003", "DCM")
ALGORITHM_PARAMETERS: Concept = ("111002", "DCM")
ALGORITHM_FAMILY: Concept = ("111000", "DCM")
ARTIFICIAL_INTELLIGENCE: Concept = ("123110", "DCM")
REFERENCED_SEGMENT: Concept = ("121191", "DCM")
SOURCE_SERIES_FOR_SEGMENTATION: Concept = ("121232", "DCM")
QUALITATIVE_EVALUATIONS: Concept = ("C0034375", "UMLS")
UCUM_ONE: Concept = ("1", "UCUM")
STATUS_VALUES: dict[Concept, str] = {
    (c.value, c.scheme_designator): s for s, c in STATUS_CODES.items()
}

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _is_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID.match(text))


def _code_of(seq: Sequence[Dataset] | None) -> Concept | None:
    if not seq:
        return None
    item = seq[0]
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    return (str(value or ""), str(item.get("CodingSchemeDesignator", "")))


def _name(item: Dataset) -> Concept | None:
    return _code_of(item.get("ConceptNameCodeSequence"))


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _find(item: Dataset, name: Concept, value_type: str | None = None) -> list[Dataset]:
    return [
        c
        for c in _children(item)
        if _name(c) == name and (value_type is None or c.get("ValueType") == value_type)
    ]


def _text(item: Dataset) -> str:
    return str(item.get("TextValue", "") or "")


def _groups(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for container in _find(ds, IMAGING_MEASUREMENTS, "CONTAINER"):
        out += _find(container, MEASUREMENT_GROUP, "CONTAINER")
    return out


def _group_label(group: Dataset, index: int) -> str:
    ids = _find(group, TRACKING_IDENTIFIER, "TEXT")
    return f"group {index + 1} ({_text(ids[0])})" if ids else f"group {index + 1}"


def _status(group: Dataset) -> str | None:
    """present / absent / not_assessable from the group's qualitative evaluation, if any."""
    for child in _children(group):
        if child.get("ValueType") == "CODE":
            value = _code_of(child.get("ConceptCodeSequence"))
            if value in STATUS_VALUES:
                return STATUS_VALUES[value]
    return None


def _nums(group: Dataset) -> list[Dataset]:
    return [c for c in _children(group) if c.get("ValueType") == "NUM"]


def _evidence_uids(ds: Dataset) -> dict[str, tuple[str, str]]:
    """SOP Instance UID → (series UID, SOP Class UID) of the Current Requested Procedure
    Evidence Sequence."""
    out: dict[str, tuple[str, str]] = {}
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for inst in series.get("ReferencedSOPSequence", []):
                out[str(inst.get("ReferencedSOPInstanceUID", ""))] = (
                    str(series.get("SeriesInstanceUID", "")),
                    str(inst.get("ReferencedSOPClassUID", "")),
                )
    return out


def _referenced_instances(ds: Dataset) -> set[str]:
    """Every SOP instance an IMAGE or COMPOSITE content item references."""
    return {
        str(ref.get("ReferencedSOPInstanceUID", ""))
        for item in _walk(ds)
        if item.get("ValueType") in ("IMAGE", "COMPOSITE")
        for ref in item.get("ReferencedSOPSequence", [])
    }


def _segments(seg: Dataset) -> dict[int, Dataset]:
    return {int(s.get("SegmentNumber", 0)): s for s in seg.get("SegmentSequence", [])}


_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
)


def _uid_from_source(ds: Dataset, ctx: Context, keyword: str) -> Iterator[str]:
    """``keyword`` holds a valid UID and, given the source CT, the source's own."""
    uid = str(ds.get(keyword, "") or "")
    if not _is_uid(uid):
        yield f"{keyword} is missing or not a UID"
    for src in ctx.sources[:1]:
        if uid != str(src.get(keyword, "") or ""):
            yield f"{keyword} differs from the source series"


def _own_series(ds: Dataset, others: set[str]) -> Iterator[str]:
    """A valid Series Instance UID of its own, none of ``others`` (what the object references):
    an output added to a source series would change what a viewer shows as the original."""
    series = str(ds.get("SeriesInstanceUID", ""))
    if not _is_uid(series):
        yield "SeriesInstanceUID is missing or not a UID"
    if series in others:
        yield "SeriesInstanceUID is the series of an object it references"


def _source_series(ctx: Context) -> set[str]:
    return {str(s.get("SeriesInstanceUID", "")) for s in ctx.sources}


# -- checks of every kind -----------------------------------------------------------------------
@_check_every_kind("same_study", "in the source study")
def _same_study(ds: Dataset, ctx: Context) -> Iterator[str]:
    yield from _uid_from_source(ds, ctx, "StudyInstanceUID")
    study = str(ds.get("StudyInstanceUID", ""))
    for item in ds.get("CurrentRequestedProcedureEvidenceSequence", []):  # an SR's evidence
        if str(item.get("StudyInstanceUID", "")) != study:
            yield "Current Requested Procedure Evidence names another study"


@_check_every_kind("patient_copied", "patient and study attributes copied from the source")
def _patient_study_copied(ds: Dataset, ctx: Context) -> Iterator[str]:
    if not ctx.sources:
        if "PatientID" not in ds:
            yield "PatientID is missing"
        return
    src = ctx.sources[0]
    for keyword in _PATIENT_STUDY:
        if str(ds.get(keyword, "") or "") != str(src.get(keyword, "") or ""):
            yield f"{keyword} differs from the source series"


@_check_every_kind("equipment", "Manufacturer, Manufacturer's Model Name, Software Versions")
def _equipment(ds: Dataset, ctx: Context) -> Iterator[str]:
    for keyword in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions"):
        if not ds.get(keyword):
            yield f"{keyword} is missing or empty (equipment must name the product and version)"


@_check_every_kind("series_description_ai", "Series Description says AI-generated")
def _ai_description(ds: Dataset, ctx: Context) -> Iterator[str]:
    if AI_MARK.lower() not in str(ds.get("SeriesDescription", "") or "").lower():
        yield f"SeriesDescription does not say the series is {AI_MARK}"


# -- SR checks ----------------------------------------------------------------------------------
@_check("sr", "sr.sop_class", "Comprehensive 3D SR storage, Modality SR")
def _sr_sop_class(ds: Dataset, ctx: Context) -> Iterator[str]:
    if str(ds.get("SOPClassUID", "")) != COMPREHENSIVE_3D_SR_STORAGE:
        yield f"SOPClassUID {ds.get('SOPClassUID', '(none)')} is not Comprehensive 3D SR"
    if ds.get("Modality") != "SR":
        yield f"Modality is {ds.get('Modality', '(none)')!r}, not 'SR'"


@_check("sr", "sr.content_template", "Content Template DCMR/1500")
def _sr_template(ds: Dataset, ctx: Context) -> Iterator[str]:
    seq = ds.get("ContentTemplateSequence", [])
    if not seq or (
        str(seq[0].get("MappingResource", "")),
        str(seq[0].get("TemplateIdentifier", "")),
    ) != ("DCMR", "1500"):
        yield "ContentTemplateSequence does not name DCMR TID 1500"


@_check("sr", "sr.document_title", "root container (126000, DCM, Imaging Measurement Report)")
def _sr_title(ds: Dataset, ctx: Context) -> Iterator[str]:
    if ds.get("ValueType") != "CONTAINER" or _name(ds) != REPORT_TITLE:
        yield f"root container is {_name(ds)}, not {REPORT_TITLE}"


@_check("sr", "sr.completion_flag", "Completion Flag COMPLETE")
def _sr_completion(ds: Dataset, ctx: Context) -> Iterator[str]:
    if ds.get("CompletionFlag") != "COMPLETE":
        yield f"CompletionFlag is {ds.get('CompletionFlag', '(missing)')!r}, not 'COMPLETE'"


@_check("sr", "sr.verification_flag", "Verification Flag UNVERIFIED (no human verified it)")
def _sr_verification(ds: Dataset, ctx: Context) -> Iterator[str]:
    if ds.get("VerificationFlag") != "UNVERIFIED":
        yield f"VerificationFlag is {ds.get('VerificationFlag', '(missing)')!r}, not 'UNVERIFIED'"


@_check("sr", "sr.performed_procedure_code", "Performed Procedure Code Sequence with a code")
def _sr_performed(ds: Dataset, ctx: Context) -> Iterator[str]:
    if _code_of(ds.get("PerformedProcedureCodeSequence")) is None:
        yield "PerformedProcedureCodeSequence is missing or empty"


@_check("sr", "sr.referenced_pps_present", "Referenced Performed Procedure Step Sequence present")
def _sr_pps(ds: Dataset, ctx: Context) -> Iterator[str]:
    if "ReferencedPerformedProcedureStepSequence" not in ds:
        yield "ReferencedPerformedProcedureStepSequence is missing (Type 2: present, may be empty)"


@_check(
    "sr",
    "sr.evidence_lists_all_references",
    "Current Requested Procedure Evidence lists every referenced instance, the CT and the SEG",
)
def _sr_evidence(ds: Dataset, ctx: Context) -> Iterator[str]:
    evidence = _evidence_uids(ds)
    if not evidence:
        yield "CurrentRequestedProcedureEvidenceSequence is missing or empty"
        return
    wanted = _referenced_instances(ds) | {str(s.SOPInstanceUID) for s in ctx.sources}
    if ctx.seg is not None:
        wanted.add(str(ctx.seg.SOPInstanceUID))
    missing = sorted(wanted - set(evidence))
    if missing:
        yield f"{len(missing)} referenced instance(s) not in the evidence, e.g. {missing[0]}"


@_check("sr", "sr.new_series", "its own series, not the source's or the SEG's")
def _sr_new_series(ds: Dataset, ctx: Context) -> Iterator[str]:
    others = {s for s, _ in _evidence_uids(ds).values()} | _source_series(ctx)
    if ctx.seg is not None:
        others.add(str(ctx.seg.get("SeriesInstanceUID", "")))
    yield from _own_series(ds, others)


@_check("sr", "sr.language", "Language of Content Item and Descendants")
def _sr_language(ds: Dataset, ctx: Context) -> Iterator[str]:
    if not _find(ds, LANGUAGE, "CODE"):
        yield "no Language of Content Item and Descendants (121049, DCM) at the root"


@_check("sr", "sr.observer_device", "observer context: Device with UID, name, manufacturer, model")
def _sr_observer(ds: Dataset, ctx: Context) -> Iterator[str]:
    types = [_code_of(i.get("ConceptCodeSequence")) for i in _find(ds, OBSERVER_TYPE, "CODE")]
    if DEVICE not in types:
        yield "no Observer Type = Device (121007, DCM)"
    uids = _find(ds, DEVICE_OBSERVER_UID, "UIDREF")
    if not uids or not _is_uid(uids[0].get("UID")):
        yield "no valid Device Observer UID"
    for concept, label in (
        (DEVICE_OBSERVER_NAME, "Name"),
        (DEVICE_OBSERVER_MANUFACTURER, "Manufacturer"),
        (DEVICE_OBSERVER_MODEL_NAME, "Model Name"),
    ):
        items = _find(ds, concept, "TEXT")
        if not items or not _text(items[0]):
            yield f"no Device Observer {label}"


@_check("sr", "sr.procedure_reported", "Procedure Reported")
def _sr_procedure(ds: Dataset, ctx: Context) -> Iterator[str]:
    items = _find(ds, PROCEDURE_REPORTED, "CODE")
    if not items or _code_of(items[0].get("ConceptCodeSequence")) is None:
        yield "no Procedure Reported (121058, DCM)"


@_check("sr", "sr.image_library", "Image Library of the source series")
def _sr_library(ds: Dataset, ctx: Context) -> Iterator[str]:
    libraries = _find(ds, IMAGE_LIBRARY, "CONTAINER")
    if not libraries:
        yield "no Image Library (111028, DCM)"
        return
    listed = {
        str(ref.get("ReferencedSOPInstanceUID", ""))
        for item in _walk(libraries[0])
        if item.get("ValueType") == "IMAGE"
        for ref in item.get("ReferencedSOPSequence", [])
    }
    if not listed:
        yield "the Image Library lists no image"
    missing = [str(s.SOPInstanceUID) for s in ctx.sources if str(s.SOPInstanceUID) not in listed]
    if missing:
        yield f"{len(missing)} source instance(s) missing from the Image Library"


@_check("sr", "sr.measurement_groups", "Imaging Measurements with at least one group")
def _sr_groups(ds: Dataset, ctx: Context) -> Iterator[str]:
    if not _groups(ds):
        yield "no Measurement Group in Imaging Measurements (126010, DCM)"


@_check("sr", "sr.group_tracking", "every group: Tracking Identifier + Tracking Unique Identifier")
def _sr_tracking(ds: Dataset, ctx: Context) -> Iterator[str]:
    seen: set[str] = set()
    for i, group in enumerate(_groups(ds)):
        ids = _find(group, TRACKING_IDENTIFIER, "TEXT")
        uids = _find(group, TRACKING_UID, "UIDREF")
        if not ids or not _text(ids[0]):
            yield f"{_group_label(group, i)}: no Tracking Identifier"
        if not uids or not _is_uid(uids[0].get("UID")):
            yield f"{_group_label(group, i)}: no valid Tracking Unique Identifier"
            continue
        uid = str(uids[0].UID)
        if uid in seen:
            yield f"{_group_label(group, i)}: Tracking Unique Identifier used twice"
        seen.add(uid)


@_check("sr", "sr.group_finding_category", "every group: Finding Category")
def _sr_category(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        items = _find(group, FINDING_CATEGORY, "CODE")
        if not items or _code_of(items[0].get("ConceptCodeSequence")) is None:
            yield f"{_group_label(group, i)}: no Finding Category"


@_check("sr", "sr.group_finding", "every group: coded Finding (SNOMED CT, RadLex or DCM)")
def _sr_finding(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        items = _find(group, FINDING, "CODE")
        code = _code_of(items[0].get("ConceptCodeSequence")) if items else None
        if code is None or not code[0]:
            yield f"{_group_label(group, i)}: no coded Finding"
        elif code[1] not in ("SCT", "RADLEX", "DCM"):
            yield f"{_group_label(group, i)}: Finding coded in {code[1]}, not SCT/RADLEX/DCM"


@_check("sr", "sr.group_finding_site", "every group: Finding Site in SNOMED CT, HAS CONCEPT MOD")
def _sr_site(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        items = _find(group, FINDING_SITE, "CODE")
        if not items:
            yield f"{_group_label(group, i)}: no Finding Site"
            continue
        code = _code_of(items[0].get("ConceptCodeSequence"))
        if code is None or code[1] != "SCT":
            yield f"{_group_label(group, i)}: Finding Site not coded in SNOMED CT"
        if items[0].get("RelationshipType") != "HAS CONCEPT MOD":
            yield f"{_group_label(group, i)}: Finding Site is not HAS CONCEPT MOD"


@_check(
    "sr",
    "sr.group_algorithm",
    "every group: Algorithm Identification (name, version, family AI, parameters)",
)
def _sr_algorithm(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        label = _group_label(group, i)
        for concept, what in ((ALGORITHM_NAME, "Name"), (ALGORITHM_VERSION, "Version")):
            items = _find(group, concept, "TEXT")
            if not items or not _text(items[0]):
                yield f"{label}: no Algorithm {what}"
        family = _find(group, ALGORITHM_FAMILY, "CODE")
        if not family or _code_of(family[0].get("ConceptCodeSequence")) != ARTIFICIAL_INTELLIGENCE:
            yield f"{label}: Algorithm Family is not Artificial Intelligence (123110, DCM)"
        if not _find(group, ALGORITHM_PARAMETERS, "TEXT"):
            yield f"{label}: no Algorithm Parameters (prompts, threshold)"


@_check(
    "sr",
    "sr.group_qualitative_evaluation",
    "every group: one CODE Present / Absent / Undetermined (not assessable)",
)
def _sr_evaluation(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        values = [
            _code_of(c.get("ConceptCodeSequence"))
            for c in _children(group)
            if c.get("ValueType") == "CODE"
            and c.get("RelationshipType") == "CONTAINS"
            and _name(c) not in (FINDING, FINDING_CATEGORY)
        ]
        hits = [v for v in values if v in STATUS_VALUES]
        if len(hits) != 1:
            yield (
                f"{_group_label(group, i)}: {len(hits)} qualitative evaluations with a "
                "Present/Absent/Undetermined value, want exactly 1"
            )


def _num_value(item: Dataset) -> float | None:
    measured = item.get("MeasuredValueSequence", [])
    if not measured:
        return None
    m = measured[0]
    if "FloatingPointValue" in m:
        return float(m.FloatingPointValue)
    try:
        return float(m.get("NumericValue"))
    except (TypeError, ValueError):
        return None


@_check("sr", "sr.num_unit_ucum_one", "every score NUM has the UCUM unit '1'")
def _sr_num_unit(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        for num in _nums(group):
            measured = num.get("MeasuredValueSequence", [])
            unit = _code_of(measured[0].get("MeasurementUnitsCodeSequence")) if measured else None
            if unit != UCUM_ONE:
                yield f"{_group_label(group, i)}: NUM unit is {unit}, not {UCUM_ONE}"


@_check("sr", "sr.num_finite_probability", "every score NUM is a finite probability in [0, 1]")
def _sr_num_value(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        for num in _nums(group):
            value = _num_value(num)
            if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                yield f"{_group_label(group, i)}: NUM value {value} is not a probability"


@_check("sr", "sr.not_assessable_has_no_num", "a not-assessable finding carries no NUM")
def _sr_na_num(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        if _status(group) == "not_assessable" and _nums(group):
            yield f"{_group_label(group, i)}: Undetermined but has a NUM"


@_check("sr", "sr.assessed_has_score", "a present/absent finding carries its probability NUM")
def _sr_assessed_num(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        if _status(group) in ("present", "absent") and len(_nums(group)) != 1:
            yield f"{_group_label(group, i)}: {len(_nums(group))} NUM items, want 1 (the score)"


@_check(
    "sr",
    "sr.no_num_in_qualitative_container",
    "no NUM inside a Qualitative Evaluations container",
)
def _sr_qual_container(ds: Dataset, ctx: Context) -> Iterator[str]:
    for item in [ds, *_walk(ds)]:
        if item.get("ValueType") == "CONTAINER" and _name(item) == QUALITATIVE_EVALUATIONS:
            if any(c.get("ValueType") == "NUM" for c in _walk(item)):
                yield "a Qualitative Evaluations container holds a NUM"


def _segment_refs(group: Dataset) -> list[Dataset]:
    return _find(group, REFERENCED_SEGMENT, "IMAGE")


@_check(
    "sr",
    "sr.referenced_segment",
    "segment references: number + source series; the SEG's segment codes the finding site",
)
def _sr_segment_refs(ds: Dataset, ctx: Context) -> Iterator[str]:
    for i, group in enumerate(_groups(ds)):
        label = _group_label(group, i)
        for ref in _segment_refs(group):
            sop = ref.get("ReferencedSOPSequence", [Dataset()])[0]
            number = sop.get("ReferencedSegmentNumber")
            if number is None:
                yield f"{label}: Referenced Segment without a segment number"
                continue
            series = _find(group, SOURCE_SERIES_FOR_SEGMENTATION, "UIDREF")
            if not series or not _is_uid(series[0].get("UID")):
                yield f"{label}: Referenced Segment without Source Series for Segmentation"
            elif ctx.sources and str(series[0].UID) not in _source_series(ctx):
                yield f"{label}: Source Series for Segmentation is not the source series"
            if ctx.seg is None:
                continue
            if str(sop.get("ReferencedSOPInstanceUID", "")) != str(ctx.seg.SOPInstanceUID):
                yield f"{label}: references another SEG than the one written with it"
                continue
            segment = _segments(ctx.seg).get(int(number))
            if segment is None:
                yield f"{label}: segment {number} does not exist in the SEG"
                continue
            sites = _find(group, FINDING_SITE, "CODE")
            site = _code_of(sites[0].get("ConceptCodeSequence")) if sites else None
            seg_type = _code_of(segment.get("SegmentedPropertyTypeCodeSequence"))
            if site != seg_type:
                yield f"{label}: segment {number} codes {seg_type}, the finding site is {site}"
            ids = _find(group, TRACKING_IDENTIFIER, "TEXT")
            prefix = _text(ids[0]).split("/")[0] if ids else ""
            if prefix != str(segment.get("SegmentLabel", "")):
                yield f"{label}: segment label {segment.get('SegmentLabel')!r} differs from the SR's"


@_check(
    "sr",
    "sr.segment_reference_when_seg_exists",
    "a finding whose anatomy has a SEG segment references it",
)
def _sr_segment_needed(ds: Dataset, ctx: Context) -> Iterator[str]:
    groups = _groups(ds)
    if ctx.seg is not None:
        types = {
            _code_of(s.get("SegmentedPropertyTypeCodeSequence"))
            for s in ctx.seg.get("SegmentSequence", [])
        }
        for i, group in enumerate(groups):
            sites = _find(group, FINDING_SITE, "CODE")
            site = _code_of(sites[0].get("ConceptCodeSequence")) if sites else None
            if site in types and not _segment_refs(group):
                yield f"{_group_label(group, i)}: its anatomy is segmented but not referenced"
        return
    has_seg = any(cls == SEGMENTATION_STORAGE for _, cls in _evidence_uids(ds).values())
    if has_seg and groups and not any(_segment_refs(g) for g in groups):
        yield "the evidence lists a SEG but no finding references a segment"


@_check("sr", "sr.predecessor_not_self", "Predecessor Documents name other SR instances")
def _sr_predecessor(ds: Dataset, ctx: Context) -> Iterator[str]:
    me = str(ds.get("SOPInstanceUID", ""))
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for inst in series.get("ReferencedSOPSequence", []):
                if str(inst.get("ReferencedSOPInstanceUID", "")) == me:
                    yield "PredecessorDocumentsSequence names this SR itself (a re-run needs new UIDs)"


# -- SEG checks ---------------------------------------------------------------------------------
@_check("seg", "seg.sop_class", "Segmentation storage, Modality SEG")
def _seg_sop_class(ds: Dataset, ctx: Context) -> Iterator[str]:
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        yield f"SOPClassUID {ds.get('SOPClassUID', '(none)')} is not Segmentation Storage"
    if ds.get("Modality") != "SEG":
        yield f"Modality is {ds.get('Modality', '(none)')!r}, not 'SEG'"


@_check("seg", "seg.segmentation_type", "BINARY (or LABELMAP): what every viewer reads")
def _seg_type(ds: Dataset, ctx: Context) -> Iterator[str]:
    if ds.get("SegmentationType") not in ("BINARY", "LABELMAP"):
        yield f"SegmentationType is {ds.get('SegmentationType', '(missing)')!r}"


@_check("seg", "seg.frame_of_reference_matches_source", "Frame of Reference of the source CT")
def _seg_for(ds: Dataset, ctx: Context) -> Iterator[str]:
    yield from _uid_from_source(ds, ctx, "FrameOfReferenceUID")


@_check("seg", "seg.new_series", "its own series, not the source's")
def _seg_new_series(ds: Dataset, ctx: Context) -> Iterator[str]:
    referenced = {
        str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence", [])
    }
    yield from _own_series(ds, referenced | _source_series(ctx))


def _frame_sources(ds: Dataset) -> Iterator[tuple[int, list[str]]]:
    for i, frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
        uids = [
            str(src.get("ReferencedSOPInstanceUID", ""))
            for derivation in frame.get("DerivationImageSequence", [])
            for src in derivation.get("SourceImageSequence", [])
        ]
        yield i, uids


@_check("seg", "seg.per_frame_source_references", "every frame references its source CT image")
def _seg_frames(ds: Dataset, ctx: Context) -> Iterator[str]:
    frames = list(_frame_sources(ds))
    if not frames or len(frames) != int(ds.get("NumberOfFrames", 0) or 0):
        yield "PerFrameFunctionalGroupsSequence does not have one item per frame"
    wanted = {str(s.SOPInstanceUID) for s in ctx.sources}
    for i, uids in frames:
        if not uids:
            yield f"frame {i + 1} references no source image"
            return
        if wanted and not set(uids) <= wanted:
            yield f"frame {i + 1} references an image outside the source series"
            return


@_check("seg", "seg.referenced_series", "Referenced Series lists the source instances")
def _seg_referenced(ds: Dataset, ctx: Context) -> Iterator[str]:
    listed = {
        str(inst.get("ReferencedSOPInstanceUID", ""))
        for series in ds.get("ReferencedSeriesSequence", [])
        for inst in series.get("ReferencedInstanceSequence", [])
    }
    if not listed:
        yield "ReferencedSeriesSequence lists no instance"
    used = {u for _, uids in _frame_sources(ds) for u in uids}
    if not used <= listed:
        yield "frames reference instances the Referenced Series Sequence does not list"


@_check(
    "seg", "seg.segment_algorithm", "every segment AUTOMATIC with an algorithm name and identity"
)
def _seg_algorithm(ds: Dataset, ctx: Context) -> Iterator[str]:
    segments = list(ds.get("SegmentSequence", []))
    if not segments:
        yield "no segment"
    for s in segments:
        n = s.get("SegmentNumber", "?")
        if s.get("SegmentAlgorithmType") != "AUTOMATIC":
            yield f"segment {n}: SegmentAlgorithmType is not AUTOMATIC"
        if not s.get("SegmentAlgorithmName"):
            yield f"segment {n}: no SegmentAlgorithmName"
        algo = s.get("SegmentationAlgorithmIdentificationSequence", [])
        if not algo or _code_of(algo[0].get("AlgorithmFamilyCodeSequence")) is None:
            yield f"segment {n}: no algorithm identification with a family"


@_check("seg", "seg.segment_codes", "segment category and type coded, type in SNOMED CT")
def _seg_codes(ds: Dataset, ctx: Context) -> Iterator[str]:
    for s in ds.get("SegmentSequence", []):
        n = s.get("SegmentNumber", "?")
        if _code_of(s.get("SegmentedPropertyCategoryCodeSequence")) is None:
            yield f"segment {n}: no Segmented Property Category"
        code = _code_of(s.get("SegmentedPropertyTypeCodeSequence"))
        if code is None or code[1] != "SCT":
            yield f"segment {n}: Segmented Property Type not coded in SNOMED CT"


@_check("seg", "seg.one_segment_per_anatomy", "segments numbered 1..n, one per anatomy code")
def _seg_unique(ds: Dataset, ctx: Context) -> Iterator[str]:
    segments = list(ds.get("SegmentSequence", []))
    numbers = [int(s.get("SegmentNumber", 0)) for s in segments]
    if numbers != list(range(1, len(segments) + 1)):
        yield f"segment numbers {numbers} are not 1..{len(segments)}"
    codes = [_code_of(s.get("SegmentedPropertyTypeCodeSequence")) for s in segments]
    if len(set(codes)) != len(codes):
        yield "two segments code the same anatomy"


@_check("seg", "seg.segment_labels", "every segment has a unique label")
def _seg_labels(ds: Dataset, ctx: Context) -> Iterator[str]:
    labels = [str(s.get("SegmentLabel", "") or "") for s in ds.get("SegmentSequence", [])]
    if not all(labels):
        yield "a segment has no SegmentLabel"
    if len(set(labels)) != len(labels):
        yield "two segments share a SegmentLabel"


# -- SC checks ----------------------------------------------------------------------------------
@_check("sc", "sc.sop_class", "Secondary Capture Image storage")
def _sc_sop_class(ds: Dataset, ctx: Context) -> Iterator[str]:
    if str(ds.get("SOPClassUID", "")) != SECONDARY_CAPTURE_IMAGE_STORAGE:
        yield f"SOPClassUID {ds.get('SOPClassUID', '(none)')} is not Secondary Capture"


@_check("sc", "sc.new_series", "its own series, not the source's")
def _sc_new_series(ds: Dataset, ctx: Context) -> Iterator[str]:
    yield from _own_series(ds, _source_series(ctx))


@_check("sc", "sc.source_images", "Source Image Sequence names the CT slices shown")
def _sc_sources(ds: Dataset, ctx: Context) -> Iterator[str]:
    uids = {str(i.get("ReferencedSOPInstanceUID", "")) for i in ds.get("SourceImageSequence", [])}
    if not uids:
        yield "no Source Image Sequence"
    wanted = {str(s.SOPInstanceUID) for s in ctx.sources}
    if wanted and not uids <= wanted:
        yield "Source Image Sequence names an image outside the source series"


@_check("sc", "sc.burned_in_annotation", "Burned In Annotation declared")
def _sc_burned_in(ds: Dataset, ctx: Context) -> Iterator[str]:
    if ds.get("BurnedInAnnotation") not in ("YES", "NO"):
        yield "BurnedInAnnotation is missing (text is drawn into the pixels)"


# -- running ------------------------------------------------------------------------------------
_KIND_BY_CLASS: dict[str, Kind] = {
    COMPREHENSIVE_3D_SR_STORAGE: "sr",
    SEGMENTATION_STORAGE: "seg",
    SECONDARY_CAPTURE_IMAGE_STORAGE: "sc",
}


def kind_of(ds: Dataset) -> Kind | None:
    """Which of our object kinds a dataset is, by SOP Class UID (None: not one we write)."""
    return _KIND_BY_CLASS.get(str(ds.get("SOPClassUID", "")))


def check_dataset(ds: Dataset, ctx: Context = Context(), kind: Kind | None = None) -> list[Issue]:
    """Run every check of the dataset's kind; a check that crashes on a malformed object counts
    as failed (with the exception in its message), never as passed."""
    kind = kind or kind_of(ds)
    if kind is None:
        return [
            Issue(
                "object.sop_class",
                f"SOP Class {ds.get('SOPClassUID', '(none)')} is not an SR, SEG or SC we write",
            )
        ]
    issues: list[Issue] = []
    for c in CHECKS:
        if c.kind != kind:
            continue
        try:
            issues += [Issue(c.name, msg) for msg in c.run(ds, ctx)]
        except Exception as exc:  # noqa: BLE001 — a malformed object must fail, not crash
            issues.append(Issue(c.name, f"could not be checked: {type(exc).__name__}: {exc}"))
    return issues


_BRACKETED = re.compile(r"(Module=)?<([^>]*)>")


def redact(text: str) -> str:
    """dciodvfy quotes values in <…>; keep attribute keywords and module names, hide the rest.

    For messages that go to logs and the job record: a quoted value could be a patient's name.
    """

    def keep(m: re.Match[str]) -> str:
        return m.group(0) if m.group(1) or m.group(2) in keyword_dict else "<…>"

    return _BRACKETED.sub(keep, text)


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def run_dciodvfy(path: Path, timeout: float = 120.0) -> list[Issue]:
    """``dciodvfy``'s verdict on a file: "Error" lines as errors, "Warning" lines as warnings.

    Returns an empty list when ``dciodvfy`` is not installed (the checks above still run).
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        return []
    try:
        proc = subprocess.run(
            [exe, str(path)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Issue("dicom.dciodvfy", f"dciodvfy could not run: {exc}")]
    issues: list[Issue] = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        text = line.strip()
        if text.startswith("Error"):
            issues.append(Issue("dicom.dciodvfy", text))
        elif text.startswith("Warning"):
            issues.append(Issue("dicom.dciodvfy", text, "warning"))
    return issues


@dataclass(frozen=True)
class FileReport:
    """The verdict on one file."""

    path: Path
    kind: Kind | None
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        """Human-readable report: one headline, then one line per issue."""
        n_checks = len(check_names(self.kind)) if self.kind else 0
        verdict = "OK" if self.ok else "FAILED"
        head = (
            f"{self.path}: {verdict} ({(self.kind or '?').upper()}, {n_checks} checks, "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s))"
        )
        return [head, *(f"  {i}" for i in self.issues)]


def validate_file(path: Path, ctx: Context = Context(), *, dciodvfy: bool = True) -> FileReport:
    """Read ``path`` and run the checks of its kind and (if installed) ``dciodvfy``."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return FileReport(path, None, [Issue("object.readable", f"cannot read: {exc}")])
    issues = check_dataset(ds, ctx)
    if dciodvfy:
        issues += run_dciodvfy(path)
    return FileReport(path, kind_of(ds), issues)


def validate_files(
    paths: Sequence[Path], sources: Sequence[Dataset] = (), *, dciodvfy: bool = True
) -> list[FileReport]:
    """Validate several files together: an SR is checked against a SEG among them that it
    references; ``sources`` (CT headers) enable the comparisons with the source series."""
    headers: dict[str, Dataset] = {}
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if kind_of(ds) == "seg":
            headers[str(ds.SOPInstanceUID)] = ds
    reports = []
    for p in paths:
        seg = None
        try:
            head = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            head = None
        if head is not None and kind_of(head) == "sr":
            refs = _referenced_instances(head)
            seg = next((s for uid, s in headers.items() if uid in refs), None)
        ctx = Context(sources=tuple(sources), seg=seg)
        reports.append(validate_file(p, ctx, dciodvfy=dciodvfy))
    return reports
