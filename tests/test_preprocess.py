"""Preprocessing conventions: orientation, spacing, window, crops, assessability."""

from __future__ import annotations

from collections.abc import Callable

import highdicom as hd
import numpy as np
import pytest

from fvlm_pacs.domain import Volume
from fvlm_pacs.model import preprocess
from fvlm_pacs.model.preprocess import (
    CONTEXT_MIN_SHAPE,
    CROP_MIN_SHAPE,
    PATCH,
    anatomy_crops,
    group_by_shape,
    to_model_grid,
)

Field = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def sampled(affine: np.ndarray, shape: tuple[int, int, int], f: Field) -> np.ndarray:
    """Evaluate f(x, y, z) (patient LPS mm) at every voxel centre of a grid."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    idx = np.stack([k, r, c, np.ones_like(k)], axis=-1).reshape(-1, 4).T
    x, y, z, _ = affine @ idx
    return f(x, y, z).reshape(shape)


def volume(affine: np.ndarray, shape: tuple[int, int, int], hu: Field) -> Volume:
    arr = sampled(affine, shape, hu).astype(np.float32)
    return Volume(
        voxels=hd.Volume(arr, affine, "PATIENT", frame_of_reference_uid="1.2.3"),
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        source_instances=tuple(f"1.2.3.{i}" for i in range(shape[0])),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def head_first_axial(spacing_z: float = 5.0, px: float = 4.0) -> np.ndarray:
    """Slices stacked towards the head (+z), rows → posterior, columns → left."""
    a = np.eye(4)
    a[:3, 0] = (0, 0, spacing_z)
    a[:3, 1] = (0, px, 0)
    a[:3, 2] = (px, 0, 0)
    a[:3, 3] = (-32 * px, -32 * px, -200)  # 64 pixels centred on x = y = 0
    return a


def feet_first_flipped(
    shape: tuple[int, int, int], spacing_z: float = 5.0, px: float = 4.0
) -> np.ndarray:
    """The same voxels stored feet-first with columns running towards the right."""
    a = head_first_axial(spacing_z, px)
    b = np.eye(4)
    b[:3, 0] = -a[:3, 0]
    b[:3, 1] = a[:3, 1]
    b[:3, 2] = -a[:3, 2]
    b[:3, 3] = a[:3, 3] + a[:3, 0] * (shape[0] - 1) + a[:3, 2] * (shape[2] - 1)
    return b


def phantom_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    # asymmetric in every axis, so a flip anywhere would show
    return 10.0 * x + 3.0 * y + 1.0 * z - 200.0


def two_boxes(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    lab = np.zeros(x.shape, np.float32)
    lab[(abs(x - 20) < 30) & (abs(y) < 30) & (z > -150) & (z < -100)] = 1
    lab[(abs(x + 60) < 20) & (abs(y) < 20) & (z > -60) & (z < -30)] = 2
    return lab


SHAPE = (60, 64, 64)


def test_voxel_order_of_the_series_does_not_matter() -> None:
    a = head_first_axial()
    b = feet_first_flipped(SHAPE)
    va, vb = volume(a, SHAPE, phantom_hu), volume(b, SHAPE, phantom_hu)
    ga = to_model_grid(va, sampled(a, SHAPE, two_boxes), n_anatomies=2)
    gb = to_model_grid(vb, sampled(b, SHAPE, two_boxes), n_anatomies=2)
    np.testing.assert_array_equal(ga.labels, gb.labels)
    np.testing.assert_allclose(ga.image, gb.image, atol=1e-6)


def test_axes_run_head_to_feet_anterior_to_posterior_right_to_left() -> None:
    a = head_first_axial()
    grid = to_model_grid(volume(a, SHAPE, phantom_hu), sampled(a, SHAPE, two_boxes), 2)
    lo1 = np.argwhere(grid.labels == 1).min(axis=0)
    lo2 = np.argwhere(grid.labels == 2).min(axis=0)
    # box 2 is higher (towards the head: smaller axis-0 index) and on the right (x < 0 in LPS,
    # smaller axis-2 index) of box 1
    assert lo2[0] < lo1[0]
    assert lo2[2] < lo1[2]
    # the HU ramp grows with x (left) and y (posterior) and z (head): along axis 2 it rises,
    # along axis 0 it falls
    d, h, w = np.argwhere(grid.labels == 1).mean(axis=0).astype(int)
    assert grid.image[d, h, w + 1] > grid.image[d, h, w]
    assert grid.image[d, h + 1, w] > grid.image[d, h, w]
    assert grid.image[d + 1, h, w] < grid.image[d, h, w]


def test_spacing_and_window() -> None:
    a = head_first_axial(spacing_z=1.5, px=2.0)
    shape = (100, 64, 64)
    const = volume(a, shape, lambda x, y, z: np.full(x.shape, 350.0 + 0 * x))
    grid = to_model_grid(const, sampled(a, shape, two_boxes), 2)
    # box 1: 50 mm in z (3 mm slices), 60 mm in x and y (1 mm pixels)
    extent = np.ptp(np.argwhere(grid.labels == 1), axis=0) + 1
    assert abs(extent[0] - 50 / 3) <= 1.5
    assert abs(extent[1] - 60) <= 2 and abs(extent[2] - 60) <= 2
    inside = grid.image[grid.labels == 1]
    assert np.allclose(inside, 1.0)  # 350 HU is the release window's top
    bone = volume(a, shape, lambda x, y, z: np.full(x.shape, 1000.0 + 0 * x))
    dense = to_model_grid(bone, sampled(a, shape, two_boxes), 2).image
    # nothing above the window is clipped here: the model clips to its own windows
    assert np.allclose(dense[grid.labels == 1], 2150 / 1500, atol=1e-4)
    low = volume(a, shape, lambda x, y, z: np.full(x.shape, -1150.0 + 0 * x))
    # float32 sampling grid: the bottom of the window within 0.02 HU
    assert np.allclose(to_model_grid(low, sampled(a, shape, two_boxes), 2).image, 0.0, atol=1e-5)


def test_cutting_to_the_anatomies_before_resampling_keeps_the_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the anatomies plus the context margin are resampled; the model input matches the
    one from resampling the whole field of view. Water everywhere, so the context is image
    (0.767) up to the end padding (0): a margin cut too short would leave zeros in it. The
    resampled grid moves by part of a voxel, so the context box may move by one voxel."""
    a = head_first_axial(spacing_z=2.5, px=2.0)
    a[:3, 3] = (-140, -96, -230)
    shape = (110, 112, 146)  # both boxes with 30-60 mm of air on every side
    vol = volume(a, shape, lambda x, y, z: np.zeros(x.shape))
    labels = sampled(a, shape, two_boxes)
    cut = to_model_grid(vol, labels, 2)
    monkeypatch.setattr(preprocess, "_around_anatomies", lambda image, lab, n: (image, lab))
    whole = to_model_grid(vol, labels, 2)
    assert cut.image.shape == whole.image.shape
    water = 1150 / 1500
    assert np.all(np.isclose(cut.image, 0, atol=1e-4) | np.isclose(cut.image, water, atol=1e-4))
    assert np.count_nonzero(cut.image) == pytest.approx(np.count_nonzero(whole.image), rel=0.05)
    assert np.mean(cut.labels == whole.labels) > 0.995
    # nearest neighbour on a grid shifted by part of a 3 mm slice: a 50 mm box may gain or
    # lose one of its ~17 slices
    np.testing.assert_allclose(cut.voxels[1:], whole.voxels[1:], rtol=1 / 16)


def test_context_is_padded_to_the_minimum_shape() -> None:
    a = head_first_axial()
    grid = to_model_grid(volume(a, SHAPE, phantom_hu), sampled(a, SHAPE, two_boxes), 2)
    assert all(s >= m for s, m in zip(grid.image.shape, CONTEXT_MIN_SHAPE, strict=True))
    assert grid.labels.shape == grid.image.shape


def test_crops_cover_their_anatomy_and_fit_the_patch() -> None:
    a = head_first_axial()
    grid = to_model_grid(volume(a, SHAPE, phantom_hu), sampled(a, SHAPE, two_boxes), 2)
    crops = anatomy_crops(grid)
    assert [c.label for c in crops] == [1, 2]
    for crop in crops:
        assert all(s >= m for s, m in zip(crop.shape, CROP_MIN_SHAPE, strict=True))
        assert all(s % p == 0 for s, p in zip(crop.shape, PATCH, strict=True))
        assert int((crop.labels == crop.label).sum()) == int(grid.voxels[crop.label])
        assert crop.assessable == (1, 2)  # both boxes fit in each other's crop
    assert len(group_by_shape(crops)) == 1


def test_missing_anatomy_has_no_crop() -> None:
    a = head_first_axial()
    labels = sampled(a, SHAPE, two_boxes)
    labels[labels == 2] = 0
    grid = to_model_grid(volume(a, SHAPE, phantom_hu), labels, 3)
    assert not grid.present(2) and not grid.present(3)
    assert [c.label for c in anatomy_crops(grid)] == [1]


def test_anatomy_cut_by_another_crop_is_not_assessable_there() -> None:
    a = head_first_axial(spacing_z=5.0, px=4.0)
    shape = (100, 64, 64)  # 500 mm long

    def long_and_short(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        lab = np.zeros(x.shape, np.float32)
        lab[(abs(x) < 20) & (abs(y) < 20) & (z > -190) & (z < 250)] = 1  # 440 mm > crop depth
        lab[(abs(x - 60) < 20) & (abs(y) < 20) & (z > -180) & (z < -150)] = 2
        return lab

    grid = to_model_grid(volume(a, shape, phantom_hu), sampled(a, shape, long_and_short), 2)
    crops = {c.label: c for c in anatomy_crops(grid)}
    assert crops[1].shape[0] > CROP_MIN_SHAPE[0]  # widened to hold all of anatomy 1
    assert int((crops[1].labels == 1).sum()) == int(grid.voxels[1])
    # anatomy 2's crop (336 mm deep) keeps < 90 % of the long anatomy 1: not scored there
    assert crops[2].assessable == (2,)
    assert not (crops[2].labels == 1).any()


def test_labelmap_must_match_the_volume() -> None:
    a = head_first_axial()
    with pytest.raises(ValueError, match="labelmap shape"):
        to_model_grid(volume(a, SHAPE, phantom_hu), np.zeros((2, 2, 2)), 2)


def test_context_crop_holds_every_present_anatomy() -> None:
    from fvlm_pacs.model.preprocess import context_crop

    a = head_first_axial()
    grid = to_model_grid(volume(a, SHAPE, phantom_hu), sampled(a, SHAPE, two_boxes), 3)
    crop = context_crop(grid)
    assert crop.assessable == (1, 2)  # 3 is absent
    assert all(s % p == 0 for s, p in zip(crop.shape, PATCH, strict=True))
    for label in (1, 2):
        assert int((crop.labels == label).sum()) == int(grid.voxels[label])
