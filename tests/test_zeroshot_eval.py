"""`fvlm-pacs eval` and `fvlm-pacs calibrate` on a small synthetic dataset with a tiny model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fvlm_pacs.cli import main
from fvlm_pacs.domain import LabelMap
from fvlm_pacs.evaluation import co_finding_auc, roc_auc
from fvlm_pacs.model import Predictor
from fvlm_pacs.model.config import RELEASED_ANATOMIES
from fvlm_pacs.model.predictor import load_thresholds
from fvlm_pacs.model.zeroshot_eval import dataset_split, score_cases, score_cases_shared
from fvlm_pacs.phantoms import PhantomSpec, write_dataset
from fvlm_pacs.reports import normal_text
from tests.test_predictor import build_model_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zs-data")
    write_dataset(8, 100, root, spec=PhantomSpec(shape=(48, 96, 128), spacing=(6.0, 2.5, 2.5)))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("zs-model"))


def test_split_is_deterministic_and_disjoint(data: Path) -> None:
    a = dataset_split(data / "manifest.csv", seed=3)
    b = dataset_split(data / "manifest.csv", seed=3)
    assert a == b
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(len(p) for p in parts) == 8
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_score_cases_collects_scores_and_truth(model_dir: Path, data: Path) -> None:
    predictor = Predictor(model_dir, device="cpu", mode="single")
    ids = ("case_00000", "case_00001")
    got = score_cases(predictor, data, ids)
    assert set(got.scores) == {f.name for f in predictor.findings}
    for name, scores in got.scores.items():
        assert scores.shape == (2,) and np.isfinite(scores).all(), name
        truth = json.loads((data / ids[0] / "labels.json").read_text())["findings"][name]
        assert got.labels[name][0] == truth


def test_shared_scoring_equals_one_pass_per_table(model_dir: Path, data: Path) -> None:
    """Two prompt tables on one encoding per case give each table's own score_cases."""
    first = Predictor(model_dir, device="cpu", mode="single")
    template = tuple(
        dataclasses.replace(f, negative=normal_text(f.anatomy)) for f in first.findings
    )
    second = Predictor(model_dir, device="cpu", mode="single", findings=template)
    ids = ("case_00000", "case_00001", "case_00002")
    shared = score_cases_shared((first, second), data, ids)
    for p, got in zip((first, second), shared, strict=True):
        alone = score_cases(p, data, ids)
        assert got.case_ids == ids and got.labels.keys() == alone.labels.keys()
        for name in alone.scores:
            np.testing.assert_allclose(got.scores[name], alone.scores[name], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(got.labels[name], alone.labels[name])
    assert any(
        not np.allclose(shared[0].scores[n], shared[1].scores[n], atol=1e-3)
        for n in shared[0].scores
    )
    with pytest.raises(ValueError, match="no predictor"):
        score_cases_shared((), data, ids)


def test_cli_calibrate_then_eval(model_dir: Path, data: Path, tmp_path: Path) -> None:
    thresholds = tmp_path / "thresholds.json"
    argv = ["calibrate", "--model", str(model_dir), "--data", str(data), "--out", str(thresholds)]
    assert main([*argv, "--split", "all", "--mode", "single"]) == 0
    doc = json.loads(thresholds.read_text())
    predictor = Predictor(model_dir, device="cpu", thresholds_path=thresholds)
    assert load_thresholds(thresholds, predictor.findings, predictor.info.sha256)
    assert doc["model_sha256"] == predictor.info.sha256

    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--json", str(report)]
    assert main([*argv, "--split", "all", "--mode", "single", "--thresholds", str(thresholds)]) == 0
    result = json.loads(report.read_text())
    assert "mean_auc" in result and len(result["findings"]) == 16
    # the report's AUC is the AUC of the scores the predictor gives on those cases
    scores = score_cases(
        Predictor(model_dir, device="cpu", mode="single"),
        data,
        tuple(sorted(p.name for p in data.iterdir() if p.is_dir())),
    )
    for row in result["findings"]:
        expected = roc_auc(scores.scores[row["finding"]], scores.labels[row["finding"]])
        assert row["auc"] == (pytest.approx(expected) if expected is not None else None)
    # grouped by the predictor's own finding -> anatomy table
    co = co_finding_auc(scores.scores, scores.labels, predictor.anatomy_of())
    assert [r["co_finding_auc"] for r in result["findings"]] == [
        pytest.approx(co[r["finding"]]) if co[r["finding"]] is not None else None
        for r in result["findings"]
    ]
    assert result["mean_co_finding_auc"] is not None  # some lung holds two findings
    assert (tmp_path / "eval.md").exists() and (tmp_path / "eval.png").stat().st_size > 1000


def test_cli_eval_scores_with_the_precision_it_is_given(model_dir: Path, data: Path, tmp_path):
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--json", str(report)]
    assert main([*argv, "--split", "all", "--mode", "single", "--precision", "bf16"]) == 0
    ids = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    bf16 = score_cases(
        Predictor(model_dir, device="cpu", mode="single", precision="bf16"), data, ids
    )
    fp32 = score_cases(Predictor(model_dir, device="cpu", mode="single"), data, ids)
    assert any(not np.array_equal(bf16.scores[k], fp32.scores[k]) for k in bf16.scores)
    result = json.loads(report.read_text())
    assert result["inference"] == {"mode": "single", "precision": "bf16", "device": "cpu"}
    for row in result["findings"]:
        expected = roc_auc(bf16.scores[row["finding"]], bf16.labels[row["finding"]])
        assert row["auc"] == (pytest.approx(expected) if expected is not None else None)


class WithoutAorta:
    """A segmentation provider that finds every anatomy but the aorta (reads the phantom's own
    label map and blanks label 4): scoring with it must use its map, not the exact one."""

    name = "without-aorta"

    def __init__(self, root: Path) -> None:
        self.root = root

    def segment(self, volume, study_paths):  # type: ignore[no-untyped-def]
        with np.load(self.root / volume.series_instance_uid / "case.npz") as z:
            labels = z["labels"].copy()
        labels[labels == 4] = 0
        return LabelMap(array=labels, anatomies=RELEASED_ANATOMIES, source=self.name)


def test_score_cases_can_segment_as_served(model_dir: Path, data: Path) -> None:
    predictor = Predictor(model_dir, device="cpu", mode="single")
    ids = ("case_00000", "case_00001")
    exact = score_cases(predictor, data, ids)
    served = score_cases(predictor, data, ids, WithoutAorta(data))
    aorta = [f.name for f in predictor.findings if f.anatomy == "aorta"]
    assert aorta and all(np.isfinite(exact.scores[n]).all() for n in aorta)
    assert all(np.isnan(served.scores[n]).all() for n in aorta)  # not assessable, not guessed
    np.testing.assert_array_equal(served.scores["emphysema"], exact.scores["emphysema"])
