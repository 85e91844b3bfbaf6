"""Training data and loop: dataset items, augmentation, CT-RATE layout, loss, CLIP, resume, CLI."""

from __future__ import annotations

import csv
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm_pacs.cli import main
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.model import FvlmModel, Predictor
from fvlm_pacs.model import dataset as dataset_module
from fvlm_pacs.model.dataset import (
    ManifestDataset,
    collate,
    keep_sentences,
    orient_fpl,
    read_nifti,
)
from fvlm_pacs.model.intensity import INPUT_HU_CEILING, scale_hu
from fvlm_pacs.model.provenance import TRAINING_CASES_FILE
from fvlm_pacs.model.train import TrainConfig, lr_factor, train
from fvlm_pacs.phantoms import FINDINGS, PhantomSpec, write_dataset
from fvlm_pacs.reports import RuleBasedDecomposer, normal_text, split_report, split_sentences
from tests.helpers import free_port

SMALL = PhantomSpec(shape=(32, 48, 64), spacing=(3.0, 2.0, 2.0))
CROP = (32, 96, 128)  # covers the whole context of SMALL on the 3x1x1 grid


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default phantom grid (3 x 1.5 x 1.5 mm), as the brief asks."""
    return write_dataset(6, 7, tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(6, 0, tmp_path_factory.mktemp("small"), spec=SMALL)


# -- dataset -------------------------------------------------------------------------------
CEILING = float(scale_hu(np.array(INPUT_HU_CEILING)))


def test_items_shapes_range_and_texts(synth: Path) -> None:
    ds = ManifestDataset(synth, crop=(32, 64, 64), seed=1)
    dec = RuleBasedDecomposer()
    assert len(ds) == 6
    rows = list(csv.DictReader(synth.open(encoding="utf-8")))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 32, 64, 64) and item["image"].dtype == torch.float32
        assert item["labels"].shape == (32, 64, 64) and item["labels"].dtype == torch.uint8
        # scaled HU: -1150 -> 0, 350 -> 1, nothing above 350 clipped (the model windows it)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= CEILING
        assert set(item["labels"].unique().tolist()) <= {0, 1, 2, 3, 4}
        report = (synth.parent / rows[i]["report"]).read_text(encoding="utf-8")
        parts = dec.decompose(*split_report(report))
        for k, a in enumerate(ds.anatomies):
            assert item["texts"][k] == parts[a].text
            assert bool(item["normal"][k]) == parts[a].normal
            if parts[a].normal:
                assert item["texts"][k] == normal_text(a)
        assert item["findings"].tolist() == [int(rows[i][f]) for f in FINDINGS]
    # bone above the release window's 350 HU reaches the model unclipped
    assert max(float(ds[i]["image"].max()) for i in range(len(ds))) > 1.0
    # the cached grid is the model's 3 x 1 x 1 mm: 160 rows at 1.5 mm -> up to 240 at 1 mm
    assert ds.prepared(0).hu.shape[1] > 160
    # a 32 x 64 x 64 crop cannot hold a whole lung: inside must be false
    assert not any(bool(ds[(i, d)]["inside"][0]) for i in range(6) for d in range(3))
    # a crop larger than the context holds every present anatomy
    big = ManifestDataset(synth, crop=(128, 320, 416), seed=1)
    item = big[0]
    assert item["inside"].tolist() == [bool(v > 0) for v in big.prepared(0).voxels[1:]]
    assert item["inside"].all()
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 32, 64, 64) and len(batch["texts"]) == 2


def test_normal_wording_report_keeps_the_reports_own_sentences(synth: Path) -> None:
    template = ManifestDataset(synth, crop=(32, 64, 64), seed=1)
    own = ManifestDataset(synth, crop=(32, 64, 64), seed=1, normal_wording="report")
    dec = RuleBasedDecomposer()
    rows = list(csv.DictReader(synth.open(encoding="utf-8")))
    varied = 0
    for i in range(len(own)):
        a, b = template.texts(i), own.texts(i)
        assert a.normal == b.normal  # only the wording changes, never the labels
        parts = dec.decompose(*split_report((synth.parent / rows[i]["report"]).read_text()))
        for k, name in enumerate(own.anatomies):
            if not parts[name].normal:
                assert b.texts[k] == a.texts[k]
            elif parts[name].sentences:
                assert b.texts[k] == " ".join(parts[name].sentences) != normal_text(name)
                varied += 1
            else:
                assert b.texts[k] == normal_text(name)
    assert varied > 0  # the phantoms' reports do mention normal anatomies in their own words
    with pytest.raises(ValueError, match="normal_wording"):
        ManifestDataset(synth, normal_wording="free")
    with pytest.raises(ConfigError, match="normal_wording"):
        TrainConfig(manifest=Path("m.csv"), out_dir=Path("o"), normal_wording="free")


def test_sentence_keep_draws_subsets_of_abnormal_texts_only(synth: Path) -> None:
    """Abnormal texts become non-empty in-order subsets of their sentences, varying by draw and
    reproducible per draw; normal templates, images and the evaluation view never change."""
    whole = ManifestDataset(synth, crop=(32, 64, 64), seed=1)
    half = ManifestDataset(synth, crop=(32, 64, 64), seed=1, sentence_keep=0.5)
    shortened = 0
    for i in range(len(half)):
        t = whole.texts(i)
        seen = set()
        for draw in range(8):
            a, b = whole[(i, draw)], half[(i, draw)]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
            assert b["texts"] == half[(i, draw)]["texts"]  # a pure function of the draw
            for k in range(len(t.texts)):
                if t.normal[k]:
                    assert b["texts"][k] == t.texts[k]
                    continue
                full = split_sentences(t.texts[k])
                got = split_sentences(b["texts"][k])
                assert got and got == [s for s in full if s in got]  # a subset, in order
                shortened += len(got) < len(full)
                seen.add(b["texts"][k])
        if any(not n and len(split_sentences(x)) > 2 for x, n in zip(t.texts, t.normal)):
            assert len(seen) > 1
    assert shortened > 0
    assert ManifestDataset(synth, train=False, sentence_keep=0.5)[0]["texts"] == list(
        whole.texts(0).texts
    )
    one = np.random.default_rng(0)
    assert keep_sentences("Only one.", 0.01, one) == "Only one."
    assert len(split_sentences(keep_sentences("A b. C d. E f.", 1e-9, one))) == 1
    with pytest.raises(ValueError, match="sentence_keep"):
        ManifestDataset(synth, sentence_keep=0.0)
    with pytest.raises(ConfigError, match="sentence_keep"):
        TrainConfig(manifest=Path("m.csv"), out_dir=Path("o"), sentence_keep=1.5)
    cfg = TrainConfig(manifest=synth, out_dir=Path("o"), sentence_keep=0.5)
    assert cfg.dataset().sentence_keep == 0.5


def test_whole_text_anatomies_are_never_shortened(synth: Path, tmp_path: Path) -> None:
    """The anatomies named keep their whole texts on every draw; the others are still drawn
    from; a name the model does not have is refused before training, a bare string at once."""
    anatomies = ("lung", "heart", "esophagus", "aorta")
    half = ManifestDataset(synth, crop=(32, 64, 64), seed=1, sentence_keep=0.5)
    kept = ManifestDataset(
        synth, crop=(32, 64, 64), seed=1, sentence_keep=0.5, whole_text_anatomies=("heart",)
    )
    half.anatomies = kept.anatomies = anatomies
    heart, shortened, drawn = anatomies.index("heart"), 0, 0
    for i in range(len(kept)):
        t = kept.texts(i)
        for draw in range(8):
            texts = kept[(i, draw)]["texts"]
            assert texts[heart] == t.texts[heart]
            shortened += sum(a != b for a, b in zip(texts, t.texts))
        if not t.normal[heart] and len(split_sentences(t.texts[heart])) > 1:
            draws = {half[(i, d)]["texts"][heart] for d in range(8)}
            drawn += draws != {t.texts[heart]}  # without the option the heart is drawn from
    assert shortened > 0 and drawn > 0
    cfg = TrainConfig(manifest=synth, out_dir=Path("o"), whole_text_anatomies=["heart"])
    assert cfg.whole_text_anatomies == ("heart",)
    assert cfg.dataset().whole_text_anatomies == frozenset({"heart"})
    with pytest.raises(ConfigError, match="whole_text_anatomies"):
        TrainConfig(manifest=synth, out_dir=Path("o"), whole_text_anatomies="heart")  # type: ignore[arg-type]
    bad = config(synth, tmp_path / "run", steps=1, whole_text_anatomies=("liver",))
    with pytest.raises(ConfigError, match="'liver' is not an anatomy of the model"):
        train(bad)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_flips_apply_to_image_and_labels_together(small: Path, tmp_path: Path) -> None:
    plain = ManifestDataset(small, crop=(32, 64, 64), seed=3, flip_p=0.0, cache_dir=tmp_path)
    flipped = ManifestDataset(small, crop=(32, 64, 64), seed=3, flip_p=1.0, cache_dir=tmp_path)
    for key in [(0, 0), (2, 5), (4, 11)]:
        a, b = plain[key], flipped[key]
        assert a["crop_start"].tolist() == b["crop_start"].tolist()
        assert b["flips"].all() and not a["flips"].any()
        assert torch.equal(b["image"], a["image"].flip(1, 2, 3))
        assert torch.equal(b["labels"], a["labels"].flip(0, 1, 2))
        assert torch.equal(a["inside"], b["inside"])
    assert len(list(tmp_path.glob("*.npz"))) == 3  # preprocessed once, cached on disk
    # same seed and draw -> same item; another draw -> another crop somewhere
    again = ManifestDataset(small, crop=(32, 64, 64), seed=3, flip_p=0.0, cache_dir=tmp_path)
    assert torch.equal(again[(2, 5)]["image"], plain[(2, 5)]["image"])
    starts = {tuple(plain[(2, d)]["crop_start"].tolist()) for d in range(8)}
    assert len(starts) > 1
    # eval mode: centred, never flipped
    ev = ManifestDataset(small, crop=(32, 64, 64), train=False, flip_p=1.0)
    assert not ev[1]["flips"].any()


def test_orientation_follows_the_affine() -> None:
    a = np.arange(24).reshape(2, 3, 4)
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = 3.0, 1.5, 1.5, 1.0  # slices feet -> head
    (out,), spacing = orient_fpl([a], aff)
    assert np.array_equal(out, a[::-1]) and spacing == (3.0, 1.5, 1.5)
    # NIfTI-like (x, y, z) indexing with x to the left, y posterior, z down
    aff2 = np.zeros((4, 4))
    aff2[0, 0], aff2[1, 1], aff2[2, 2], aff2[3, 3] = 1.0, 1.0, -2.0, 1.0
    (out2,), sp2 = orient_fpl([a], aff2)
    assert np.array_equal(out2, a.transpose(2, 1, 0)) and sp2 == (2.0, 1.0, 1.0)


# -- CT-RATE layout ------------------------------------------------------------------------
def write_nifti(
    path: Path, array: np.ndarray, affine_ras: np.ndarray, slope: float = 1.0, inter: float = 0.0
) -> None:
    """A minimal single-file NIfTI-1 (sform), gzip'd."""
    codes = {np.dtype(np.int16): (4, 16), np.dtype(np.uint8): (2, 8)}
    datatype, bitpix = codes[array.dtype]
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *array.shape, 1, 1, 1, 1)
    struct.pack_into("<2h", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<2f", hdr, 112, slope, inter)
    struct.pack_into("<2h", hdr, 252, 0, 1)
    struct.pack_into("<12f", hdr, 280, *affine_ras[:3].ravel())
    hdr[344:348] = b"n+1\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(hdr) + array.tobytes(order="F")))


def test_fake_ct_rate_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "ct-rate"
    ds_dir = root / "dataset"
    shape = (40, 30, 12)  # (x, y, z) as NIfTI stores it
    aff = np.diag([-1.5, -1.5, 3.0, 1.0])  # RAS: x to the right, y anterior, z head
    names = ["train_1_a_1.nii.gz", "train_2_a_2.nii.gz", "train_3_b_1.nii.gz"]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names[:2]):
        stored = (rng.integers(-1000, 400, shape) + 1024).astype(np.int16)  # raw, needs -1024
        parts = name.split("_")
        write_nifti(
            ds_dir / "train" / f"train_{parts[1]}" / f"train_{parts[1]}_{parts[2]}" / name,
            stored,
            aff,
        )
        mask = np.zeros(shape, np.uint8)
        mask[5:30, 5:25, 2:10] = 10 + i  # TotalSegmentator lung lobe ids -> lung
        mask[15:20, 10:15, 4:8] = 51  # heart
        write_nifti(root / "masks" / name, mask, aff)
    reports = ds_dir / "radiology_text_reports" / "train_reports.csv"
    reports.parent.mkdir(parents=True)
    with reports.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "VolumeName",
                "ClinicalInformation_EN",
                "Technique_EN",
                "Findings_EN",
                "Impressions_EN",
            ]
        )
        w.writerow([names[0], "", "", "Emphysema in both lungs. Heart normal.", "Emphysema."])
        w.writerow([names[1], "", "", "Normal.", "No acute findings."])
        w.writerow([names[2], "", "", "missing volume", ""])
    labels = ds_dir / "multi_abnormality_labels" / "train_predicted_labels.csv"
    labels.parent.mkdir(parents=True)
    cols = ["Medical material", "Emphysema", "Cardiomegaly", "Lung nodule"]
    with labels.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", *cols])
        w.writerow([names[0], 0, 1, 0, 1])
        w.writerow([names[1], 0, 0, 1, 0])
    meta = ds_dir / "metadata" / "train_metadata.csv"
    meta.parent.mkdir(parents=True)
    meta.write_text(
        f"VolumeName,RescaleSlope,RescaleIntercept\n{names[0]},1,-1024\n{names[1]},1,-1024\n",
        encoding="utf-8",
    )
    (root / "anatomy_descriptions.json").write_text(
        json.dumps({names[1]: {"heart": "The heart is enlarged."}}), encoding="utf-8"
    )
    arr, aff_read, scale = read_nifti(root / "masks" / names[0])
    assert arr.shape == shape and np.allclose(aff_read, aff) and scale is None
    ds = ManifestDataset(reports, layout="ct-rate", crop=(16, 64, 64), train=False)
    assert len(ds) == 2  # the row without a volume is skipped
    a, b = ds[0], ds[1]
    assert a["image"].shape == (1, 16, 64, 64) and 0.0 <= float(a["image"].min())
    prep = ds.prepared(0)
    assert float(a["image"].max()) <= float(scale_hu(np.array(prep.hu.max())))
    assert prep.voxels[1] > 0 and prep.voxels[2] > 0 and prep.voxels[3] == prep.voxels[4] == 0
    assert prep.hu.min() >= -1024 and prep.hu.max() < 500  # the metadata intercept applied
    assert a["inside"].tolist() == [True, True, False, False]
    f = FINDINGS
    assert a["findings"][f.index("emphysema")] == 1 and a["findings"][f.index("lung_nodule")] == 1
    assert b["findings"][f.index("cardiomegaly")] == 1
    assert a["findings"][f.index("hiatal_hernia")] == -1  # not given
    assert not a["normal"][0] and a["normal"][1]  # decomposed: emphysema in the impression
    assert b["texts"][1] == "The heart is enlarged." and not b["normal"][1]  # from the JSON
    assert b["normal"][0] and b["texts"][0] == normal_text("lung")


def test_prepared_volumes_in_memory_stay_within_their_bound(
    small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory copies are bounded (least recently used out); an evicted case comes back
    from the disk cache, or is prepared again without one, and every item is unchanged.
    Without a bound and a disk cache, memory is the cache, and a warning says when it is big."""
    free = ManifestDataset(small, crop=CROP, seed=3)
    one = free.prepared(0).nbytes
    for cache in (tmp_path / "cache", None):
        bound = ManifestDataset(small, crop=CROP, seed=3, cache_dir=cache, memory_bytes=2 * one)
        for _ in range(2):
            for i in range(len(bound)):
                a, b = bound[(i, 5)], free[(i, 5)]
                torch.testing.assert_close(a["image"], b["image"])
                assert torch.equal(a["labels"], b["labels"])
                memo = bound._memo
                assert memo.prepared_bytes <= 2 * one and len(memo.prepared) < len(bound)
    assert ManifestDataset(small, crop=CROP, cache_dir=tmp_path / "c").memory_bytes == 2 << 30
    monkeypatch.setattr(dataset_module, "MEMORY_BYTES", 2 * one)
    caplog.clear()
    fresh = ManifestDataset(small, crop=CROP, seed=3)
    for i in range(len(fresh)):
        fresh.prepared(i)
    assert len(fresh._memo.prepared) == len(fresh)  # not bounded: memory is the only cache
    warned = [r for r in caplog.records if "give the dataset a cache_dir" in r.getMessage()]
    assert len(warned) == 1
    with pytest.raises(ValueError, match="memory_bytes"):
        ManifestDataset(small, crop=CROP, memory_bytes=-1)


# -- training ----------------------------------------------------------------------------
def config(manifest: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        manifest=manifest,
        out_dir=out,
        crop=CROP,
        steps=20,
        batch_size=6,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=100,
        seed=0,
        vocab_size=300,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def losses(out: Path) -> list[float]:
    with (out / "train_log.csv").open(encoding="utf-8") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_lr_schedule() -> None:
    f = [lr_factor(s, 10, 100, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_patch_convolution_gets_its_own_learning_rate() -> None:
    from fvlm_pacs.model.config import tiny
    from fvlm_pacs.model.train import PATCH_CONV, param_groups

    model = FvlmModel(tiny())
    groups = param_groups(model, 1e-3, 0.01)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-5)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[1]["params"]} == {
        f"visual_encoder.{PATCH_CONV}weight",
        f"visual_encoder.{PATCH_CONV}bias",
    }
    # every parameter in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ConfigError, match="patch_lr_scale"):
        TrainConfig(manifest=Path("m.csv"), out_dir=Path("o"), patch_lr_scale=0.0)


def test_fvlm_loss_goes_down_and_the_model_loads(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    model_dir = train(config(small, out))
    values = losses(out)
    assert len(values) == 20
    assert np.mean(values[-3:]) < np.mean(values[:3])
    assert (out / "tokenizer" / "vocab.txt").is_file() and (out / "checkpoint.pt").is_file()
    model = FvlmModel.from_checkpoint(model_dir)
    assert model.anatomies == ("lung", "heart", "esophagus", "aorta")
    assert model.encode_text(["Emphysema."]).shape == (1, model.config.embed_dim)
    predictor = Predictor(model_dir, device="cpu")
    assert predictor.model.sha256 == model.sha256


def test_clip_objective_runs(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "clip"
    train(config(small, out, objective="clip", steps=3, batch_size=4))
    assert len(losses(out)) == 3 and all(np.isfinite(losses(out)))
    assert (out / "clip_proj.safetensors").is_file() and (out / "model").is_dir()


def test_coteaching_trains_two_networks_and_resumes(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "coteach"
    cfg = config(small, out, objective="fvlm-coteach", steps=4, batch_size=4, lr=1e-3)
    stopped = train(cfg, stop_after=2)
    ckpt = torch.load(stopped, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["peer"].keys() == ckpt["module"].keys()
    # the peer starts from its own random stream: two different networks, one objective each
    key = "model.text_proj.weight"
    assert not torch.equal(ckpt["peer"][key], ckpt["module"][key])
    model_dir = train(cfg)
    values = losses(out)
    assert len(values) == 4 and all(np.isfinite(values))
    # the first network is the one saved; it loads like any fVLM model
    assert FvlmModel.from_checkpoint(model_dir).anatomies == ("lung", "heart", "esophagus", "aorta")


def test_resume_equals_a_straight_run(small: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(config(small, straight, steps=8, batch_size=4, lr=1e-3))
    resumed = tmp_path / "resumed"
    stopped = train(config(small, resumed, steps=8, batch_size=4, lr=1e-3), stop_after=5)
    assert stopped.name == "checkpoint.pt"
    ckpt = torch.load(stopped, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["scheduler"]["last_epoch"] == 5
    assert not (resumed / "model").exists()
    train(config(small, resumed, steps=8, batch_size=4, lr=1e-3))
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    a = FvlmModel.from_checkpoint(straight / "model").state_dict()
    b = FvlmModel.from_checkpoint(resumed / "model").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    opt_a = torch.load(straight / "checkpoint.pt", weights_only=True)["optimizer"]
    opt_b = torch.load(resumed / "checkpoint.pt", weights_only=True)["optimizer"]
    assert float(opt_a["state"][0]["step"]) == float(opt_b["state"][0]["step"]) == 8


def test_text_queue_changes_training_and_resumes_with_its_state(
    small: Path, tmp_path: Path
) -> None:
    """The queue is in the loss (the curve differs from the plain run's after the first step),
    lives in the checkpoint, and a resumed run continues with it as the straight run did."""
    kw: dict[str, object] = dict(steps=6, batch_size=4, lr=1e-3, text_queue=6)
    straight = tmp_path / "straight"
    train(config(small, straight, **kw))
    plain = tmp_path / "plain"
    train(config(small, plain, **{**kw, "text_queue": 0}))
    a, p = losses(straight), losses(plain)
    assert a[0] == pytest.approx(p[0], abs=1e-9)  # step 1: the queue is still empty
    assert a[1:] != pytest.approx(p[1:], abs=1e-4)
    state = torch.load(straight / "checkpoint.pt", weights_only=True)["text_queue"]
    assert state["size"] == 6 and any(len(t) == 6 for t in state["texts"])
    resumed = tmp_path / "resumed"
    train(config(small, resumed, **kw), stop_after=3)
    train(config(small, resumed, **kw))
    assert losses(resumed) == pytest.approx(a, abs=1e-6)
    with pytest.raises(ConfigError, match="saved without a text queue"):
        train(config(small, plain, **{**kw, "steps": 8}))
    with pytest.raises(ConfigError, match="text_queue: only with the fvlm objectives"):
        config(small, tmp_path / "x", text_queue=4, objective="fvlm-coteach")
    with pytest.raises(ConfigError, match="text_queue: must be >= 0"):
        config(small, tmp_path / "x", text_queue=-1)


def test_cli_train(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"manifest: {small}\nout_dir: out\ncrop: [32, 96, 128]\nsteps: 2\nbatch_size: 2\n"
        "warmup_steps: 1\nlog_every: 1\nvocab_size: 200\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(cfg)]) == 0
    assert "model saved to" in capsys.readouterr().out
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    # the model folder names its training phantoms by seed (write_dataset(6, 0): seeds 0-5) ...
    recorded = json.loads((tmp_path / "out" / "model" / TRAINING_CASES_FILE).read_text())
    assert sorted(recorded["cases"].values()) == [f"seed:{i}" for i in range(6)]
    # ... so evaluating it on them is refused before any scoring, unless asked for
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tmp_path / "out" / "model"), "--data", str(small.parent)]
    assert main([*argv, "--split", "all", "--json", str(report)]) == 2
    assert "--allow-training-cases" in capsys.readouterr().err and not report.exists()
    assert main([*argv, "--split", "all", "--json", str(report), "--allow-training-cases"]) == 0
    assert json.loads(report.read_text())["findings"]
    # negative prompts chosen on its training reports (fvlm_pacs.model.prompt_selection): six
    # phantoms are fewer than MIN_CASES per finding, so all keep the table's and no file is made
    model = tmp_path / "out" / "model"
    select = ["model", "select-prompts", "--model", str(model)]
    assert main([*select, "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "6 training reports" in printed and "| emphysema | " in printed
    assert not (model / "prompts.yaml").exists()
    # a config over cases it was not trained on is refused: validation/test reports stay unseen
    unseen = write_dataset(6, 100, tmp_path / "unseen", spec=SMALL)
    other = tmp_path / "other.yaml"
    other.write_text(f"manifest: {unseen}\nout_dir: out\n", encoding="utf-8")
    assert main([*select, "--config", str(other)]) == 2
    assert "6 of 6 cases" in capsys.readouterr().err
    # ... and on images, its training phantoms are refused, unseen ones scored (too few to move)
    assert main([*select, "--data", str(small.parent)]) == 2
    assert "choose prompts on cases it never saw" in capsys.readouterr().err
    assert main([*select, "--data", str(unseen.parent), "--dry-run"]) == 0
    assert "validation images" in capsys.readouterr().out
    assert not (model / "prompts.yaml").exists()
    # positive candidates come from its own training reports only, and are chosen on images
    on_unseen = [*select, "--data", str(unseen.parent), "--dry-run"]
    assert main([*on_unseen, "--positives-from", str(cfg)]) == 0
    assert "validation images" in capsys.readouterr().out
    assert main([*on_unseen, "--positives-from", str(other)]) == 2
    assert "6 of 6 cases" in capsys.readouterr().err
    assert main([*select, "--config", str(cfg), "--positives-from", str(cfg)]) == 2
    assert "positives are chosen on images, give --data" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"manifest: {small}\nout_dir: out\nstepz: 2\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback is 'lo' on Linux only")
@pytest.mark.parametrize(("objective", "queue"), [("fvlm", 0), ("fvlm-coteach", 0), ("fvlm", 4)])
def test_two_rank_ddp_equals_one_process_on_the_same_global_batch(
    small: Path, tmp_path: Path, objective: str, queue: int
) -> None:
    """``torchrun`` with 2 CPU ranks (gloo, loopback) × batch 2 trains the same model as one
    process × batch 4: same samples and augmentation draws per step (StepBatches), embeddings
    all-gathered into one loss, DDP averaging the gradients. Dropout is off so both runs consume
    no randomness that depends on how the batch is split. Co-teaching wraps both networks; with
    a text queue every rank pushes the gathered batch, so the ranks' queues are the single's."""
    from fvlm_pacs.model.config import tiny

    model = tiny(vocab_size=300).to_dict()
    model["pool_dropout"] = 0.0
    model["text"]["dropout"] = 0.0
    single = tmp_path / "single"
    train(
        config(
            small, single, steps=3, batch_size=4, model=model, objective=objective, text_queue=queue
        )
    )

    ddp = tmp_path / "ddp"
    settings = dict(
        manifest=str(small), out_dir=str(ddp), crop=list(CROP), steps=3, batch_size=2, lr=1e-3,
        warmup_steps=2, log_every=1, checkpoint_every=100, seed=0, vocab_size=300, model=model,
        device="cpu", objective=objective, text_queue=queue,
    )  # fmt: skip
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "fvlm_pacs.cli", "train", "--config", str(cfg),
        ],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-5)
    a = FvlmModel.from_checkpoint(single / "model").state_dict()
    b = FvlmModel.from_checkpoint(ddp / "model").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("attention.self.key.bias"):
            # softmax ignores a bias added to every key, so this gradient is zero in exact
            # arithmetic; Adam scales its float noise up to lr-sized steps, in either run
            continue
        # Adam divides by sqrt(v): an element whose gradient is nearly zero turns the runs'
        # different float summation order into a step of up to lr in either direction (seen:
        # 3e-5, and 2e-4 once the phantoms' plaques changed the data); a real DDP error (wrong
        # averaging, a missed gradient) moves whole tensors by ~lr = 1e-3, which the count of
        # differing elements catches
        diff = (a[key] - b[key]).abs()
        assert float(diff.max()) < 1e-3, key
        assert int((diff > 1e-5).sum()) <= max(1, diff.numel() // 1000), key


def test_yaml_exponent_floats_are_numbers(small: Path, tmp_path: Path) -> None:
    """PyYAML reads ``1e-4`` (no dot) as a string; a hand-written config must still work, and a
    non-number must be refused naming the key."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"manifest: {small}\nout_dir: {tmp_path / 'o'}\nlr: 1e-3\nmin_lr: 1e-6\nsteps: 1e3\n"
        "model:\n  temperature_init: 7e-2\n  text:\n    layer_norm_eps: 1e-12\n",
        encoding="utf-8",
    )
    loaded = TrainConfig.from_yaml(cfg)
    assert loaded.lr == 1e-3 and loaded.min_lr == 1e-6
    assert loaded.steps == 1000 and isinstance(loaded.steps, int)
    from fvlm_pacs.model.config import ModelConfig

    model = ModelConfig.from_dict(dict(loaded.model))  # type: ignore[arg-type]
    assert model.temperature_init == 0.07 and model.text.layer_norm_eps == 1e-12
    cfg.write_text(f"manifest: {small}\nout_dir: o\nlr: fast\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.yaml\.lr: expected a number, got 'fast'"):
        TrainConfig.from_yaml(cfg)
    cfg.write_text(f"manifest: {small}\nout_dir: o\nbatch_size: 2.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"batch_size: expected a whole number, got 2\.5"):
        TrainConfig.from_yaml(cfg)
    with pytest.raises(ConfigError, match=r"text\.dropout: expected a number"):
        ModelConfig.from_dict({"text": {"dropout": "none"}})


def test_changing_the_anatomy_list_drops_texts_made_for_the_old_one(synth: Path) -> None:
    """The trainer adopts a checkpoint's anatomy order after the tokenizer has read every text;
    items must then follow the new order, not the memoised old one."""
    ds = ManifestDataset(synth, crop=(32, 64, 64), seed=1, train=False)
    before, item = ds.texts(0), ds[0]
    ds.anatomies = ("heart", "lung", "esophagus", "aorta")
    after, swapped = ds.texts(0), ds[0]
    assert after.texts == (before.texts[1], before.texts[0], *before.texts[2:])
    assert after.normal == (before.normal[1], before.normal[0], *before.normal[2:])
    # label k must be the anatomy of texts[k - 1]: the label values are swapped too
    lung, heart = item["labels"] == 1, item["labels"] == 2
    assert lung.any() and heart.any()
    assert (swapped["labels"][lung] == 2).all() and (swapped["labels"][heart] == 1).all()
    assert torch.equal(swapped["labels"][~(lung | heart)], item["labels"][~(lung | heart)])
    assert torch.equal(swapped["inside"], item["inside"][[1, 0, 2, 3]])
    ds.anatomies = ("lung",)  # an anatomy the list drops is background
    assert set(ds[0]["labels"].unique().tolist()) <= {0, 1}
