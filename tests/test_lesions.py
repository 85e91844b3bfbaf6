"""Anatomy lesion counts: blobs by size and shape, the touch rule, the model switch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, tiny
from fvlm_pacs.model.histogram import HISTOGRAM_EDGES, feature_count
from fvlm_pacs.model.intensity import scale_hu
from fvlm_pacs.model.lesions import (
    LESION_DIAMETERS_MM,
    anatomy_lesions,
    component_shapes,
    lesion_counts,
    lesion_feature_count,
)

SPACING = (3.0, 1.0, 1.0)  # the model's grid
BINS = len(LESION_DIAMETERS_MM) - 1


def grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel centres in mm along each axis."""
    z, y, x = np.indices(shape, dtype=np.float64)
    return z * SPACING[0], y * SPACING[1], x * SPACING[2]


def ball(shape: tuple[int, int, int], centre_mm: tuple[float, ...], radius: float) -> np.ndarray:
    z, y, x = grid(shape)
    return (z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= radius**2


def rod(shape: tuple[int, int, int], z_mm: float, y_mm: float, x0: float, x1: float, radius: float):
    """A bar along x of the given radius (mm) in the z/y plane."""
    z, y, x = grid(shape)
    return ((z - z_mm) ** 2 + (y - y_mm) ** 2 <= radius**2) & (x >= x0) & (x <= x1)


def lung_case() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """An aerated block (label 1) in soft tissue with a nodule, a band, a vessel to the edge,
    a speck and a heart (label 2) beside it."""
    shape = (24, 80, 120)
    hu = np.full(shape, 40.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int64)
    labels[1:23, 2:78, 2:90] = 1
    hu[labels == 1] = -850.0
    parts = {
        "nodule": ball(shape, (33.0, 20.0, 25.0), 4.0),  # 8 mm round
        "band": rod(shape, 33.0, 55.0, 20.0, 50.0, 1.6),  # ~3 mm thick, 30 mm long
        "vessel": rod(shape, 45.0, 40.0, 0.0, 70.0, 2.0),  # reaches the block's edge
        "speck": ball(shape, (54.0, 60.0, 70.0), 1.0),  # < 4 mm
    }
    for name, mask in parts.items():
        hu[mask & (labels == 1)] = -30.0 if name == "band" else 20.0
    labels[4:20, 20:60, 95:118] = 2  # a dense organ: one component touching its own edge
    return hu, labels, parts


def test_round_and_elongated_blobs_are_counted_by_size_and_touching_ones_are_not() -> None:
    hu, labels, parts = lung_case()
    dense = (labels == 1) & (hu >= -300) & (hu < 400)
    diameter, elongation = component_shapes(dense, labels != 1, SPACING)
    # nodule and band; the vessel touches the anatomy's outside, the speck is under 4 mm
    assert len(diameter) == 2
    d, e = diameter, elongation
    nodule, band = np.argmin(e), np.argmax(e)
    nodule_volume = parts["nodule"].sum() * np.prod(SPACING)
    assert d[nodule] == pytest.approx(np.cbrt(6 * nodule_volume / np.pi))
    assert 7.0 < d[nodule] < 9.0 and e[nodule] < 1.5  # about its 8 mm, round
    assert e[band] > 3.0
    counts = np.expm1(2 * lesion_counts(diameter, elongation)).round()
    round_, long_ = counts[:BINS], counts[BINS:]
    assert round_.tolist() == [0, 1, 0, 0]  # the nodule in [6, 10)
    assert long_.sum() == 1  # the band; the speck is below the first edge


def test_anatomy_lesions_per_anatomy_and_sample() -> None:
    hu, labels, _ = lung_case()
    plain = np.where(labels == 1, -850.0, 40.0).astype(np.float32)
    image = torch.from_numpy(scale_hu(np.stack([hu, plain])))[:, None]
    labelmap = torch.from_numpy(np.stack([labels, labels]))
    got = anatomy_lesions(image, labelmap, 3, SPACING)
    assert got.shape == (2, 3, lesion_feature_count()) == (2, 3, 2 * BINS)
    counts = np.expm1(2 * got.numpy()).round()
    assert counts[0, 0].sum() == 2  # nodule and band
    assert counts[1].sum() == 0  # no lesion in the plain lung
    assert counts[0, 1].sum() == 0  # the heart is one dense component touching its edge
    assert counts[0, 2].sum() == 0  # anatomy 3 is absent: zeros
    with pytest.raises(ValueError, match="must match image"):
        anatomy_lesions(image, labelmap[:, :-1], 3, SPACING)
    with pytest.raises(ValueError, match="must not be negative"):
        anatomy_lesions(image, -labelmap, 3, SPACING)


def test_a_blob_cut_by_the_volume_face_is_not_a_lesion() -> None:
    """A crop that cuts a vessel leaves a piece that looks like a blob: the array's faces count
    as the anatomy's outside."""
    shape = (10, 40, 40)
    labels = np.ones(shape, dtype=np.int64)
    dense = ball(shape, (15.0, 20.0, 0.0), 5.0)
    assert len(component_shapes(dense, labels != 1, SPACING)[0]) == 0
    inside = ball(shape, (15.0, 20.0, 20.0), 5.0)
    assert len(component_shapes(inside, labels != 1, SPACING)[0]) == 1
    # beyond the last bin: a whole organ, never measured
    assert len(component_shapes(np.ones(shape, bool), labels != 1, SPACING)[0]) == 0


def test_lesions_widen_the_histogram_mlp_and_round_trip() -> None:
    cfg = dataclasses.replace(tiny(), histogram_edges=HISTOGRAM_EDGES, histogram_lesions=True)
    model = FvlmModel(cfg, with_text=False)
    width = feature_count(HISTOGRAM_EDGES) + lesion_feature_count()
    assert model.state_dict()["histogram.mlps.0.0.weight"].shape[1] == width
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    old = dataclasses.replace(tiny(), histogram_edges=HISTOGRAM_EDGES).to_dict()
    del old["histogram_lesions"]  # a config written before the option
    assert ModelConfig.from_dict(old).histogram_lesions is False
    with pytest.raises(ConfigError, match="need histogram_edges"):
        dataclasses.replace(tiny(), histogram_lesions=True)


def test_model_embedding_reads_the_lesion_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts reach the histogram MLP on the model's grid: the same image with other
    counts gives another embedding (the MLP's last layer set non-zero; a fresh one is zero)."""
    from fvlm_pacs.model import fvlm

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), histogram_edges=HISTOGRAM_EDGES, histogram_lesions=True)
    model = FvlmModel(cfg, with_text=False).eval()
    for mlp in model.histogram.mlps:  # type: ignore[union-attr]
        torch.nn.init.normal_(mlp[2].weight)
    labels = np.zeros((32, 32, 64), dtype=np.int64)
    labels[2:30, 2:30, 2:62] = 1
    image = torch.from_numpy(scale_hu(np.where(labels == 1, -850.0, 40.0)))[None, None]
    labelmap = torch.from_numpy(labels)[None]
    seen: list[tuple[float, ...]] = []
    fill = [0.0]

    def counts(image, labelmap, num_anatomies, spacing):
        seen.append(spacing)
        return torch.full((image.shape[0], num_anatomies, lesion_feature_count()), fill[0])

    monkeypatch.setattr(fvlm, "anatomy_lesions", counts)
    with torch.no_grad():
        none = model.encode_anatomies(image, labelmap)
        fill[0] = 1.0
        some = model.encode_anatomies(image, labelmap)
    assert seen == [fvlm.MODEL_SPACING_MM] * 2
    assert torch.isfinite(none[0, 0]).all() and not torch.allclose(none[0, 0], some[0, 0])
