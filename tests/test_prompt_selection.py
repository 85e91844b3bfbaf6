"""Per-finding prompts: negatives chosen on the training texts (``text-selected``) or images,
positives mined from the training reports.

The text encoder here is a lookup table of hand-placed unit vectors in R³, so every margin and
AUC below is a hand computation: each positive prompt sits on x, each table negative ("Not X.")
on y, each anatomy's normal template on z. A case's margin for a pair is
``t·positive − t·negative``; the AUC ranks cases with the finding above those without.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fvlm_pacs.codes import load_anatomies, load_findings
from fvlm_pacs.model.demo_build import DemoRecipe, prompt_choices_section, prompts_wording
from fvlm_pacs.model.model_prompts import PROMPTS_FILE, apply_model_prompts
from fvlm_pacs.model.prompt_selection import (
    PromptChoice,
    TrainingTexts,
    candidate_negatives,
    candidate_positives,
    choices_table,
    select_negatives,
    select_negatives_on_images,
    write_choices,
)
from fvlm_pacs.phantoms import FINDINGS
from fvlm_pacs.reports import CT_RATE_ANATOMIES, normal_text

TABLE = load_findings(load_anatomies("ct-rate"))
BY_NAME = {d.name: d for d in TABLE}
S5 = 1 / math.sqrt(5)
X, Y, Z = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)

# Case texts. "Emphysema in both upper lobes." leans to the table's negative: y·t > x·t.
EMPHYSEMA_TEXT = "Emphysema in both upper lobes."
ENLARGED_HEART = "The heart is enlarged."  # leans to the normal template: z·t > x·t
EFFUSION = "A small pericardial effusion is seen."  # another heart finding, placed on y ("Not X.")
HERNIA = "Hiatal hernia."  # the positive prompt's own words
VECTORS: dict[str, tuple[float, float, float]] = {
    EMPHYSEMA_TEXT: (S5, 2 * S5, 0.0),
    ENLARGED_HEART: (S5, 0.0, 2 * S5),
    EFFUSION: Y,
    HERNIA: X,
    **{d.positive: X for d in TABLE},
    **{d.negative: Y for d in TABLE},
    **{normal_text(a): Z for a in CT_RATE_ANATOMIES},
}


def encode(texts: list[str]) -> torch.Tensor:
    return torch.tensor([VECTORS[t] for t in texts], dtype=torch.float32)


def case(lung: str = "", heart: str = "", esophagus: str = "", aorta: str = "") -> tuple[str, ...]:
    given = (lung, heart, esophagus, aorta)
    return tuple(t or normal_text(a) for t, a in zip(given, CT_RATE_ANATOMIES, strict=True))


def dataset() -> TrainingTexts:
    """24 cases: emphysema in 0-11 (case 23's label not given), cardiomegaly in 0-5 with an
    effusion-worded heart in the other 18, hiatal hernia in 0-9, arterial calcification in 0-1
    only (worded like the emphysema texts, so the template would win on AUC)."""
    n = 24
    labels = np.zeros((n, len(FINDINGS)), dtype=np.int64)
    texts = []
    for i in range(n):
        texts.append(
            case(
                lung=EMPHYSEMA_TEXT if i < 12 else "",
                heart=ENLARGED_HEART if i < 6 else EFFUSION,
                esophagus=HERNIA if i < 10 else "",
                aorta=EMPHYSEMA_TEXT if i < 2 else "",
            )
        )
        for name, present in (
            ("emphysema", i < 12),
            ("cardiomegaly", i < 6),
            ("hiatal_hernia", i < 10),
            ("arterial_wall_calcification", i < 2),
        ):
            labels[i, FINDINGS.index(name)] = int(present)
    labels[23, FINDINGS.index("emphysema")] = -1
    return TrainingTexts(CT_RATE_ANATOMIES, tuple(texts), labels)


@pytest.fixture(scope="module")
def choices() -> dict[str, object]:
    picked = select_negatives(encode, dataset(), TABLE, min_cases=5)
    assert [c.finding for c in picked] == [d.name for d in TABLE]
    return {c.finding: c for c in picked}


def aucs(choice: object) -> list[float | None]:
    return [auc for _, auc in choice.candidates]  # type: ignore[attr-defined]


def test_candidates_are_the_tables_negative_then_the_normal_template() -> None:
    d = BY_NAME["emphysema"]
    assert candidate_negatives(d) == ("Not Emphysema.", "Lung shows no significant abnormalities.")


def test_the_template_wins_where_the_tables_negative_inverts_the_reports(choices: dict) -> None:
    c = choices["emphysema"]
    # with finding: t = (1, 2, 0)/√5 → table margin (1 − 2)/√5 < 0, template margin 1/√5
    # without: the template z → table margin 0, template margin −1
    assert aucs(c) == [0.0, 1.0]
    assert c.chosen == normal_text("lung") and c.changed
    # case 23's label is not given: counted on neither side
    assert (c.with_finding, c.without_finding) == (12, 11)


def test_the_tables_negative_stays_where_it_orders_the_reports(choices: dict) -> None:
    c = choices["cardiomegaly"]
    # with: t = (1, 0, 2)/√5 → table 1/√5, template (1 − 2)/√5; without: y → table −1, template 0
    assert aucs(c) == [1.0, 0.0]
    assert c.chosen == "Not Cardiomegaly." and not c.changed


def test_a_tie_keeps_the_table(choices: dict) -> None:
    c = choices["hiatal_hernia"]
    # with: x → both margins 1; without: z → table 0, template −1: both AUC 1
    assert aucs(c) == [1.0, 1.0] and not c.changed


def test_too_few_cases_keep_the_table_whatever_the_auc(choices: dict) -> None:
    c = choices["arterial_wall_calcification"]
    assert aucs(c) == [0.0, 1.0]  # the template would win ...
    assert (c.with_finding, c.without_finding) == (2, 22) and not c.changed  # ... on 2 cases


def test_a_finding_without_positive_cases_has_no_auc(choices: dict) -> None:
    c = choices["lung_nodule"]
    assert aucs(c) == [None, None] and not c.changed and c.with_finding == 0


def test_the_prompts_file_holds_the_changed_findings_only(choices: dict, tmp_path: Path) -> None:
    path = tmp_path / PROMPTS_FILE
    assert write_choices(path, list(choices.values())) == path
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert doc["findings"] == {"emphysema": {"negative": normal_text("lung")}}
    served = {d.name: d for d in apply_model_prompts(path, TABLE)}
    assert served["emphysema"].negative == normal_text("lung")
    assert served["cardiomegaly"] == BY_NAME["cardiomegaly"]
    # nothing changed: an old file must not keep serving stale choices
    unchanged = [c for c in choices.values() if not c.changed]
    assert write_choices(path, unchanged) is None and not path.exists()


def test_the_card_states_the_rule_and_the_table(choices: dict) -> None:
    table = choices_table(list(choices.values()))
    assert "| emphysema | 12 / 11 | 0.000 | 1.000 | normal template |" in table
    assert "| cardiomegaly | 6 / 18 | 1.000 | 0.000 | table |" in table
    assert "| lung_nodule | 0 / 24 | n/a | n/a | table |" in table
    assert "whichever ranks the train part's report texts better" in prompts_wording(
        "text-selected"
    )
    section = "\n".join(prompt_choices_section(list(choices.values())))
    assert "no image, no validation or test case" in section and table in section
    assert prompt_choices_section([]) == []  # release / normal-template: no such section
    assert (
        DemoRecipe(negative_prompts="text-selected", positive_prompts="table").negative_prompts
        == "text-selected"
    )


# --- chosen on labelled images (val-selected) -------------------------------------------------
def test_on_images_the_candidate_that_ranks_them_best_wins() -> None:
    """Scores of six images per candidate (table's negative, normal template), by hand: the
    template ranks emphysema right and the table's inverts it; cardiomegaly the other way; a
    not-assessable image (NaN) counts on neither side; hiatal hernia ties; aortic calcification
    has too few positives to move."""
    y = np.array([1, 1, 1, 0, 0, 0])
    up, down = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    names = [d.name for d in TABLE]
    table = {n: up for n in names} | {"emphysema": down, "hiatal_hernia": up}
    template = {n: up for n in names} | {"cardiomegaly": down, "hiatal_hernia": up}
    template["emphysema"] = np.array([0.9, 0.8, np.nan, 0.3, 0.2, 0.1])
    labels = {n: y for n in names} | {"arterial_wall_calcification": np.array([1, 0, 0, 0, 0, 0])}
    got = {
        c.finding: c
        for c in select_negatives_on_images(TABLE, [table, template], labels, min_cases=2)
    }
    assert aucs(got["emphysema"]) == [0.0, 1.0] and got["emphysema"].changed
    assert got["emphysema"].chosen == normal_text("lung")
    assert aucs(got["cardiomegaly"]) == [1.0, 0.0] and not got["cardiomegaly"].changed
    assert aucs(got["hiatal_hernia"]) == [1.0, 1.0] and not got["hiatal_hernia"].changed
    assert got["arterial_wall_calcification"].with_finding == 1
    assert not got["arterial_wall_calcification"].changed


# --- positive prompts in the reports' own words ----------------------------------------------
def test_candidate_positives_are_the_sentences_that_say_the_finding() -> None:
    """40 cases, cardiomegaly in 0-19 (case 39's label not given). "Cardiac enlargement is
    noted." is in 14 of them, "Enlarged heart." in 11 plus one without, "Heart is big." in 9
    (too few), "Coronary calcification." in 12 with and 12 without (names another finding),
    "Cardiomegaly." — the table's own words — in all 20: the table's stays first and once."""
    n = 40
    labels = np.full((n, len(FINDINGS)), -1, dtype=np.int64)
    col = FINDINGS.index("cardiomegaly")
    texts = []
    for i in range(n):
        has = i < 20
        labels[i, col] = int(has)
        sentences = []
        if has and i < 14:
            sentences.append("Cardiac enlargement is noted.")
        if (has and i >= 9) or i == 20:
            sentences.append("Enlarged heart.")
        if has and i < 9:
            sentences.append("Heart is big.")
        if i % 20 < 12:
            sentences.append("Coronary calcification.")
        if has:
            sentences.append("Cardiomegaly.")
        texts.append(case(heart=" ".join(sentences)))
    labels[39, col] = -1
    data = TrainingTexts(CT_RATE_ANATOMIES, tuple(texts), labels)
    cardio = BY_NAME["cardiomegaly"]
    assert candidate_positives(cardio, data) == (
        "Cardiomegaly.",
        "Cardiac enlargement is noted.",
        "Enlarged heart.",
    )
    assert candidate_positives(cardio, data, limit=1) == (
        "Cardiomegaly.",
        "Cardiac enlargement is noted.",
    )
    assert candidate_positives(cardio, data, min_cases=9)[-1] == "Heart is big."
    # 11 of 12 is under a precision of 0.95; 14 of 14 is not
    assert candidate_positives(cardio, data, min_precision=0.95) == (
        "Cardiomegaly.",
        "Cardiac enlargement is noted.",
    )
    # a finding no case is labelled for keeps the table's only
    assert candidate_positives(BY_NAME["hiatal_hernia"], data) == (
        BY_NAME["hiatal_hernia"].positive,
    )


def test_a_chosen_positive_reaches_the_prompts_file_and_the_card(tmp_path: Path) -> None:
    cardio, hernia = BY_NAME["cardiomegaly"], BY_NAME["hiatal_hernia"]
    picked = [
        PromptChoice(
            finding="cardiomegaly",
            positive=cardio.positive,
            table_negative=cardio.negative,
            candidates=((cardio.negative, 0.6), (normal_text("heart"), 0.7)),
            chosen=normal_text("heart"),
            with_finding=8,
            without_finding=30,
            positives=(("Cardiomegaly.", 0.7), ("Cardiac enlargement.", 0.9)),
            chosen_positive="Cardiac enlargement.",
        ),
        PromptChoice(
            finding="hiatal_hernia",
            positive=hernia.positive,
            table_negative=hernia.negative,
            candidates=((hernia.negative, 0.8), (normal_text("esophagus"), 0.7)),
            chosen=hernia.negative,
            with_finding=8,
            without_finding=30,
            positives=((hernia.positive, 0.8), ("Small hiatal hernia.", 0.8)),
            chosen_positive=hernia.positive,
        ),
    ]
    assert picked[0].changed and not picked[1].changed
    path = write_choices(tmp_path / PROMPTS_FILE, picked)
    assert path is not None
    assert yaml.safe_load(path.read_text())["findings"] == {
        "cardiomegaly": {"positive": "Cardiac enlargement.", "negative": normal_text("heart")}
    }
    loaded = {d.name: d for d in apply_model_prompts(path, TABLE)}
    assert loaded["cardiomegaly"].positive == "Cardiac enlargement."
    table = choices_table(picked)
    assert "| positive scored with | its AUC | table's positive |" in table
    assert "| Cardiac enlargement. | 0.900 | 0.700 |" in table
    assert "| Hiatal hernia. | 0.800 | 0.800 |" in table
