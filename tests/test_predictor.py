"""Predictor and prompt bank: hand-checked scores, statuses, voxel order, cache behaviour."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fvlm_pacs.codes import load_anatomies, load_findings
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, ModelConfig, save_model
from fvlm_pacs.model import checkpoint as checkpoint_module
from fvlm_pacs.model import fvlm as fvlm_module
from fvlm_pacs.model.config import TextConfig
from fvlm_pacs.model.fvlm import is_text_key
from fvlm_pacs.model.predictor import Predictor, load_thresholds
from fvlm_pacs.model.preprocess import anatomy_crops, context_crop, to_model_grid
from fvlm_pacs.model.prompts import BANK_FILE, PromptBank
from fvlm_pacs.model.text import load_tokenizer

from .test_model import small_config
from .test_preprocess import (
    SHAPE,
    feet_first_flipped,
    head_first_axial,
    phantom_hu,
    sampled,
    two_boxes,
    volume,
)

ANATOMIES = ("lung", "heart", "esophagus", "aorta")
FINDINGS = load_findings(load_anatomies("ct-rate"))


def prompt_vocab() -> list[str]:
    """Every word of the CT-RATE prompts, so that prompts embed differently (not all [UNK])."""
    words = sorted(
        {w.lower().strip(".") for f in FINDINGS for w in f"{f.positive} {f.negative}".split()}
    )
    return (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words + list(string.ascii_lowercase)
    )


def write_text_dir(folder: Path, vocab: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


def build_model_dir(root: Path, seed: int = 0, name: str = "tiny") -> Path:
    """A tiny fVLM (the ct-rate four anatomies) saved in our format with its tokenizer."""
    vocab = prompt_vocab()
    text_dir = write_text_dir(root / "text", vocab)
    cfg = small_config()
    cfg = ModelConfig(
        vision=cfg.vision,
        text=TextConfig(**{**cfg.text.__dict__, "vocab_size": len(vocab)}),
        embed_dim=cfg.embed_dim,
        anatomies=ANATOMIES,
    )
    torch.manual_seed(seed)
    model = FvlmModel(cfg, tokenizer=load_tokenizer(text_dir)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.query_tokens.normal_()
        model.temp.fill_(0.2)  # keeps sigmoid((cos+ − cos−)/τ) well inside (0, 1)
    return save_model(model, root / "model", name, "0.1")


def labelmap(affine: np.ndarray, anatomies: tuple[str, ...] = ANATOMIES) -> LabelMap:
    """lung (1) and heart (2) only: esophagus and aorta are absent."""
    arr = sampled(affine, SHAPE, two_boxes).astype(np.uint8)
    return LabelMap(array=arr, anatomies=anatomies, source="test")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def case() -> tuple[Volume, LabelMap]:
    a = head_first_axial()
    return volume(a, SHAPE, phantom_hu), labelmap(a)


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor(model_dir, device="cpu")


@pytest.fixture(scope="module")
def result(predictor: Predictor, case: tuple[Volume, LabelMap]) -> Any:
    return predictor.run(*case)


def by_name(findings: Any) -> dict[str, Any]:
    return {f.finding: f for f in findings}


# -- scores ----------------------------------------------------------------------------------
def test_sixteen_findings_absent_anatomies_not_assessable(result, predictor) -> None:
    findings = result.findings
    assert [f.finding for f in findings] == [f.name for f in FINDINGS]
    assert len(findings) == 16
    for f in findings:
        assert f.model == predictor.info
        assert f.model.sha256 == predictor.model.sha256 and f.model.name == "tiny"
        if f.anatomy in ("esophagus", "aorta"):
            assert f.status == "not_assessable" and f.score is None
        else:
            assert f.score is not None and 0.0 < f.score < 1.0
            assert f.status == ("present" if f.score >= f.threshold else "absent")
    assert result.not_assessable == {
        "esophagus": "absent from the label map",
        "aorta": "absent from the label map",
    }
    assert set(result.timings) == {"preprocess", "encode", "score", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.crops == 2


def test_scores_equal_a_hand_computation(result, model_dir, case) -> None:
    model = FvlmModel.from_checkpoint(model_dir)  # an independent copy of the weights
    vol, lab = case
    crops = anatomy_crops(to_model_grid(vol, lab.array, 4))
    assert [c.assessable for c in crops] == [(1, 2), (1, 2)]  # heart/lung scored by both crops
    with torch.no_grad():
        embs = [
            model.encode_anatomies(
                torch.from_numpy(c.image)[None, None],
                torch.from_numpy(c.labels.astype(np.int64))[None],
            )[0]
            for c in crops
        ]
        text = model.encode_text([f.positive for f in FINDINGS] + [f.negative for f in FINDINGS])
    tau = model.temperature
    got = by_name(result.findings)
    scores = []
    for i, f in enumerate(FINDINGS):
        if f.anatomy not in ("lung", "heart"):
            continue
        k = ANATOMIES.index(f.anatomy)
        probs = [
            1.0 / (1.0 + math.exp(-float((e[k] @ text[i] - e[k] @ text[16 + i]) / tau)))
            for e in embs
        ]
        expected = sum(probs) / len(probs)
        assert got[f.name].score == pytest.approx(expected, abs=1e-5), f.name
        scores.append(expected)
    assert len(set(np.round(scores, 6))) > 3  # prompts differ, so scores do too
    # the embeddings a probe reads: per assessed anatomy, the mean over the crops that assess it
    assert set(result.embeddings) == {"lung", "heart"}
    for name, got_emb in result.embeddings.items():
        k = ANATOMIES.index(name)
        expected_emb = (embs[0][k] + embs[1][k]).numpy() / 2
        assert got_emb.dtype == np.float32 and got_emb.shape == expected_emb.shape
        np.testing.assert_allclose(got_emb, expected_emb, atol=1e-5)
    assert "embeddings" not in result.as_dict()


def test_thresholds_decide_the_status(model_dir, case, tmp_path, result) -> None:
    scores = {f.finding: f.score for f in result.findings}
    path = tmp_path / "thresholds.json"
    path.write_text(
        json.dumps(
            {
                "emphysema": 0.0,  # score >= 0: present
                "cardiomegaly": 1.0,  # score < 1: absent
                "atelectasis": scores["atelectasis"],  # equality counts as present
                "hiatal_hernia": 0.0,  # not assessable whatever the threshold
            }
        )
    )
    p = Predictor(model_dir, device="cpu", thresholds_path=path)
    got = by_name(p.predict(*case))
    assert got["emphysema"].status == "present" and got["emphysema"].threshold == 0.0
    assert got["cardiomegaly"].status == "absent" and got["cardiomegaly"].threshold == 1.0
    assert got["atelectasis"].status == "present"
    assert got["hiatal_hernia"].status == "not_assessable" and got["hiatal_hernia"].score is None
    assert got["lung_nodule"].threshold == 0.5  # findings.yaml default for the others


def test_thresholds_json_next_to_the_model_is_used_and_checked(model_dir, tmp_path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))
    (copy / "thresholds.json").write_text(
        json.dumps({"model_sha256": "0" * 64, "thresholds": {"emphysema": 0.3}})
    )
    with pytest.raises(ConfigError, match="calibrated for weights"):
        Predictor(copy, device="cpu")
    (copy / "thresholds.json").write_text(json.dumps({"emphysem": 0.3}))
    with pytest.raises(ConfigError, match="unknown finding 'emphysem'"):
        Predictor(copy, device="cpu")
    (copy / "thresholds.json").write_text(json.dumps({"emphysema": 0.3}))
    assert Predictor(copy, device="cpu").thresholds["emphysema"] == 0.3
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        (tmp_path / "bad.json").write_text(json.dumps({"emphysema": 1.5}))
        load_thresholds(tmp_path / "bad.json", FINDINGS)


def test_voxel_order_does_not_change_the_findings(result, predictor) -> None:
    b = feet_first_flipped(SHAPE)
    flipped = predictor.run(volume(b, SHAPE, phantom_hu), labelmap(b))
    for x, y in zip(result.findings, flipped.findings, strict=True):
        assert (x.finding, x.status) == (y.finding, y.status)
        if x.score is None:
            assert y.score is None
        else:
            assert y.score == pytest.approx(x.score, abs=1e-5)


def test_one_crop_per_batch_gives_the_same_scores(result, model_dir, case) -> None:
    p = Predictor(model_dir, device="cpu", max_batch=1)
    for x, y in zip(result.findings, p.predict(*case), strict=True):
        assert (x.score is None) == (y.score is None)
        if x.score is not None:
            assert y.score == pytest.approx(x.score, abs=1e-5)


def test_labelmap_with_other_anatomies_is_refused(predictor, case) -> None:
    vol, lab = case
    other = LabelMap(array=lab.array, anatomies=("lung", "heart"), source="test")
    with pytest.raises(ValueError, match=r"\(lung, heart\).*\(lung, heart, esophagus, aorta\)"):
        predictor.predict(vol, other)


def test_one_encoding_scores_another_prompt_table_of_the_same_weights(
    result, predictor, model_dir, case, tmp_path
) -> None:
    """encode/score split: the same findings as run; a second table (other negatives) scored
    on that encoding equals its own run; other weights' embeddings are refused."""
    encoded = predictor.encode(*case)
    again = predictor.score(encoded)
    assert [f.score for f in again.findings] == [f.score for f in result.findings]
    assert again.not_assessable == result.not_assessable and again.crops == result.crops
    other_negatives = tuple(
        dataclasses.replace(f, negative=f"No {f.name.lower()} is seen.") for f in predictor.findings
    )
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))  # new prompts: not in the shared bank
    other = Predictor(copy, device="cpu", findings=other_negatives)
    shared = [f.score for f in other.score(encoded).findings]
    own = [f.score for f in other.run(*case).findings]
    assert shared == pytest.approx(own, abs=1e-6)
    assert shared != pytest.approx([f.score for f in result.findings], abs=1e-3)
    foreign = Predictor(build_model_dir(tmp_path / "other", seed=1), device="cpu")
    with pytest.raises(ValueError, match="other weights"):
        foreign.score(encoded)


# -- prompt bank -----------------------------------------------------------------------------
def test_warm_bank_never_calls_the_text_encoder(predictor, model_dir, monkeypatch) -> None:
    assert (model_dir / BANK_FILE).is_file()  # written by the first predictor
    assert len(predictor.prompt_bank) == 32

    def refuse(self: FvlmModel, texts: list[str]) -> torch.Tensor:
        raise AssertionError("text encoder called although the prompt bank is warm")

    monkeypatch.setattr(FvlmModel, "encode_text", refuse)
    second = Predictor(model_dir, device="cpu")
    torch.testing.assert_close(second._positives, predictor._positives, rtol=0, atol=0)
    torch.testing.assert_close(second._negatives, predictor._negatives, rtol=0, atol=0)


class Counting:
    """A text encoder that records what it was asked to embed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        g = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=g), dim=-1)


def test_bank_computes_only_misses_and_is_keyed_by_sha256(tmp_path) -> None:
    sha_a, sha_b = "a" * 64, "b" * 64
    enc = Counting()
    bank = PromptBank.for_model(tmp_path, sha_a)
    first = bank.embeddings(["x.", "y.", "x."], encoder=enc)
    assert enc.calls == [["x.", "y."]] and first.shape == (3, 8)
    torch.testing.assert_close(first[0], first[2])
    bank.embeddings(["y.", "z."], encoder=enc)
    assert enc.calls[-1] == ["z."]  # only the miss
    # a new bank on the same place, same weights: all hits, no encoder needed
    again = PromptBank.for_model(tmp_path, sha_a).embeddings(["x.", "y."])
    torch.testing.assert_close(again, first[:2], rtol=0, atol=0)
    # other weights: nothing matches, the encoder runs for all, the stale file is replaced
    enc_b = Counting()
    other = PromptBank.for_model(tmp_path, sha_b)
    assert len(other) == 0 and "x." not in other
    other.embeddings(["x."], encoder=enc_b)
    assert enc_b.calls == [["x."]]
    assert len(PromptBank.for_model(tmp_path, sha_a)) == 0
    with pytest.raises(ConfigError, match="lacks 1 prompt"):
        PromptBank.for_model(tmp_path, sha_a).embeddings(["x."])


def test_bank_falls_back_to_the_cache_dir_when_the_model_dir_is_unwritable(tmp_path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file, so nothing can be written below it")
    cache = tmp_path / "cache"
    sha = "c" * 64
    bank = PromptBank(sha, [blocked / BANK_FILE, cache / sha / BANK_FILE])
    bank.embeddings(["x."], encoder=Counting())
    assert bank.path == cache / sha / BANK_FILE and (cache / sha / BANK_FILE).is_file()
    assert "x." in PromptBank(sha, [blocked / BANK_FILE, cache / sha / BANK_FILE])
    memory_only = PromptBank(sha, [blocked / BANK_FILE])
    memory_only.embeddings(["y."], encoder=Counting())  # still answers, logs a warning
    assert memory_only.path is None and "y." in memory_only


def test_new_weights_in_the_same_folder_invalidate_the_bank(
    predictor, model_dir, tmp_path, monkeypatch
) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))  # holds the warm bank of model_dir
    retrained = FvlmModel.from_checkpoint(copy)
    with torch.no_grad():
        retrained.text_proj.weight.add_(0.1)
    save_model(retrained, copy, "tiny", "0.2")  # new weights file, new sha256
    calls: list[int] = []
    original = FvlmModel.encode_text

    def counting(self: FvlmModel, texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(FvlmModel, "encode_text", counting)
    p = Predictor(copy, device="cpu")
    assert p.info.sha256 != predictor.info.sha256 and p.info.version == "0.2"
    assert sum(calls) == 32  # every prompt recomputed for the new weights
    assert not torch.allclose(p._positives, predictor._positives)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_scores_track_the_cpu_ones(result, model_dir, case) -> None:
    p = Predictor(model_dir, device="cuda")
    assert p.device.type == "cuda"
    for x, y in zip(result.findings, p.predict(*case), strict=True):
        assert (x.status == "not_assessable") == (y.status == "not_assessable")
        if x.score is not None:
            assert y.score == pytest.approx(x.score, abs=0.05)  # bf16 encoder, fp32 scoring


def test_single_pass_mode_scores_every_anatomy_from_one_crop(model_dir, case) -> None:
    p = Predictor(model_dir, device="cpu", mode="single")
    volume, labels = case
    prediction = p.run(volume, labels)
    assert prediction.crops == 1
    got = by_name(prediction.findings)
    crop = context_crop(to_model_grid(volume, labels.array, 4))
    text_model = FvlmModel.from_checkpoint(model_dir)  # the predictor keeps no text tower
    with torch.no_grad():
        emb = p.model.encode_anatomies(
            torch.from_numpy(crop.image)[None, None].float(),
            torch.from_numpy(crop.labels.astype(np.int64))[None],
        )[0]
        tau = p.model.temperature
        for f in FINDINGS:
            if f.anatomy in ("esophagus", "aorta"):
                assert got[f.name].status == "not_assessable"
                continue
            v = emb[ANATOMIES.index(f.anatomy)]
            pos, neg = text_model.encode_text([f.positive, f.negative])
            expected = torch.sigmoid(((v * pos).sum() - (v * neg).sum()) / tau)
            assert got[f.name].score == pytest.approx(float(expected), abs=1e-5)


def test_bf16_on_cpu_tracks_fp32_and_stores_matmul_weights_in_bf16(result, model_dir, case):
    p = Predictor(model_dir, device="cpu", precision="bf16")
    assert p.precision == "bf16"
    vit = p.model.visual_encoder
    assert vit.blocks[0].mlp.linear1.weight.dtype == torch.bfloat16
    assert vit.patch_embedding.patch_embeddings.weight.dtype == torch.bfloat16
    assert p.model.attention.in_proj_weight.dtype == torch.bfloat16
    assert vit.norm.weight.dtype == torch.float32  # norms and position embeddings stay fp32
    assert vit.patch_embedding.position_embeddings.dtype == torch.float32
    got = p.predict(*case)
    assert [f.status == "not_assessable" for f in got] == [
        f.status == "not_assessable" for f in result.findings
    ]
    diffs = [abs(y.score - x.score) for x, y in zip(result.findings, got, strict=True) if x.score]
    assert diffs and max(diffs) < 0.02  # bf16 encoder, fp32 scoring
    assert max(diffs) > 0  # the bf16 path really ran


def test_precision_auto_is_fp32_on_cpu_and_unknown_is_refused(model_dir, predictor) -> None:
    assert predictor.precision == "fp32"
    assert predictor.model.visual_encoder.blocks[0].mlp.linear1.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        Predictor(model_dir, device="cpu", precision="fp16")  # type: ignore[arg-type]


def test_unknown_mode_is_refused(model_dir) -> None:
    with pytest.raises(ConfigError, match="mode"):
        Predictor(model_dir, device="cpu", mode="fast")  # type: ignore[arg-type]


# -- the text tower: loaded only for a cold bank, never kept ---------------------------------
class SpyOpen:
    """Wraps ``safe_open`` in the checkpoint module and records every tensor read."""

    def __init__(self) -> None:
        self.real = checkpoint_module.safe_open
        self.read: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spy, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self) -> Handle:
                self.fh = handle.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return handle.__exit__(*exc)

            def keys(self) -> Any:
                return self.fh.keys()

            def get_slice(self, key: str) -> Any:
                return self.fh.get_slice(key)

            def get_tensor(self, key: str) -> torch.Tensor:
                spy.read.append(key)
                return self.fh.get_tensor(key)

        return Handle()


def fresh_copy(model_dir: Path, dest: Path) -> Path:
    """The model directory without its prompt bank: the first predictor on it starts cold."""
    copy = Path(shutil.copytree(model_dir, dest))
    (copy / BANK_FILE).unlink(missing_ok=True)
    return copy


def test_cold_bank_fills_and_drops_warm_bank_never_loads_the_text_tower(
    model_dir, case, tmp_path, monkeypatch, caplog
) -> None:
    copy = fresh_copy(model_dir, tmp_path / "m")
    built: list[str] = []  # the device of every BERT built (the strict check uses "meta")
    real_build = fvlm_module.build_text_encoder

    def build(cfg: TextConfig) -> Any:
        encoder = real_build(cfg)
        built.append(next(encoder.parameters()).device.type)
        return encoder

    monkeypatch.setattr(fvlm_module, "build_text_encoder", build)
    spy = SpyOpen()
    monkeypatch.setattr(checkpoint_module, "safe_open", spy)
    caplog.set_level(logging.INFO, logger="fvlm_pacs.model.predictor")

    cold = Predictor(copy, device="cpu")
    assert "prompt bank cold (32 of 32 prompts missing)" in caplog.text
    assert "cpu" in built and any(is_text_key(k) for k in spy.read)
    assert (copy / BANK_FILE).is_file() and len(cold.prompt_bank) == 32
    assert cold.model.text_encoder is None and cold.model.text_proj is None  # dropped
    assert not any(is_text_key(k) for k in cold.model.state_dict())

    built.clear()
    spy.read.clear()
    caplog.clear()
    warm = Predictor(copy, device="cpu")
    assert "prompt bank warm (32 prompts): model loaded without its text tower" in caplog.text
    assert "cpu" not in built  # BERT's weights never even allocated (only a meta skeleton)
    assert spy.read and not any(is_text_key(k) for k in spy.read)  # no text tensor read
    assert sorted(spy.read) == sorted(warm.model.state_dict())  # every other one read
    assert warm.model.text_encoder is None and warm.model.text_proj is None
    assert warm.info == cold.info
    torch.testing.assert_close(warm._positives, cold._positives, rtol=0, atol=0)
    torch.testing.assert_close(warm._negatives, cold._negatives, rtol=0, atol=0)
    # bit-identical findings whichever way the predictor started
    a, b = cold.run(*case), warm.run(*case)
    assert [f.as_dict() for f in a.findings] == [f.as_dict() for f in b.findings]
    assert a.not_assessable == b.not_assessable


def test_one_missing_prompt_loads_the_tower_for_that_prompt_only(
    model_dir, predictor, tmp_path, monkeypatch
) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))  # holds the warm bank
    assert len(PromptBank.for_model(copy, predictor.info.sha256)) == 32
    findings = list(FINDINGS)
    findings[0] = dataclasses.replace(findings[0], positive="Emphysema, lung.")
    calls: list[list[str]] = []
    original = FvlmModel.encode_text

    def counting(self: FvlmModel, texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(FvlmModel, "encode_text", counting)
    p = Predictor(copy, device="cpu", findings=findings)
    assert calls == [["Emphysema, lung."]]
    assert p.model.text_encoder is None
    torch.testing.assert_close(p._positives[1:], predictor._positives[1:], rtol=0, atol=0)
    torch.testing.assert_close(p._negatives, predictor._negatives, rtol=0, atol=0)


def test_a_model_without_its_text_tower_says_how_to_get_it(model_dir, predictor) -> None:
    with pytest.raises(ConfigError, match="loaded without its text tower.*with_text=True"):
        predictor.model.encode_text(["Emphysema."])
    bare = FvlmModel.from_checkpoint(model_dir, with_text=False)
    assert not bare.has_text and bare.text_encoder is None and bare.text_proj is None
    with pytest.raises(ConfigError, match="without its text tower"):
        bare.encode_text(["Emphysema."])
    full = FvlmModel.from_checkpoint(model_dir)
    assert full.has_text
    full.drop_text()
    full.drop_text()  # idempotent
    assert not full.has_text
    with pytest.raises(ConfigError, match="without its text tower"):
        full.encode_text(["Emphysema."])
