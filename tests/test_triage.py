"""Triage: the shipped rule table, strict parsing, and assess() as a pure function."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fvlm_pacs.codes import check_mappings
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.triage import (
    TriageRules,
    assess,
    finding_names,
    load_triage_rules,
    parse_triage_rules,
    priority_rank,
)

REPO_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
KNOWN = finding_names(REPO_MAPPINGS)
MODEL = {"name": "fvlm-test", "version": "1"}
CODES = {
    "pleural_effusion": ["60046008", "SCT", "Pleural effusion"],
    "pericardial_effusion": ["373945007", "SCT", "Pericardial effusion"],
    "consolidation": ["95436008", "SCT", "Lung consolidation"],
    "emphysema": ["87433001", "SCT", "Pulmonary emphysema"],
    "cardiomegaly": ["8186001", "SCT", "Cardiomegaly"],
}
ANATOMY = {
    "pleural_effusion": "lung",
    "consolidation": "lung",
    "emphysema": "lung",
    "pericardial_effusion": "heart",
    "cardiomegaly": "heart",
}


def finding(name: str, score: float | None, threshold: float = 0.5) -> dict[str, Any]:
    """A row as Finding.as_dict() makes it; status follows the predictor (score ≥ threshold)."""
    status = "not_assessable" if score is None else "present" if score >= threshold else "absent"
    return {
        "anatomy": ANATOMY[name],
        "finding": name,
        "code": CODES[name],
        "score": score,
        "threshold": threshold,
        "status": status,
        "model": MODEL,
    }


def rules(data: dict[str, Any]) -> TriageRules:
    return parse_triage_rules({"version": 1, **data}, KNOWN)


CRITICAL = rules(
    {
        "rules": [
            {"name": "effusion", "findings": ["pleural_effusion", "pericardial_effusion"], "priority": "high"},
            {"name": "pe_critical", "findings": ["pericardial_effusion"], "priority": "critical", "margin": 0.2},
            {"name": "consolidation", "findings": ["consolidation"], "priority": "high", "margin": 0.1},
        ]
    }
)  # fmt: skip


# --- the shipped table -----------------------------------------------------------------------


def test_shipped_rules_load_and_name_known_findings() -> None:
    table = load_triage_rules()
    assert {r.name for r in table.rules} == {"effusion", "consolidation"}
    assert all(f in KNOWN for r in table.rules for f in r.findings)
    assert {r.priority for r in table.rules} == {"high"}
    assert table.sha256 and len(table.sha256) == 64
    assert table.source.endswith("triage.yaml")


def test_shipped_rules_raise_effusions_and_consolidation_to_high() -> None:
    table = load_triage_rules()
    for name in ("pleural_effusion", "pericardial_effusion", "consolidation"):
        t = assess([finding(name, 0.7), finding("emphysema", 0.9)], table)
        assert t.priority == "high", name
        assert [f.finding for f in t.flags] == [name]
    assert assess([finding("emphysema", 0.9)], table).priority == "routine"


def test_mappings_check_reports_triage() -> None:
    lines = check_mappings(REPO_MAPPINGS)
    line = next(x for x in lines if x.startswith("triage.yaml"))
    assert "high: effusion (pleural_effusion, pericardial_effusion)" in line
    assert "critical: (none)" in line


def test_mappings_check_fails_on_a_bad_triage_table(tmp_path: Path) -> None:
    d = tmp_path / "mappings"
    shutil.copytree(REPO_MAPPINGS, d)
    data = yaml.safe_load((d / "triage.yaml").read_text())
    data["rules"][0]["findings"].append("pneumothorax")
    (d / "triage.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match=r"rules\[0\]\.findings\[2\]: unknown finding 'pneumothorax'"
    ):
        check_mappings(d)


def test_missing_table_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_triage_rules(tmp_path / "triage.yaml", known_findings=KNOWN)


def test_load_checks_names_against_the_findings_next_to_it(tmp_path: Path) -> None:
    d = tmp_path / "mappings"
    shutil.copytree(REPO_MAPPINGS, d)
    (d / "triage.yaml").write_text(
        "version: 1\nrules:\n  - {name: x, findings: [emphysemaa], priority: high}\n"
    )
    with pytest.raises(ConfigError, match=r"triage triage\.yaml: rules\[0\]\.findings\[0\]"):
        load_triage_rules(d / "triage.yaml")


# --- strict parsing --------------------------------------------------------------------------

GOOD_RULE = {"name": "r", "findings": ["emphysema"], "priority": "high"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rules": [GOOD_RULE], "rule": []}, r"rule: unknown key 'rule'"),
        ({}, r"rules: required key missing"),
        ({"version": 2, "rules": []}, r"version: unsupported version 2"),
        ({"rules": {"r": GOOD_RULE}}, r"rules: must be a list"),
        ({"rules": [{**GOOD_RULE, "priorty": "high"}]}, r"rules\[0\]\.priorty: unknown key"),
        ({"rules": [{**GOOD_RULE, "name": "Bad Name"}]}, r"rules\[0\]\.name: must be lower case"),
        ({"rules": [GOOD_RULE, GOOD_RULE]}, r"rules\[1\]\.name: duplicate rule name 'r'"),
        ({"rules": [{**GOOD_RULE, "findings": []}]}, r"rules\[0\]\.findings: must be a non-empty"),
        ({"rules": [{**GOOD_RULE, "findings": "emphysema"}]}, r"rules\[0\]\.findings: must be"),
        ({"rules": [{**GOOD_RULE, "findings": ["emphysema", "emphysema"]}]}, r"findings\[1\]: 'emphysema' listed twice"),
        ({"rules": [{**GOOD_RULE, "findings": ["emphysema", "pneumothorax"]}]}, r"rules\[0\]\.findings\[1\]: unknown finding 'pneumothorax'"),
        ({"rules": [{**GOOD_RULE, "priority": "routine"}]}, r"rules\[0\]\.priority: must be one of high, critical"),
        ({"rules": [{**GOOD_RULE, "priority": "urgent"}]}, r"rules\[0\]\.priority"),
        ({"rules": [{**GOOD_RULE, "margin": -0.1}]}, r"rules\[0\]\.margin: must be a number in \[0, 1\)"),
        ({"rules": [{**GOOD_RULE, "margin": True}]}, r"rules\[0\]\.margin"),
        ({"rules": [{**GOOD_RULE, "margin": "0.1"}]}, r"rules\[0\]\.margin"),
        ({"rules": [{**GOOD_RULE, "note": 3}]}, r"rules\[0\]\.note: must be a string"),
        ({"rules": ["emphysema"]}, r"rules\[0\]: must be a mapping"),
    ],
)  # fmt: skip
def test_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_triage_rules({"version": 1, **data}, KNOWN, source="/x/triage.yaml")


def test_error_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^triage triage\.yaml: rules\[0\]\.margin"):
        parse_triage_rules({"rules": [{**GOOD_RULE, "margin": 2}]}, KNOWN, "/x/triage.yaml")


def test_empty_rule_list_is_allowed() -> None:
    assert assess([finding("pleural_effusion", 0.9)], rules({"rules": []})).priority == "routine"


# --- assess ----------------------------------------------------------------------------------


def test_critical_beats_high_and_flags_explain() -> None:
    t = assess(
        [
            finding("pleural_effusion", 0.62),
            finding("pericardial_effusion", 0.75),
            finding("emphysema", 0.99),
        ],
        CRITICAL,
    )
    assert t.priority == "critical"
    assert [(f.finding, f.rule, f.priority) for f in t.flags] == [
        ("pericardial_effusion", "pe_critical", "critical"),
        ("pleural_effusion", "effusion", "high"),
    ]
    top = t.flags[0]
    assert (top.anatomy, top.score, top.threshold, top.margin) == ("heart", 0.75, 0.5, 0.2)
    assert top.reason == (
        "pericardial_effusion (heart) score 0.75 ≥ threshold 0.5 + margin 0.2 "
        "(rule pe_critical → critical)"
    )


def test_one_flag_per_finding_the_highest_rule_that_fires() -> None:
    t = assess([finding("pericardial_effusion", 0.6)], CRITICAL)  # below the critical margin
    assert t.priority == "high"
    assert [(f.rule, f.priority) for f in t.flags] == [("effusion", "high")]


def test_margin_is_inclusive_and_uses_the_findings_own_threshold() -> None:
    assert assess([finding("consolidation", 0.6)], CRITICAL).priority == "high"  # 0.5 + 0.1
    assert assess([finding("consolidation", 0.59)], CRITICAL).priority == "routine"
    assert assess([finding("consolidation", 0.35, threshold=0.25)], CRITICAL).priority == "high"
    assert assess([finding("consolidation", 0.34, threshold=0.25)], CRITICAL).priority == "routine"


def test_absent_findings_never_flag_even_with_a_high_score() -> None:
    row = {**finding("pleural_effusion", 0.9), "status": "absent"}
    assert assess([row], CRITICAL).priority == "routine"


def test_not_assessable_never_raises_priority_but_is_listed() -> None:
    t = assess(
        [finding("pericardial_effusion", None), finding("emphysema", None)],
        CRITICAL,
    )
    assert t.priority == "routine" and t.flags == ()
    assert [(n.finding, n.anatomy, n.rules) for n in t.not_assessable] == [
        ("pericardial_effusion", "heart", ("effusion", "pe_critical")),
        ("emphysema", "lung", ()),
    ]


def test_no_findings_is_routine() -> None:
    t = assess([], CRITICAL)
    assert (t.priority, t.flags, t.not_assessable) == ("routine", (), ())


def test_as_dict_is_json_and_names_the_rule_table() -> None:
    table = load_triage_rules()
    t = assess([finding("pleural_effusion", 0.8), finding("cardiomegaly", None)], table)
    d = json.loads(json.dumps(t.as_dict()))
    assert d["priority"] == "high"
    assert d["flags"] == [
        {
            "rule": "effusion",
            "priority": "high",
            "finding": "pleural_effusion",
            "anatomy": "lung",
            "score": 0.8,
            "threshold": 0.5,
            "margin": 0.0,
            "reason": "pleural_effusion (lung) score 0.8 ≥ threshold 0.5 (rule effusion → high)",
        }
    ]
    assert d["not_assessable"] == [{"finding": "cardiomegaly", "anatomy": "heart", "rules": []}]
    assert d["rules"] == {"source": "triage.yaml", "sha256": table.sha256}


def test_assess_is_pure() -> None:
    rows = [finding("pleural_effusion", 0.8), finding("consolidation", 0.9)]
    before = json.dumps(rows)
    assert assess(rows, CRITICAL) == assess(rows, CRITICAL)
    assert json.dumps(rows) == before


def test_default_rules_are_the_shipped_table() -> None:
    assert assess([finding("consolidation", 0.8)]).as_dict() == (
        assess([finding("consolidation", 0.8)], load_triage_rules()).as_dict()
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(status="maybe"), r"findings\[0\]\.status"),
        (lambda r: r.update(score=None), r"findings\[0\]\.score"),
        (lambda r: r.update(score="0.9"), r"findings\[0\]\.score"),
        (lambda r: r.update(threshold=float("nan")), r"findings\[0\]\.threshold"),
        (lambda r: r.pop("finding"), r"findings\[0\]: finding and anatomy"),
    ],
)
def test_malformed_rows_are_bugs(mutate: Any, message: str) -> None:
    row = finding("pleural_effusion", 0.9)
    mutate(row)
    with pytest.raises(ValueError, match=message):
        assess([row], CRITICAL)


def test_priority_rank() -> None:
    assert [priority_rank(p) for p in ("routine", "high", "critical", None)] == [0, 1, 2, 0]
