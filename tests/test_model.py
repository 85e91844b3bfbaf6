"""fVLM network pieces: config, ViT key set and levels, anatomy pooling, text path, scoring."""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, pair_score, score_findings, tiny, vit_b
from fvlm_pacs.model.anatomy import pool_anatomies, token_selector
from fvlm_pacs.model.checkpoint import CheckpointError, infer_vision_config
from fvlm_pacs.model.config import TextConfig, VisionConfig
from fvlm_pacs.model.intensity import window_channels
from fvlm_pacs.model.text import bert_config, load_tokenizer
from fvlm_pacs.model.vit import VisionTransformer3D

# -- tiny local text models: nothing is downloaded (shared with test_model_checkpoint) ----
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "not",
    "emphysema",
    "effusion",
    "pleural",
    "lung",
    "heart",
    "shows",
    "no",
    "significant",
    "abnormalities",
    "cardiomegaly",
    ".",
    ",",
    "##s",
    "##es",
]
VOCAB = WORDS + list(string.ascii_lowercase)

SMALL_TEXT = TextConfig(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    max_tokens=64,
)


def write_text_model_dir(folder: Path, text: TextConfig = SMALL_TEXT) -> Path:
    """A CXR-BERT-like folder: config.json (with a foreign model_type) and vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = {
        "model_type": "cxr-bert",
        "architectures": ["CXRBertModel"],
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "layer_norm_eps": text.layer_norm_eps,
        "pad_token_id": 0,
        "hidden_act": "gelu",
        "type_vocab_size": 2,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def small_config(vision: VisionConfig | None = None) -> ModelConfig:
    """Tiny dims everywhere; ``max_tokens`` of the text dir is the default 384 capped at 64."""
    return ModelConfig(
        vision=vision
        or VisionConfig(
            img_size=(32, 32, 64),
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            mlp_dim=128,
            level_blocks=(1, 2, 3),
        ),
        text=SMALL_TEXT,
        embed_dim=16,
    )


#: The released key set (12 blocks, nominal grid 7x16x11) at a small width.
VITB_KEYS_SMALL = VisionConfig(hidden_size=128, num_heads=2, mlp_dim=256)


PATCH = (16, 16, 32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> FvlmModel:
    folder = write_text_model_dir(tmp_path_factory.mktemp("text"))
    torch.manual_seed(0)
    m = FvlmModel(small_config(), tokenizer=load_tokenizer(folder))
    with torch.no_grad():  # non-zero queries so anatomies differ
        m.query_tokens.normal_()
    return m.eval()


# -- config -------------------------------------------------------------------------------
def test_config_json_round_trip_and_presets() -> None:
    for cfg in (vit_b(), tiny(), small_config()):
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert vit_b().vision.grid == (7, 16, 11)
    assert vit_b().vision.level_blocks == (3, 6, 9)
    assert vit_b().text.layer_norm_eps == 1e-12 and vit_b().vision.layer_norm_eps == 1e-5
    with torch.device("meta"):
        assert len(FvlmModel(tiny()).vision_projs) == 4  # the demo preset builds


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="vision.img_size"):
        VisionConfig(img_size=(100, 256, 352))
    with pytest.raises(ConfigError, match="unknown vision config keys"):
        ModelConfig.from_dict({"vision": {"hidden": 3}})
    with pytest.raises(ConfigError, match="anatomies"):
        ModelConfig(anatomies=("lung", "lung"))


# -- ViT ------------------------------------------------------------------------------------
def expected_vit_b_keys() -> set[str]:
    keys = {
        "patch_embedding.patch_embeddings.weight",
        "patch_embedding.patch_embeddings.bias",
        "patch_embedding.position_embeddings",
        "norm.weight",
        "norm.bias",
    }
    for i in range(12):
        for name in (
            "norm1.weight",
            "norm1.bias",
            "attn.qkv.weight",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "norm2.weight",
            "norm2.bias",
            "mlp.linear1.weight",
            "mlp.linear1.bias",
            "mlp.linear2.weight",
            "mlp.linear2.bias",
        ):
            keys.add(f"blocks.{i}.{name}")
    return keys


def test_vit_b_key_set_and_shapes_on_meta_device() -> None:
    with torch.device("meta"):
        vit = VisionTransformer3D(VisionConfig())
    state = vit.state_dict()
    assert set(state) == expected_vit_b_keys()
    assert tuple(state["patch_embedding.position_embeddings"].shape) == (1, 1232, 768)
    assert tuple(state["patch_embedding.patch_embeddings.weight"].shape) == (768, 1, 16, 16, 32)
    assert tuple(state["blocks.0.attn.qkv.weight"].shape) == (2304, 768)
    assert tuple(state["blocks.11.mlp.linear1.weight"].shape) == (3072, 768)
    # and the released dims are recovered from those shapes alone
    prefixed = {f"visual_encoder.{k}": v for k, v in state.items()}
    assert infer_vision_config(prefixed) == VisionConfig()
    # which HU window each of several input channels is cannot be read from the weights
    prefixed["visual_encoder.patch_embedding.patch_embeddings.weight"] = torch.empty(
        768, 4, 16, 16, 32, device="meta"
    )
    with pytest.raises(CheckpointError, match="hu_windows"):
        infer_vision_config(prefixed)


def test_vit_levels_grid_and_layer_norm_eps() -> None:
    torch.manual_seed(0)
    cfg = small_config().vision
    vit = VisionTransformer3D(cfg).eval()
    levels, grid = vit(torch.rand(2, 1, 32, 32, 64))
    assert grid == (2, 2, 2)
    assert len(levels) == 4 and all(t.shape == (2, 8, 64) for t in levels)
    assert all(m.eps == 1e-5 for m in vit.modules() if isinstance(m, torch.nn.LayerNorm))
    # the last level is the normed stream: zero mean per token
    assert levels[-1].mean(-1).abs().max() < 1e-4


def test_vit_levels_are_the_residual_stream_after_blocks_3_6_9() -> None:
    torch.manual_seed(0)
    cfg = VisionConfig(img_size=(16, 16, 32), hidden_size=32, num_heads=2, mlp_dim=32)
    vit = VisionTransformer3D(cfg).eval()
    image = torch.rand(1, 1, 16, 32, 32)
    levels, grid = vit(image)
    x, _ = vit.patch_embedding(image)
    stream = []
    for block in vit.blocks:
        x = block(x)
        stream.append(x)
    for got, idx in zip(levels[:3], (3, 6, 9), strict=True):
        torch.testing.assert_close(got, stream[idx])
    torch.testing.assert_close(levels[3], vit.norm(stream[11]))


def test_attention_matches_a_hand_computation() -> None:
    torch.manual_seed(1)
    cfg = VisionConfig(
        img_size=(16, 16, 32),
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        mlp_dim=32,
        level_blocks=(0, 1, 2),
    )
    attn = VisionTransformer3D(cfg).blocks[0].attn
    x = torch.randn(2, 5, 32)
    qkv = attn.qkv(x).reshape(2, 5, 3, 4, 8)  # (qkv, head, head_dim) packing, as MONAI
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), want)


def test_position_embedding_interpolates_to_another_grid() -> None:
    torch.manual_seed(0)
    cfg = small_config().vision  # nominal grid 2x2x2
    vit = VisionTransformer3D(cfg).eval()
    pe = vit.patch_embedding
    assert pe.position_embedding_for((2, 2, 2)) is pe.position_embeddings
    with torch.no_grad():
        pe.position_embeddings.copy_(torch.arange(64.0).expand(1, 8, 64))  # constant over space
    resized = pe.position_embedding_for((3, 4, 2))
    assert resized.shape == (1, 24, 64)
    torch.testing.assert_close(resized, torch.arange(64.0).expand(1, 24, 64))
    with torch.no_grad():  # a ramp along D stays ordered along D after resampling
        ramp = torch.tensor([0.0, 1.0]).repeat_interleave(4).reshape(1, 8, 1).expand(1, 8, 64)
        pe.position_embeddings.copy_(ramp)
    along_d = pe.position_embedding_for((4, 2, 2))[0, ::4, 0]
    assert torch.all(along_d[1:] >= along_d[:-1]) and along_d[0] == 0 and along_d[-1] == 1
    levels, grid = vit(torch.rand(1, 1, 48, 64, 64))
    assert grid == (3, 4, 2) and levels[0].shape == (1, 24, 64)


def test_patch_embedding_is_the_conv3d_it_stores() -> None:
    """The windowed patchify-as-one-matrix-product equals the Conv3d whose parameters it keeps
    applied to the windowed image, with several windows and a batch, token order D-major then
    H then W."""
    torch.manual_seed(0)
    cfg = VisionConfig(
        in_channels=2, patch_size=(4, 8, 16), img_size=(8, 16, 32), hidden_size=24,
        num_layers=1, num_heads=2, mlp_dim=48, level_blocks=(),
        hu_windows=((-1150, 350), (130, 1130)),
    )  # fmt: skip
    pe = VisionTransformer3D(cfg).patch_embedding
    x = torch.rand(3, 1, 12, 24, 64) * 1.5  # scaled HU up to 1100 HU
    with torch.no_grad():
        tokens, grid = pe(x)
        conv = pe.patch_embeddings(window_channels(x, cfg.hu_windows))  # [B, C, D', H', W']
    assert grid == (3, 3, 4)
    expected = conv.flatten(2).transpose(1, 2) + pe.position_embedding_for(grid)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_image_size_not_a_patch_multiple_is_refused() -> None:
    vit = VisionTransformer3D(small_config().vision)
    with pytest.raises(ValueError, match="along W"):
        vit(torch.rand(1, 1, 32, 32, 60))


# -- anatomy pooling --------------------------------------------------------------------------
def test_selector_picks_exactly_the_tokens_the_mask_covers() -> None:
    lab = torch.zeros(1, 32, 32, 64, dtype=torch.long)
    lab[0, 17, 3, 40] = 1  # one voxel -> token (d=1, h=0, w=1) = 1*4 + 0*2 + 1 = 5
    lab[0, 0:2, 20:22, 0:3] = 2  # token (0, 1, 0) = 2
    lab[0, 31, 31, 63] = 2  # token (1, 1, 1) = 7
    sel = token_selector(lab, 3, PATCH)
    assert sel.shape == (1, 3, 8)
    assert sel[0, 0].nonzero().flatten().tolist() == [5]
    assert sel[0, 1].nonzero().flatten().tolist() == [2, 7]
    assert not sel[0, 2].any()
    # training feeds uint8 label maps, flipped views included: same tokens
    assert torch.equal(token_selector(lab.to(torch.uint8), 3, PATCH), sel)
    flipped = lab.to(torch.uint8).flip(1, 2, 3)  # non-contiguous
    expected = sel.reshape(1, 3, 2, 2, 2).flip(2, 3, 4).reshape(1, 3, 8)
    assert torch.equal(token_selector(flipped, 3, PATCH), expected)


def test_pooling_equals_attention_over_the_selected_tokens_only(model: FvlmModel) -> None:
    torch.manual_seed(2)
    levels = [torch.randn(2, 8, 64) for _ in range(4)]
    sel = torch.zeros(2, 4, 8, dtype=torch.bool)
    sel[0, 0, [1, 5]] = True
    sel[0, 1, :] = True
    sel[1, 0, [7]] = True
    sel[1, 2, [0, 3, 4]] = True
    with torch.no_grad():
        got = pool_anatomies(levels, sel, model.query_tokens, model.attention, model.vision_projs)
        for b in range(2):
            for k in range(4):
                idx = sel[b, k].nonzero().flatten()
                if idx.numel() == 0:
                    assert torch.isnan(got[b, k]).all()
                    continue
                keys = torch.cat([lv[b, idx] for lv in levels]).unsqueeze(0)
                q = model.query_tokens[k].reshape(1, 1, -1)
                out, _ = model.attention(q, keys, keys)
                want = F.normalize(model.vision_projs[k](out[0, 0]), dim=-1)
                torch.testing.assert_close(got[b, k], want, rtol=1e-5, atol=1e-6)
        # tokens outside the selector do not matter
        noisy = [lv.clone() for lv in levels]
        noisy[0][0, 0] += 100.0
        again = pool_anatomies(noisy, sel, model.query_tokens, model.attention, model.vision_projs)
    torch.testing.assert_close(again[0, 0], got[0, 0])
    assert not torch.allclose(again[0, 1], got[0, 1])  # anatomy 1 covers token 0


def test_encode_anatomies_nan_row_for_absent_anatomy_and_unit_norm(model: FvlmModel) -> None:
    torch.manual_seed(3)
    image = torch.rand(1, 1, 32, 32, 64)
    lab = torch.zeros(1, 32, 32, 64, dtype=torch.long)
    lab[0, :16] = 1
    lab[0, 16:, :16] = 2
    lab[0, 20, 20, 20] = 4
    with torch.no_grad():
        emb = model.encode_anatomies(image, lab)
    assert emb.shape == (1, 4, 16)
    assert torch.isnan(emb[0, 2]).all()
    torch.testing.assert_close(emb[0, [0, 1, 3]].norm(dim=-1), torch.ones(3))


def test_outputs_are_deterministic_on_cpu(tmp_path) -> None:
    folder = write_text_model_dir(tmp_path)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        m = FvlmModel(small_config(), tokenizer=load_tokenizer(folder)).eval()
        lab = torch.ones(1, 32, 32, 64, dtype=torch.long)
        with torch.no_grad():
            return (
                m.encode_anatomies(torch.rand(1, 1, 32, 32, 64), lab),
                m.encode_text(["pleural effusion."]),
            )

    a, b = run(), run()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert torch.isnan(a[0][0, 1:]).all() and not torch.isnan(a[0][0, 0]).any()


# -- text -----------------------------------------------------------------------------------
def test_text_path_matches_bert_with_zero_token_type_embedding(model: FvlmModel) -> None:
    assert not any("token_type" in k for k in model.state_dict())
    assert not any("pooler" in k for k in model.state_dict())
    reference = BertModel(bert_config(model.config.text), add_pooling_layer=False).eval()
    state = {
        "embeddings.token_type_embeddings.weight": torch.zeros_like(
            reference.embeddings.token_type_embeddings.weight
        )
    }
    state.update(model.text_encoder.state_dict())
    reference.load_state_dict(state, strict=True)
    texts = ["Emphysema.", "Not emphysema.", "heart shows no significant abnormalities."]
    tok = model.tokenizer
    assert tok is not None
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 1] == tok.convert_tokens_to_ids("emphysema")  # lower-cased
    with torch.no_grad():
        cls = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, 0]
        want = F.normalize(model.text_proj(cls), dim=-1)
        got = model.encode_text(texts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the bypass matters: a non-zero token-type row 0 (HF's default path) changes the result
        reference.embeddings.token_type_embeddings.weight.normal_()
        shifted = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, 0]
    assert not torch.allclose(F.normalize(model.text_proj(shifted), dim=-1), got, atol=1e-3)
    assert got.shape == (3, 16)


def test_encode_text_refuses_a_bare_string(model: FvlmModel) -> None:
    with pytest.raises(TypeError):
        model.encode_text("emphysema")  # type: ignore[arg-type]


# -- scoring ----------------------------------------------------------------------------------
def test_score_is_sigmoid_of_scaled_cosine_difference(model: FvlmModel) -> None:
    torch.manual_seed(4)
    v = F.normalize(torch.randn(3, 4, 16), dim=-1)
    v[1, 2] = float("nan")
    pos = F.normalize(torch.randn(5, 16), dim=-1)
    neg = F.normalize(torch.randn(5, 16), dim=-1)
    index = [0, 2, 2, 3, 1]
    tau = model.temperature
    assert tau == pytest.approx(0.07)
    got = score_findings(v, index, pos, neg, tau)
    assert got.shape == (3, 5)
    for b in range(3):
        for f, k in enumerate(index):
            cos_pos = float(v[b, k] @ pos[f])
            cos_neg = float(v[b, k] @ neg[f])
            if math.isnan(cos_pos):
                assert math.isnan(float(got[b, f]))
                continue
            want = 1.0 / (1.0 + math.exp(-(cos_pos - cos_neg) / tau))
            assert float(got[b, f]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.isnan(got[1, [1, 2]]).all() and not torch.isnan(got[1, [0, 3, 4]]).any()
    assert float(pair_score(pos[0], pos[0], neg[0], 0.5)) > 0.5


def test_temperature_is_clamped(model: FvlmModel) -> None:
    with torch.no_grad():
        old = model.temp.clone()
        model.temp.fill_(3.0)
        assert model.temperature == 0.5
        model.temp.fill_(-1.0)
        assert model.temperature == pytest.approx(0.001)
        model.temp.copy_(old)


def test_released_key_names_of_the_whole_model() -> None:
    with torch.device("meta"):
        m = FvlmModel(vit_b())
    keys = set(m.state_dict())
    visual = {k.removeprefix("visual_encoder.") for k in keys if k.startswith("visual_encoder.")}
    assert visual == expected_vit_b_keys()
    top = {k for k in keys if not re.match(r"(visual|text)_encoder\.", k)}
    assert top == {
        "query_tokens",
        "temp",
        "attention.in_proj_weight",
        "attention.in_proj_bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        *(f"vision_projs.{k}.{p}" for k in range(4) for p in ("weight", "bias")),
    }
    assert "text_encoder.embeddings.word_embeddings.weight" in keys
    assert "text_encoder.encoder.layer.11.output.LayerNorm.weight" in keys
    assert tuple(m.state_dict()["query_tokens"].shape) == (4, 768)


def test_vit_computes_what_monai_vit_computes() -> None:
    """Same function as ``monai.networks.nets.ViT`` (needs einops, which MONAI's SABlock uses)."""
    pytest.importorskip("einops")
    from monai.networks.nets import ViT

    torch.manual_seed(5)
    cfg = small_config().vision
    monai_vit = ViT(
        1, cfg.img_size, cfg.patch_size, hidden_size=64, mlp_dim=128, num_layers=4, num_heads=4
    ).eval()
    ours = VisionTransformer3D(cfg).eval()
    state = monai_vit.state_dict()
    # MONAI >= 1.4 adds an unused cross-attention norm per block; the release (1.3) has none.
    extra = {k for k in state if k not in ours.state_dict()}
    assert all(".norm_cross_attn." in k for k in extra)
    ours.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)
    image = torch.rand(2, 1, 32, 32, 64)
    with torch.no_grad():
        final, hidden = monai_vit(image)
        levels, _ = ours(image)
    torch.testing.assert_close(levels[-1], final, rtol=1e-4, atol=1e-5)
    for got, idx in zip(levels[:3], cfg.level_blocks, strict=True):
        torch.testing.assert_close(got, hidden[idx], rtol=1e-4, atol=1e-5)
