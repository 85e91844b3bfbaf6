"""Anatomy HU histograms: exact counts, the absent-anatomy rules, the config switch, round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, save_model, tiny
from fvlm_pacs.model.histogram import (
    FRACTION_FLOOR,
    HISTOGRAM_EDGES,
    anatomy_histograms,
    feature_count,
    log_fractions,
    log_volume,
)
from fvlm_pacs.model.intensity import scale_hu
from fvlm_pacs.model.text import load_tokenizer

from .test_model import write_text_model_dir

EDGES = (-900.0, 0.0, 300.0)  # bins: < -900, [-900, 0), [0, 300), >= 300


def scaled(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(scale_hu(hu))[None, None]


def with_histograms(edges: tuple[float, ...] = HISTOGRAM_EDGES) -> ModelConfig:
    return dataclasses.replace(tiny(), histogram_edges=edges)


def test_histogram_counts_each_anatomys_voxels_in_their_bins() -> None:
    hu = np.full((2, 2, 4), 40.0, dtype=np.float32)
    labels = np.zeros((2, 2, 4), dtype=np.int64)
    # anatomy 1: 4 voxels: two air, one at -900 exactly (second bin), one of calcium
    labels[0, 0] = 1
    hu[0, 0] = [-1000.0, -950.0, -900.0, 800.0]
    # anatomy 2: 3 voxels of soft tissue and one just below 0 HU (rounded down: second bin)
    labels[1, 1] = 2
    hu[1, 1] = [40.0, 40.0, 299.0, -0.4]
    labels[1, 0, 0] = 7  # not one of the model's anatomies: ignored
    hu[1, 0, 0] = 2000.0
    got = anatomy_histograms(scaled(hu), torch.from_numpy(labels)[None], 3, EDGES)
    counts = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got[0], log_fractions(counts))
    assert got.shape == (1, 3, 4)
    # the feature scale: a whole anatomy in one bin is 1, an empty bin -1 (log10 of the floor)
    assert log_fractions(torch.tensor([[0.0, 5.0]]))[0].tolist() == pytest.approx(
        [(np.log10(FRACTION_FLOOR) + 2) / 2, (np.log10(1 + FRACTION_FLOOR) + 2) / 2]
    )


def test_each_sample_of_a_batch_counts_its_own_voxels() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 1, 8, 8, 16) * 2.8
    labels = torch.randint(0, 5, (3, 8, 8, 16), dtype=torch.int32)
    kept = labels.clone()
    batch = anatomy_histograms(image, labels, 4, HISTOGRAM_EDGES)
    assert torch.equal(labels, kept)  # the caller's label map is not the scratch buffer
    for i in range(3):
        alone = anatomy_histograms(image[i : i + 1], labels[i : i + 1], 4, HISTOGRAM_EDGES)
        torch.testing.assert_close(batch[i : i + 1], alone)


def test_histograms_refuse_mismatched_or_negative_labels() -> None:
    image = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="must match image"):
        anatomy_histograms(image, torch.zeros(1, 4, 4, 5, dtype=torch.long), 2, EDGES)
    with pytest.raises(ValueError, match="negative"):
        anatomy_histograms(image, torch.full((1, 4, 4, 4), -1), 2, EDGES)


def test_shell_counts_the_surroundings_no_anatomy_claims() -> None:
    """Pleural fluid lies outside the lung's mask: the shell histogram is where it shows."""
    hu = np.full((1, 1, 8), 40.0, dtype=np.float32)
    labels = np.zeros((1, 1, 8), dtype=np.int64)
    labels[0, 0, 0:2] = 1  # "lung"
    labels[0, 0, 4:6] = 2  # "heart"
    hu[0, 0, 2] = 10.0  # fluid, next to the lung only
    hu[0, 0, 3] = -100.0  # fat between both: in both shells
    labels[0, 0, 6] = 9  # a label that is none of the model's anatomies: surroundings
    hu[0, 0, 6] = 800.0
    got = anatomy_histograms(scaled(hu), torch.from_numpy(labels)[None], 3, EDGES, shell=2)
    assert got.shape == (1, 3, feature_count(EDGES, shell=2)) == (1, 3, 8)
    shells = torch.tensor(
        [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    )  # lung: voxels 2, 3; heart: 2, 3, 6, 7 (40 HU); anatomy 3 absent
    shells[1] = torch.tensor([0.0, 1.0, 2.0, 1.0])
    torch.testing.assert_close(got[0, :, 4:], log_fractions(shells))
    own = anatomy_histograms(scaled(hu), torch.from_numpy(labels)[None], 3, EDGES)
    torch.testing.assert_close(got[..., :4], own)  # the anatomy's own part is unchanged


def reference_shells(labels: np.ndarray, k: int, width: int) -> np.ndarray:
    """bool [B, K, D, H, W] by brute force: within ``width`` voxels (box) of anatomy k, in none."""
    b, d, h, w = labels.shape
    free = (labels < 1) | (labels > k)
    out = np.zeros((b, k, d, h, w), dtype=bool)
    for a in range(k):
        mask = np.pad(labels == a + 1, ((0, 0), (width,) * 2, (width,) * 2, (width,) * 2))
        for i in range(2 * width + 1):
            for j in range(2 * width + 1):
                for m in range(2 * width + 1):
                    out[:, a] |= mask[:, i : i + d, j : j + h, m : m + w]
        out[:, a] &= free
    return out


@pytest.mark.parametrize(("k", "width"), [(4, 2), (9, 1)])  # 9: more than one bincount group
def test_shells_match_a_brute_force_dilation_on_a_random_batch(k: int, width: int) -> None:
    rng = np.random.default_rng(k)
    p = np.full(k + 2, 0.3 / (k + 1))
    p[0] = 0.7  # mostly background, so shells are neither empty nor everything
    labels = rng.choice(k + 2, size=(2, 6, 7, 9), p=p)  # label k + 1: no anatomy of the model
    hu = rng.uniform(-1100, 1100, size=labels.shape).astype(np.float32)
    image = torch.from_numpy(scale_hu(hu))[:, None]
    got = anatomy_histograms(image, torch.from_numpy(labels), k, EDGES, shell=width, volume=True)
    shells = reference_shells(labels, k, width)
    bins = np.digitize(np.floor(hu), EDGES)
    for s in range(2):
        for a in range(k):
            counts = np.bincount(bins[s][shells[s, a]], minlength=4).astype(np.float32)
            own = np.bincount(bins[s][labels[s] == a + 1], minlength=4).astype(np.float32)
            assert 0 < counts.sum() < shells[s, a].size
            torch.testing.assert_close(got[s, a, 4:8], log_fractions(torch.from_numpy(counts)))
            torch.testing.assert_close(got[s, a, :4], log_fractions(torch.from_numpy(own)))
            assert float(got[s, a, 8]) == pytest.approx((np.log10(max(own.sum(), 1)) - 5) / 2)


def test_volume_is_the_anatomys_log_voxel_count() -> None:
    counts = torch.tensor([[1e5, 0.0], [5e2, 5e2], [0.0, 0.0]])
    assert log_volume(counts).flatten().tolist() == pytest.approx([0.0, -1.0, -2.5])
    assert feature_count(HISTOGRAM_EDGES) == 18
    assert feature_count(HISTOGRAM_EDGES, shell=3, volume=True) == 37


def test_shell_and_volume_widen_the_mlp_and_round_trip() -> None:
    cfg = dataclasses.replace(with_histograms(), histogram_shell=2, histogram_volume=True)
    model = FvlmModel(cfg, with_text=False)
    assert model.state_dict()["histogram.mlps.0.0.weight"].shape[1] == 37
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_json(with_histograms().to_json()).histogram_shell == 0
    with pytest.raises(ConfigError, match="need histogram_edges"):
        dataclasses.replace(tiny(), histogram_volume=True)
    with pytest.raises(ConfigError, match="histogram_shell"):
        dataclasses.replace(with_histograms(), histogram_shell=-1)


@pytest.mark.parametrize(
    ("edges", "message"),
    [((0.0, 0.0), "increase strictly"), ((10.0, -10.0), "increase strictly"), ("ab", "HU")],
)
def test_config_refuses_bad_edges(edges, message) -> None:
    with pytest.raises(ConfigError, match=message):
        with_histograms(edges)
    with pytest.raises(ConfigError, match="histogram_hidden"):
        dataclasses.replace(with_histograms(), histogram_hidden=0)


def test_only_a_config_with_edges_has_histogram_weights() -> None:
    plain, hist = FvlmModel(tiny(), with_text=False), FvlmModel(with_histograms(), with_text=False)
    assert plain.histogram is None and not any("histogram" in k for k in plain.state_dict())
    extra = {k for k in hist.state_dict() if k.startswith("histogram.")}
    assert extra and set(hist.state_dict()) - extra == set(plain.state_dict())
    assert ModelConfig.from_json(with_histograms().to_json()) == with_histograms()
    assert ModelConfig.from_json(tiny().to_json()).histogram_edges == ()


def calcified_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images alike but for 12 voxels of 800 HU inside anatomy 4 (the aorta), beside bone
    of the background in the same patch."""
    hu = np.full((2, 32, 32, 64), 40.0, dtype=np.float32)
    hu[:, :, :, :8] = 900.0  # "spine": background label, same tokens as the aorta
    hu[1, 10:12, 10:12, 8:11] = 800.0  # plaque
    labels = torch.zeros(2, 32, 32, 64, dtype=torch.long)
    labels[:, :16, :16, 8:24] = 4
    labels[:, 16:] = 1
    return torch.from_numpy(scale_hu(hu))[:, None], labels


def test_a_fresh_model_starts_from_the_token_pooling_and_learns_what_tokens_blur() -> None:
    """The histogram MLPs' last layers start at zero: a fresh model's embeddings are those of the
    same weights without histograms. After a few steps on 'tell these two aortas apart' the
    histogram path has moved them apart; on the same steps without it the tokens are the ones
    that must — which the test does not rely on, it only checks the path carries signal."""
    torch.manual_seed(0)
    image, labels = calcified_pair()
    hist = FvlmModel(with_histograms(), with_text=False)
    plain = FvlmModel(tiny(), with_text=False)
    plain.load_state_dict(
        {k: v for k, v in hist.state_dict().items() if not k.startswith("histogram.")}
    )
    hist.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            hist.encode_anatomies(image, labels),
            plain.encode_anatomies(image, labels),
            equal_nan=True,
        )
    features = anatomy_histograms(image, labels, 4, HISTOGRAM_EDGES)
    assert not torch.equal(features[0, 3], features[1, 3])  # the aorta's bins differ
    torch.testing.assert_close(features[0, 0], features[1, 0])  # the lung's do not
    # gradient reaches the histogram MLPs and no NaN from the absent anatomies (2 and 3)
    hist.train()
    optimiser = torch.optim.AdamW(hist.histogram.parameters(), lr=1e-2)
    for _ in range(20):
        emb = hist.encode_anatomies(image, labels)
        loss = (emb[0, 3] * emb[1, 3]).sum()  # cosine of the two aortas: push apart
        optimiser.zero_grad()
        loss.backward()
        grads = [p.grad for p in hist.histogram.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimiser.step()
    with torch.no_grad():
        emb = hist.eval().encode_anatomies(image, labels)
    assert float((emb[0, 3] * emb[1, 3]).sum()) < 0.0
    assert torch.isnan(emb[:, 1:3]).all()  # absent anatomies stay "not assessable"


def test_histogram_weights_round_trip_through_our_format(tmp_path) -> None:
    torch.manual_seed(1)
    tokenizer = load_tokenizer(write_text_model_dir(tmp_path / "t"))
    cfg = dataclasses.replace(
        with_histograms(), text=dataclasses.replace(tiny().text, vocab_size=46)
    )
    model = FvlmModel(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for p in model.histogram.parameters():
            p.normal_()
    out = save_model(model, tmp_path / "m", "tiny", "0.1")
    loaded = FvlmModel.from_checkpoint(out, with_text=False)
    assert loaded.config.histogram_edges == HISTOGRAM_EDGES
    image, labels = calcified_pair()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_anatomies(image, labels),
            model.encode_anatomies(image, labels),
            rtol=0,
            atol=0,
            equal_nan=True,
        )
