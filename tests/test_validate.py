"""The AI-result validator: valid objects pass every named check; each check fails on an object
broken on purpose; dciodvfy errors count; ``fvlm-pacs validate`` exit codes; ``write_outputs``
refuses (and leaves nothing behind) when a check fails."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from fvlm_pacs.cli import main
from fvlm_pacs.domain import Finding
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers import OutputObject, write_outputs
from fvlm_pacs.writers.seg import build_seg
from fvlm_pacs.writers.sr import build_sr, reported_finding
from fvlm_pacs.writers.summary import build_summary
from fvlm_pacs.writers.validate import (
    CHECKS,
    Context,
    check_dataset,
    check_names,
    redact,
    run_dciodvfy,
)
from tests.helpers import require_tool
from tests.test_segmentation import boxes
from tests.test_writers_seg import DEFINITIONS, MODEL, TABLE, Case, make_case, make_findings


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """SEG, SR and SC of one case, written and read back as plain datasets."""
    root = tmp_path_factory.mktemp("validate")
    case = make_case(root)
    seg = build_seg(case.volume, case.labelmap, case.sources, TABLE, MODEL)
    assert seg is not None
    sr = build_sr(case.sources, make_findings(), DEFINITIONS, TABLE, MODEL, seg=seg)
    rows = [reported_finding(f) for f in make_findings()]
    sc, _ = build_summary(case.volume, case.labelmap, case.sources, TABLE, rows, MODEL)
    out: dict[str, object] = {"case": case, "root": root}
    for kind, ds in (("seg", seg.dataset), ("sr", sr), ("sc", sc)):
        path = root / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[f"{kind}_path"] = path
        out[kind] = pydicom.dcmread(path)
    return out


def context(built: dict[str, object]) -> Context:
    case = built["case"]
    assert isinstance(case, Case)
    seg = built["seg"]
    assert isinstance(seg, Dataset)
    return Context(sources=tuple(case.sources), seg=seg)


@pytest.mark.parametrize("kind", ["sr", "seg", "sc"])
def test_our_objects_pass_every_check(built: dict[str, object], kind: str) -> None:
    ds = built[kind]
    assert isinstance(ds, Dataset)
    assert check_dataset(ds, context(built)) == []
    assert check_dataset(ds) == []  # without context: what the object alone shows


# -- content tree surgery ----------------------------------------------------------------------
def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _drop(parent: Dataset, code: str) -> None:
    parent.ContentSequence = [c for c in parent.ContentSequence if _code(c) != code]


def _one(parent: Dataset, code: str) -> Dataset:
    return next(c for c in parent.ContentSequence if _code(c) == code)


def _groups(ds: Dataset) -> list[Dataset]:
    return list(_one(ds, "126010").ContentSequence)


def _status(group: Dataset) -> str:
    values = {"52101004": "present", "272519000": "absent", "373068000": "not_assessable"}
    for c in group.ContentSequence:
        if c.ValueType == "CODE" and c.ConceptCodeSequence[0].CodeValue in values:
            return values[c.ConceptCodeSequence[0].CodeValue]
    return "?"


def _group(ds: Dataset, status: str | None = None, segmented: bool | None = None) -> Dataset:
    for g in _groups(ds):
        has_segment = any(_code(c) == "121191" for c in g.ContentSequence)
        if (status is None or _status(g) == status) and (
            segmented is None or has_segment == segmented
        ):
            return g
    raise AssertionError("no such group")


def _num(group: Dataset) -> Dataset:
    return next(c for c in group.ContentSequence if c.ValueType == "NUM")


def _set_num(ds: Dataset, value: float) -> None:
    measured = _num(_group(ds, "present")).MeasuredValueSequence[0]
    measured.NumericValue = value if value == value else "0"
    measured.FloatingPointValue = value


def _add_qualitative_container_with_num(ds: Dataset) -> None:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "CONTAINER"
    item.ContinuityOfContent = "SEPARATE"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator = "C0034375", "UMLS"
    name.CodeMeaning = "Qualitative Evaluations"
    item.ConceptNameCodeSequence = [name]
    item.ContentSequence = [copy.deepcopy(_num(_group(ds, "present")))]
    ds.ContentSequence.append(item)


def _add_num_to_not_assessable(ds: Dataset) -> None:
    num = copy.deepcopy(_num(_group(ds, "present")))
    _group(ds, "not_assessable").ContentSequence.append(num)


def _drop_seg_from_evidence(ds: Dataset, seg_series: str) -> None:
    for study in ds.CurrentRequestedProcedureEvidenceSequence:
        study.ReferencedSeriesSequence = [
            s for s in study.ReferencedSeriesSequence if s.SeriesInstanceUID != seg_series
        ]


def _self_predecessor(ds: Dataset) -> None:
    inst = Dataset()
    inst.ReferencedSOPClassUID = ds.SOPClassUID
    inst.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedSOPSequence = [inst]
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    ds.PredecessorDocumentsSequence = [study]


def _duplicate_segment_code(ds: Dataset) -> None:
    segs = ds.SegmentSequence
    segs[1].SegmentedPropertyTypeCodeSequence = copy.deepcopy(
        segs[0].SegmentedPropertyTypeCodeSequence
    )


Breaker = Callable[[Dataset, dict[str, object]], None]


def _src(built: dict[str, object]) -> Dataset:
    case = built["case"]
    assert isinstance(case, Case)
    return case.sources[0]


BREAKERS: dict[str, Breaker] = {
    # SR header
    "sr.sop_class": lambda ds, b: setattr(ds, "Modality", "OT"),
    "sr.content_template": lambda ds, b: setattr(
        ds.ContentTemplateSequence[0], "TemplateIdentifier", "2000"
    ),
    "sr.document_title": lambda ds, b: setattr(
        ds.ConceptNameCodeSequence[0], "CodeValue", "999999"
    ),
    "sr.completion_flag": lambda ds, b: setattr(ds, "CompletionFlag", "PARTIAL"),
    "sr.verification_flag": lambda ds, b: setattr(ds, "VerificationFlag", "VERIFIED"),
    "sr.performed_procedure_code": lambda ds, b: setattr(ds, "PerformedProcedureCodeSequence", []),
    "sr.referenced_pps_present": lambda ds, b: delattr(
        ds, "ReferencedPerformedProcedureStepSequence"
    ),
    "sr.evidence_lists_all_references": lambda ds, b: _drop_seg_from_evidence(
        ds,
        b["seg"].SeriesInstanceUID,  # type: ignore[attr-defined]
    ),
    "sr.same_study": lambda ds, b: setattr(ds, "StudyInstanceUID", generate_uid()),
    "sr.new_series": lambda ds, b: setattr(ds, "SeriesInstanceUID", _src(b).SeriesInstanceUID),
    "sr.patient_copied": lambda ds, b: setattr(ds, "PatientID", "SOMEONE_ELSE"),
    "sr.equipment": lambda ds, b: delattr(ds, "ManufacturerModelName"),
    "sr.series_description_ai": lambda ds, b: setattr(ds, "SeriesDescription", "Findings"),
    # SR content
    "sr.language": lambda ds, b: _drop(ds, "121049"),
    "sr.observer_device": lambda ds, b: _drop(ds, "121012"),
    "sr.procedure_reported": lambda ds, b: _drop(ds, "121058"),
    "sr.image_library": lambda ds, b: _drop(ds, "111028"),
    "sr.measurement_groups": lambda ds, b: setattr(_one(ds, "126010"), "ContentSequence", []),
    "sr.group_tracking": lambda ds, b: _drop(_groups(ds)[0], "112040"),
    "sr.group_finding_category": lambda ds, b: _drop(_groups(ds)[0], "276214006"),
    "sr.group_finding": lambda ds, b: _drop(_groups(ds)[0], "121071"),
    "sr.group_finding_site": lambda ds, b: setattr(
        _one(_groups(ds)[0], "363698007"), "RelationshipType", "CONTAINS"
    ),
    "sr.group_algorithm": lambda ds, b: setattr(
        _one(_groups(ds)[0], "111000").ConceptCodeSequence[0], "CodeValue", "123109"
    ),
    "sr.group_qualitative_evaluation": lambda ds, b: setattr(
        next(
            c.ConceptCodeSequence[0]
            for c in _group(ds, "absent").ContentSequence
            if c.ValueType == "CODE" and c.ConceptCodeSequence[0].CodeValue == "272519000"
        ),
        "CodeValue",
        "99999",
    ),
    "sr.num_unit_ucum_one": lambda ds, b: setattr(
        _num(_group(ds, "present")).MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0],
        "CodeValue",
        "%",
    ),
    "sr.num_finite_probability": lambda ds, b: _set_num(ds, float("nan")),
    "sr.not_assessable_has_no_num": lambda ds, b: _add_num_to_not_assessable(ds),
    "sr.assessed_has_score": lambda ds, b: setattr(
        _group(ds, "absent"),
        "ContentSequence",
        [c for c in _group(ds, "absent").ContentSequence if c.ValueType != "NUM"],
    ),
    "sr.no_num_in_qualitative_container": lambda ds, b: _add_qualitative_container_with_num(ds),
    "sr.referenced_segment": lambda ds, b: setattr(
        _one(_group(ds, segmented=True), "121191").ReferencedSOPSequence[0],
        "ReferencedSegmentNumber",
        99,
    ),
    "sr.segment_reference_when_seg_exists": lambda ds, b: [
        _drop(_group(ds, segmented=True), code) for code in ("121191", "121232")
    ],
    "sr.predecessor_not_self": lambda ds, b: _self_predecessor(ds),
    # SEG
    "seg.sop_class": lambda ds, b: setattr(ds, "Modality", "OT"),
    "seg.segmentation_type": lambda ds, b: setattr(ds, "SegmentationType", "FRACTIONAL"),
    "seg.same_study": lambda ds, b: setattr(ds, "StudyInstanceUID", generate_uid()),
    "seg.patient_copied": lambda ds, b: setattr(ds, "PatientID", "SOMEONE_ELSE"),
    "seg.frame_of_reference_matches_source": lambda ds, b: setattr(
        ds, "FrameOfReferenceUID", generate_uid()
    ),
    "seg.new_series": lambda ds, b: setattr(ds, "SeriesInstanceUID", _src(b).SeriesInstanceUID),
    "seg.per_frame_source_references": lambda ds, b: delattr(
        ds.PerFrameFunctionalGroupsSequence[0], "DerivationImageSequence"
    ),
    "seg.referenced_series": lambda ds, b: setattr(
        ds.ReferencedSeriesSequence[0],
        "ReferencedInstanceSequence",
        ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[:1],
    ),
    "seg.segment_algorithm": lambda ds, b: setattr(
        ds.SegmentSequence[0], "SegmentAlgorithmType", "MANUAL"
    ),
    "seg.segment_codes": lambda ds, b: setattr(
        ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0],
        "CodingSchemeDesignator",
        "99X",
    ),
    "seg.one_segment_per_anatomy": lambda ds, b: _duplicate_segment_code(ds),
    "seg.segment_labels": lambda ds, b: setattr(
        ds.SegmentSequence[1], "SegmentLabel", ds.SegmentSequence[0].SegmentLabel
    ),
    "seg.equipment": lambda ds, b: delattr(ds, "SoftwareVersions"),
    "seg.series_description_ai": lambda ds, b: setattr(ds, "SeriesDescription", "Anatomy"),
    # SC
    "sc.sop_class": lambda ds, b: setattr(ds, "SOPClassUID", CTImageStorage),
    "sc.same_study": lambda ds, b: setattr(ds, "StudyInstanceUID", generate_uid()),
    "sc.patient_copied": lambda ds, b: setattr(ds, "PatientID", "SOMEONE_ELSE"),
    "sc.new_series": lambda ds, b: setattr(ds, "SeriesInstanceUID", _src(b).SeriesInstanceUID),
    "sc.source_images": lambda ds, b: delattr(ds, "SourceImageSequence"),
    "sc.burned_in_annotation": lambda ds, b: delattr(ds, "BurnedInAnnotation"),
    "sc.equipment": lambda ds, b: setattr(ds, "Manufacturer", ""),
    "sc.series_description_ai": lambda ds, b: setattr(ds, "SeriesDescription", "Summary"),
}


def test_every_check_has_a_breaker() -> None:
    assert set(BREAKERS) == set(check_names())
    assert len({c.name for c in CHECKS}) == len(CHECKS)


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_each_check_fails_on_an_object_broken_on_purpose(
    built: dict[str, object], name: str
) -> None:
    kind = name.split(".")[0]
    ds = copy.deepcopy(built[kind])
    assert isinstance(ds, Dataset)
    BREAKERS[name](ds, built)
    issues = check_dataset(ds, context(built), kind=kind)  # type: ignore[arg-type]
    failed = {i.check for i in issues if i.severity == "error"}
    assert name in failed, issues
    # it failed by finding the problem, not by crashing on the broken object
    assert not any("could not be checked" in i.message for i in issues if i.check == name)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.5, -0.1])
def test_a_score_that_is_no_probability_fails(built: dict[str, object], value: float) -> None:
    ds = copy.deepcopy(built["sr"])
    assert isinstance(ds, Dataset)
    _set_num(ds, value)
    assert "sr.num_finite_probability" in {i.check for i in check_dataset(ds)}


def test_a_crashing_check_counts_as_failed(built: dict[str, object]) -> None:
    ds = copy.deepcopy(built["seg"])
    assert isinstance(ds, Dataset)
    ds.SegmentSequence[0].SegmentNumber = "x"  # int() raises inside the check
    issues = check_dataset(ds)
    assert any("could not be checked" in i.message for i in issues)


def test_unknown_object_is_an_error() -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    assert [i.check for i in check_dataset(ds)] == ["object.sop_class"]


# -- dciodvfy ----------------------------------------------------------------------------------
def test_dciodvfy_errors_are_counted(built: dict[str, object], tmp_path: Path) -> None:
    require_tool("dciodvfy")
    path = built["sr_path"]
    assert isinstance(path, Path)
    assert [i for i in run_dciodvfy(path) if i.severity == "error"] == []
    ds = pydicom.dcmread(path)
    del ds.CompletionFlag
    ds.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    errors = [i for i in run_dciodvfy(tmp_path / "broken.dcm") if i.severity == "error"]
    assert errors and all(i.check == "dicom.dciodvfy" for i in errors)
    assert any("CompletionFlag" in i.message for i in errors)


def test_dciodvfy_values_are_redacted_for_logs() -> None:
    line = "Error - Bad value <Doe^Jane> in Element=<PatientName> Module=<Patient>"
    assert redact(line) == "Error - Bad value <…> in Element=<PatientName> Module=<Patient>"


# -- fvlm-pacs validate ------------------------------------------------------------------------
def test_cli_validate_ok(built: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(built[f"{k}_path"]) for k in ("sr", "seg", "sc")]
    case = built["case"]
    assert isinstance(case, Case)
    sources = str(case.paths[0].parent)
    assert main(["validate", *files, "--sources", sources]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK (") == 3 and "FAILED" not in out


def test_cli_validate_fails_on_a_broken_file(
    built: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built["sr_path"]
    assert isinstance(path, Path)
    ds = pydicom.dcmread(path)
    ds.CompletionFlag = "PARTIAL"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert main(["validate", str(tmp_path / "sr.dcm"), str(built["seg_path"])]) == 1
    out = capsys.readouterr().out
    assert "sr.completion_flag" in out and "FAILED" in out


def test_cli_validate_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    assert main(["validate", str(junk), "--no-dciodvfy"]) == 1
    assert "object." in capsys.readouterr().out


# -- write_outputs refuses invalid objects ------------------------------------------------------
def _write(
    case: Case, out: Path, findings: list[Finding] | None = None, **options: Any
) -> list[OutputObject]:
    """``write_outputs`` for a test case, with the test model, anatomy and findings tables."""
    findings = make_findings() if findings is None else findings
    return write_outputs(
        case.volume, case.labelmap, findings, case.paths, MODEL, TABLE, DEFINITIONS, out, **options
    )


def test_write_outputs_refuses_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = make_case(tmp_path / "study")
    monkeypatch.setattr("fvlm_pacs.writers.sr.SR_SERIES_DESCRIPTION", "Findings")
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="sr.series_description_ai") as info:
        _write(case, out, dciodvfy=False)
    assert info.value.detail and info.value.detail["validation"]
    assert list(out.iterdir()) == []


def test_write_outputs_paths_are_relative_to_the_root(tmp_path: Path) -> None:
    case = make_case(tmp_path / "study")
    root = tmp_path / "outputs"
    outputs = _write(case, root / "1.2.3" / "job-7", outputs_root=root)
    assert [o.kind for o in outputs] == ["seg", "sr", "summary", "summary-png"]
    for o in outputs:
        assert not o.path.is_absolute() and o.path.parts[:2] == ("1.2.3", "job-7")
        assert (root / o.path).is_file()
    assert sorted(p.name for p in (root / "1.2.3" / "job-7").iterdir()) == [
        "seg.dcm",
        "sr.dcm",
        "summary.dcm",
        "summary.png",
    ]


def test_write_outputs_without_any_anatomy_writes_no_seg(tmp_path: Path) -> None:
    case = make_case(tmp_path / "study", np.zeros_like(boxes(TABLE)))
    not_assessable = [replace(f, score=None, status="not_assessable") for f in make_findings()]
    outputs = _write(case, tmp_path / "out", not_assessable)
    assert [o.kind for o in outputs] == ["sr", "summary", "summary-png"]
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    assert check_dataset(sr, Context(sources=tuple(case.sources))) == []
    assert "NUM" not in {i.ValueType for g in _groups(sr) for i in g.ContentSequence}


def test_sources_without_type2_patient_attributes_still_work(tmp_path: Path) -> None:
    """De-identified CTs sometimes drop Type 2 attributes; the outputs carry them empty."""
    case = make_case(tmp_path / "study")
    for path in case.paths:
        ds = pydicom.dcmread(path)
        for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"):
            delattr(ds, keyword)
        ds.save_as(path)
    outputs = _write(case, tmp_path / "out")
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    assert [o.kind for o in outputs] == ["seg", "sr", "summary", "summary-png"]
    assert "PatientBirthDate" in sr and not sr.PatientBirthDate
