"""TID 1500 SR writer: a write → read round trip with highdicom asserts every checklist item;
dciodvfy accepts the document; re-runs get new UIDs and name their predecessor."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from fvlm_pacs import __version__
from fvlm_pacs.domain import Finding, InstanceRef
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers.equipment import MANUFACTURER, SR_SERIES_DESCRIPTION, device_observer_uid
from fvlm_pacs.writers.seg import SegOutput, build_seg
from fvlm_pacs.writers.sr import (
    ABSENT,
    COMPREHENSIVE_3D_SR_STORAGE,
    PRESENT,
    PROBABILITY,
    UNDETERMINED,
    UNIT_ONE,
    build_sr,
)
from tests.helpers import require_tool
from tests.test_writers_seg import DEFINITIONS, MODEL, TABLE, Case, make_case, make_findings


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return make_case(tmp_path)


@pytest.fixture
def seg(case: Case, tmp_path: Path) -> SegOutput:
    out = build_seg(case.volume, case.labelmap, case.sources, TABLE, MODEL)
    assert out is not None
    out.dataset.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    return out


def write_sr(case: Case, seg: SegOutput | None, path: Path, **kwargs) -> hd.sr.Comprehensive3DSR:
    sr = build_sr(case.sources, make_findings(), DEFINITIONS, TABLE, MODEL, seg=seg, **kwargs)
    sr.save_as(path, enforce_file_format=True)
    return hd.sr.srread(path)


def groups_by_tracking_id(sr: hd.sr.Comprehensive3DSR) -> dict[str, object]:
    report = sr.content
    groups = [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]
    return {g.tracking_identifier: g for g in groups}


def test_header_meets_the_checklist(case: Case, seg: SegOutput, tmp_path: Path) -> None:
    sr = write_sr(case, seg, tmp_path / "sr.dcm")
    ct = case.datasets[0]
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE and sr.Modality == "SR"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PerformedProcedureCodeSequence[0].CodeValue == "169069000"
    assert "ReferencedPerformedProcedureStepSequence" in sr
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (ct.SeriesInstanceUID, seg.dataset.SeriesInstanceUID)
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyDate", "StudyID"):
        assert sr.get(keyword) == ct.get(keyword), keyword
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert sr.Manufacturer == MANUFACTURER and sr.ManufacturerModelName == "fvlm_pacs tiny"
    assert f"fvlm_pacs {__version__}" in sr.SoftwareVersions
    assert "PredecessorDocumentsSequence" not in sr

    # the evidence lists every CT instance and the SEG
    evidence = {sop for _, _, sop, _ in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {*case.volume.source_instances, seg.dataset.SOPInstanceUID}


def test_observer_procedure_and_image_library(case: Case, seg: SegOutput, tmp_path: Path) -> None:
    sr = write_sr(case, seg, tmp_path / "sr.dcm")
    report = sr.content
    [device] = report.get_observer_contexts(observer_type=codes.cid270.Device)
    attrs = device.observer_identifying_attributes
    assert attrs.uid == device_observer_uid(MODEL)
    assert attrs.name == MANUFACTURER and attrs.manufacturer_name == MANUFACTURER
    assert attrs.model_name == "tiny 0.1"
    root = sr.ContentSequence
    [procedure] = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "169069000"
    [library] = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    listed = {
        img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library.ContentSequence
        for img in group.ContentSequence
        if img.ValueType == "IMAGE"
    }
    assert listed == set(case.volume.source_instances)


def test_one_group_per_finding_with_codes_scores_and_segments(
    case: Case, seg: SegOutput, tmp_path: Path
) -> None:
    sr = write_sr(case, seg, tmp_path / "sr.dcm")
    groups = groups_by_tracking_id(sr)
    findings = make_findings()
    assert len(groups) == len(findings) == 16
    tracking_uids = set()
    for f in findings:
        g = groups[f"{f.anatomy}/{f.finding}"]
        tracking_uids.add(g.tracking_uid)
        anatomy = TABLE.by_name(f.anatomy)
        assert g.finding_type == hd.sr.CodedConcept(f.code_value, f.code_scheme, f.code_meaning)
        assert g.finding_category.value == "49755003"
        [site] = g.finding_sites
        assert (site.value.value, site.value.scheme_designator) == (anatomy.code.value, "SCT")
        assert site.RelationshipType == "HAS CONCEPT MOD"

        algo = {
            (i.ConceptNameCodeSequence[0].CodeValue, str(i.get("TextValue", "")))
            for i in g[0].ContentSequence
            if i.ValueType == "TEXT"
        }
        definition = next(d for d in DEFINITIONS if d.name == f.finding)
        assert ("111001", "tiny") in algo and ("111003", "0.1") in algo
        assert ("111002", f"positive prompt: {definition.positive}") in algo
        assert ("111002", f"negative prompt: {definition.negative}") in algo
        assert ("111002", f"threshold: {f.threshold:g}") in algo
        [family] = [
            i for i in g[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111000"
        ]
        assert family.ConceptCodeSequence[0].CodeValue == "123110"

        [evaluation] = g.get_qualitative_evaluations(name=g.finding_type)
        expected = {"present": PRESENT, "absent": ABSENT, "not_assessable": UNDETERMINED}
        assert evaluation.value == expected[f.status]
        measurements = g.get_measurements()
        if f.status == "not_assessable":
            assert measurements == []  # never a NaN, never a 0
        else:
            [m] = measurements
            assert m.name == PROBABILITY and m.unit == UNIT_ONE
            assert math.isclose(m.value, f.score)

        if f.anatomy in seg.segment_numbers:
            ref = g.referenced_segment
            assert ref is not None
            assert ref.referenced_sop_instance_uid == seg.dataset.SOPInstanceUID
            number = ref.referenced_segment_numbers[0]
            assert number == seg.segment_numbers[f.anatomy]
            segment = seg.dataset.get_segment_description(number)
            assert segment.segmented_property_type.value == anatomy.code.value
            assert segment.segment_label == f.anatomy
            assert ref.source_series_for_segmentation.value == case.volume.series_instance_uid
        else:  # esophagus / aorta: no segment, so a TID 1501 group without a region
            assert isinstance(g, hd.sr.MeasurementsAndQualitativeEvaluations)
    assert len(tracking_uids) == 16


def test_without_seg_no_segment_references(case: Case, tmp_path: Path) -> None:
    sr = write_sr(case, None, tmp_path / "sr.dcm")
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert len(sr.content.get_image_measurement_groups()) == 16
    evidence = {sop for _, _, sop, _ in sr.get_evidence()}
    assert evidence == set(case.volume.source_instances)


def test_result_json_records_give_the_same_report(
    case: Case, seg: SegOutput, tmp_path: Path
) -> None:
    from_objects = write_sr(case, seg, tmp_path / "a.dcm")
    records = [f.as_dict() for f in make_findings()]
    build_sr(case.sources, records, DEFINITIONS, TABLE, MODEL, seg=seg).save_as(tmp_path / "b.dcm")
    from_dicts = hd.sr.srread(tmp_path / "b.dcm")

    def content(sr: hd.sr.Comprehensive3DSR) -> list[tuple[str, object]]:
        out = []
        for g in sr.content.get_volumetric_roi_measurement_groups():
            out.append((g.tracking_identifier, [m.value for m in g.get_measurements()]))
        return out

    assert content(from_objects) == content(from_dicts)


def test_rerun_names_its_predecessor_with_new_uids(
    case: Case, seg: SegOutput, tmp_path: Path
) -> None:
    first = write_sr(case, seg, tmp_path / "first.dcm")
    ref = InstanceRef(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        sop_instance_uid=first.SOPInstanceUID,
        sop_class_uid=first.SOPClassUID,
    )
    second = write_sr(case, seg, tmp_path / "second.dcm", predecessor=ref)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID != first.SeriesInstanceUID
    [study] = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    # the same finding keeps its Tracking Unique Identifier across re-runs
    a, b = groups_by_tracking_id(first), groups_by_tracking_id(second)
    assert {k: g.tracking_uid for k, g in a.items()} == {k: g.tracking_uid for k, g in b.items()}


@pytest.mark.parametrize(
    ("score", "status"),
    [(float("nan"), "present"), (None, "absent"), (1.5, "present"), (0.3, "not_assessable")],
    ids=["nan", "assessed-without-score", "out-of-range", "not-assessable-with-score"],
)
def test_inconsistent_findings_are_refused(case: Case, score, status) -> None:
    findings = make_findings()
    f = findings[0]
    findings[0] = Finding(
        f.anatomy, f.finding, f.code_value, f.code_scheme, f.code_meaning, score, f.threshold,
        status, f.model,
    )  # fmt: skip
    with pytest.raises(OutputError, match=f.finding):
        build_sr(case.sources, findings, DEFINITIONS, TABLE, MODEL)


def test_finding_without_definition_is_refused(case: Case) -> None:
    with pytest.raises(OutputError, match="no definition"):
        build_sr(case.sources, make_findings(), DEFINITIONS[1:], TABLE, MODEL)


def test_dciodvfy_reports_no_error_on_the_sr(case: Case, seg: SegOutput, tmp_path: Path) -> None:
    exe = require_tool("dciodvfy")
    write_sr(case, seg, tmp_path / "sr.dcm")
    proc = subprocess.run(
        [exe, str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=120
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
