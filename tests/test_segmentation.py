"""Segmentation providers: DICOM SEG in the study, TotalSegmentator (fake runner), factory."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from fvlm_pacs.codes import AnatomyTable, load_anatomies
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.segmentation import (
    SegmentationProvider,
    SegmentationUnavailable,
    make_provider,
)
from fvlm_pacs.segmentation.dicom_seg import DicomSegProvider
from fvlm_pacs.segmentation.grid import merge_anatomy_masks
from fvlm_pacs.segmentation.totalsegmentator import (
    MODEL_FILES,
    TASK_MODELS,
    TOTAL_TASK_IDS,
    TotalSegmentatorProvider,
    _offline_environment,
    labels_to_volume,
    task_model_dir,
    volume_to_nifti,
)
from fvlm_pacs.studies.assembly import assemble_series
from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series

N, ROWS, COLS = 24, 64, 64


@pytest.fixture(scope="module")
def table() -> AnatomyTable:
    return load_anatomies("ct-rate")


def boxes(table: AnatomyTable) -> np.ndarray:
    """Expected label map in volume voxel order: two lung boxes, a heart box between them."""
    out = np.zeros((N, ROWS, COLS), dtype=np.uint8)
    lung, heart = table.label_of("lung"), table.label_of("heart")
    out[3:20, 10:50, 5:25] = lung
    out[3:20, 10:50, 40:60] = lung
    out[8:16, 20:40, 27:38] = heart
    return out


def series(spacing: float = 1.0, for_uid: str | None = None) -> list[Dataset]:
    spec = SeriesSpec(n_slices=N, rows=ROWS, columns=COLS, slice_spacing=spacing)
    return ct_series(spec, frame_of_reference_uid=for_uid)


def write_seg(
    datasets: Sequence[Dataset],
    volume: Volume,
    labels: np.ndarray,
    segments: Sequence[tuple[str, hd.sr.CodedConcept, int]],
    path: Path,
    *,
    frame_of_reference_uid: str | None = None,
    content_time: str | None = None,
    sides: dict[int, str] | None = None,
) -> Path:
    """A BINARY SEG of ``labels`` (volume voxel order) over ``datasets``; one segment per
    (label text, property type, label value)."""
    index = {sop: k for k, sop in enumerate(volume.source_instances)}
    per_dataset = np.stack([labels[index[ds.SOPInstanceUID]] for ds in datasets])
    pixel = np.stack([per_dataset == value for _, _, value in segments], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test boxes", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, (label, code, _) in enumerate(segments)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="fvlm_pacs tests",
        manufacturer_model_name="boxes",
        software_versions="0",
        device_serial_number="0",
    )
    if frame_of_reference_uid is not None:
        seg.FrameOfReferenceUID = frame_of_reference_uid
    if content_time is not None:
        seg["ContentTime"].value = content_time
    for number, side in (sides or {}).items():  # laterality as a property type modifier
        modifier = codes.SCT.Left if side == "left" else codes.SCT.Right
        segment = seg.SegmentSequence[number - 1]
        item = copy.deepcopy(segment.SegmentedPropertyTypeCodeSequence[0])  # may be shared
        item.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(modifier)]
        segment.SegmentedPropertyTypeCodeSequence = [item]
    seg.save_as(path)
    return path


def anatomy_segments(table: AnatomyTable) -> list[tuple[str, hd.sr.CodedConcept, int]]:
    out = []
    for name in ("lung", "heart"):
        a = table.by_name(name)
        out.append(
            (name.title(), hd.sr.CodedConcept(a.code.value, a.code.scheme, a.code.meaning), a.label)
        )
    return out


def make_study(tmp_path: Path, spacing: float = 1.0) -> tuple[list[Dataset], Volume, list[Path]]:
    datasets = series(spacing)
    volume, _ = assemble_series(datasets)
    paths = write_series(datasets, tmp_path / "ct")
    return datasets, volume, paths


@pytest.mark.parametrize("spacing", [1.0, -1.0], ids=["ascending", "reversed"])
def test_dicom_seg_gives_the_boxes_on_the_ct_grid(
    tmp_path: Path, table: AnatomyTable, spacing: float
) -> None:
    datasets, volume, paths = make_study(tmp_path, spacing)
    expected = boxes(table)
    seg = write_seg(datasets, volume, expected, anatomy_segments(table), tmp_path / "seg.dcm")
    provider = make_provider("dicom-seg", table)
    assert isinstance(provider, SegmentationProvider)
    result = provider.segment(volume, [*paths, seg])
    assert result.source == "dicom-seg"
    assert result.anatomies == table.names
    assert result.array.shape == volume.array.shape
    np.testing.assert_array_equal(result.array, expected)
    written = pydicom.dcmread(seg, stop_before_pixels=True)
    assert result.provenance == {  # the job record names the SEG it pooled under
        "seg_sop_instance_uid": written.SOPInstanceUID,
        "seg_series_instance_uid": written.SeriesInstanceUID,
        "segments": {"lung": [1], "heart": [2]},
        "matched_by": {"lung": "code", "heart": "code"},
    }


def test_dicom_seg_in_reversed_dataset_order(tmp_path: Path, table: AnatomyTable) -> None:
    """SEG frames written in the reverse of the CT's slice order still land on the right slices."""
    datasets, volume, paths = make_study(tmp_path)
    expected = boxes(table)
    seg = write_seg(datasets[::-1], volume, expected, anatomy_segments(table), tmp_path / "s.dcm")
    result = DicomSegProvider(table).segment(volume, [seg, *paths])
    np.testing.assert_array_equal(result.array, expected)


def test_newest_seg_wins(tmp_path: Path, table: AnatomyTable) -> None:
    datasets, volume, paths = make_study(tmp_path)
    expected = boxes(table)
    older = expected.copy()
    older[older == table.label_of("heart")] = 0
    segs = anatomy_segments(table)
    a = write_seg(datasets, volume, older, segs[:1], tmp_path / "a.dcm", content_time="080000")
    b = write_seg(datasets, volume, expected, segs, tmp_path / "b.dcm", content_time="090000")
    result = DicomSegProvider(table).segment(volume, [b, a, *paths])
    np.testing.assert_array_equal(result.array, expected)
    result = DicomSegProvider(table).segment(volume, [a, b])
    np.testing.assert_array_equal(result.array, expected)


def test_segment_label_fallback(tmp_path: Path, table: AnatomyTable) -> None:
    datasets, volume, _ = make_study(tmp_path)
    expected = boxes(table)
    private = hd.sr.CodedConcept("L1", "99TEST", "Private lung")
    lung = table.label_of("lung")
    labels = expected.copy()
    labels[(expected == lung) & (np.arange(COLS) < 25)[None, None, :]] = 11  # the other lung
    segs = [("Lung", private, lung), ("lung", private, 11)]  # both sides labelled "Lung"
    seg = write_seg(datasets, volume, labels, segs, tmp_path / "seg.dcm")
    result = DicomSegProvider(table).segment(volume, [seg])
    np.testing.assert_array_equal(result.array, np.where(expected == lung, lung, 0))
    assert result.provenance["matched_by"] == {"lung": "segment label"}
    with pytest.raises(SegmentationUnavailable, match="99TEST"):
        DicomSegProvider(table, match_segment_labels=False).segment(volume, [seg])


UPPER = hd.sr.CodedConcept("45653009", "SCT", "Upper lobe of lung")
MIDDLE = hd.sr.CodedConcept("72481006", "SCT", "Middle lobe of right lung")
LOWER = hd.sr.CodedConcept("90572001", "SCT", "Lower lobe of lung")
HEART = hd.sr.CodedConcept("80891009", "SCT", "Heart")


def lobes_study(tmp_path: Path, table: AnatomyTable) -> tuple[list[Dataset], Volume, np.ndarray]:
    """The boxes study with each lung split into lobes: values 11–13 right (upper, middle,
    lower), 21–22 left (upper, lower); heart as in :func:`boxes`."""
    datasets, volume, _ = make_study(tmp_path)
    expected = boxes(table)
    lung = expected == table.label_of("lung")
    right = (np.arange(COLS) < 25)[None, None, :]
    z = np.arange(N)[:, None, None]
    lobes = np.where(lung, 0, expected)
    lobes[lung & right & (z < 8)] = 11
    lobes[lung & right & (z >= 8) & (z < 13)] = 12
    lobes[lung & right & (z >= 13)] = 13
    lobes[lung & ~right & (z < 10)] = 21
    lobes[lung & ~right & (z >= 10)] = 22
    return datasets, volume, lobes


def test_five_lobes_with_sides_give_the_lung(tmp_path: Path, table: AnatomyTable) -> None:
    """A SEG coding the lungs per lobe with the generic lobe codes and the side as a modifier
    completes the lung's lobe set: the same label map as a SEG coding "Lung"."""
    datasets, volume, lobes = lobes_study(tmp_path, table)
    heart = table.label_of("heart")
    segs = [
        ("RUL", UPPER, 11), ("RML", MIDDLE, 12), ("RLL", LOWER, 13),
        ("LUL", UPPER, 21), ("LLL", LOWER, 22), ("Heart", HEART, heart),
    ]  # fmt: skip
    sides = {1: "right", 3: "right", 4: "left", 5: "left"}
    seg = write_seg(datasets, volume, lobes, segs, tmp_path / "lobes.dcm", sides=sides)
    result = DicomSegProvider(table, match_segment_labels=False).segment(volume, [seg])
    np.testing.assert_array_equal(result.array, boxes(table))
    assert result.provenance["matched_by"] == {"lung": "part set 2", "heart": "code"}


def test_an_incomplete_set_of_parts_is_not_the_organ(tmp_path: Path, table: AnatomyTable) -> None:
    """Four of five lobes (or lobes without their sides) are not the lung: the lung stays
    absent — not assessable downstream — and the reason is recorded; the heart is still used."""
    datasets, volume, lobes = lobes_study(tmp_path, table)
    heart = table.label_of("heart")
    segs = [
        ("RUL", UPPER, 11), ("RML", MIDDLE, 12), ("RLL", LOWER, 13),
        ("LUL", UPPER, 21), ("Heart", HEART, heart),
    ]  # fmt: skip
    sides = {1: "right", 3: "right", 4: "left"}
    seg = write_seg(datasets, volume, lobes, segs, tmp_path / "four.dcm", sides=sides)
    result = DicomSegProvider(table).segment(volume, [seg])
    np.testing.assert_array_equal(result.array, np.where(boxes(table) == heart, heart, 0))
    assert "no complete set of parts" in result.provenance["not_used"]["lung"]
    # all five lobes but no side given: which upper lobe is which cannot be told
    segs = [
        ("RUL", UPPER, 11),
        ("RML", MIDDLE, 12),
        ("RLL", LOWER, 13),
        ("LUL", UPPER, 21),
        ("LLL", LOWER, 22),
        ("Lung", HEART, heart),
    ]  # fmt: skip  (labelled "Lung" but coded Heart: a known code beats the label)
    seg = write_seg(datasets, volume, lobes, segs, tmp_path / "nosides.dcm")
    result = DicomSegProvider(table).segment(volume, [seg])
    assert not (result.array == table.label_of("lung")).any()


def test_left_and_right_lung_and_additions(tmp_path: Path, table: AnatomyTable) -> None:
    """Left + right lung complete the lung; the left atrial appendage joins the heart when the
    heart is there and never stands for it alone; the legacy SRT designator counts as SCT."""
    datasets, volume, _ = make_study(tmp_path)
    expected = boxes(table)
    lung, heart = table.label_of("lung"), table.label_of("heart")
    labels = expected.copy()
    labels[(expected == lung) & (np.arange(COLS) < 25)[None, None, :]] = 11
    labels[(expected == heart) & (np.arange(N) < 10)[:, None, None]] = 7  # appendage
    left = hd.sr.CodedConcept("44029006", "SRT", "Left lung")
    right = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
    appendage = hd.sr.CodedConcept("33626005", "SCT", "Left auricular appendage")
    segs = [("L", left, lung), ("R", right, 11), ("H", HEART, heart), ("LAA", appendage, 7)]
    seg = write_seg(datasets, volume, labels, segs, tmp_path / "lr.dcm")
    result = DicomSegProvider(table).segment(volume, [seg])
    np.testing.assert_array_equal(result.array, expected)
    assert result.provenance["segments"] == {"lung": [1, 2], "heart": [3, 4]}
    only = write_seg(datasets, volume, labels, [("LAA", appendage, 7)], tmp_path / "laa.dcm")
    with pytest.raises(SegmentationUnavailable, match="heart: only part"):
        DicomSegProvider(table).segment(volume, [only])


def test_unknown_codes_only(tmp_path: Path, table: AnatomyTable) -> None:
    datasets, volume, paths = make_study(tmp_path)
    liver = hd.sr.CodedConcept("10200004", "SCT", "Liver")
    seg = write_seg(datasets, volume, boxes(table), [("Liver", liver, 1)], tmp_path / "seg.dcm")
    with pytest.raises(SegmentationUnavailable, match="no segment codes an anatomy") as info:
        DicomSegProvider(table).segment(volume, [*paths, seg])
    assert info.value.retryable is False


def test_no_seg_in_study(tmp_path: Path, table: AnatomyTable) -> None:
    _, volume, paths = make_study(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(SegmentationUnavailable, match="holds no DICOM SEG"):
        DicomSegProvider(table).segment(volume, [*paths, tmp_path / "junk.dcm"])


def test_seg_of_another_frame_of_reference(tmp_path: Path, table: AnatomyTable) -> None:
    datasets, volume, paths = make_study(tmp_path)
    seg = write_seg(
        datasets,
        volume,
        boxes(table),
        anatomy_segments(table),
        tmp_path / "seg.dcm",
        frame_of_reference_uid=generate_uid(),
    )
    with pytest.raises(SegmentationUnavailable, match="Frame of Reference"):
        DicomSegProvider(table).segment(volume, [*paths, seg])


def test_overlap_smaller_anatomy_wins(table: AnatomyTable) -> None:
    lung = np.zeros((4, 4, 4), dtype=bool)
    lung[:, :, :3] = True
    esophagus = np.zeros_like(lung)
    esophagus[1:3, 1:3, 2:4] = True
    out = merge_anatomy_masks({"lung": lung, "esophagus": esophagus}, table, lung.shape, "x")
    assert out.array[1, 1, 2] == table.label_of("esophagus")
    assert out.array[0, 0, 0] == table.label_of("lung")


# --- TotalSegmentator -----------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fake_weights(root: Path, task_ids: Sequence[int] = TOTAL_TASK_IDS) -> Path:
    """Empty files in the exact layout TotalSegmentator looks up (the runner is faked)."""
    for t in task_ids:
        model = task_model_dir(root, t)
        for name in MODEL_FILES:
            (model / name).parent.mkdir(parents=True, exist_ok=True)
            (model / name).write_bytes(b"")
    return root


def total_labels(table: AnatomyTable) -> np.ndarray:
    """TotalSegmentator-style ``total`` map of the same boxes (volume voxel order)."""
    ours = boxes(table)
    out = np.zeros(ours.shape, dtype=np.uint8)
    out[ours == table.label_of("lung")] = 12  # lung_upper_lobe_right
    out[:, :, 40:][ours[:, :, 40:] == table.label_of("lung")] = 10  # lung_upper_lobe_left
    out[ours == table.label_of("heart")] = 51
    out[0, 0, 0] = 90  # a structure no anatomy uses (e.g. a vertebra)
    return out


def test_totalsegmentator_matches_dicom_seg(tmp_path: Path, table: AnatomyTable) -> None:
    datasets, volume, paths = make_study(tmp_path, spacing=-1.0)
    seg = write_seg(datasets, volume, boxes(table), anatomy_segments(table), tmp_path / "seg.dcm")
    from_seg = make_provider("dicom-seg", table).segment(volume, [*paths, seg])

    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def runner(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append((image, affine))
        # TotalSegmentator answers on the input's grid, in the input's NIfTI index order
        return total_labels(table).transpose(2, 1, 0), affine

    provider = make_provider(
        "totalsegmentator", table, weights_dir=fake_weights(tmp_path / "w"), runner=runner
    )
    from_ts = provider.segment(volume, paths)
    assert isinstance(from_ts, LabelMap)
    assert from_ts.source == "totalsegmentator"
    empty = hashlib.sha256(b"").hexdigest()  # the fake weights files are empty
    assert from_ts.provenance == {
        "task": "total",
        "fast": False,
        "tasks": list(TOTAL_TASK_IDS),
        "version": installed_version("TotalSegmentator"),  # None where not installed
        "weights_sha256": {str(t): empty for t in TOTAL_TASK_IDS},
    }
    assert from_ts.anatomies == from_seg.anatomies
    np.testing.assert_array_equal(from_ts.array, from_seg.array)
    image, affine = calls[0]
    np.testing.assert_array_equal(image, volume.array.transpose(2, 1, 0))


def test_nifti_conversion_is_ras_and_round_trips(tmp_path: Path, table: AnatomyTable) -> None:
    _, volume, _ = make_study(tmp_path)
    image, affine = volume_to_nifti(volume)
    assert image.shape == (COLS, ROWS, N)
    # voxel (i, j, k) = (column, row, slice) of NIfTI is voxel (slice, row, column) of ours; RAS
    # flips x and y of LPS
    s, r, c = 5, 7, 11
    lps = volume.affine @ np.array([s, r, c, 1.0])
    ras = affine @ np.array([c, r, s, 1.0])
    np.testing.assert_allclose(ras[:3], lps[:3] * np.array([-1, -1, 1]))
    assert image[c, r, s] == volume.array[s, r, c]
    back = labels_to_volume(image, affine)
    np.testing.assert_allclose(back.affine @ np.array([c, r, s, 1.0]), lps)


def test_totalsegmentator_labels_on_another_grid(tmp_path: Path, table: AnatomyTable) -> None:
    """A result on a coarser grid (2 mm slices) is sampled nearest-neighbour onto the CT grid."""
    _, volume, _ = make_study(tmp_path)
    coarse = total_labels(table)[::2]  # slices 0, 2, 4, ... at twice the spacing

    def runner(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = affine.copy()
        a[:3, 2] *= 2
        return coarse.transpose(2, 1, 0), a

    provider = TotalSegmentatorProvider(table, fake_weights(tmp_path / "w"), runner=runner)
    result = provider.segment(volume, [])
    # every CT slice takes its nearest coarse slice: even ones exactly, odd ones round half-even
    idx = np.rint(np.arange(N) / 2).astype(int)
    np.testing.assert_array_equal(
        result.array, table.group_totalsegmentator(coarse[np.minimum(idx, len(coarse) - 1)])
    )


def test_totalsegmentator_package_missing(tmp_path: Path, table: AnatomyTable) -> None:
    try:
        import totalsegmentator  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TotalSegmentator is installed here")
    _, volume, _ = make_study(tmp_path)
    provider = make_provider("totalsegmentator", table, weights_dir=fake_weights(tmp_path / "w"))
    with pytest.raises(SegmentationUnavailable, match=r"fvlm_pacs\[totalseg\]"):
        provider.segment(volume, [])


def test_totalsegmentator_weights_missing(tmp_path: Path, table: AnatomyTable) -> None:
    _, volume, _ = make_study(tmp_path)

    def runner(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("must not run without weights")

    unset = TotalSegmentatorProvider(table, None, runner=runner)
    with pytest.raises(SegmentationUnavailable, match="totalsegmentator_weights is not set"):
        unset.segment(volume, [])
    partial = fake_weights(tmp_path / "w", TOTAL_TASK_IDS[:2])
    with pytest.raises(SegmentationUnavailable, match=r"totalsegmentator_weights.*293, 294, 295"):
        TotalSegmentatorProvider(table, partial, runner=runner).segment(volume, [])
    with pytest.raises(SegmentationUnavailable, match="not a directory"):
        TotalSegmentatorProvider(table, tmp_path / "nope", runner=runner).segment(volume, [])


@pytest.mark.parametrize(
    "rename",
    [
        ("Dataset297_TotalSegmentator_total_3mm_1559subj", "Dataset297_TotalSegmentator_total_3mm_1559subj_v204"),
        ("nnUNetTrainer_4000epochs_NoMirroring__", "nnUNetTrainerNoMirroring__"),
        ("plans.json", "plans.json.bak"),
    ],
    ids=["old-release-folder", "other-trainer", "no-plans"],
)  # fmt: skip
def test_totalsegmentator_weights_need_the_exact_names(
    tmp_path: Path, table: AnatomyTable, rename: tuple[str, str]
) -> None:
    """TotalSegmentator downloads a task whose exact folder it does not find (and deletes an
    older release's folder), so a near miss is refused before it runs, naming the layout."""
    root = fake_weights(tmp_path / "w", (297,))
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if rename[0] in path.name:
            path.rename(path.with_name(path.name.replace(*rename)))
    provider = TotalSegmentatorProvider(table, root, fast=True, runner=lambda i, a: (i, a))
    with pytest.raises(SegmentationUnavailable, match=r"task\(s\) 297 .*Dataset297_Total"):
        provider.check()


def test_totalsegmentator_runs_on_links_to_the_exact_folders_only(tmp_path: Path) -> None:
    """The run's weights directory links the task folders and nothing else, so whatever
    TotalSegmentator deletes or writes there (old-release folders, downloads) is not the site's
    folder; the environment is restored afterwards."""
    site = fake_weights(tmp_path / "site", (297,))
    old = site / "Dataset297_TotalSegmentator_total_3mm_1559subj_v204"
    old.mkdir()
    before = {str(p.relative_to(site)) for p in site.rglob("*")}
    saved = os.environ.get("TOTALSEG_WEIGHTS_PATH")
    with _offline_environment(site, (297,)):
        private = Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
        assert os.environ["nnUNet_results"] == str(private) and private != site
        assert [p.name for p in private.iterdir()] == [TASK_MODELS[297][0]]
        linked = private / TASK_MODELS[297][0]
        assert linked.is_symlink() and linked.resolve() == (site / TASK_MODELS[297][0]).resolve()
        config = json.loads((private.parent / "config.json").read_text())
        assert config["send_usage_stats"] is False
    assert os.environ.get("TOTALSEG_WEIGHTS_PATH") == saved
    assert not private.exists()  # the private home is gone, the site's folder is untouched
    assert {str(p.relative_to(site)) for p in site.rglob("*")} == before


# --- factory --------------------------------------------------------------------------------


def test_builtin_without_weights_names_the_setting(table: AnatomyTable, tmp_path: Path) -> None:
    provider = make_provider("builtin", table, model_dir=tmp_path / "no-weights")
    assert provider.name == "builtin"
    with pytest.raises(SegmentationUnavailable, match="builtin_segmentation_dir"):
        provider.check()  # type: ignore[attr-defined]


def test_unknown_provider_name(table: AnatomyTable) -> None:
    with pytest.raises(ConfigError, match="'nnunet'"):
        make_provider("nnunet", table)
