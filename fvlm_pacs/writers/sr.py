"""fVLM findings as a Comprehensive 3D SR with TID 1500 (highdicom ``Comprehensive3DSR``).

The document follows the "AI-result SR checklist" of ``PACS.md`` (IHE AIR uses the same
templates); :mod:`.validate` checks every item again on the written object.

Layout of the content tree::

    Imaging Measurement Report (126000, DCM)                TID 1500
      Language of Content Item and Descendants (English)
      Observer Type = Device, Device Observer UID/Name/Manufacturer/Model Name    TID 1002/1004
      Procedure Reported = CT of chest (per anatomy profile, see PROCEDURES)
      Image Library: one entry per CT instance of the source series
      Imaging Measurements
        Measurement Group (one per anatomy × finding)      TID 1411, or TID 1501 without a segment
          Tracking Identifier "<anatomy>/<finding>" + Tracking Unique Identifier
          Finding Category = Morphologically Abnormal Structure
          Finding = the finding's code (mappings/findings.yaml)
          Finding Site = the anatomy's SNOMED CT code (HAS CONCEPT MOD)
          Algorithm Identification: model name, version, family Artificial Intelligence,
                                    parameters "positive prompt: …", "negative prompt: …",
                                    "threshold: …", "weights sha256: …"          TID 4019
          Referenced Segment (SEG segment of the anatomy) + Source Series for Segmentation
          <finding> = Present | Absent | Undetermined       CODE (qualitative evaluation)
          Probability = score, unit (1, UCUM, "no units")  NUM, only when assessed

Codes (provenance also in ``mappings/README.md``, section "SR codes"): the qualitative values
are CID 240 "Present-Absent" (52101004 Present, 272519000 Absent, 373068000 Undetermined — the
latter for "not assessable": the anatomy was missing or cut off, so the model could not tell),
as listed in DICOM PS3.16 shipped with pydicom. ``Probability`` is (122157, DCM). They are
named constants, not mapping rows, because a site has no reason to change a standard value set.

Why per-finding groups and no study-level Qualitative Evaluations container: each finding
carries its own site, algorithm parameters and segment reference; a NUM inside a study-level
qualitative container is what makes peers' SRs fail (PACS.md pain point 4), so we never write
that container.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from fvlm_pacs.codes import AnatomyTable, FindingDefinition
from fvlm_pacs.domain import Finding, FindingStatus, InstanceRef, ModelInfo
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers.equipment import (
    MANUFACTURER,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    device_observer_uid,
    manufacturer_model_name,
    software_versions,
    stable_uid,
)
from fvlm_pacs.writers.seg import (
    SegOutput,
    anatomy_label,
    hd_code,
    with_patient_study_attributes,
)

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR_STORAGE = Comprehensive3DSRStorage

# -- codes ---------------------------------------------------------------------------------------
# CID 240 "Present-Absent" (DICOM PS3.16, as shipped in pydicom 3: pydicom.sr._cid_dict).
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
UNDETERMINED = hd.sr.CodedConcept("373068000", "SCT", "Undetermined")
"""Used for "not assessable": the presence of the finding could not be determined."""

STATUS_CODES: Mapping[str, hd.sr.CodedConcept] = {
    "present": PRESENT,
    "absent": ABSENT,
    "not_assessable": UNDETERMINED,
}

PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
"""NUM concept name of the score (DICOM PS3.16 Annex D, DCM 122157)."""

UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
"""UCUM unity "1" as CID 7181 codes it: a probability has no unit."""

FINDING_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
"""CID 7150 category for every fVLM finding (they are all abnormal findings of an anatomy)."""

ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")
"""CID 7162 algorithm family."""

PROCEDURES: Mapping[str, hd.sr.CodedConcept] = {
    # SNOMED CT procedure "Computed tomography of chest"; corroborated in public FHIR uses
    # ("CT of chest"), not in PS3.16 — see mappings/README.md.
    "ct-rate": hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest"),
}
"""Procedure Reported (and Performed Procedure Code) by anatomy profile."""

DEFAULT_PROCEDURE = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
"""CID 100 entry used for a profile not in :data:`PROCEDURES`."""


def procedure_for(table: AnatomyTable) -> hd.sr.CodedConcept:
    """The procedure a report of this anatomy profile is about."""
    return PROCEDURES.get(table.profile, DEFAULT_PROCEDURE)


# -- findings in --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportedFinding:
    """One row of the report, whether it came from a :class:`Finding` or from the result JSON."""

    anatomy: str
    finding: str
    code: hd.sr.CodedConcept
    score: float | None
    threshold: float
    status: FindingStatus


def reported_finding(item: Finding | Mapping[str, Any]) -> ReportedFinding:
    """Normalise a :class:`Finding` or its ``as_dict()`` form; :class:`OutputError` when the
    status and score disagree (a score must be a finite probability unless not assessable, and a
    not-assessable finding has none — the SR never carries NaN)."""
    if isinstance(item, Finding):
        row = ReportedFinding(
            anatomy=item.anatomy,
            finding=item.finding,
            code=hd.sr.CodedConcept(item.code_value, item.code_scheme, item.code_meaning),
            score=item.score,
            threshold=float(item.threshold),
            status=item.status,
        )
    else:
        try:
            value, scheme, meaning = item["code"]
            row = ReportedFinding(
                anatomy=str(item["anatomy"]),
                finding=str(item["finding"]),
                code=hd.sr.CodedConcept(str(value), str(scheme), str(meaning)),
                score=None if item["score"] is None else float(item["score"]),
                threshold=float(item["threshold"]),
                status=item["status"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OutputError(f"SR: malformed finding record: {exc}") from exc
    name = f"{row.anatomy}/{row.finding}"
    if row.status not in STATUS_CODES:
        raise OutputError(f"SR: finding {name}: unknown status {row.status!r}")
    if row.status == "not_assessable":
        if row.score is not None:
            raise OutputError(f"SR: finding {name} is not assessable but has a score")
    elif row.score is None or not math.isfinite(row.score) or not 0.0 <= row.score <= 1.0:
        raise OutputError(f"SR: finding {name} is {row.status} without a probability in [0, 1]")
    return row


# -- building -----------------------------------------------------------------------------------
def tracking_uid(study_instance_uid: str, anatomy: str, finding: str) -> str:
    """Tracking Unique Identifier of a finding: the same in every report of one study, so a
    re-run's finding is recognisably the same finding as its predecessor's."""
    return stable_uid("tracking", study_instance_uid, anatomy, finding)


def _algorithm(
    model: ModelInfo, definition: FindingDefinition, threshold: float
) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=ARTIFICIAL_INTELLIGENCE,
        parameters=[
            f"positive prompt: {definition.positive}",
            f"negative prompt: {definition.negative}",
            f"threshold: {threshold:g}",
            f"weights sha256: {model.sha256}",
        ],
    )


def _group(
    row: ReportedFinding,
    definition: FindingDefinition,
    table: AnatomyTable,
    model: ModelInfo,
    study_instance_uid: str,
    series_instance_uid: str,
    seg: SegOutput | None,
) -> (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    anatomy = table.by_name(row.anatomy)
    kwargs: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(study_instance_uid, row.anatomy, row.finding),
            identifier=f"{anatomy_label(anatomy)}/{row.finding}",
        ),
        "finding_category": FINDING_CATEGORY,
        "finding_type": row.code,
        "finding_sites": [hd.sr.FindingSite(anatomic_location=hd_code(anatomy.code))],
        "algorithm_id": _algorithm(model, definition, row.threshold),
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(name=row.code, value=STATUS_CODES[row.status])
        ],
    }
    if row.score is not None:
        kwargs["measurements"] = [
            hd.sr.Measurement(name=PROBABILITY, value=float(row.score), unit=UNIT_ONE)
        ]
    number = seg.segment_numbers.get(row.anatomy) if seg is not None else None
    if seg is None or number is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**kwargs)
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.dataset.SOPClassUID),
        sop_instance_uid=str(seg.dataset.SOPInstanceUID),
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series_instance_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=segment, **kwargs
    )


def _predecessor_dataset(ref: InstanceRef) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.StudyInstanceUID = ref.study_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    return ds


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding | Mapping[str, Any]],
    definitions: Sequence[FindingDefinition],
    table: AnatomyTable,
    model: ModelInfo,
    *,
    seg: SegOutput | None = None,
    predecessor: InstanceRef | None = None,
    installation: str = "",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``findings`` on the CT instances ``sources`` (headers, slice order).

    ``definitions`` give each finding's prompts (algorithm parameters); ``seg`` is the SEG of the
    same run (its segments are referenced and it is listed as evidence); ``predecessor`` is the SR
    this one supersedes (Predecessor Documents Sequence). Every call makes new series and SOP
    Instance UIDs unless given. Raises :class:`OutputError` naming what does not fit.
    """
    if not sources:
        raise OutputError("SR: no source instances")
    sources = with_patient_study_attributes(sources)
    rows = [reported_finding(f) for f in findings]
    if not rows:
        raise OutputError("SR: no findings to report")
    by_name = {d.name: d for d in definitions}
    study_uid = str(sources[0].StudyInstanceUID)
    source_series = str(sources[0].SeriesInstanceUID)
    groups = []
    for row in rows:
        definition = by_name.get(row.finding)
        if definition is None:
            raise OutputError(f"SR: finding {row.finding!r} has no definition (prompts)")
        if row.anatomy not in table.names:
            raise OutputError(
                f"SR: finding {row.finding!r}: anatomy {row.anatomy!r} is not in profile "
                f"{table.profile!r}"
            )
        groups.append(_group(row, definition, table, model, study_uid, source_series, seg))

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model, installation),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    procedure = procedure_for(table)
    evidence: list[Dataset] = list(sources)
    if seg is not None:
        evidence.append(seg.dataset)
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups,
            referenced_images=list(sources),
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            performed_procedure_codes=[procedure],
            previous_versions=[_predecessor_dataset(predecessor)] if predecessor else None,
            manufacturer_model_name=manufacturer_model_name(model),
            software_versions=list(software_versions(model)),
            series_description=SR_SERIES_DESCRIPTION,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"SR: highdicom refused the report: {exc}") from exc
    log.info(
        "study %s: SR with %d measurement group(s)%s",
        study_uid,
        len(groups),
        " superseding a predecessor" if predecessor else "",
    )
    return sr
