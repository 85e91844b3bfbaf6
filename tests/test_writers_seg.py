"""SEG writer: segments, codes and references round-trip through highdicom; dciodvfy accepts it;
the dicom-seg provider ignores our own SEG when it comes back into the spool.

Also holds the small synthetic case the SR, summary and validator tests share.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from fvlm_pacs import __version__
from fvlm_pacs.codes import load_anatomies, load_findings
from fvlm_pacs.domain import Finding, LabelMap, ModelInfo, Volume
from fvlm_pacs.errors import OutputError
from fvlm_pacs.segmentation import SegmentationUnavailable
from fvlm_pacs.segmentation.dicom_seg import DicomSegProvider
from fvlm_pacs.writers import read_source_headers
from fvlm_pacs.writers.equipment import MANUFACTURER, SEG_SERIES_DESCRIPTION
from fvlm_pacs.writers.seg import SEGMENTATION_STORAGE, SegOutput, build_seg
from tests.helpers import require_tool
from tests.test_segmentation import anatomy_segments, boxes, make_study, write_seg

TABLE = load_anatomies("ct-rate")
DEFINITIONS = load_findings(TABLE)
MODEL = ModelInfo(name="tiny", version="0.1", sha256="ab" * 32)


@dataclass(frozen=True)
class Case:
    """A 24-slice CT series on disk, its volume, headers in slice order and an anatomy label map
    with lung and heart (esophagus and aorta absent, so their findings are not assessable)."""

    datasets: list[Dataset]
    volume: Volume
    paths: list[Path]
    sources: list[Dataset]
    labelmap: LabelMap


def make_case(tmp_path: Path, labels: np.ndarray | None = None) -> Case:
    datasets, volume, paths = make_study(tmp_path)
    arr = boxes(TABLE) if labels is None else labels
    labelmap = LabelMap(array=arr, anatomies=TABLE.names, source="dicom-seg")
    return Case(datasets, volume, paths, read_source_headers(paths, volume), labelmap)


def make_findings(model: ModelInfo = MODEL) -> list[Finding]:
    """Every ct-rate finding: lung/heart scored (some present, some absent), others not
    assessable; deterministic."""
    out = []
    for i, d in enumerate(DEFINITIONS):
        if d.anatomy in ("lung", "heart"):
            score: float | None = round(((i * 37) % 100) / 100, 3)
            status = "present" if score >= d.default_threshold else "absent"
        else:
            score, status = None, "not_assessable"
        out.append(
            Finding(
                anatomy=d.anatomy,
                finding=d.name,
                code_value=d.code.value,
                code_scheme=d.code.scheme,
                code_meaning=d.code.meaning,
                score=score,
                threshold=d.default_threshold,
                status=status,  # type: ignore[arg-type]
                model=model,
            )
        )
    return out


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return make_case(tmp_path)


def written_seg(case: Case, path: Path) -> tuple[SegOutput, Path]:
    out = build_seg(case.volume, case.labelmap, case.sources, TABLE, MODEL)
    assert out is not None
    out.dataset.save_as(path, enforce_file_format=True)
    return out, path


def test_seg_round_trip(case: Case, tmp_path: Path) -> None:
    out, path = written_seg(case, tmp_path / "seg.dcm")
    assert dict(out.segment_numbers) == {"lung": 1, "heart": 2}
    seg = hd.seg.segread(path)
    ct = case.datasets[0]
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != ct.SeriesInstanceUID
    assert seg.PatientID == ct.PatientID
    assert (
        seg.SeriesDescription == SEG_SERIES_DESCRIPTION and "AI-generated" in seg.SeriesDescription
    )
    assert seg.Manufacturer == MANUFACTURER
    assert seg.ManufacturerModelName == "fvlm_pacs tiny"
    assert f"fvlm_pacs {__version__}" in seg.SoftwareVersions

    for name, number in out.segment_numbers.items():
        anatomy = TABLE.by_name(name)
        desc = seg.get_segment_description(number)
        assert desc.segment_label == name
        assert desc.segmented_property_type == hd.sr.CodedConcept(
            anatomy.code.value, anatomy.code.scheme, anatomy.code.meaning
        )
        assert desc.segmented_property_category.value == anatomy.segmentation_category.value
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification
        assert algo is not None and algo[0].AlgorithmVersion == "0.1"
        assert algo[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI
        assert "dicom-seg" in algo[0].AlgorithmName and "tiny" in algo[0].AlgorithmName

    # every frame references a CT instance of the series, and the pixels come back per instance
    ct_uids = set(case.volume.source_instances)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID in ct_uids
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(case.volume.source_instances),
        segment_numbers=[1, 2],
        combine_segments=False,
    )
    expected = boxes(TABLE)
    np.testing.assert_array_equal(pixels[..., 0] > 0, expected == TABLE.label_of("lung"))
    np.testing.assert_array_equal(pixels[..., 1] > 0, expected == TABLE.label_of("heart"))


def test_absent_anatomy_gets_no_segment_and_numbers_stay_consecutive(tmp_path: Path) -> None:
    labels = boxes(TABLE)
    labels[labels == TABLE.label_of("lung")] = 0  # heart only
    c = make_case(tmp_path, labels)
    out = build_seg(c.volume, c.labelmap, c.sources, TABLE, MODEL)
    assert out is not None and dict(out.segment_numbers) == {"heart": 1}
    assert [s.SegmentLabel for s in out.dataset.SegmentSequence] == ["heart"]


def test_empty_label_map_gives_no_seg(tmp_path: Path) -> None:
    c = make_case(tmp_path, np.zeros_like(boxes(TABLE)))
    assert build_seg(c.volume, c.labelmap, c.sources, TABLE, MODEL) is None


def test_sources_must_be_the_volume_instances_in_slice_order(case: Case) -> None:
    with pytest.raises(OutputError, match="slice order"):
        build_seg(case.volume, case.labelmap, case.sources[::-1], TABLE, MODEL)


def test_new_uids_per_build(case: Case) -> None:
    a = build_seg(case.volume, case.labelmap, case.sources, TABLE, MODEL)
    b = build_seg(case.volume, case.labelmap, case.sources, TABLE, MODEL)
    assert a is not None and b is not None
    assert a.dataset.SOPInstanceUID != b.dataset.SOPInstanceUID
    assert a.dataset.SeriesInstanceUID != b.dataset.SeriesInstanceUID


def test_dciodvfy_reports_no_error_on_the_seg(case: Case, tmp_path: Path) -> None:
    exe = require_tool("dciodvfy")
    _, path = written_seg(case, tmp_path / "seg.dcm")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []


# -- our own SEG coming back into the spool ------------------------------------------------------
def test_dicom_seg_provider_ignores_our_own_seg(case: Case, tmp_path: Path) -> None:
    _, ours = written_seg(case, tmp_path / "ours.dcm")
    assert pydicom.dcmread(ours, stop_before_pixels=True).Manufacturer == MANUFACTURER
    provider = DicomSegProvider(TABLE)
    with pytest.raises(SegmentationUnavailable, match="written by fvlm_pacs itself"):
        provider.segment(case.volume, [*case.paths, ours])


def test_dicom_seg_provider_uses_the_site_seg_next_to_ours(case: Case, tmp_path: Path) -> None:
    """Ours is newer and holds only the heart: were it used, the lung would be missing."""
    heart_only = boxes(TABLE)
    heart_only[heart_only == TABLE.label_of("lung")] = 0
    site = write_seg(
        case.datasets,
        case.volume,
        boxes(TABLE),
        anatomy_segments(TABLE),
        tmp_path / "site.dcm",
        content_time="080000",
    )
    ours_case = Case(
        case.datasets,
        case.volume,
        case.paths,
        case.sources,
        LabelMap(heart_only, TABLE.names, "dicom-seg"),
    )
    out, ours = written_seg(ours_case, tmp_path / "ours.dcm")
    out.dataset.ContentTime = "235959"
    out.dataset.save_as(ours, enforce_file_format=True)
    result = DicomSegProvider(TABLE).segment(case.volume, [*case.paths, ours, site])
    np.testing.assert_array_equal(result.array, boxes(TABLE))
