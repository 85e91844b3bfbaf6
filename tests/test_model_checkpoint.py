"""Checkpoint formats: the authors' layout loads strictly and equals its converted copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import CheckpointError, FvlmModel, import_official, save_model
from fvlm_pacs.model.checkpoint import IGNORED_RESIDUE, sha256_file
from fvlm_pacs.model.fvlm import is_text_key
from fvlm_pacs.model.text import load_tokenizer

from .test_model import VITB_KEYS_SMALL, small_config, write_text_model_dir


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A file in the authors' layout: 12 ViT blocks on the 7x16x11 grid, small widths."""
    root = tmp_path_factory.mktemp("released")
    text_dir = write_text_model_dir(root / "cxr-bert")
    torch.manual_seed(0)
    source = FvlmModel(small_config(VITB_KEYS_SMALL), tokenizer=load_tokenizer(text_dir)).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))  # queries, biases etc. all non-trivial
        source.temp.fill_(0.05)
    state = dict(source.state_dict())
    state["text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    state["text_encoder.cls.predictions.decoder.weight"] = torch.randn(26 + 20, 32)
    state["text_encoder.cls.predictions.decoder.bias"] = torch.randn(46)
    path = root / "fvlm_ctrate.pth"
    torch.save({"model": state, "epoch": 7}, path)
    return {"root": root, "text_dir": text_dir, "path": path, "state": state, "source": source}


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    image = torch.rand(2, 1, 32, 32, 64)  # grid 2x2x2: position embedding is interpolated
    lab = torch.zeros(2, 32, 32, 64, dtype=torch.long)
    lab[:, :16] = 1
    lab[:, 16:, :16] = 2
    lab[0, 16:, 16:] = 3
    lab[1, 0, 0, 0] = 4
    return image, lab


TEXTS = ["Emphysema.", "Not emphysema.", "pleural effusion."]


def embeddings(model: FvlmModel) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_anatomies(*inputs()), model.encode_text(TEXTS)


def test_released_file_loads_strictly_and_equals_converted_copy(released, tmp_path) -> None:
    official = FvlmModel.from_checkpoint(released["path"], text_model_dir=released["text_dir"])
    assert official.config.vision == VITB_KEYS_SMALL  # dims inferred from shapes
    assert official.anatomies == ("lung", "heart", "esophagus", "aorta")
    assert official.temperature == pytest.approx(0.05)
    assert not official.training
    out = import_official(
        released["path"],
        released["text_dir"],
        tmp_path / "ours",
        "fvlm-ctrate",
        "1.0",
        ("lung", "heart", "esophagus", "aorta"),
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["name"] == "fvlm-ctrate" and meta["anatomies"][0] == "lung"
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    ours = FvlmModel.from_checkpoint(out)  # self-contained: no text_model_dir
    assert ours.sha256 == meta["sha256"] and ours.version == "1.0"
    a_img, a_txt = embeddings(official)
    b_img, b_txt = embeddings(ours)
    c_img, c_txt = embeddings(released["source"])
    torch.testing.assert_close(a_img, b_img, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a_txt, b_txt, rtol=0, atol=0)
    torch.testing.assert_close(a_img, c_img, equal_nan=True)
    torch.testing.assert_close(a_txt, c_txt)
    absent = torch.zeros(2, 4, dtype=torch.bool)
    absent[1, 2] = absent[0, 3] = True  # esophagus only in case 0, aorta only in case 1
    assert torch.equal(torch.isnan(a_img).all(-1), absent)
    assert torch.equal(torch.isnan(a_img).any(-1), absent)


def test_bare_state_dict_is_accepted(released, tmp_path) -> None:
    path = tmp_path / "bare.pth"
    torch.save(released["state"], path)
    model = FvlmModel.from_checkpoint(path, text_model_dir=released["text_dir"])
    torch.testing.assert_close(model.temp, released["source"].temp)


def spoil(state: dict[str, torch.Tensor], change: str, named: str) -> None:
    """Break a state dict at one key: ``drop`` it, ``add`` it, or give it the wrong ``shape``."""
    if change == "drop":
        del state[named]
    elif change == "add":
        state[named] = torch.zeros(3)
    else:
        state[named] = torch.zeros(5, 5)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "visual_encoder.blocks.7.attn.qkv.weight"),
        ("drop", "attention.in_proj_bias"),
        ("add", "text_encoder.embeddings.token_type_embeddings.weight"),
        ("add", "text_encoder.cls.predictions.bias"),  # only the three residue keys are ignored
        ("add", "visual_encoder.blocks.0.norm_cross_attn.weight"),
        ("shape", "vision_projs.2.weight"),
    ],
)
def test_wrong_or_missing_key_fails_with_its_name(released, tmp_path, change, named) -> None:
    state = dict(released["state"])
    spoil(state, change, named)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        FvlmModel.from_checkpoint(path, text_model_dir=released["text_dir"])


def test_residue_keys_are_exactly_the_documented_three() -> None:
    assert IGNORED_RESIDUE == {
        "text_encoder.embeddings.position_ids",
        "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.decoder.bias",
    }


def test_released_format_needs_text_model_dir(released) -> None:
    with pytest.raises(ConfigError, match="text_model_dir"):
        FvlmModel.from_checkpoint(released["path"])


def test_anatomy_names_must_match_query_count(released, tmp_path) -> None:
    with pytest.raises(ConfigError, match="anatomies"):
        import_official(
            released["path"], released["text_dir"], tmp_path / "x", "n", "1", ("lung", "heart")
        )


def test_not_a_checkpoint_is_refused(tmp_path: Path, released) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="official_path"):
        FvlmModel.from_checkpoint(junk, text_model_dir=released["text_dir"])
    with pytest.raises(CheckpointError, match="path"):
        FvlmModel.from_checkpoint(tmp_path / "missing")


def test_our_format_detects_tampered_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = FvlmModel(
        small_config(), tokenizer=load_tokenizer(write_text_model_dir(tmp_path / "t"))
    )
    out = save_model(model, tmp_path / "m", "tiny", "0.1")
    reloaded = FvlmModel.from_checkpoint(out)
    assert reloaded.config == model.config
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        FvlmModel.from_checkpoint(out)


def test_cli_model_import(released, tmp_path, capsys) -> None:
    from fvlm_pacs.cli import main

    out = tmp_path / "imported"
    argv = ["model", "import", str(released["path"]), "--text-model", str(released["text_dir"])]
    assert main([*argv, "--out", str(out), "--name", "t", "--version", "2"]) == 0
    assert "imported" in capsys.readouterr().out
    model = FvlmModel.from_checkpoint(out)
    assert (model.name, model.version) == ("t", "2")
    broken = tmp_path / "broken.pth"
    state = dict(released["state"])
    state.pop("temp")
    torch.save(state, broken)
    argv = ["model", "import", str(broken), "--text-model", str(released["text_dir"])]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "temp" in capsys.readouterr().err


# -- our format without the text tower --------------------------------------------------------
@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ours")
    torch.manual_seed(3)
    model = FvlmModel(small_config(), tokenizer=load_tokenizer(write_text_model_dir(root / "t")))
    with torch.no_grad():
        model.query_tokens.normal_()
    out = save_model(model.eval(), root / "m", "tiny", "0.1")
    return {"root": root, "dir": out, "model": model}


def republish(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Rewrite the weights and the sha256 in config.json: a consistent but wrong file."""
    save_file(state, str(folder / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    meta["sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(meta))


def test_our_format_loads_without_the_text_tower(ours) -> None:
    full = FvlmModel.from_checkpoint(ours["dir"])
    bare = FvlmModel.from_checkpoint(ours["dir"], with_text=False)
    assert full.has_text and not bare.has_text and not bare.training
    assert bare.text_encoder is None and bare.text_proj is None
    assert set(bare.state_dict()) == {k for k in full.state_dict() if not is_text_key(k)}
    assert (bare.sha256, bare.version) == (full.sha256, full.version)
    with torch.no_grad():
        a, b = full.encode_anatomies(*inputs()), bare.encode_anatomies(*inputs())
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ConfigError, match="without its text tower"):
        bare.encode_text(TEXTS)


@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "text_encoder.encoder.layer.1.output.dense.weight"),  # required even if skipped
        ("drop", "visual_encoder.blocks.2.attn.qkv.weight"),
        ("add", "text_encoder.pooler.dense.weight"),
        ("add", "visual_encoder.cls_token"),
        ("shape", "text_proj.weight"),
        ("shape", "query_tokens"),
    ],
)
def test_our_format_is_strict_with_or_without_the_text_tower(
    ours, tmp_path, with_text, change, named
) -> None:
    folder = Path(shutil.copytree(ours["dir"], tmp_path / "m"))
    state = load_file(str(folder / "model.safetensors"))
    spoil(state, change, named)
    republish(folder, state)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        FvlmModel.from_checkpoint(folder, with_text=with_text)


@pytest.mark.parametrize("with_text", [True, False])
def test_our_format_refuses_a_truncated_file(ours, tmp_path, with_text) -> None:
    folder = Path(shutil.copytree(ours["dir"], tmp_path / "m"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sha256"):
        FvlmModel.from_checkpoint(folder, with_text=with_text)
    meta = json.loads((folder / "config.json").read_text())
    meta["sha256"] = sha256_file(weights)  # even when config.json was rewritten to match
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        FvlmModel.from_checkpoint(folder, with_text=with_text)


def test_released_format_always_loads_the_text_tower(released) -> None:
    model = FvlmModel.from_checkpoint(
        released["path"], text_model_dir=released["text_dir"], with_text=False
    )
    assert model.has_text  # a pickle is read whole; `fvlm-pacs model import` converts it once
