"""Summary Secondary Capture: key slices, determinism, header, dciodvfy."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fvlm_pacs.writers.equipment import MANUFACTURER, SC_SERIES_DESCRIPTION
from fvlm_pacs.writers.seg import display_rgb
from fvlm_pacs.writers.sr import ReportedFinding, reported_finding
from fvlm_pacs.writers.summary import (
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    build_summary,
    key_slices,
    render_summary,
)
from tests.helpers import require_tool
from tests.test_segmentation import boxes
from tests.test_writers_seg import MODEL, TABLE, Case, make_case, make_findings


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return make_case(tmp_path)


def rows(*, none_present: bool = False) -> list[ReportedFinding]:
    out = [reported_finding(f) for f in make_findings()]
    if none_present:
        out = [replace(r, status="absent") if r.status == "present" else r for r in out]
    return out


def test_key_slice_is_the_largest_area_of_each_flagged_anatomy(case: Case) -> None:
    keys = key_slices(case.labelmap, TABLE, rows())
    labels = boxes(TABLE)
    flagged = {r.anatomy for r in rows() if r.status == "present"}
    assert [k.anatomy for k in keys] == [a for a in TABLE.names if a in flagged]
    for k in keys:
        area = (labels == TABLE.label_of(k.anatomy)).sum(axis=(1, 2))
        assert k.index == int(np.argmax(area))
        assert all(
            r.finding in k.caption
            for r in rows()
            if r.anatomy == k.anatomy and r.status == "present"
        )


def test_no_finding_present_shows_the_middle_slice(case: Case) -> None:
    keys = key_slices(case.labelmap, TABLE, rows(none_present=True))
    assert [(k.index, k.anatomy) for k in keys] == [(case.volume.array.shape[0] // 2, None)]


def test_rendering_is_deterministic_and_outlines_in_the_seg_colour(case: Case) -> None:
    a, keys = render_summary(case.volume, case.labelmap, TABLE, rows(), MODEL)
    b, _ = render_summary(case.volume, case.labelmap, TABLE, rows(), MODEL)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)
    for k in keys:
        colour = np.array(display_rgb(TABLE.by_name(k.anatomy)), dtype=np.uint8)
        assert np.all(a == colour, axis=-1).sum() > 20  # the outline (and its caption) is drawn


def test_secondary_capture_header(case: Case, tmp_path: Path) -> None:
    sc, rgb = build_summary(case.volume, case.labelmap, case.sources, TABLE, rows(), MODEL)
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "sc.dcm")
    ct = case.datasets[0]
    assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert ds.SeriesDescription == SC_SERIES_DESCRIPTION and ds.Manufacturer == MANUFACTURER
    assert ds.BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(ds.pixel_array, rgb)
    shown = {i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence}
    keys = key_slices(case.labelmap, TABLE, rows())
    assert shown == {case.volume.source_instances[k.index] for k in keys}


def test_dciodvfy_reports_no_error_on_the_summary(case: Case, tmp_path: Path) -> None:
    exe = require_tool("dciodvfy")
    sc, _ = build_summary(case.volume, case.labelmap, case.sources, TABLE, rows(), MODEL)
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    proc = subprocess.run(
        [exe, str(tmp_path / "sc.dcm")], capture_output=True, text=True, timeout=120
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
