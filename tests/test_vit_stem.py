"""The hierarchical patchify stem (``vision.stem_strides``): a drop-in for the release's linear
patch convolution that keeps the token grid, the token order and the model-folder round trip.

Why it exists: the 16 × 16 × 32 linear patch embedding cannot threshold a few dense voxels, and
at the full learning rate it collapses (``patch_lr_scale``); the stem's small stages can, and do
not. These tests pin what the rest of the model relies on: one token per patch, in the
convolution's D-major order, each depending on its own patch only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, tiny
from fvlm_pacs.model.checkpoint import save_model
from fvlm_pacs.model.config import HMLP_STEM_STRIDES, RELEASED_HU_WINDOW, VisionConfig
from fvlm_pacs.model.predictor import cast_linear_weights
from fvlm_pacs.model.train import PATCH_CONV, param_groups
from fvlm_pacs.model.vit import PatchEmbedding

SMALL = {
    "img_size": (32, 32, 64),
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "level_blocks": (0,),
}
WINDOWS = (RELEASED_HU_WINDOW, (130.0, 1130.0))


def test_stem_config_is_checked_and_survives_json() -> None:
    with pytest.raises(ConfigError, match="multiply to"):
        VisionConfig(**SMALL, stem_strides=((2, 4, 4), (2, 2, 2)), stem_channels=(8,))
    with pytest.raises(ConfigError, match="one width per stem stage"):
        VisionConfig(**SMALL, stem_strides=((8, 8, 8), (2, 2, 4)), stem_channels=())
    with pytest.raises(ConfigError, match="needs vision.stem_strides"):
        VisionConfig(**SMALL, stem_channels=(8,))
    with pytest.raises(ConfigError, match="positive"):
        VisionConfig(**SMALL, stem_strides=((8, 8, 8), (2, 2, 4)), stem_channels=(0,))
    with pytest.raises(ConfigError, match=r"stem_strides\[1\]"):
        VisionConfig(**SMALL, stem_strides=((8, 8, 8), (2, 2)), stem_channels=(8,))
    cfg = tiny(hierarchical_stem=True)
    assert cfg.vision.stem_strides == HMLP_STEM_STRIDES
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    # a config written before stems existed reads as the release's convolution
    old = tiny().to_dict()
    del old["vision"]["stem_strides"], old["vision"]["stem_channels"]
    assert ModelConfig.from_dict(old).vision.stem_strides == ()


@torch.no_grad()
def test_a_one_stage_stem_is_the_patch_convolution() -> None:
    """With one stage and no non-linearity the stem must compute exactly what the release's
    convolution computes from the same weights: same windows, same token order."""
    torch.manual_seed(0)
    conv_cfg = VisionConfig(**SMALL, in_channels=2, hu_windows=WINDOWS)
    stem_cfg = VisionConfig(
        **SMALL, in_channels=2, hu_windows=WINDOWS, stem_strides=((16, 16, 32),)
    )
    conv, stem = PatchEmbedding(conv_cfg), PatchEmbedding(stem_cfg)
    assert conv.patch_embeddings is not None and stem.stem is not None
    linear = stem.stem.stages[0].linear
    linear.weight.copy_(conv.patch_embeddings.weight.reshape(64, -1))
    linear.bias.copy_(conv.patch_embeddings.bias)
    stem.position_embeddings.copy_(conv.position_embeddings)
    x = torch.rand(2, 1, 32, 64, 96) * 2.0  # above 1: the calcium window sees something
    (a, grid_a), (b, grid_b) = conv(x), stem(x)
    assert grid_a == grid_b == (2, 4, 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_stem_token_depends_on_its_own_patch_only() -> None:
    """Changing voxels inside one 16 × 16 × 32 patch changes that patch's token and no other,
    at the index the convolution (and so the anatomy selector) gives it."""
    torch.manual_seed(0)
    cfg = tiny(hierarchical_stem=True).vision
    embed = PatchEmbedding(cfg).eval()
    x = torch.rand(1, 1, 32, 48, 96)  # grid (2, 3, 3)
    base, grid = embed(x)
    assert grid == (2, 3, 3) and base.shape == (1, 18, cfg.hidden_size)
    y = x.clone()
    y[0, 0, 16:32, 16:32, 64:96] += 0.5  # patch (1, 1, 2) → token 1·9 + 1·3 + 2 = 14
    changed = (embed(y)[0] - base).abs().amax(dim=-1)[0]
    assert changed.argmax().item() == 14
    assert changed[14] > 1e-3
    assert torch.count_nonzero(changed > 1e-6).item() == 1


def test_the_stem_trains_at_the_full_learning_rate() -> None:
    """``patch_lr_scale`` slows the 8192-input convolution only; a stem model has none, so
    every parameter is in the full-rate group."""
    model = FvlmModel(tiny(hierarchical_stem=True))
    assert not any(PATCH_CONV in n for n, _ in model.named_parameters())
    groups = param_groups(model, 1e-3, 0.01)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_a_stem_model_round_trips_through_its_model_folder(tmp_path) -> None:
    torch.manual_seed(0)
    model = FvlmModel(tiny(hierarchical_stem=True)).eval()
    folder = save_model(model, tmp_path / "m", "stem-test", "1")
    loaded = FvlmModel.from_checkpoint(folder, device="cpu").eval()
    assert loaded.config == model.config
    image = torch.rand(1, 1, 32, 32, 64)
    labels = torch.ones(1, 32, 32, 64, dtype=torch.long)
    with torch.no_grad():
        # anatomies absent from the label map are NaN rows in both
        torch.testing.assert_close(
            loaded.encode_anatomies(image, labels),
            model.encode_anatomies(image, labels),
            equal_nan=True,
        )


def test_a_stem_model_under_bf16_tracks_fp32() -> None:
    """The Predictor's bf16 path (matmul weights stored in bf16, autocast) reaches the stem's
    linear stages too; the anatomy embeddings stay close to fp32's."""
    torch.manual_seed(0)
    model = FvlmModel(tiny(hierarchical_stem=True)).eval()
    with torch.no_grad():
        model.query_tokens.normal_()
    low = copy.deepcopy(model)
    cast_linear_weights(low, torch.bfloat16)
    assert low.visual_encoder.patch_embedding.stem.stages[0].linear.weight.dtype == torch.bfloat16
    image = torch.rand(1, 1, 32, 32, 64)
    labels = torch.ones(1, 32, 32, 64, dtype=torch.long)
    with torch.no_grad():
        ref = model.encode_anatomies(image, labels)[0, 0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = low.encode_anatomies(image, labels)[0, 0].float()
    assert torch.nn.functional.cosine_similarity(ref, got, dim=0) > 0.99
