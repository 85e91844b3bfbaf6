"""Series selection and volume assembly on synthetic CT (fvlm_pacs.synthetic)."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from fvlm_pacs.codes import SeriesRules, load_series_rules
from fvlm_pacs.domain import Volume
from fvlm_pacs.errors import GeometryError, NoUsableSeries
from fvlm_pacs.studies.assembly import assemble_series, assemble_study, choose_series
from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@pytest.fixture(scope="module")
def rules() -> SeriesRules:
    return load_series_rules(
        Path(__file__).resolve().parent.parent / "mappings" / "series_rules.yaml"
    )


def ramp(k: int, rows: int, cols: int) -> np.ndarray:
    """Even HU values, different in every slice and pixel: any reordering or flip shows up, and
    slope 2 / intercept −1024 represents them exactly."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (-1000 + 2 * ((k * 53 + yy * 7 + xx) % 1000)).astype(float)


def rotated_orientation(
    z_deg: float, x_deg: float
) -> tuple[float, float, float, float, float, float]:
    """Row/column cosines of Rz(z_deg)·Rx(x_deg): the slice normal is x_deg away from the z axis."""
    cz, sz = math.cos(math.radians(z_deg)), math.sin(math.radians(z_deg))
    cx, sx = math.cos(math.radians(x_deg)), math.sin(math.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r = rz @ rx
    row, col = r[:, 0], r[:, 1]
    return (row[0], row[1], row[2], col[0], col[1], col[2])


def series(study: str | None = None, **spec: object) -> list[Dataset]:
    return ct_series(SeriesSpec(**spec), study_instance_uid=study, hu=ramp)  # type: ignore[arg-type]


def dicom_position(ds: Dataset, r: int, c: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1: centre of pixel (r, c) of one slice in patient coordinates."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    ps = [float(v) for v in ds.PixelSpacing]
    return ipp + r * ps[0] * iop[3:] + c * ps[1] * iop[:3]


def assert_volume_matches_dicom(volume: Volume, datasets: Sequence[Dataset]) -> None:
    """Voxel (k, r, c) sits where DICOM says slice k's pixel (r, c) is, and holds its HU."""
    by_sop = {ds.SOPInstanceUID: ds for ds in datasets}
    n, rows, cols = volume.array.shape
    for k in (0, 1, n // 2, n - 1):
        ds = by_sop[volume.source_instances[k]]
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for r, c in ((0, 0), (3, 7), (rows - 1, 0), (rows - 1, cols - 1)):
            mapped = (volume.affine @ np.array([k, r, c, 1.0]))[:3]
            np.testing.assert_allclose(mapped, dicom_position(ds, r, c), atol=1e-3)
            assert volume.array[k, r, c] == hu[r, c]


# --- choosing the series --------------------------------------------------------------------


def test_choose_axial_over_localizer_thick_and_five_mm(rules: SeriesRules) -> None:
    study = generate_uid()
    thin = series(study, n_slices=40, slice_thickness=1.0, slice_spacing=1.0)
    scout = series(
        study,
        n_slices=2,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        orientation=CORONAL,
        series_description="Topogram 0.6 T20s",
    )
    thick = series(
        study, n_slices=30, slice_thickness=8.0, slice_spacing=8.0, series_description="Chest 8 mm"
    )
    five = series(
        study, n_slices=25, slice_thickness=5.0, slice_spacing=5.0, series_description="Chest 5 mm"
    )
    headers = thin + scout + thick + five
    random.Random(1).shuffle(headers)

    choice = choose_series(headers, rules)

    uid = {
        name: s[0].SeriesInstanceUID
        for name, s in {"thin": thin, "scout": scout, "thick": thick, "five": five}.items()
    }
    assert choice.chosen_series_uid == uid["thin"]
    assert choice.ranking == [uid["thin"], uid["five"]]
    assert set(choice.reasons) == set(uid.values())
    assert choice.reasons[uid["thin"]][0] == "accepted"
    assert choice.reasons[uid["five"]][0] == "accepted"
    assert choice.reasons[uid["five"]][1].startswith("rank 2 of 2")
    assert choice.reasons[uid["thick"]] == ["rejected: SliceThickness 8.0 outside 0.5–5.0 mm"]
    assert "rejected: ImageType contains LOCALIZER" in choice.reasons[uid["scout"]]
    assert "rejected: orientation 90.0° from axial (max 10°)" in choice.reasons[uid["scout"]]
    assert "rejected: 2 instances, fewer than 20" in choice.reasons[uid["scout"]]


def test_equal_instances_prefers_thinner(rules: SeriesRules) -> None:
    study = generate_uid()
    a = series(study, n_slices=40, slice_thickness=1.25, slice_spacing=1.25)
    b = series(study, n_slices=40, slice_thickness=1.0, slice_spacing=1.0)
    choice = choose_series(a + b, rules)
    assert choice.ranking == [b[0].SeriesInstanceUID, a[0].SeriesInstanceUID]


def test_tilt_within_limit_accepted_beyond_rejected(rules: SeriesRules) -> None:
    ok = series(orientation=rotated_orientation(20, 8))
    too_much = series(orientation=rotated_orientation(0, 12))
    choice = choose_series(ok + too_much, rules)
    assert choice.chosen_series_uid == ok[0].SeriesInstanceUID
    assert choice.reasons[too_much[0].SeriesInstanceUID] == [
        "rejected: orientation 12.0° from axial (max 10°)"
    ]


def test_enhanced_ct_is_rejected_with_a_clear_reason(rules: SeriesRules) -> None:
    enhanced = Dataset()
    enhanced.SOPClassUID = EnhancedCTImageStorage
    enhanced.SOPInstanceUID = generate_uid()
    enhanced.SeriesInstanceUID = generate_uid()
    enhanced.Modality = "CT"
    enhanced.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    enhanced.NumberOfFrames = 200
    choice = choose_series([enhanced], rules)
    assert choice.chosen_series_uid is None
    [reason] = choice.reasons[enhanced.SeriesInstanceUID]
    assert reason.startswith("rejected: multi-frame Enhanced CT not supported yet")
    with pytest.raises(GeometryError, match="multi-frame Enhanced CT not supported yet"):
        assemble_series([enhanced])


# --- slice order ------------------------------------------------------------------------------


def test_order_comes_from_positions_not_arrival_or_instance_number() -> None:
    ordered = series(n_slices=30)
    reference, _ = assemble_series(ordered)

    shuffled = ordered[:]
    random.Random(7).shuffle(shuffled)
    reversed_ = ordered[::-1]
    scrambled = [copy.deepcopy(ds) for ds in ordered]
    numbers = list(range(1, 31))
    random.Random(3).shuffle(numbers)
    for ds, number in zip(scrambled, numbers):
        ds.InstanceNumber = number
    # reversed InstanceNumbers too: numbering head→feet must not flip the volume
    backwards = [copy.deepcopy(ds) for ds in ordered]
    for ds in backwards:
        ds.InstanceNumber = 31 - ds.InstanceNumber

    for variant in (shuffled, reversed_, scrambled, backwards):
        volume, warnings = assemble_series(variant)
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_allclose(volume.affine, reference.affine)
        assert volume.source_instances == reference.source_instances
        assert warnings == []

    z = [float(ds.ImagePositionPatient[2]) for ds in ordered]
    assert reference.source_instances == tuple(
        ds.SOPInstanceUID for ds in ordered
    )  # synthetic stacks +z
    assert z == sorted(z)
    expected = np.stack([ramp(k, 64, 64) for k in range(30)]).astype(np.float32)
    np.testing.assert_array_equal(reference.array, expected)
    assert reference.array.dtype == np.float32
    assert reference.spacing == pytest.approx((1.0, 0.8, 0.8))
    assert reference.frame_of_reference_uid == ordered[0].FrameOfReferenceUID
    assert reference.study_instance_uid == ordered[0].StudyInstanceUID
    assert reference.sop_class_uid == ordered[0].SOPClassUID


def test_rescale_slope_and_intercept_give_hu() -> None:
    datasets = series(n_slices=5, rescale_slope=2.0, rescale_intercept=-1024.0)
    assert datasets[0].pixel_array[0, 0] == 12  # stored (−1000 + 1024) / 2
    volume, _ = assemble_series(datasets)
    expected = np.stack([ramp(k, 64, 64) for k in range(5)])
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    assert volume.array[0, 0, 0] == -1000.0
    assert volume.array[4, 63, 63] == ramp(4, 64, 64)[63, 63] == 432.0


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, rotated_orientation(20, 8), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)],
    ids=["axial", "tilted-8deg", "stacked-minus-z"],
)
def test_affine_maps_indices_to_dicom_positions(orientation: tuple[float, ...]) -> None:
    datasets = series(
        n_slices=24,
        rows=32,
        columns=48,
        pixel_spacing=(0.7, 0.9),
        slice_thickness=1.5,
        slice_spacing=1.5,
        orientation=orientation,
        origin=(10.0, -20.0, 30.0),
    )
    random.Random(5).shuffle(datasets)
    volume, warnings = assemble_series(datasets)
    assert warnings == []
    assert volume.array.shape == (24, 32, 48)
    assert_volume_matches_dicom(volume, datasets)
    normal = np.cross(orientation[:3], orientation[3:])
    np.testing.assert_allclose(volume.affine[:3, 0], normal * 1.5, atol=1e-4)
    # source_instances run along the slice normal
    by_sop = {ds.SOPInstanceUID: ds for ds in datasets}
    along = [
        float(np.dot(np.array(by_sop[s].ImagePositionPatient, dtype=float), normal))
        for s in volume.source_instances
    ]
    assert along == sorted(along)


def test_slices_thinner_than_their_spacing_are_reported() -> None:
    _, warnings = assemble_series(series(n_slices=20, slice_thickness=1.0, slice_spacing=1.5))
    assert warnings == [
        "slices are 1 mm thick but 1.5 mm apart: tissue between slices is not imaged"
    ]


def test_minus_z_stack_runs_head_to_feet() -> None:
    volume, _ = assemble_series(series(n_slices=20, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))
    z = [(volume.affine @ np.array([k, 0, 0, 1.0]))[2] for k in range(20)]
    assert z[0] == pytest.approx(-100.0)
    assert z[-1] == pytest.approx(-119.0)


# --- geometry errors --------------------------------------------------------------------------


def test_missing_slice_is_a_geometry_error_naming_the_gap() -> None:
    datasets = series(n_slices=30)
    del datasets[10]
    with pytest.raises(
        GeometryError,
        match=r"1 missing slice\(s\) in a 1\.000 mm grid: 1 missing between -91\.00 and -89\.00 mm",
    ):
        assemble_series(datasets)
    del datasets[20:23]  # a second gap of three
    with pytest.raises(GeometryError, match=r"4 missing slice\(s\).*; 3 missing between"):
        assemble_series(datasets)


def test_inconsistent_rows() -> None:
    datasets = series(n_slices=10)
    odd = datasets[4]
    odd.Rows = 32
    odd.PixelData = np.zeros((32, 64), dtype=np.int16).tobytes()
    with pytest.raises(
        GeometryError, match=f"inconsistent Rows/Columns — instance {odd.SOPInstanceUID} is 32×64"
    ):
        assemble_series(datasets)


def test_mixed_orientation() -> None:
    datasets = series(n_slices=10)
    datasets[6].ImageOrientationPatient = list(rotated_orientation(0, 3))
    with pytest.raises(GeometryError, match="mixed ImageOrientationPatient"):
        assemble_series(datasets)


def test_irregular_spacing() -> None:
    datasets = series(n_slices=20)
    pos = [float(v) for v in datasets[8].ImagePositionPatient]
    datasets[8].ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.4]
    with pytest.raises(
        GeometryError, match=r"irregular slice spacing \(nominal 1\.000 mm\): step 1\.400 mm"
    ):
        assemble_series(datasets)


def test_half_step_is_irregular_not_a_gap() -> None:
    datasets = series(n_slices=20)
    for ds in datasets[10:]:
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.5]
    with pytest.raises(GeometryError, match="irregular slice spacing.*step 1.500 mm"):
        assemble_series(datasets)


def test_sheared_stack_is_rejected() -> None:
    datasets = series(n_slices=20)
    for k, ds in enumerate(datasets):
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1] + 0.3 * k, pos[2]]  # gantry-tilt-like shear
    with pytest.raises(GeometryError, match="not stacked along the slice normal"):
        assemble_series(datasets)


def test_duplicates_resent_instance_dropped_other_instance_rejected() -> None:
    datasets = series(n_slices=20)
    volume, warnings = assemble_series(datasets + [datasets[3]])
    assert volume.array.shape[0] == 20
    assert warnings == ["dropped 1 duplicate copies of already received instances"]

    clone = copy.deepcopy(datasets[3])
    clone.SOPInstanceUID = generate_uid()
    with pytest.raises(GeometryError, match="1 duplicate slice position"):
        assemble_series(datasets + [clone])


def test_mixed_series_refused() -> None:
    with pytest.raises(GeometryError, match="belong to 2 series"):
        assemble_series(series(n_slices=3) + series(n_slices=3))


# --- whole study from files -------------------------------------------------------------------


def test_assemble_study_from_files(tmp_path: Path, rules: SeriesRules) -> None:
    study = generate_uid()
    thin = series(study, n_slices=30)
    scout = series(
        study, n_slices=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=CORONAL
    )
    paths = write_series(thin, tmp_path / "a") + write_series(scout, tmp_path / "b")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    paths.append(junk)
    random.Random(2).shuffle(paths)

    choice, volume, warnings = assemble_study(paths, rules)

    assert choice.chosen_series_uid == thin[0].SeriesInstanceUID
    assert choice.reasons[thin[0].SeriesInstanceUID][-1] == "chosen"
    assert choice.reasons[scout[0].SeriesInstanceUID][0].startswith("rejected: ")
    assert warnings == ["skipped unreadable file junk.dcm: InvalidDicomError"]
    expected, _ = assemble_series(thin)
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.affine, expected.affine)
    assert volume.source_instances == tuple(ds.SOPInstanceUID for ds in thin)


def test_assemble_study_falls_back_when_best_series_has_a_gap(
    tmp_path: Path, rules: SeriesRules
) -> None:
    study = generate_uid()
    gappy = series(study, n_slices=40)
    del gappy[15]
    five = series(study, n_slices=24, slice_thickness=5.0, slice_spacing=5.0)
    paths = write_series(gappy, tmp_path / "g") + write_series(five, tmp_path / "f")

    choice, volume, warnings = assemble_study(paths, rules)

    g_uid, f_uid = gappy[0].SeriesInstanceUID, five[0].SeriesInstanceUID
    assert choice.ranking == [g_uid, f_uid]
    assert choice.chosen_series_uid == f_uid
    assert volume.series_instance_uid == f_uid
    assert any(
        r.startswith("rejected at assembly:") and "1 missing slice" in r
        for r in choice.reasons[g_uid]
    )
    assert len(warnings) == 1 and "1 missing between" in warnings[0] and g_uid in warnings[0]


def test_no_usable_series_names_every_reason(tmp_path: Path, rules: SeriesRules) -> None:
    study = generate_uid()
    scout = series(
        study, n_slices=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=CORONAL
    )
    thick = series(study, n_slices=30, slice_thickness=8.0, slice_spacing=8.0)
    paths = write_series(scout, tmp_path / "s") + write_series(thick, tmp_path / "t")

    with pytest.raises(NoUsableSeries) as info:
        assemble_study(paths, rules)
    message = str(info.value)
    assert scout[0].SeriesInstanceUID in message and "ImageType contains LOCALIZER" in message
    assert (
        thick[0].SeriesInstanceUID in message and "SliceThickness 8.0 outside 0.5–5.0 mm" in message
    )
    assert "SYNTH0001" not in message and "Phantom" not in message  # no PHI
    assert info.value.retryable is False


def test_no_readable_files_is_no_usable_series(tmp_path: Path, rules: SeriesRules) -> None:
    junk = tmp_path / "x.dcm"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(
        NoUsableSeries, match=r"1 file\(s\) skipped as unreadable.*no readable instances"
    ):
        assemble_study([junk], rules)
