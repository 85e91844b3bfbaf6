"""A model's own prompt wording (``prompts.yaml``): loaded over the table, scored, recorded.

The demo's text tower never saw the release's "Not X."; its normal anatomies were trained on the
normal template. These tests pin that a model folder's prompts replace the table's, that the
predictor scores with them, that thresholds calibrated on one pair refuse another, and that a
bad file is an error naming the finding instead of silently scoring the table's words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm_pacs.codes import load_anatomies, load_findings
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.evaluation import write_thresholds
from fvlm_pacs.model import FvlmModel
from fvlm_pacs.model.demo_build import (
    DemoRecipe,
    prompt_choices_section,
    prompts_wording,
    write_demo_prompts,
)
from fvlm_pacs.model.model_prompts import (
    PROMPTS_FILE,
    apply_model_prompts,
    default_prompts_path,
    write_model_prompts,
)
from fvlm_pacs.model.predictor import Predictor, load_thresholds
from fvlm_pacs.model.prompt_selection import select_on_images
from fvlm_pacs.model.train import TrainConfig
from fvlm_pacs.model.zeroshot_eval import score_cases
from fvlm_pacs.phantoms import PhantomSpec, write_dataset
from fvlm_pacs.reports import normal_text

from .test_predictor import build_model_dir

FINDINGS = load_findings(load_anatomies("ct-rate"))
LUNG_NORMAL = normal_text("lung")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("prompts"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_keeps_the_table_and_a_file_replaces_only_what_it_names(tmp_path: Path) -> None:
    assert apply_model_prompts(tmp_path / PROMPTS_FILE, FINDINGS) == FINDINGS
    path = write_model_prompts(
        tmp_path / PROMPTS_FILE,
        {
            "emphysema": {"negative": LUNG_NORMAL},
            "cardiomegaly": {"positive": "The heart is enlarged.", "negative": "Normal heart."},
        },
    )
    got = {f.name: f for f in apply_model_prompts(path, FINDINGS)}
    table = {f.name: f for f in FINDINGS}
    assert (got["emphysema"].positive, got["emphysema"].negative) == ("Emphysema.", LUNG_NORMAL)
    assert (got["cardiomegaly"].positive, got["cardiomegaly"].negative) == (
        "The heart is enlarged.",
        "Normal heart.",
    )
    assert got["cardiomegaly"].code == table["cardiomegaly"].code  # SR coding stays the table's
    assert got["lung_nodule"] == table["lung_nodule"]
    assert [f.name for f in apply_model_prompts(path, FINDINGS)] == [f.name for f in FINDINGS]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("findings: {emphysemaa: {negative: No.}}", "emphysemaa: unknown finding"),
        ("findings: {emphysema: {negativ: No.}}", "emphysema: must map"),
        ("findings: {emphysema: {negative: '  '}}", "emphysema.negative: must be a non-empty"),
        ("findings: {emphysema: {negative: emphysema.}}", "must differ"),
        ("findings: [emphysema]", "'findings' mapping"),
        ("version: 2\nfindings: {}", "version must be 1"),
        ("findings: {emphysema: {negative: [unclosed", "cannot read"),
    ],
)
def test_a_bad_prompts_file_is_an_error_naming_the_problem(
    tmp_path: Path, text: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_model_prompts(write(tmp_path / PROMPTS_FILE, text), FINDINGS)


def test_predictor_scores_with_the_models_prompts(model_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    write_model_prompts(own / PROMPTS_FILE, {"emphysema": {"negative": LUNG_NORMAL}})
    assert default_prompts_path(own) == own / PROMPTS_FILE
    plain, p = Predictor(model_dir, device="cpu"), Predictor(own, device="cpu")
    assert {f.name: f.negative for f in p.findings}["emphysema"] == LUNG_NORMAL
    assert p.prompt_pairs()["emphysema"] == ("Emphysema.", LUNG_NORMAL)
    i = [f.name for f in FINDINGS].index("emphysema")
    text = FvlmModel.from_checkpoint(own)
    with torch.no_grad():
        want = text.encode_text([LUNG_NORMAL])[0]
    torch.testing.assert_close(p._negatives[i], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(p._positives, plain._positives, rtol=0, atol=0)
    others = [j for j in range(len(FINDINGS)) if j != i]
    torch.testing.assert_close(p._negatives[others], plain._negatives[others], rtol=0, atol=0)


def test_thresholds_refuse_prompts_they_were_not_calibrated_with(
    model_dir: Path, tmp_path: Path
) -> None:
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    p = Predictor(own, device="cpu")
    sha = p.info.sha256
    path = write_thresholds(own / "thresholds.json", {"emphysema": 0.4}, sha, p.prompt_pairs())
    assert json.loads(path.read_text())["prompts"]["emphysema"] == ["Emphysema.", "Not Emphysema."]
    assert load_thresholds(path, p.findings, sha) == {"emphysema": 0.4}
    write_model_prompts(own / PROMPTS_FILE, {"emphysema": {"negative": LUNG_NORMAL}})
    with pytest.raises(ConfigError, match="emphysema was calibrated with the prompts"):
        Predictor(own, device="cpu")
    # thresholds written before they recorded prompts still load
    old = write_thresholds(tmp_path / "old.json", {"emphysema": 0.4}, sha)
    assert load_thresholds(old, Predictor(own, device="cpu", thresholds_path=old).findings, sha)


def test_the_demo_recipe_writes_its_negative_prompts(model_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    phantoms = write_dataset(3, 0, tmp_path / "data", spec=PhantomSpec(shape=(32, 48, 64)))
    training = TrainConfig(manifest=phantoms, out_dir=tmp_path / "run")
    release = DemoRecipe(negative_prompts="release", positive_prompts="table")
    assert write_demo_prompts(release, own, training) == ()
    assert not (own / PROMPTS_FILE).exists()
    write_demo_prompts(
        DemoRecipe(negative_prompts="normal-template", positive_prompts="table"), own, training
    )
    got = {f.name: f for f in Predictor(own, device="cpu").findings}
    for f in FINDINGS:
        assert got[f.name].positive == f.positive
        assert got[f.name].negative == normal_text(f.anatomy)
    # text-selected reads the training reports; three phantoms are too few to move any finding
    # off the table (tests/test_prompt_selection.py has the rule), and the old file goes
    choices = write_demo_prompts(
        DemoRecipe(negative_prompts="text-selected", positive_prompts="table"), own, training
    )
    assert [c.finding for c in choices] == [f.name for f in FINDINGS]
    assert not any(c.changed for c in choices) and not (own / PROMPTS_FILE).exists()
    assert sum(c.with_finding + c.without_finding for c in choices) == 3 * len(FINDINGS)
    with pytest.raises(ConfigError, match="negative_prompts"):
        DemoRecipe(negative_prompts="none", positive_prompts="table")


def test_val_selected_scores_each_candidate_and_keeps_the_chosen_scores(
    model_dir: Path, tmp_path: Path
) -> None:
    """The demo's ``val-selected`` path on a random model and three phantoms: both candidate
    sets are scored, three cases are too few to move any finding off the table (so no file),
    and the scores handed to calibration are the table set's, finding by finding."""
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    write_model_prompts(own / PROMPTS_FILE, {"emphysema": {"negative": "An old choice."}})
    phantoms = write_dataset(3, 0, tmp_path / "data", spec=PhantomSpec(shape=(32, 48, 64)))
    cases = ("case_00000", "case_00001", "case_00002")
    choices, scored = select_on_images(own, phantoms.parent, cases)
    assert [c.finding for c in choices] == [f.name for f in FINDINGS]
    assert not any(c.changed for c in choices) and not (own / PROMPTS_FILE).exists()
    table = score_cases(Predictor(own, device="cpu"), phantoms.parent, cases)
    for f in FINDINGS:
        np.testing.assert_allclose(scored.scores[f.name], table.scores[f.name], rtol=0, atol=1e-6)
        assert dict(choices[0].candidates).keys() == {"Not Emphysema.", LUNG_NORMAL}
    assert "validation part's images" in prompts_wording("val-selected")
    assert "never the test part" in "\n".join(prompt_choices_section(choices, "val-selected"))


def test_positive_candidates_are_chosen_after_the_negative_and_scored_as_served(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With candidate positives and the case minimum lowered to one (a random model on four
    phantoms), each finding keeps the positive with the best AUC under its chosen negative
    (the table's on a tie), and the scores handed to calibration are those the predictor gives
    once the written prompts.yaml is loaded."""
    from fvlm_pacs.evaluation import roc_auc
    from fvlm_pacs.model import prompt_selection

    monkeypatch.setattr(prompt_selection, "MIN_IMAGE_CASES", 1)
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    phantoms = write_dataset(4, 3, tmp_path / "data", spec=PhantomSpec(shape=(32, 48, 64)))
    cases = tuple(f"case_{i:05d}" for i in range(4))
    extra = ("Consolidation of the lower lobe.", "Pulmonary consolidation.")
    positives = {f.name: (f.positive, *extra) for f in FINDINGS if f.anatomy == "lung"}
    choices, scored = select_on_images(own, phantoms.parent, cases, positives=positives)
    served = score_cases(Predictor(own, device="cpu"), phantoms.parent, cases)
    moved = 0
    for c in choices:
        if c.finding not in positives:
            assert c.positives == () and c.scored_positive == c.positive
        else:
            assert [t for t, _ in c.positives] == list(positives[c.finding])
            aucs = [a for _, a in c.positives]
            if all(a is not None for a in aucs):
                assert dict(c.positives)[c.scored_positive] == max(aucs)  # type: ignore[type-var]
                assert c.scored_positive == c.positive or aucs[0] < max(aucs)  # type: ignore[operator]
            moved += c.scored_positive != c.positive
        np.testing.assert_allclose(
            scored.scores[c.finding], served.scores[c.finding], rtol=0, atol=1e-6
        )
        y = served.labels[c.finding]
        if c.positives and 0 < y.sum() < len(y):
            assert roc_auc(served.scores[c.finding], y) == pytest.approx(
                dict(c.positives)[c.scored_positive]
            )
    assert moved > 0  # a random model prefers some other wording somewhere
    with pytest.raises(ValueError, match="must start with the table's"):
        select_on_images(own, phantoms.parent, cases, positives={"emphysema": ("Other.",)})
