"""Evaluation and calibration: hand-computed AUCs, thresholds, metrics, report outputs."""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvlm_pacs.codes import load_anatomies, load_findings
from fvlm_pacs.domain import Finding, FindingStatus, ModelInfo
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.evaluation import (
    binary_metrics,
    bootstrap_auc_ci,
    calibrate,
    calibrate_threshold,
    co_finding_auc,
    evaluate,
    roc_auc,
    roc_curve,
    scores_from_findings,
    split_cases,
    write_thresholds,
)
from fvlm_pacs.model.predictor import load_thresholds

SHA = "ab" * 32


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return total / (len(pos) * len(neg))


def trapezoid(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


# -- AUC ------------------------------------------------------------------------------------


def test_auc_perfect_inverted_and_ties() -> None:
    y = [0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5


def test_auc_small_examples_by_hand() -> None:
    # pos 0.9 beats 3 negatives, 0.6 beats 2, 0.4 beats 2 → U = 7 of 9 pairs
    scores = [0.9, 0.6, 0.4, 0.7, 0.3, 0.2]
    labels = [1, 1, 1, 0, 0, 0]
    assert roc_auc(scores, labels) == pytest.approx(7 / 9)
    # with ties: 0.8 beats 2; each 0.5 ties one negative (½) and beats one → U = 2 + 1.5 + 1.5
    scores = [0.8, 0.5, 0.5, 0.5, 0.2, 0.9]
    assert roc_auc(scores, labels) == pytest.approx(5 / 9)


def test_auc_equals_pairwise_count_on_random_data() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = int(rng.integers(20, 80))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounding makes many ties
        expected = brute_auc(scores, labels)
        assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
        fpr, tpr, thr = roc_curve(scores, labels)
        assert trapezoid(fpr, tpr) == pytest.approx(expected, abs=1e-12)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert thr[0] == np.inf and np.all(np.diff(thr) < 0)


def test_roc_curve_points_follow_score_ge_threshold() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 1, 0, 0])
    fpr, tpr, thr = roc_curve(scores, labels)
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:], strict=True):
        m = binary_metrics(scores, labels, th)
        assert (m.fp / 3, m.tp / 3) == pytest.approx((f, t))


def test_one_class_gives_no_auc() -> None:
    assert roc_auc([0.1, 0.4, 0.3], [1, 1, 1]) is None
    assert roc_auc([0.1, 0.4, float("nan")], [0, 0, 1]) is None  # the only positive is NaN
    assert bootstrap_auc_ci([0.1, 0.4], [0, 0]) is None
    with pytest.raises(ValueError, match="labels"):
        roc_curve([0.1, 0.4], [0, 0])
    with pytest.raises(ValueError, match="labels"):
        calibrate_threshold([0.1, 0.4], [1, 1])


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="labels must be 0/1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="scores must be one-dimensional"):
        roc_auc([[0.1, 0.2]], [0, 1])


def test_nan_scores_are_not_assessable() -> None:
    scores = [0.9, np.nan, 0.1, None, 0.8, 0.2]
    labels = [1, 1, 0, 0, 1, 0]
    assert roc_auc(scores, labels) == 1.0
    m = binary_metrics(scores, labels, 0.5)
    assert (m.n, m.tp, m.tn, m.fp, m.fn) == (4, 2, 2, 0, 0)
    report = evaluate({"x": scores}, {"x": labels}, {"x": 0.5}, n_bootstrap=50)
    (fe,) = report.findings
    assert (fe.n, fe.n_pos, fe.n_neg, fe.n_not_assessable) == (4, 2, 2, 2)


# -- bootstrap ------------------------------------------------------------------------------


def test_co_finding_auc_keeps_the_cases_with_another_finding_of_the_anatomy() -> None:
    """An 'abnormal lung' score: better than chance over all cases, chance among the lungs
    that hold another finding."""
    labels = {
        "a": np.array([1, 0, 1, 0, 0, 1]),
        "b": np.array([0, 1, 1, 1, 0, 0]),  # lung, with a
        "c": np.array([0, 0, 0, 1, 1, 0]),  # heart: never counts for a or b
    }
    abnormal = [0.9, 0.9, 0.9, 0.9, 0.1, 0.9]  # any lung finding -> 0.9
    scores = {"a": abnormal, "b": [0.2, 0.8, None, 0.7, 0.1, 0.3], "c": [0.1] * 6}
    anatomy_of = {"a": "lung", "b": "lung", "c": "heart"}
    got = co_finding_auc(scores, labels, anatomy_of)
    assert roc_auc(abnormal, labels["a"]) == pytest.approx(2 / 3)  # the healthy lung ranks low
    assert got["a"] == 0.5  # cases 1, 2, 3 (b present): a tie at 0.9 for all three
    # b among the cases with a (0, 2, 5): 2 is not assessable, so 0 and 5 are both negatives
    assert got["b"] is None
    assert got["c"] is None  # heart has no other finding
    scores["b"] = [0.2, 0.8, 0.9, 0.7, 0.1, 0.3]
    assert co_finding_auc(scores, labels, anatomy_of)["b"] == 1.0  # 0.9 above 0.2 and 0.3
    with pytest.raises(ValueError, match="anatomy_of"):
        co_finding_auc(scores, labels, {"a": "lung", "b": "lung"})
    told = evaluate(scores, labels, anatomy_of=anatomy_of, n_bootstrap=10)
    assert [f.co_finding_auc for f in told.findings] == [0.5, 1.0, None]
    assert told.mean_co_finding_auc == 0.75
    doc = json.loads(told.to_json())
    assert doc["mean_co_finding_auc"] == 0.75 and doc["findings"][0]["co_finding_auc"] == 0.5
    md = told.to_markdown()
    assert "AUC, another finding present |" in md and "| 0.500 |" in md and "mean 0.750" in md
    plain = evaluate(scores, labels, n_bootstrap=10)
    assert plain.mean_co_finding_auc is None and "another finding" not in plain.to_markdown()


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 2)
    auc = roc_auc(scores, labels)
    assert auc is not None
    ci = bootstrap_auc_ci(scores, labels, n=300, seed=7)
    assert ci is not None
    low, high = ci
    assert low < auc < high
    assert 0.0 <= low and high <= 1.0
    assert bootstrap_auc_ci(scores, labels, n=300, seed=7) == ci
    assert bootstrap_auc_ci(scores, labels, n=300, seed=8) != ci
    wider = bootstrap_auc_ci(scores, labels, n=300, seed=7, alpha=0.01)
    assert wider is not None and wider[0] <= low and wider[1] >= high


def test_bootstrap_skips_resamples_with_one_class() -> None:
    # one positive among 4: many resamples miss it and must be skipped, not count as 0 or NaN
    ci = bootstrap_auc_ci([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 0], n=200, seed=1)
    assert ci == (1.0, 1.0)


# -- calibration ------------------------------------------------------------------------------


def test_calibrate_threshold_picks_point_closest_to_top_left() -> None:
    # d² per threshold: .9→.5625 .8→.25 .7→.3125 .6→.125 .5→.3125 .4→.625 .3→.5625 .2→1
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    labels = [1, 1, 0, 1, 0, 0, 1, 0]
    assert calibrate_threshold(scores, labels) == 0.6
    # the calibrated rule reproduces the chosen point with score >= threshold
    m = binary_metrics(scores, labels, 0.6)
    assert (m.tp, m.fp) == (3, 1)


def test_calibrate_threshold_tie_goes_to_higher_threshold() -> None:
    # 0.9 → (fpr 0, tpr .5) and 0.5 → (fpr .5, tpr 1) are both at distance .5
    assert calibrate_threshold([0.9, 0.7, 0.5, 0.1], [1, 0, 1, 0]) == 0.9


def test_calibrate_skips_one_class_findings() -> None:
    out = calibrate(
        {"a": [0.9, 0.2, 0.7, 0.4], "b": [0.1, 0.2, 0.3, 0.4]},
        {"a": [1, 0, 1, 0], "b": [0, 0, 0, 0]},
    )
    assert out == {"a": 0.7}


# -- metrics --------------------------------------------------------------------------------


def test_binary_metrics_by_hand() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    labels = [1, 1, 0, 1, 0, 0, 1, 0, 0]
    m = binary_metrics(scores, labels, 0.75)
    assert (m.tp, m.fp, m.tn, m.fn, m.n) == (2, 0, 5, 2, 9)
    assert m.accuracy == pytest.approx(7 / 9)
    assert m.sensitivity == pytest.approx(0.5)
    assert m.specificity == pytest.approx(1.0)
    assert m.precision == pytest.approx(1.0)
    # F1 positive = 2·2/(2·2+0+2) = 2/3 (support 4); F1 negative = 2·5/(2·5+2+0) = 5/6 (support 5)
    assert m.f1_weighted == pytest.approx((4 * 2 / 3 + 5 * 5 / 6) / 9)
    # a score equal to the threshold is positive (the predictor's rule)
    m = binary_metrics(scores, labels, 0.6)
    assert (m.tp, m.fp) == (3, 1)


def test_binary_metrics_undefined_rates_are_none() -> None:
    m = binary_metrics([0.1, 0.2], [0, 0], 0.5)
    assert m.sensitivity is None and m.precision is None
    assert m.specificity == 1.0 and m.accuracy == 1.0
    assert m.f1_weighted == pytest.approx(1.0)  # sklearn: only class 0 has support


# -- report ---------------------------------------------------------------------------------


def _data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    labels = {"emphysema": rng.integers(0, 2, 60), "cardiomegaly": rng.integers(0, 2, 60)}
    labels["hiatal hernia"] = np.zeros(60, dtype=int)  # one class only
    scores = {k: 1 / (1 + np.exp(-(rng.normal(size=60) + v))) for k, v in labels.items()}
    scores["emphysema"][:3] = np.nan
    return scores, labels


def test_evaluate_report_json_and_markdown() -> None:
    scores, labels = _data()
    thresholds = {"emphysema": 0.6, "cardiomegaly": 0.55, "hiatal hernia": 0.5}
    report = evaluate(scores, labels, thresholds, n_bootstrap=100)
    data = json.loads(report.to_json())
    assert {"mean_auc", "findings"} <= set(data)
    by_name = {f["finding"]: f for f in data["findings"]}
    assert list(by_name) == list(scores)
    assert by_name["emphysema"]["n_not_assessable"] == 3
    assert by_name["emphysema"]["n"] == 57
    assert by_name["hiatal hernia"]["auc"] is None
    assert by_name["hiatal hernia"]["metrics"]["specificity"] is not None
    expected = np.mean([roc_auc(scores[k], labels[k]) for k in ("emphysema", "cardiomegaly")])
    assert data["mean_auc"] == pytest.approx(expected)
    assert not data["optimistic_thresholds"]
    assert all(f["threshold_source"] == "given" for f in data["findings"])
    md = report.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(scores)  # header + one row per finding
    for name in scores:
        assert sum(line.startswith(f"| {name} |") for line in rows) == 1
    assert "Optimistic" not in md


def test_evaluate_without_thresholds_is_flagged_optimistic() -> None:
    scores, labels = _data()
    report = evaluate(scores, labels, None, n_bootstrap=50)
    assert report.optimistic
    fe = {f.finding: f for f in report.findings}
    assert fe["emphysema"].threshold_source == "optimistic"
    assert fe["emphysema"].threshold == calibrate_threshold(
        scores["emphysema"], labels["emphysema"]
    )
    assert fe["hiatal hernia"].threshold is None and fe["hiatal hernia"].metrics is None
    assert "Optimistic" in report.to_markdown()
    assert json.loads(report.to_json())["optimistic_thresholds"] is True


def test_evaluate_requires_every_threshold_and_matching_keys() -> None:
    scores, labels = _data()
    with pytest.raises(ValueError, match="thresholds: none for finding"):
        evaluate(scores, labels, {"emphysema": 0.5})
    with pytest.raises(ValueError, match="labels: no labels"):
        evaluate(scores, {"emphysema": labels["emphysema"]}, None)


def test_mean_auc_none_when_no_finding_has_one() -> None:
    report = evaluate({"a": [0.1, 0.2]}, {"a": [1, 1]}, {"a": 0.5}, n_bootstrap=10)
    assert report.mean_auc is None
    assert json.loads(report.to_json())["mean_auc"] is None


def test_roc_png_is_written(tmp_path: Path) -> None:
    scores, labels = _data()
    report = evaluate(scores, labels, None, n_bootstrap=20)
    out = report.save_roc_png(tmp_path / "figs" / "roc.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.width > 500 and img.height > 500
        colors = img.convert("RGB").getcolors(maxcolors=100_000)
        assert colors is not None and len(colors) > 10  # curves, text, axes — not a blank image
    assert [p.name for p in out.parent.iterdir()] == ["roc.png"]  # no temp file left


# -- thresholds file --------------------------------------------------------------------------


def test_write_thresholds_loads_in_predictor(tmp_path: Path) -> None:
    findings = load_findings(load_anatomies("ct-rate"))
    names = [f.name for f in findings[:3]]
    rng = np.random.default_rng(0)
    labels = {n: rng.integers(0, 2, 40) for n in names}
    scores = {n: np.clip(rng.random(40) * 0.5 + 0.4 * labels[n], 0, 1) for n in names}
    thresholds = calibrate(scores, labels)
    assert set(thresholds) == set(names)
    path = write_thresholds(tmp_path / "thresholds.json", thresholds, SHA)
    loaded = load_thresholds(path, findings, SHA)
    assert loaded == pytest.approx(thresholds)
    assert json.loads(path.read_text())["model_sha256"] == SHA
    with pytest.raises(ConfigError, match="calibrated for weights"):
        load_thresholds(path, findings, "cd" * 32)


def test_write_thresholds_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="x must be a number in"):
        write_thresholds(tmp_path / "t.json", {"x": 1.5}, SHA)
    with pytest.raises(ValueError, match="x must be a number in"):
        write_thresholds(tmp_path / "t.json", {"x": math.nan}, SHA)
    with pytest.raises(ValueError, match="model_sha256"):
        write_thresholds(tmp_path / "t.json", {"x": 0.5}, "")
    assert not list(tmp_path.iterdir())


# -- splits and predictor output ---------------------------------------------------------------


def test_split_cases_is_deterministic_and_disjoint() -> None:
    ids = [f"case{i:03d}" for i in range(101)]
    split = split_cases(ids, seed=4)
    assert (len(split.train), len(split.val), len(split.test)) == (71, 15, 15)
    assert set(split.train) | set(split.val) | set(split.test) == set(ids)
    assert not (set(split.train) & set(split.val)) and not (set(split.val) & set(split.test))
    assert split_cases(list(reversed(ids)), seed=4) == split  # order of ids does not matter
    assert split_cases(ids, seed=5) != split
    with pytest.raises(ValueError, match="unique"):
        split_cases(["a", "b", "a"])
    with pytest.raises(ValueError, match="fractions"):
        split_cases(ids, fractions=(0.5, 0.5, 0.5))


def test_scores_from_findings_marks_not_assessable_nan() -> None:
    info = ModelInfo("m", "1", SHA)

    def f(name: str, score: float | None) -> Finding:
        status: FindingStatus = "not_assessable" if score is None else "absent"
        return Finding("lung", name, "1", "SCT", name, score, 0.5, status, info)

    out = scores_from_findings([[f("a", 0.2), f("b", None)], [f("a", 0.7)]])
    assert out["a"].tolist() == [0.2, 0.7]
    assert np.isnan(out["b"]).all()
