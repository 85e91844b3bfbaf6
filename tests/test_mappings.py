"""Anatomy and finding tables: the shipped rows, TotalSegmentator grouping, validation errors that
name the key, and the ``fvlm-pacs mappings check`` command."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import yaml
from pydicom.sr._concepts_dict import concepts as _ps316

from fvlm_pacs.cli import main
from fvlm_pacs.codes import (
    AnatomyTable,
    check_mappings,
    load_anatomies,
    load_anatomy_profiles,
    load_findings,
)
from fvlm_pacs.errors import ConfigError

REPO_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"

# pydicom's copy of DICOM PS3.16: scheme → keyword → code value → (meaning, CIDs)
PS316 = cast(dict[str, dict[str, dict[str, tuple[str, list[int]]]]], _ps316)

CT_RATE_FINDINGS = {
    "emphysema": "lung",
    "atelectasis": "lung",
    "lung_nodule": "lung",
    "lung_opacity": "lung",
    "pulmonary_fibrotic_sequela": "lung",
    "pleural_effusion": "lung",
    "mosaic_attenuation_pattern": "lung",
    "peribronchial_thickening": "lung",
    "consolidation": "lung",
    "bronchiectasis": "lung",
    "interlobular_septal_thickening": "lung",
    "cardiomegaly": "heart",
    "pericardial_effusion": "heart",
    "coronary_artery_wall_calcification": "heart",
    "hiatal_hernia": "esophagus",
    "arterial_wall_calcification": "aorta",
}


def _anatomies() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_MAPPINGS / "anatomies.yaml").read_text())
    return data


def _findings() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_MAPPINGS / "findings.yaml").read_text())
    return data


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- shipped tables ---------------------------------------------------------------------------


def test_ct_rate_profile_is_the_release_order() -> None:
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    assert table.names == ("lung", "heart", "esophagus", "aorta")
    assert [a.label for a in table.anatomies] == [1, 2, 3, 4]
    assert table.by_name("lung").totalsegmentator == (10, 11, 12, 13, 14)
    assert table.by_name("heart").totalsegmentator == (51, 61)  # FVLM.md: heart (51, 61)
    assert table.by_name("esophagus").totalsegmentator == (15,)
    assert table.by_name("aorta").totalsegmentator == (52,)
    assert table.label_of("aorta") == 4
    assert table.by_name("lung").code.value == "39607008"
    assert table.by_name("lung").segmentation_category.value == "91723000"
    with pytest.raises(KeyError, match="liver"):
        table.by_name("liver")


def test_default_path_is_the_shipped_table() -> None:
    assert load_anatomies().names == ("lung", "heart", "esophagus", "aorta")


def test_abdomen_profile_loads_without_overlaps() -> None:
    table = load_anatomies("abdomen", REPO_MAPPINGS / "anatomies.yaml")
    assert table.names == (
        "liver",
        "spleen",
        "pancreas",
        "kidneys",
        "gallbladder",
        "stomach",
        "bowel",
        "urinary_bladder",
        "bone",
    )
    ids = [i for a in table.anatomies for i in a.totalsegmentator]
    assert len(ids) == len(set(ids))
    assert all(1 <= i <= 117 for i in ids)  # TotalSegmentator v2 `total` has 117 classes
    assert 117 not in table.by_name("bone").totalsegmentator  # costal cartilages are not bone


def test_sixteen_ct_rate_findings_in_known_anatomies() -> None:
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    findings = load_findings(table, REPO_MAPPINGS / "findings.yaml")
    assert {f.name: f.anatomy for f in findings} == CT_RATE_FINDINGS
    assert len(findings) == 16
    emphysema = findings[0]
    assert (emphysema.positive, emphysema.negative) == ("Emphysema.", "Not Emphysema.")
    assert emphysema.code.value == "87433001"
    for f in findings:
        assert f.anatomy in table.names
        assert f.default_threshold == 0.5
        assert f.negative == f"Not {f.positive}"


def test_abdomen_profile_scores_no_ct_rate_findings() -> None:
    table = load_anatomies("abdomen", REPO_MAPPINGS / "anatomies.yaml")
    assert load_findings(table, REPO_MAPPINGS / "findings.yaml") == ()


def _codes_of_tables() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for t in load_anatomy_profiles(REPO_MAPPINGS / "anatomies.yaml").values():
        out += [(f"{t.profile}/{a.name}", c) for a in t.anatomies for c in a.matching_codes]
        out += [(f"{t.profile}/{a.name} category", a.segmentation_category) for a in t.anatomies]
        out += [
            (f"finding {f.name}", f.code) for f in load_findings(t, REPO_MAPPINGS / "findings.yaml")
        ]
    return out


def test_codes_marked_ps316_are_in_dicom_ps316_with_that_meaning() -> None:
    """A row marked ``verified: ps3.16`` must match pydicom's copy of DICOM PS3.16 exactly."""
    checked = 0
    for what, code in _codes_of_tables():
        if code.verification != "ps3.16":
            continue
        meanings = {
            m.casefold()
            for by_value in PS316[code.scheme].values()
            for value, (m, _cids) in by_value.items()
            if value == code.value
        }
        assert code.meaning.casefold() in meanings, f"{what}: {code} not in PS3.16 ({meanings})"
        checked += 1
    assert checked >= 20


# --- TotalSegmentator grouping ----------------------------------------------------------------


def test_group_totalsegmentator_maps_a_hand_made_label_map() -> None:
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    total = np.array(
        [
            [[0, 10, 11, 12], [13, 14, 15, 16]],
            [[51, 61, 52, 53], [5, 117, 200, 9]],
        ],
        dtype=np.uint8,
    )
    expected = np.array(
        [
            [[0, 1, 1, 1], [1, 1, 3, 0]],
            [[2, 2, 4, 0], [0, 0, 0, 0]],
        ],
        dtype=np.uint8,
    )
    out = table.group_totalsegmentator(total)
    assert out.shape == total.shape
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


def test_group_totalsegmentator_accepts_integral_floats_and_rejects_others() -> None:
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    np.testing.assert_array_equal(
        table.group_totalsegmentator(np.array([52.0, -1.0, 15.0, 1000.0])), [4, 0, 3, 0]
    )
    with pytest.raises(ValueError, match="non-integer"):
        table.group_totalsegmentator(np.array([10.5]))
    with pytest.raises(ValueError, match="integer"):
        table.group_totalsegmentator(np.array(["10"]))


def test_group_totalsegmentator_abdomen_profile() -> None:
    table = load_anatomies("abdomen", REPO_MAPPINGS / "anatomies.yaml")
    total = np.array([5, 1, 7, 2, 3, 23, 4, 6, 18, 19, 20, 21, 25, 116, 117, 10, 51], np.int16)
    np.testing.assert_array_equal(
        table.group_totalsegmentator(total), [1, 2, 3, 4, 4, 4, 5, 6, 7, 7, 7, 8, 9, 9, 0, 0, 0]
    )


# --- validation errors name the file and the key ------------------------------------------------


def _bad_anatomies(tmp_path: Path, mutate: Any) -> Path:
    data = _anatomies()
    mutate(data)
    return _write(tmp_path, "anatomies.yaml", data)


ANATOMY_ERRORS = [
    (
        "unknown key",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0].update(labell=1),
        r"profiles\.ct-rate\.anatomies\[0\]\.labell: unknown key",
    ),
    (
        "unknown top-level key",
        lambda d: d.update(profile={}),
        r"anatomies\.yaml: profile: unknown key",
    ),
    (
        "duplicate name",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][1].update(name="lung"),
        r"profiles\.ct-rate\.anatomies\[1\]\.name: duplicate anatomy name 'lung'",
    ),
    (
        "duplicate label",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][3].update(label=2),
        r"profiles\.ct-rate\.anatomies\[3\]\.label: label 2 already used by 'heart'",
    ),
    (
        "labels with a gap",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][3].update(label=5),
        r"profiles\.ct-rate\.anatomies: labels must be 1\.\.4 without gaps, got 1, 2, 3, 5",
    ),
    (
        "id used by two anatomies",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][1].update(totalsegmentator=[51, 52]),
        r"profiles\.ct-rate\.anatomies\[3\]\.totalsegmentator: id 52 already belongs to 'heart'",
    ),
    (
        "empty ids",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][2].update(totalsegmentator=[]),
        r"profiles\.ct-rate\.anatomies\[2\]\.totalsegmentator: must be a non-empty list",
    ),
    (
        "SCT value not digits",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0]["code"].update(value="3960700B"),
        r"profiles\.ct-rate\.anatomies\[0\]\.code\.value: SCT code must be digits only",
    ),
    (
        "unknown scheme",
        lambda d: d["profiles"]["abdomen"]["anatomies"][0]["code"].update(scheme="SNOMED"),
        r"profiles\.abdomen\.anatomies\[0\]\.code\.scheme: must be one of SCT, RADLEX, DCM",
    ),
    (
        "bad RadLex id",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0]["code"].update(
            scheme="RADLEX", value="1301"
        ),
        r"anatomies\[0\]\.code\.value: RADLEX code must look like RID1234",
    ),
    (
        "unknown verification",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0]["code"].update(verified="yes"),
        r"anatomies\[0\]\.code\.verified: must be one of ps3\.16, corroborated, unverified",
    ),
    (
        "part code of another anatomy",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][1]["additions"].append(
            {"scheme": "SCT", "value": "45653009", "meaning": "Upper lobe of lung"}
        ),
        r"anatomies\[1\]\.additions\[1\]: code 45653009 \(SCT\) already counts for 'lung'",
    ),
    (
        "own code as a part",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][2].update(
            part_sets=[[{"scheme": "SCT", "value": "32849002", "meaning": "Esophagus"}]]
        ),
        r"anatomies\[2\]\.code: the anatomy's own code cannot be a part",
    ),
    (
        "part_sets not a list of lists",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0].update(part_sets=[[]]),
        r"anatomies\[0\]\.part_sets: must be a list of non-empty lists of codes",
    ),
    (
        "bad part code",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0]["part_sets"][0][0].update(value="x"),
        r"anatomies\[0\]\.part_sets\[0\]\[0\]\.value: SCT code must be digits only",
    ),
    (
        "bad laterality",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0]["part_sets"][1][0].update(
            laterality="both"
        ),
        r"part_sets\[1\]\[0\]\.laterality: must be one of left, right, got 'both'",
    ),
    (
        "missing code",
        lambda d: d["profiles"]["ct-rate"]["anatomies"][0].pop("code"),
        r"profiles\.ct-rate\.anatomies\[0\]\.code: required key missing",
    ),
    (
        "no profiles",
        lambda d: d.update(profiles={}),
        r"anatomies\.yaml: profiles: must be a non-empty",
    ),
    (
        "bad version",
        lambda d: d.update(version=2),
        r"anatomies\.yaml: version: unsupported version 2",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(m, msg) for _, m, msg in ANATOMY_ERRORS],
    ids=[i for i, _, _ in ANATOMY_ERRORS],
)
def test_anatomy_errors_name_the_key(tmp_path: Path, mutate: Any, message: str) -> None:
    path = _bad_anatomies(tmp_path, mutate)
    with pytest.raises(ConfigError, match=message):
        load_anatomies("ct-rate", path)


def test_unknown_profile_lists_the_profiles() -> None:
    with pytest.raises(
        ConfigError, match=r"profiles\.chest: no such profile \(have abdomen, ct-rate\)"
    ):
        load_anatomies("chest", REPO_MAPPINGS / "anatomies.yaml")


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="anatomies: cannot read"):
        load_anatomies("ct-rate", tmp_path / "missing.yaml")
    bad = tmp_path / "anatomies.yaml"
    bad.write_text("profiles: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="anatomies anatomies.yaml: not valid YAML"):
        load_anatomies("ct-rate", bad)


FINDING_ERRORS = [
    (
        "unknown key",
        lambda d: d["findings"][0].update(prompt="x"),
        r"findings\.yaml: findings\[0\]\.prompt: unknown key",
    ),
    (
        "unknown anatomy",
        lambda d: d["findings"][2].update(anatomy="lungs"),
        r"findings\[2\]\.anatomy: unknown anatomy 'lungs'",
    ),
    (
        "empty positive prompt",
        lambda d: d["findings"][1].update(positive="  "),
        r"findings\[1\]\.positive: must be a non-empty string",
    ),
    (
        "missing negative prompt",
        lambda d: d["findings"][1].pop("negative"),
        r"findings\[1\]\.negative: required key missing",
    ),
    (
        "same prompts",
        lambda d: d["findings"][1].update(negative="atelectasis."),
        r"findings\[1\]\.negative: must differ from the positive prompt",
    ),
    (
        "threshold 1",
        lambda d: d["findings"][3].update(threshold=1.0),
        r"findings\[3\]\.threshold: must be a number strictly between 0 and 1",
    ),
    (
        "default threshold 0",
        lambda d: d.update(default_threshold=0),
        r"findings\.yaml: default_threshold: must be a number strictly between 0 and 1",
    ),
    (
        "duplicate name",
        lambda d: d["findings"][4].update(name="emphysema"),
        r"findings\[4\]\.name: duplicate finding name 'emphysema'",
    ),
    (
        "DCM value not digits",
        lambda d: d["findings"][3]["code"].update(value="DCM112001"),
        r"findings\[3\]\.code\.value: DCM code must be digits only",
    ),
    (
        "meaning too long",
        lambda d: d["findings"][0]["code"].update(meaning="x" * 65),
        r"findings\[0\]\.code\.meaning: must be a non-empty string of ≤ 64 characters",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(m, msg) for _, m, msg in FINDING_ERRORS],
    ids=[i for i, _, _ in FINDING_ERRORS],
)
def test_finding_errors_name_the_key(tmp_path: Path, mutate: Any, message: str) -> None:
    data = _findings()
    mutate(data)
    path = _write(tmp_path, "findings.yaml", data)
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    with pytest.raises(ConfigError, match=message):
        load_findings(table, path)


def test_findings_of_other_profiles_are_validated_too(tmp_path: Path) -> None:
    """A broken row for an abdominal anatomy must fail even when the chest profile is loaded."""
    data = _findings()
    data["findings"].append(
        {
            "name": "ascites",
            "anatomy": "liver",
            "positive": "Ascites.",
            "negative": "",
            "code": {"scheme": "SCT", "value": "389026000", "meaning": "Ascites"},
        }
    )
    path = _write(tmp_path, "findings.yaml", data)
    table = load_anatomies("ct-rate", REPO_MAPPINGS / "anatomies.yaml")
    with pytest.raises(ConfigError, match=r"findings\[16\]\.negative"):
        load_findings(table, path)
    data["findings"][-1]["negative"] = "Not Ascites."
    data["findings"][-1]["threshold"] = 0.3
    path = _write(tmp_path, "findings.yaml", data)
    assert len(load_findings(table, path)) == 16
    abdomen = load_anatomies("abdomen", REPO_MAPPINGS / "anatomies.yaml")
    (ascites,) = load_findings(abdomen, path)
    assert (ascites.anatomy, ascites.default_threshold) == ("liver", 0.3)


def test_a_table_built_in_memory_knows_only_its_own_names() -> None:
    table = AnatomyTable(profile="x", anatomies=())
    with pytest.raises(ConfigError, match="unknown anatomy 'lung'"):
        from fvlm_pacs.codes import parse_findings

        parse_findings(_findings(), table)


# --- check_mappings and the CLI -----------------------------------------------------------------


def test_check_mappings_summarises_every_table() -> None:
    lines = check_mappings(REPO_MAPPINGS)
    text = "\n".join(lines)
    assert "series_rules.yaml: 8 conditions" in text
    assert (
        "profile ct-rate: 4 anatomies (1 lung +2 part sets, 2 heart +1 additions, 3 esophagus, "
        "4 aorta +2 part sets +1 additions)"
    ) in text
    assert "findings.yaml: profile ct-rate: 16 findings" in text
    assert "pulmonary_fibrotic_sequela" in text  # unverified codes are listed


def _copy_mappings(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(REPO_MAPPINGS, target)
    return target


def test_check_mappings_also_checks_series_rules(tmp_path: Path) -> None:
    d = _copy_mappings(tmp_path)
    rules = d / "series_rules.yaml"
    rules.write_text(rules.read_text().replace("contains_all:", "contains_al:"), encoding="utf-8")
    with pytest.raises(ConfigError, match="contains_al"):
        check_mappings(d)


def test_cli_mappings_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "check", "--dir", str(REPO_MAPPINGS)]) == 0
    out = capsys.readouterr().out
    assert "profile ct-rate: 4 anatomies" in out
    assert "16 findings" in out


def test_cli_mappings_check_default_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "check"]) == 0
    assert "anatomies.yaml" in capsys.readouterr().out


def test_cli_mappings_check_broken_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy_mappings(tmp_path)
    data = yaml.safe_load((d / "findings.yaml").read_text())
    data["findings"][0]["anatomy"] = "lungs"
    _write(d, "findings.yaml", data)
    assert main(["mappings", "check", "--dir", str(d)]) == 2
    captured = capsys.readouterr()
    assert "findings[0].anatomy: unknown anatomy 'lungs'" in captured.err
    assert captured.out == ""
