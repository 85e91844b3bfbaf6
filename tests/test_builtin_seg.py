"""The ``builtin`` segmentation provider: grid contract, training, weights, factory, settings.

Kept small for CI on two cores: phantoms of 24 × 40 × 56 voxels (8 × 6 × 6 mm), a U-Net of
channels (8, 16, 32) on an 8 mm working grid, 80 training steps, one thread.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch

from fvlm_pacs.codes import AnatomyTable, load_anatomies
from fvlm_pacs.config import load_settings
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model.demo_build import DemoRecipe, build_demo, segmentation_section
from fvlm_pacs.phantoms import PhantomSpec, write_dataset
from fvlm_pacs.segmentation import SegmentationProvider, SegmentationUnavailable, make_provider
from fvlm_pacs.segmentation.builtin import (
    CONFIG_FILE,
    SETTING,
    BuiltinSegmenter,
    SegNetConfig,
    WorkingGrid,
    connected_components,
    default_model_dir,
    load_segnet,
    sample_linear_argmax,
    sample_nearest,
    segment_voxels,
    to_ct_grid,
    to_working_grid,
)
from fvlm_pacs.segmentation.builtin_train import SegTrainResult, train_builtin
from fvlm_pacs.service import build_stages

SPEC = PhantomSpec(shape=(24, 40, 56), spacing=(8.0, 6.0, 6.0))
CONFIG = SegNetConfig(
    spacing_mm=(8.0, 8.0, 8.0), channels=(8, 16, 32), strides=(2, 2), roi=(24, 32, 44)
)
# measured: held-out Dice lung/heart 0.82/0.63 (seed 0), 0.82/0.65 (seed 1); untrained 0.14/0.03;
# 40 steps were too few (heart 0.34 or 0.00 depending on the seed)
STEPS = 80


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Training on two shared cores: one thread is as fast and does not starve the others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def table() -> AnatomyTable:
    return load_anatomies("ct-rate")


@dataclass(frozen=True)
class Trained:
    cases: list[Path]
    trained: SegTrainResult
    untrained: SegTrainResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("segnet")
    manifest = write_dataset(6, 500, root / "data", spec=SPEC)
    cases = sorted(manifest.parent.glob("case_*"))
    train, test = cases[:4], cases[4:]
    trained = train_builtin(
        train, root / "trained", steps=STEPS, seed=0, test_cases=test, config=CONFIG
    )
    untrained = train_builtin(
        train, root / "untrained", steps=0, seed=0, test_cases=test, config=CONFIG
    )
    return Trained(cases=cases, trained=trained, untrained=untrained)


def volume_of(array: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(
        voxels=hd.Volume(array.astype(np.float32), affine, "PATIENT"),
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        source_instances=(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def phantom_volume(case_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(case_dir / "case.npz") as data:
        return data["hu"].astype(np.float32), data["labels"], data["affine"]


# --- training --------------------------------------------------------------------------------


def test_training_beats_an_untrained_net(runs: Trained) -> None:
    trained, untrained = runs.trained.metrics["test"], runs.untrained.metrics["test"]
    for anatomy in ("lung", "heart"):
        assert trained["dice"][anatomy] > untrained["dice"][anatomy] + 0.3, (trained, untrained)
    assert trained["dice"]["lung"] > 0.6
    metrics = json.loads((runs.trained.out_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["test"]["cases"] == 2
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["weights_bytes"] < 5_000_000


def test_training_is_deterministic_per_seed(runs: Trained, tmp_path: Path) -> None:
    train = runs.cases[:2]
    digests = [
        json.loads(
            (
                train_builtin(train, tmp_path / f"r{i}", steps=2, seed=seed, config=CONFIG).out_dir
                / CONFIG_FILE
            ).read_text()
        )["sha256"]
        for i, seed in enumerate((7, 7, 8))
    ]
    assert digests[0] == digests[1] != digests[2]


def test_build_demo_ships_the_network(table: AnatomyTable, tmp_path: Path) -> None:
    """A tiny recipe end to end (with anatomy histograms, so they are trained, calibrated and
    served, and sentence subsets but for the heart's): the network lands in <out>/segmentation, loads through the factory, and the card
    reports its held-out Dice."""
    recipe = DemoRecipe(
        cases=6,
        steps=1,
        batch_size=2,
        seg_steps=2,
        negative_prompts="normal-template",
        positive_prompts="table",
        hierarchical_stem=True,
        histograms=True,
        sentence_keep=0.5,
        whole_text_anatomies=("heart",),
        heldout_cases=2,
    )
    out = build_demo(recipe, tmp_path / "work", tmp_path / "demo")
    metrics = json.loads((out / "segmentation" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_cases"] == 4 and metrics["test"]["cases"] == 1
    make_provider("builtin", table, model_dir=out / "segmentation").check()  # type: ignore[attr-defined]
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Segmentation network" in card and "--seg-steps 2" in card
    assert "--stem hierarchical" in card and "hierarchical stem" in card
    assert "--histograms on" in card and "HU histogram" in card  # trained, scored, served
    assert "histograms count the HU inside each mask" in card  # the limit it brings
    assert "--sentence-keep 0.5 " in card and "kept with p = 0.5 (heart: whole texts)" in card
    assert "--whole-text-anatomies heart " in card and "--positive-prompts table " in card
    # the model's own negative prompts ship with it and the thresholds name them
    assert (out / "prompts.yaml").is_file() and "--negative-prompts normal-template" in card
    recorded = json.loads((out / "thresholds.json").read_text())["prompts"]
    assert recorded["emphysema"] == ["Emphysema.", "Lung shows no significant abnormalities."]
    # the card also reports phantoms the build never touched (seeds 100000..), in its caveat too
    heldout = json.loads((out / "eval_heldout.json").read_text())
    assert len(heldout["findings"]) == 16 and "--heldout-cases 2" in card
    assert "## Zero-shot results on independent held-out phantoms" in card
    assert "seeds 100000–100001 (the build's own: 1–6)" in card
    caveat = next(line for line in card.splitlines() if line.startswith("caveat:"))
    assert "2 independent synthetic phantoms" in caveat


def test_model_card_section_lists_dice(runs: Trained) -> None:
    text = "\n".join(segmentation_section(runs.trained.metrics, {"seg_s": 1.0}))
    assert "## Segmentation network" in text
    for anatomy in ("lung", "heart", "esophagus", "aorta"):
        assert f"| {anatomy} | " in text
    assert "| anatomy | Dice | Dice raw | Dice nearest |" in text
    assert "the provider's upsampling: linear" in text
    assert "--seg-steps 0" in "\n".join(segmentation_section(None, {}))


# --- the provider: grid contract --------------------------------------------------------------


def test_label_map_follows_the_volume_voxel_order(runs: Trained, table: AnatomyTable) -> None:
    """Head-first, feet-first with flipped columns, and a coronal stack (axes permuted) of one
    phantom give the same anatomy at the same patient position."""
    provider = BuiltinSegmenter(table, model_dir=runs.trained.out_dir, device="cpu")
    hu, truth, affine = phantom_volume(runs.cases[5])
    base = provider.segment(volume_of(hu, affine), [])
    assert isinstance(base, LabelMap) and base.source == "builtin"
    meta = json.loads((runs.trained.out_dir / "config.json").read_text())
    assert base.provenance == {  # the job record names the exact network
        "network": meta["name"],
        "version": meta["version"],
        "sha256": meta["sha256"],
    }
    assert base.array.shape == hu.shape and base.anatomies == table.names
    assert (base.array == table.label_of("lung")).any()

    d, _, w = hu.shape
    flip = np.array([[-1, 0, 0, d - 1], [0, 1, 0, 0], [0, 0, -1, w - 1], [0, 0, 0, 1]], float)
    flipped = provider.segment(volume_of(hu[::-1, :, ::-1], affine @ flip), [])
    assert flipped.array.shape == hu.shape
    np.testing.assert_array_equal(flipped.array, base.array[::-1, :, ::-1])

    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    coronal = provider.segment(volume_of(hu.transpose(1, 0, 2), affine @ perm), [])
    assert coronal.array.shape == (hu.shape[1], hu.shape[0], hu.shape[2])
    np.testing.assert_array_equal(coronal.array, base.array.transpose(1, 0, 2))


def test_sample_nearest_matches_the_affine_on_any_grid() -> None:
    """The separable path (axis-aligned, flipped, permuted) and the plane-by-plane path
    (oblique) agree with the direct formula: index = rint(inv(src) @ dst @ ijk), clamped."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 5, size=(9, 11, 13)).astype(np.uint8)
    src_affine = np.diag([3.0, 2.0, 2.5, 1.0])
    src_affine[:3, 3] = (5.0, -7.0, 1.0)
    a = np.deg2rad(17.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    grids = {
        "flipped": np.array([[0, 0, -1.2], [0, 1.1, 0], [0.9, 0, 0]]),
        "oblique": rot @ np.diag([1.3, 1.1, 0.9]),
    }
    shape = (20, 17, 23)
    for name, lin in grids.items():
        affine = np.eye(4)
        affine[:3, :3] = lin
        affine[:3, 3] = (8.0, 3.0, 12.0)
        got = sample_nearest(src, src_affine, shape, affine)
        ijk = np.indices(shape).reshape(3, -1)
        to_src = np.linalg.inv(src_affine) @ affine
        idx = np.rint(to_src[:3, :3] @ ijk + to_src[:3, 3:]).astype(int)
        idx = np.clip(idx, 0, np.array(src.shape).reshape(3, 1) - 1)
        want = src[idx[0], idx[1], idx[2]].reshape(shape)
        np.testing.assert_array_equal(got, want, err_msg=name)


def trilinear_reference(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of (C, a, b, c) at fractional (3, N) positions, by its formula:
    the eight surrounding voxels weighted by the products of the axis weights."""
    limits = np.array(values.shape[1:]).reshape(3, 1)
    pos = np.clip(pos, 0, limits - 1)
    lo = np.minimum(np.floor(pos).astype(int), np.maximum(limits - 2, 0))
    frac = pos - lo
    out = np.zeros((values.shape[0], pos.shape[1]))
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner).reshape(3, 1)
        idx = np.minimum(lo + c, limits - 1)
        weight = np.prod(np.where(c == 1, frac, 1 - frac), axis=0)
        out += values[:, idx[0], idx[1], idx[2]] * weight
    return out


def test_sample_linear_argmax_is_the_argmax_of_trilinear_probabilities() -> None:
    """Axis-aligned grids (scaled, flipped, permuted; a slab smaller than the output) give the
    argmax of the formula's trilinear interpolation; oblique grids the nearest label."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(5, 6, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    src_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    src_affine[:3, 3] = (2.0, -3.0, 1.0)
    shape = (17, 11, 13)
    grids = {
        "finer": np.diag([1.1, 1.7, 2.3]),
        "flipped, permuted": np.array([[0, 0, -1.9], [0, 1.3, 0], [2.1, 0, 0]]),
    }
    for name, lin in grids.items():
        affine = np.eye(4)
        affine[:3, :3] = lin
        affine[:3, 3] = (4.0, 1.0, 5.0) if name == "finer" else (30.0, 0.0, 9.0)
        got = sample_linear_argmax(probs, src_affine, shape, affine, slab=3)
        ijk = np.indices(shape).reshape(3, -1)
        to_src = np.linalg.inv(src_affine) @ affine
        pos = to_src[:3, :3] @ ijk + to_src[:3, 3:]
        want = trilinear_reference(probs, pos).argmax(axis=0).reshape(shape)
        assert got.dtype == np.uint8 and got.shape == shape
        np.testing.assert_array_equal(got, want, err_msg=name)
    a = np.deg2rad(20.0)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    labels = probs.argmax(axis=0).astype(np.uint8)
    np.testing.assert_array_equal(
        sample_linear_argmax(probs, src_affine, shape, oblique),
        sample_nearest(labels, src_affine, shape, oblique),
    )


def test_linear_upsampling_keeps_the_clean_up_and_smooths_edges() -> None:
    """A component the clean-up drops stays background on the CT grid; on a grid 4 times finer
    the boundary lies where the interpolated probabilities cross, where nearest neighbour puts
    it halfway between the working voxels whatever their probabilities."""
    config = dataclasses.replace(CONFIG, min_component_fraction=0.5)
    probs = np.zeros((5, 4, 4, 8), dtype=np.float32)
    probs[0] = 1.0
    probs[:, :, :, 4:] = 0.0
    probs[1, :, :, 4:] = 0.6  # lung on the right half, background 0.4
    probs[0, :, :, 4:] = 0.4
    probs[:, 0, 0, 0] = 0.0
    probs[1, 0, 0, 0] = 1.0  # a one-voxel lung fragment far from the rest: dropped
    grid = WorkingGrid(
        image=np.zeros((1, 4, 4, 8), dtype=np.float32), affine=np.diag([4.0, 4, 4, 1])
    )
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = -1.5  # voxel centres of a 1 mm grid inside the 4 mm voxels
    voxels = hd.Volume(np.zeros((16, 16, 32), dtype=np.float32), fine, "PATIENT")
    linear = to_ct_grid(probs.copy(), grid, voxels, config)
    nearest = to_ct_grid(probs.copy(), grid, voxels, config, upsampling="nearest")
    assert not linear[:4, :4, :4].any() and not nearest[:4, :4, :4].any()  # fragment dropped
    # fine column c is at x = c - 1.5 mm. p(lung) rises from 0 at working column 3 (x = 12 mm)
    # to 0.6 at column 4 (16 mm) while background falls from 1 to 0.4: they cross at
    # x = 12 + 4 / 1.2 = 15.33 mm, so lung from fine column 17; nearest: from x > 14 mm, column 16
    assert linear[8, 8, :17].max() == 0 and linear[8, 8, 17:].min() == 1
    assert nearest[8, 8, :16].max() == 0 and nearest[8, 8, 16:].min() == 1


def test_connected_components_counts_and_sizes() -> None:
    mask = np.zeros((6, 8, 8), dtype=bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[4, 5, 5] = mask[5, 6, 6] = True  # two voxels touching at a corner: one component
    mask[0, 7, 0] = True
    ids, n = connected_components(mask)
    assert n == 3
    sizes = sorted(np.bincount(ids.ravel())[1:].tolist())
    assert sizes == [1, 2, 27]
    assert connected_components(np.zeros((2, 2, 2), bool))[1] == 0


# --- weights, factory, settings ---------------------------------------------------------------


def test_missing_weights_name_the_setting(table: AnatomyTable, tmp_path: Path) -> None:
    provider = BuiltinSegmenter(table, model_dir=tmp_path / "nowhere")
    with pytest.raises(SegmentationUnavailable, match=SETTING) as info:
        provider.check()
    assert "fvlm-pacs model build-demo" in str(info.value)
    assert not info.value.retryable
    assert BuiltinSegmenter(table).model_dir == default_model_dir()


def test_damaged_weights_are_refused(runs: Trained, table: AnatomyTable, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(runs.trained.out_dir, copy)
    meta = json.loads((copy / CONFIG_FILE).read_text())
    meta["sha256"] = "0" * 64
    (copy / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(SegmentationUnavailable, match="sha256"):
        BuiltinSegmenter(table, model_dir=copy).check()


def test_make_provider_builtin_with_a_model_dir(runs: Trained, table: AnatomyTable) -> None:
    provider = make_provider("builtin", table, model_dir=runs.trained.out_dir, device="cpu")
    assert isinstance(provider, SegmentationProvider) and provider.name == "builtin"
    hu, _, affine = phantom_volume(runs.cases[4])
    labelmap = provider.segment(volume_of(hu, affine), [])
    assert labelmap.array.shape == hu.shape and labelmap.array.dtype == np.uint8
    assert set(np.unique(labelmap.array)) <= {0, 1, 2, 3, 4}


def test_network_config_round_trip(runs: Trained) -> None:
    assert SegNetConfig.from_dict(CONFIG.to_dict()) == CONFIG
    loaded = load_segnet(runs.trained.out_dir, device="cpu")
    assert loaded.config == CONFIG
    meta = json.loads((runs.trained.out_dir / CONFIG_FILE).read_text())
    assert meta["anatomies"] == list(CONFIG.anatomies) and loaded.sha256 == meta["sha256"]
    with pytest.raises(ValueError, match="roi"):
        SegNetConfig(roi=(30, 64, 80))


def test_setting_round_trip_and_start_up_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FVLM_PACS_BUILTIN_SEGMENTATION_DIR", str(tmp_path / "seg"))
    settings = load_settings(
        data_dir=tmp_path, model_dir=tmp_path / "model", segmentation_provider="builtin"
    )
    assert settings.builtin_segmentation_dir == tmp_path / "seg"
    assert load_settings().builtin_segmentation_dir == tmp_path / "seg"
    monkeypatch.delenv("FVLM_PACS_BUILTIN_SEGMENTATION_DIR")
    assert load_settings().builtin_segmentation_dir is None
    with pytest.raises(ConfigError, match=SETTING):
        build_stages(settings)  # fails at start, before the fVLM model is even looked at


def test_extra_windows_are_input_channels(runs: Trained, tmp_path: Path) -> None:
    """A soft-tissue window is a second channel: fluid and heart, 30 HU apart, are 0.02 apart
    in the first window and 0.12 in a 250-HU one; a network with it trains and segments."""
    soft = dataclasses.replace(CONFIG, extra_windows=((-100.0, 150.0),))
    assert soft.windows == (CONFIG.hu_window, (-100.0, 150.0))
    assert SegNetConfig.from_dict(soft.to_dict()) == soft
    old = CONFIG.to_dict()
    del old["extra_windows"]  # a network saved before the option
    assert SegNetConfig.from_dict(old) == CONFIG
    with pytest.raises(ValueError, match="extra_windows"):
        dataclasses.replace(CONFIG, extra_windows=((50.0, 50.0),))
    hu = np.full((24, 32, 48), 12.0, dtype=np.float32)
    hu[:, :, 24:] = 42.0
    grid = to_working_grid(hd.Volume(hu, np.diag([8.0, 8.0, 8.0, 1.0]), "PATIENT"), soft)
    assert grid.image.shape == (2, *grid.shape)
    spread = grid.image.reshape(2, -1).max(axis=1) - grid.image.reshape(2, -1).min(axis=1)
    assert spread.tolist() == pytest.approx([30 / 1400, 30 / 250], abs=1e-4)
    trained = train_builtin(runs.cases[:2], tmp_path / "soft", steps=2, seed=0, config=soft)
    card = "\n".join(segmentation_section(trained.metrics, {}))
    assert "HU window [-1000.0, 400.0] and [-100.0, 150.0]," in card
    out = trained.out_dir
    loaded = load_segnet(out, device="cpu")
    assert loaded.config == soft
    hu_case, _, affine = phantom_volume(runs.cases[4])
    labels = segment_voxels(loaded, hd.Volume(hu_case, affine, "PATIENT"))
    assert labels.shape == hu_case.shape
