"""Series selection rules: loading, validation errors that name the key, and rule semantics."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fvlm_pacs.codes import (
    AllOf,
    AnyOf,
    AttributeCondition,
    MinInstancesCondition,
    Not,
    OrientationCondition,
    SeriesRules,
    load_series_rules,
    mappings_dir,
)
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.studies.assembly import choose_series

REPO_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"


@dataclass
class Facts:
    """A hand-made series for rule evaluation (implements codes.SeriesFacts)."""

    values: dict[str, Any] = field(default_factory=dict)
    n: int = 40
    normal: tuple[float, float, float] | None = (0.0, 0.0, 1.0)

    @property
    def instance_count(self) -> int:
        return self.n

    def value(self, keyword: str) -> Any:
        return self.values.get(keyword)

    def slice_normal(self) -> tuple[float, float, float] | None:
        return self.normal


def rules_from(text: str, tmp_path: Path) -> SeriesRules:
    path = tmp_path / "series_rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_series_rules(path)


# --- the shipped file -------------------------------------------------------------------------


def test_shipped_rules_load_with_expected_content(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FVLM_PACS_MAPPINGS", raising=False)
    assert mappings_dir() == REPO_MAPPINGS
    rules = load_series_rules()
    kinds = [type(c) for c in rules.condition.conditions]
    assert (
        AttributeCondition in kinds
        and OrientationCondition in kinds
        and MinInstancesCondition in kinds
    )
    [orientation] = [c for c in rules.condition.conditions if isinstance(c, OrientationCondition)]
    assert (orientation.plane, orientation.max_angle_degrees) == ("axial", 10.0)
    [thickness] = [
        c
        for c in rules.condition.conditions
        if isinstance(c, AttributeCondition) and c.attribute == "SliceThickness"
    ]
    assert (thickness.min, thickness.max) == (0.5, 5.0)
    assert [(p.direction, p.key) for p in rules.prefer] == [
        ("most", "instances"),
        ("least", "SliceThickness"),
    ]
    assert {"Modality", "ImageType", "SliceThickness", "SeriesDescription"} <= rules.attributes


def test_shipped_rules_verdicts() -> None:
    rules = load_series_rules(REPO_MAPPINGS / "series_rules.yaml")
    good = Facts(
        {
            "Modality": "CT",
            "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
            "SliceThickness": 1.0,
            "SeriesDescription": "Thorax 1.0 Br40",
        }
    )
    assert rules.evaluate(good).ok
    scout = Facts(
        {
            "Modality": "CT",
            "ImageType": ("ORIGINAL", "PRIMARY", "LOCALIZER"),
            "SliceThickness": 1.0,
            "SeriesDescription": "Topogram 0.6 T20s",
        },
        n=2,
        normal=(0.0, 1.0, 0.0),
    )
    verdict = rules.evaluate(scout)
    assert not verdict.ok
    assert set(verdict.notes) == {
        "ImageType contains LOCALIZER",
        "orientation 90.0° from axial (max 10°)",
        "SeriesDescription matches excluded pattern at 'Topogram'",
        "2 instances, fewer than 20",
    }
    derived = Facts(
        {"Modality": "CT", "ImageType": ("DERIVED", "SECONDARY", "AXIAL"), "SliceThickness": 3.0}
    )
    assert rules.evaluate(derived).notes == (
        "ImageType lacks ORIGINAL, PRIMARY",
        "ImageType contains DERIVED, SECONDARY",
    )
    dose = Facts(
        {
            "Modality": "CT",
            "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
            "SliceThickness": 1.0,
            "SeriesDescription": "Dose Report",
        }
    )
    assert not rules.evaluate(dose).ok
    no_thickness = Facts({"Modality": "CT", "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL")})
    assert rules.evaluate(no_thickness).notes == (
        "SliceThickness missing (must be within 0.5–5.0 mm)",
    )


def test_mappings_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "series_rules.yaml").write_text("all:\n  - min_instances: 3\n", encoding="utf-8")
    monkeypatch.setenv("FVLM_PACS_MAPPINGS", str(tmp_path))
    assert mappings_dir() == tmp_path
    rules = load_series_rules()
    assert rules.condition == AllOf((MinInstancesCondition(3),))
    assert rules.prefer == ()


# --- validation names the bad key -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "all:\n  - attribute: ImageType\n    contains_al: [ORIGINAL]\n",
            r"all\[0\]\.contains_al.*unknown condition key 'contains_al'",
        ),
        ("all:\n  - contains_al: [ORIGINAL]\n", r"all\[0\]\.contains_al"),
        ("all:\n  - min_instances: 3\nprefered: []\n", r"unknown top-level key 'prefered'"),
        (
            "all:\n  - attribute: ImageTyp\n    contains_all: [ORIGINAL]\n",
            r"all\[0\]\.attribute: 'ImageTyp' is not a DICOM keyword",
        ),
        (
            "all:\n  - attribute: SeriesDescription\n    matches: '(scout'\n",
            r"all\[0\]\.matches: invalid regular expression",
        ),
        ("all:\n  - attribute: SliceThickness\n    min: 5\n    max: 1\n", r"all\[0\]\.min"),
        (
            "all:\n  - attribute: SliceThickness\n    min: thin\n",
            r"all\[0\]\.min: must be a number",
        ),
        ("all:\n  - orientation: oblique\n    max_angle_degrees: 5\n", r"all\[0\]\.orientation"),
        ("all:\n  - orientation: axial\n", r"all\[0\]\.max_angle_degrees: required"),
        (
            "all:\n  - any:\n    - attribute: Modality\n      inn: [CT]\n",
            r"all\[0\]\.any\[0\]\.inn",
        ),
        ("all:\n  - not:\n      min_instance: 3\n", r"all\[0\]\.not\.min_instance"),
        ("all:\n  - any: CT\n", r"all\[0\]\.any: 'any:' needs a non-empty list"),
        ("all:\n  - min_instances: 0\n", r"all\[0\]\.min_instances: must be a positive integer"),
        ("all:\n  - attribute: Modality\n", r"all\[0\]: condition on Modality has no test"),
        (
            "all:\n  - attribute: Modality\n    in: [CT]\n    if_missing: maybe\n",
            r"all\[0\]\.if_missing",
        ),
        (
            "all:\n  - min_instances: 3\nprefer:\n  - fewest: instances\n",
            r"prefer\[0\]\.fewest: unknown preference",
        ),
        (
            "all:\n  - min_instances: 3\nprefer:\n  - least: Thickness\n",
            r"prefer\[0\]\.least: 'Thickness'",
        ),
        ("prefer: []\n", r"missing top-level key 'all'"),
        ("- min_instances: 3\n", r"top level must be a mapping"),
        ("all: [\n", r"not valid YAML"),
    ],
)
def test_bad_rules_raise_config_error_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        rules_from(text, tmp_path)
    assert "series_rules.yaml" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_series_rules(tmp_path / "nope.yaml")


# --- semantics ----------------------------------------------------------------------------------

COMPOSED = """
all:
  - attribute: Modality
    in: [CT]
  - any:
      - attribute: SliceThickness
        max: 1.5
        unit: mm
      - attribute: SeriesDescription
        matches: 'lung'
  - not:
      attribute: ImageType
      contains_any: [LOCALIZER]
prefer:
  - most: instances
  - least: SliceThickness
"""


def test_and_or_not_composition(tmp_path: Path) -> None:
    rules = rules_from(COMPOSED, tmp_path)
    assert isinstance(rules.condition.conditions[1], AnyOf)
    assert isinstance(rules.condition.conditions[2], Not)

    thin = Facts(
        {"Modality": "CT", "SliceThickness": 1.0, "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL")}
    )
    assert rules.evaluate(thin).ok

    thick_lung = Facts(
        {
            "Modality": "ct",
            "SliceThickness": 5.0,
            "SeriesDescription": "LUNG 5mm",
            "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        }
    )
    assert rules.evaluate(
        thick_lung
    ).ok  # OR: the description rescues the thick series; 'in' ignores case

    thick_body = Facts(
        {
            "Modality": "CT",
            "SliceThickness": 5.0,
            "SeriesDescription": "Body 5mm",
            "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        }
    )
    v = rules.evaluate(thick_body)
    assert not v.ok
    assert v.notes == (
        "none of: SliceThickness 5.0 above 1.5 mm | SeriesDescription does not match /lung/",
    )

    scout = Facts(
        {"Modality": "CT", "SliceThickness": 1.0, "ImageType": ("ORIGINAL", "PRIMARY", "localizer")}
    )
    assert rules.evaluate(scout).notes == ("excluded by not: ImageType contains LOCALIZER",)

    mr = Facts({"Modality": "MR", "SliceThickness": 1.0, "ImageType": ("ORIGINAL", "PRIMARY")})
    assert rules.evaluate(mr).notes == ("Modality MR is not one of CT",)


def test_nested_groups(tmp_path: Path) -> None:
    rules = rules_from(
        """
        all:
          - any:
              - all:
                  - attribute: Manufacturer
                    in: [SIEMENS]
                  - not:
                      attribute: SeriesDescription
                      matches: 'topogram'
              - min_instances: 100
        """,
        tmp_path,
    )
    assert rules.evaluate(Facts({"Manufacturer": "Siemens", "SeriesDescription": "Thorax"})).ok
    assert not rules.evaluate(
        Facts({"Manufacturer": "Siemens", "SeriesDescription": "Topogram"})
    ).ok
    assert rules.evaluate(
        Facts({"Manufacturer": "Siemens", "SeriesDescription": "Topogram"}, n=150)
    ).ok
    assert not rules.evaluate(Facts({"Manufacturer": "GE"})).ok
    assert rules.attributes == {"Manufacturer", "SeriesDescription"}


def test_missing_attribute_semantics(tmp_path: Path) -> None:
    rules = rules_from(
        """
        all:
          - attribute: SeriesDescription
            not_matches: 'scout'
          - attribute: ImageType
            contains_none: [LOCALIZER]
        """,
        tmp_path,
    )
    assert rules.evaluate(Facts({})).ok  # nothing to exclude

    positive = rules_from(
        """
        all:
          - attribute: SeriesDescription
            matches: 'chest'
        """,
        tmp_path,
    )
    assert positive.evaluate(Facts({})).notes == ("SeriesDescription missing (must match /chest/)",)

    lenient = rules_from(
        """
        all:
          - attribute: SliceThickness
            min: 0.5
            max: 5
            if_missing: pass
        """,
        tmp_path,
    )
    assert lenient.evaluate(Facts({})).ok
    assert not lenient.evaluate(Facts({"SliceThickness": 0.4})).ok


def test_orientation_angle_ignores_normal_sign() -> None:
    axial = OrientationCondition("axial", 10.0)
    assert axial.angle((0.0, 0.0, -1.0)) == pytest.approx(0.0)
    assert axial.angle((0.0, 0.17364817766693033, 0.984807753012208)) == pytest.approx(10.0)
    assert axial.evaluate(Facts(normal=(0.0, 0.17364817766693033, 0.984807753012208))).ok
    v = axial.evaluate(Facts(normal=(0.0, 0.2588190451025208, 0.9659258262890683)))
    assert (v.ok, v.notes) == (False, ("orientation 15.0° from axial (max 10°)",))
    assert not axial.evaluate(Facts(normal=None)).ok


def test_prefer_orders_most_instances_then_thinnest(tmp_path: Path) -> None:
    rules = rules_from(COMPOSED, tmp_path)
    a = Facts({"SliceThickness": 1.0}, n=300)
    b = Facts({"SliceThickness": 0.6}, n=300)
    c = Facts({"SliceThickness": 0.5}, n=100)
    d = Facts({}, n=300)  # no thickness: after every series that has one
    ranked = sorted([a, b, c, d], key=rules.sort_key)
    assert ranked == [b, a, d, c]


def _header(series_uid: str, sop: int, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_choose_series_on_hand_made_headers_uses_majority_values(tmp_path: Path) -> None:
    rules = rules_from(COMPOSED, tmp_path)
    thin, lung, body = generate_uid(), generate_uid(), generate_uid()
    headers = [
        _header(thin, i, SliceThickness=1.0, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
        for i in range(30)
    ]
    # one odd header must not flip the series' verdict
    headers.append(
        _header(thin, 99, SliceThickness=9.0, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    )
    headers += [
        _header(
            lung,
            i,
            SliceThickness=5.0,
            SeriesDescription="Lung 5mm",
            ImageType=["ORIGINAL", "PRIMARY"],
        )
        for i in range(40)
    ]
    headers += [
        _header(
            body, i, SliceThickness=5.0, SeriesDescription="Body", ImageType=["ORIGINAL", "PRIMARY"]
        )
        for i in range(50)
    ]
    choice = choose_series(headers, rules)
    assert choice.ranking == [lung, thin]  # 40 instances beat 31
    assert choice.chosen_series_uid == lung
    assert choice.reasons[thin][0] == "accepted"
    assert choice.reasons[body] == [
        "rejected: none of: SliceThickness 5.0 above 1.5 mm | SeriesDescription does not match /lung/"
    ]
