"""The intensity convention: scaled HU in, the model's own HU windows as channels.

Why it exists: the release's one window [−1150, 350] clips calcium (350–1000 HU) to the value of
dense soft tissue, so no linear patch embedding can tell a calcified plaque from its wall; the
model now clips to windows its config names, and the release's window still gives what it gave.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, tiny
from fvlm_pacs.model.config import RELEASED_HU_WINDOW, VisionConfig
from fvlm_pacs.model.intensity import scale_hu, window_channels

CALCIUM = (130.0, 1130.0)


def hu_image(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(scale_hu(values))[None, None]


def test_scale_hu_keeps_what_lies_above_the_release_window() -> None:
    got = scale_hu(np.array([-3024.0, -1150.0, -1000.0, 350.0, 1000.0, 5000.0]))
    want = np.array([0.0, 0.0, 150 / 1500, 1.0, 2150 / 1500, 4221 / 1500], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_window_channels_clip_each_window_to_0_1() -> None:
    hu = np.array([-1100.0, -950.0, 40.0, 350.0, 630.0, 1500.0]).reshape(1, 1, 6)
    image = hu_image(hu)
    got = window_channels(image, ((-1000.0, -900.0), CALCIUM))
    assert got.shape == (1, 2, 1, 1, 6)
    low, calcium = got[0, 0, 0, 0], got[0, 1, 0, 0]
    torch.testing.assert_close(low, torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(calcium, torch.tensor([0.0, 0.0, 0.0, 0.22, 0.5, 1.0]))


def test_the_release_window_is_exactly_the_old_clip() -> None:
    torch.manual_seed(0)
    image = torch.rand(2, 1, 4, 4, 4) * 3.0 - 0.5  # scaled HU from below air to bone
    got = window_channels(image, (RELEASED_HU_WINDOW,))
    assert torch.equal(got, image.clamp(0.0, 1.0))
    with pytest.raises(ValueError, match="one scaled-HU channel"):
        window_channels(image.expand(2, 2, 4, 4, 4), (RELEASED_HU_WINDOW,))


def test_windows_are_checked_and_survive_json() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        VisionConfig(in_channels=2)
    with pytest.raises(ConfigError, match="low < high"):
        VisionConfig(hu_windows=((-2000.0, 0.0),))
    with pytest.raises(ConfigError, match="low < high"):
        VisionConfig(hu_windows=((300.0, 100.0),))
    with pytest.raises(ConfigError, match="at least one"):
        VisionConfig(in_channels=0, hu_windows=())
    with pytest.raises(ConfigError, match="pairs"):
        ModelConfig.from_dict({"vision": {"hu_windows": [[-1150]]}})
    data = tiny().to_dict()
    data["vision"].update(hu_windows=[[-1150, 350], list(CALCIUM)], in_channels=2)
    cfg = ModelConfig.from_dict(data)
    assert cfg.vision.hu_windows == ((-1150.0, 350.0), CALCIUM)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    # a config written before windows existed reads as the release's one window
    old = tiny().to_dict()
    del old["vision"]["hu_windows"]
    assert ModelConfig.from_dict(old).vision.hu_windows == (RELEASED_HU_WINDOW,)


def model_with(windows: tuple[tuple[float, float], ...]) -> FvlmModel:
    torch.manual_seed(0)
    m = FvlmModel(tiny(hu_windows=windows))
    with torch.no_grad():
        m.query_tokens.normal_()
    return m.eval()


def plaque(hu_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """40 HU soft tissue (anatomy 1 everywhere) with one 4-voxel plaque of ``hu_value``."""
    hu = np.full((32, 32, 64), 40.0, dtype=np.float32)
    hu[10:12, 10:12, 20] = hu_value
    labels = torch.ones(1, 32, 32, 64, dtype=torch.long)
    return hu_image(hu), labels


@torch.no_grad()
def test_only_a_calcium_window_lets_the_model_see_a_dense_plaque() -> None:
    release = model_with((RELEASED_HU_WINDOW,))
    faint, dense = plaque(350.0), plaque(900.0)
    # the release clips both plaques to 350 HU: the same embedding
    lung = 0  # the only anatomy in the label map (the others are NaN rows)
    assert torch.equal(
        release.encode_anatomies(*faint)[0, lung], release.encode_anatomies(*dense)[0, lung]
    )
    both = model_with((RELEASED_HU_WINDOW, CALCIUM))
    a, b = both.encode_anatomies(*faint), both.encode_anatomies(*dense)
    assert (a[0, lung] - b[0, lung]).abs().max() > 1e-4
