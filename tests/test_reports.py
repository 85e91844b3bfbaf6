"""Report decomposition: sentence splitting, section splitting, negation-aware anatomy mentions,
the FVLM normal template, the synonyms table loader and the LLM hook."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from fvlm_pacs.codes import load_anatomy_profiles
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.reports import (
    NORMAL_TEMPLATE,
    AnatomyText,
    Decomposer,
    RuleBasedDecomposer,
    load_decomposer,
    load_report_synonyms,
    normal_text,
    parse_report_synonyms,
    split_report,
    split_sentences,
)

REPO_SYNONYMS = Path(__file__).resolve().parent.parent / "mappings" / "report_synonyms.yaml"


@pytest.fixture(scope="module")
def decomposer() -> RuleBasedDecomposer:
    return RuleBasedDecomposer()


def status(d: RuleBasedDecomposer, sentence: str) -> dict[str, bool]:
    """anatomy → True if mentioned un-negated (abnormal), False if only negated."""
    out: dict[str, bool] = {}
    for anatomy, negated in d.mentions(sentence):
        out[anatomy] = out.get(anatomy, False) or not negated
    return out


# ---- template -----------------------------------------------------------------------------


def test_template_is_the_one_of_fvlm_md() -> None:
    assert NORMAL_TEMPLATE == "{anatomy} shows no significant abnormalities."
    assert normal_text("lung") == "Lung shows no significant abnormalities."
    assert normal_text("urinary bladder") == "Urinary bladder shows no significant abnormalities."


# ---- sentences ----------------------------------------------------------------------------


def test_split_sentences_abbreviations_and_decimals() -> None:
    text = "A nodule of approx. 3.5 mm is seen, e.g. in the right lobe. Heart size vs. prior is normal."
    assert split_sentences(text) == [
        "A nodule of approx. 3.5 mm is seen, e.g. in the right lobe.",
        "Heart size vs. prior is normal.",
    ]


def test_split_sentences_headers_bullets_and_wrapping() -> None:
    text = textwrap.dedent(
        """\
        FINDINGS:
        The lungs show centrilobular emphysema
        in both upper lobes. No pleural effusion
        - Heart size normal.
        * Esophagus unremarkable
        Impression: 1. Emphysema. 2) Small hiatal hernia.
        """
    )
    assert split_sentences(text) == [
        "The lungs show centrilobular emphysema in both upper lobes.",
        "No pleural effusion",
        "Heart size normal.",
        "Esophagus unremarkable",
        "Emphysema.",
        "Small hiatal hernia.",
    ]


def test_split_sentences_end_of_text_and_question_marks() -> None:
    assert split_sentences("Normal heart. Possible hernia? Lungs clear") == [
        "Normal heart.",
        "Possible hernia?",
        "Lungs clear",
    ]
    assert split_sentences("   \n\n") == []


def test_split_report_sections() -> None:
    report = (
        "Clinical information: cough.\nTechnique: Non-contrast chest CT.\n"
        "Findings: Heart size is normal.\nThe lungs are clear.\n"
        "IMPRESSION:\nNo acute abnormality."
    )
    findings, impression = split_report(report)
    assert findings == "Heart size is normal.\nThe lungs are clear."
    assert impression == "No acute abnormality."
    assert split_report("Conclusion: Emphysema.") == ("", "Emphysema.")
    assert split_report("Just text.") == ("Just text.", "")


# ---- mentions and negation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("No pleural or pericardial effusion.", {"lung": False, "heart": False}),
        ("No pericardial effusion or hiatal hernia.", {"heart": False, "esophagus": False}),
        ("Heart size is normal, no pericardial effusion.", {"heart": False}),
        ("Heart size normal.", {"heart": False}),
        ("The esophagus is dilated.", {"esophagus": True}),
        ("Esophagus unremarkable.", {"esophagus": False}),
        ("The esophagus is not dilated.", {"esophagus": False}),
        (
            "Atherosclerotic calcification in the aorta and coronary arteries.",
            {"aorta": True, "heart": True},
        ),
        ("No nodule, but a 5 mm opacity in the right lung.", {"lung": True}),
        ("No pleural effusion; emphysema in both upper lobes.", {"lung": True}),
        ("Emphysema in both lungs, heart normal.", {"lung": True, "heart": False}),
        ("Nodule in the lung, no pleural effusion.", {"lung": True}),
        ("Cardiomegaly.", {"heart": True}),
        ("Small hiatal hernia.", {"esophagus": True}),
        ("Aortic valve calcification.", {"heart": True}),
        ("Ectatic ascending aorta measuring 4.2 cm.", {"aorta": True}),
        ("Trachea and both main bronchi are open.", {"lung": False}),
        ("A 6 mm nodule in the left thyroid lobe.", {}),
        ("Atherosclerotic plaques in the coronary arteries.", {"heart": True}),
        ("Mild atherosclerotic changes.", {"aorta": True}),
        ("Pulmonary artery diameter is 27 mm.", {}),
        ("Subcutaneous emphysema in the chest wall.", {}),
        ("A pulmonary embolism cannot be excluded.", {}),
        ("Bilateral atelectasis cannot be excluded.", {"lung": True}),
        ("No significant change in the 4 mm nodule in the right upper lobe.", {"lung": True}),
        ("Mediastinal lymph nodes are not enlarged.", {}),
    ],
)
def test_mentions(
    decomposer: RuleBasedDecomposer, sentence: str, expected: dict[str, bool]
) -> None:
    assert status(decomposer, sentence) == expected


# ---- decomposition ------------------------------------------------------------------------


def test_impression_only_abnormal(decomposer: RuleBasedDecomposer) -> None:
    result = decomposer.decompose("Heart size is normal.", "Mild cardiomegaly.")
    heart = result["heart"]
    assert not heart.normal
    assert heart.mentioned_in_impression
    assert heart.text == "Heart size is normal. Mild cardiomegaly."


def test_findings_only_mention_is_normal_template(decomposer: RuleBasedDecomposer) -> None:
    # FVLM.md: normal = not mentioned (as abnormal) in the impression, whatever the findings say.
    result = decomposer.decompose(
        "A small hiatal hernia is seen. The esophagus is otherwise normal.", "Emphysema."
    )
    esophagus = result["esophagus"]
    assert esophagus.normal
    assert not esophagus.mentioned_in_impression
    assert esophagus.text == "Esophagus shows no significant abnormalities."
    assert esophagus.sentences == (
        "A small hiatal hernia is seen.",
        "The esophagus is otherwise normal.",
    )
    assert not result["lung"].normal


def test_negated_impression_mention_is_normal(decomposer: RuleBasedDecomposer) -> None:
    result = decomposer.decompose("No pleural effusion.", "No pleural or pericardial effusion.")
    assert result["lung"].normal and result["lung"].mentioned_in_impression
    assert result["heart"].normal and result["heart"].mentioned_in_impression
    assert result["lung"].text == "Lung shows no significant abnormalities."
    assert not result["aorta"].mentioned_in_impression


def test_duplicate_sentence_kept_once(decomposer: RuleBasedDecomposer) -> None:
    result = decomposer.decompose("Small hiatal hernia.", "Small  hiatal hernia.")
    assert result["esophagus"].text == "Small hiatal hernia."


REPORT = """\
Clinical information: Shortness of breath, smoker.
Technique: Thin-section non-contrast chest CT.
Findings:
Trachea and both main bronchi are open. Mediastinal structures cannot be evaluated optimally
without contrast. Heart contour and size are normal. No pericardial effusion. Calcified
atheroma plaques are seen in the arcus aorta and the coronary arteries. The thoracic aorta has
a diameter of approx. 3.4 cm. The esophagus is of normal calibre; no hiatal hernia.
No enlarged lymph nodes in the mediastinum or hila. Centrilobular and paraseptal emphysema in
both upper lobes. A 4.5 mm solid nodule in the superior segment of the right lower lobe.
No pleural effusion, no pneumothorax. A 7 mm hypodense lesion in the liver, probably a cyst.
Degenerative changes in the thoracic spine.

Impression:
1. Centrilobular and paraseptal emphysema; 4.5 mm nodule in the right lower lobe.
2. Atherosclerotic changes in the aorta and coronary arteries.
3. No pericardial or pleural effusion.
"""


def test_full_report_end_to_end(decomposer: RuleBasedDecomposer) -> None:
    result = decomposer.decompose_report(REPORT)
    assert set(result) == {"lung", "heart", "esophagus", "aorta"}
    lung, heart, esophagus, aorta = (result[k] for k in ("lung", "heart", "esophagus", "aorta"))
    assert not lung.normal
    assert lung.text == (
        "Trachea and both main bronchi are open. "
        "Centrilobular and paraseptal emphysema in both upper lobes. "
        "A 4.5 mm solid nodule in the superior segment of the right lower lobe. "
        "No pleural effusion, no pneumothorax. "
        "Centrilobular and paraseptal emphysema; 4.5 mm nodule in the right lower lobe. "
        "No pericardial or pleural effusion."
    )
    assert not heart.normal  # coronary atherosclerosis in the impression
    assert heart.text.startswith("Heart contour and size are normal. No pericardial effusion. ")
    assert "Atherosclerotic changes in the aorta and coronary arteries." in heart.text
    assert not aorta.normal
    assert aorta.text == (
        "Calcified atheroma plaques are seen in the arcus aorta and the coronary arteries. "
        "The thoracic aorta has a diameter of approx. 3.4 cm. "
        "Atherosclerotic changes in the aorta and coronary arteries."
    )
    assert esophagus.normal and not esophagus.mentioned_in_impression
    assert esophagus.text == "Esophagus shows no significant abnormalities."
    assert esophagus.sentences == ("The esophagus is of normal calibre; no hiatal hernia.",)
    # the liver lesion and spine belong to no ct-rate anatomy
    assert all("liver" not in r.text and "spine" not in r.text for r in result.values())


def test_normal_report(decomposer: RuleBasedDecomposer) -> None:
    result = decomposer.decompose(
        "Lungs are clear. Heart size normal. Esophagus unremarkable. Aorta of normal calibre.",
        "No significant abnormality.",
    )
    assert all(r.normal and not r.mentioned_in_impression for r in result.values())
    assert result["aorta"].text == "Aorta shows no significant abnormalities."


def test_abdomen_profile(decomposer: RuleBasedDecomposer) -> None:
    d = RuleBasedDecomposer(anatomies=("liver", "gallbladder", "kidneys", "urinary_bladder"))
    result = d.decompose("", "Cholelithiasis. Simple cyst in the left kidney. Liver unremarkable.")
    assert not result["gallbladder"].normal
    assert not result["kidneys"].normal
    assert result["liver"].normal and result["liver"].mentioned_in_impression
    assert result["urinary_bladder"].normal  # "gallbladder"/"cholelithiasis" is not the bladder


# ---- the table ----------------------------------------------------------------------------


def test_shipped_table_covers_every_profile_anatomy() -> None:
    synonyms = load_report_synonyms()
    profiles = load_anatomy_profiles()
    every = {name for table in profiles.values() for name in table.names}
    assert set(synonyms.anatomies) == every
    assert set(profiles["ct-rate"].names) == {"lung", "heart", "esophagus", "aorta"}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "report_synonyms.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _good() -> dict[str, Any]:
    return yaml.safe_load(REPO_SYNONYMS.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["anatomies"]["lung"].update(termz=["x"]), "anatomies.lung.termz"),
        (lambda d: d["anatomies"]["heart"].pop("terms"), "anatomies.heart.terms"),
        (lambda d: d["anatomies"]["heart"].update(terms=[]), "anatomies.heart.terms"),
        (lambda d: d["anatomies"]["aorta"]["terms"].append("Aorta"), "anatomies.aorta.terms[14]"),
        (lambda d: d["anatomies"]["lung"]["terms"].append(""), "anatomies.lung.terms["),
        (
            lambda d: d["anatomies"]["lung"]["weak_terms"].append("lungs"),
            "anatomies.lung.weak_terms",
        ),
        (lambda d: d["cues"].update(negatoin=["no"]), "cues.negatoin"),
        (lambda d: d["cues"].update(negation=[]), "cues.negation"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["anatomies"].update({"Lung Left": {"terms": ["x"]}}), "anatomies.Lung Left"),
    ],
)
def test_loader_errors_name_the_key(tmp_path: Path, mutate: Any, key: str) -> None:
    data = _good()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        load_report_synonyms(_write(tmp_path, data))
    assert key in str(info.value)


def test_loader_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_report_synonyms(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("anatomies: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_report_synonyms(bad)


def test_decomposer_rejects_anatomy_without_synonyms() -> None:
    synonyms = parse_report_synonyms(
        {
            "version": 1,
            "anatomies": {"lung": {"terms": ["lung"]}},
            "cues": {"negation": ["no"], "normal": ["normal"]},
        }
    )
    with pytest.raises(ConfigError, match="anatomies.heart"):
        RuleBasedDecomposer(synonyms=synonyms, anatomies=("lung", "heart"))


# ---- the LLM hook -------------------------------------------------------------------------


class _FakeLLMDecomposer:
    def decompose(self, findings_text: str, impression_text: str) -> dict[str, AnatomyText]:
        return {"lung": AnatomyText("lung", normal_text("lung"), True, False)}


def test_load_decomposer_by_import_path(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("site_llm_hook")
    module.Fake = _FakeLLMDecomposer  # type: ignore[attr-defined]
    module.NotOne = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "site_llm_hook", module)
    d = load_decomposer("site_llm_hook:Fake")
    assert isinstance(d, Decomposer)
    assert d.decompose("", "")["lung"].normal
    assert isinstance(RuleBasedDecomposer(), Decomposer)
    for bad, msg in [
        ("site_llm_hook", "expected"),
        ("site_llm_hook:Missing", "cannot import"),
        ("no_such_module_xyz:Fake", "cannot import"),
        ("site_llm_hook:NotOne", "no decompose"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_decomposer(bad)
