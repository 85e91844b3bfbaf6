"""Loads and checks the data tables in ``mappings/``.

Everything a site may want to tune without touching code (which series to use, coded concepts,
prompts, thresholds) lives as data under ``mappings/``, each table with its provenance in
``mappings/README.md``. This module turns those files into typed, frozen objects and refuses a file
it does not fully understand: a typo in a rule must stop the service at start-up with a
:class:`~fvlm_pacs.errors.ConfigError` naming the key, not silently select the wrong series.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import yaml
from pydicom.datadict import tag_for_keyword

from fvlm_pacs.errors import ConfigError

MAPPINGS_ENV = "FVLM_PACS_MAPPINGS"
"""Environment variable that points at a ``mappings/`` folder (overrides the shipped one)."""


def mappings_dir() -> Path:
    """Where the ``mappings/`` data tables are.

    The folder is top-level in the repository and installed as data files, so its place depends on
    how the package runs: ``$FVLM_PACS_MAPPINGS`` wins (a site's own tables); else the folder next
    to the package in a source checkout; else ``<sys.prefix>/share/fvlm_pacs/mappings`` where
    ``setup.py`` installs it.
    """
    env = os.environ.get(MAPPINGS_ENV)
    if env:
        return Path(env)
    source = Path(__file__).resolve().parent.parent / "mappings"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "fvlm_pacs" / "mappings"


# ---------------------------------------------------------------------------------------------
# Series selection rules: mappings/series_rules.yaml
# ---------------------------------------------------------------------------------------------


class SeriesFacts(Protocol):
    """What a rule can ask about one candidate series.

    ``studies/assembly.py`` implements it from the instance headers; values are the ones most
    instances of the series have (series are nearly always uniform, and one odd header must not
    flip a verdict).
    """

    @property
    def instance_count(self) -> int:
        """Number of distinct SOP instances in the series."""
        ...

    def value(self, keyword: str) -> Any:
        """The series' value of a DICOM attribute by keyword; ``None`` if absent or empty.

        Multi-valued attributes come as tuples, DS as float, IS as int, everything else as str.
        """
        ...

    def slice_normal(self) -> tuple[float, float, float] | None:
        """cross(row direction, column direction) from ImageOrientationPatient, or ``None``."""
        ...


@dataclass(frozen=True)
class Verdict:
    """Outcome of one condition for one series.

    ``notes`` explains the outcome: why it failed when ``ok`` is false, why it held when ``ok`` is
    true (a ``not:`` group needs the latter to say what it excluded).
    """

    ok: bool
    notes: tuple[str, ...]


_MissingPolicy = Literal["pass", "fail"]


def _fmt_num(x: float) -> str:
    """Numbers in messages: 5.0 → '5.0', 0.625 → '0.625' (no float noise)."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:g}" if x != int(x) else f"{x:.1f}"


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, float):
        return _fmt_num(value)
    return str(value)


@dataclass(frozen=True)
class AttributeCondition:
    """Tests one DICOM attribute of the series; every operator given must hold (AND).

    ``if_missing`` overrides what an absent/empty attribute means. By default an absent value fails
    the positive tests (``in``, ``contains_all``, ``contains_any``, ``min``/``max``, ``matches``)
    and passes the negative ones (``contains_none``, ``not_matches``): a missing value contains
    nothing and matches nothing.

    Messages never echo a free-text value (SeriesDescription may hold anything, and de-identification
    profiles remove it); for regex tests only the matched excerpt is shown.
    """

    attribute: str
    in_: tuple[Any, ...] | None = None
    contains_all: tuple[str, ...] | None = None
    contains_none: tuple[str, ...] | None = None
    contains_any: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    matches: re.Pattern[str] | None = None
    not_matches: re.Pattern[str] | None = None
    unit: str = ""
    if_missing: _MissingPolicy | None = None

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset({self.attribute})

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        value = facts.value(self.attribute)
        passed: list[str] = []
        failed: list[str] = []
        for ok, note in self._checks(value):
            (passed if ok else failed).append(note)
        if failed:
            return Verdict(False, tuple(failed))
        return Verdict(True, tuple(passed))

    def _missing(self, default_ok: bool, what: str) -> tuple[bool, str]:
        ok = default_ok if self.if_missing is None else self.if_missing == "pass"
        return ok, f"{self.attribute} missing ({what})"

    def _checks(self, value: Any) -> list[tuple[bool, str]]:
        a = self.attribute
        unit = f" {self.unit}" if self.unit else ""
        out: list[tuple[bool, str]] = []
        if self.in_ is not None:
            allowed = ", ".join(_show(v) for v in self.in_)
            if value is None:
                out.append(self._missing(False, f"must be one of {allowed}"))
            elif isinstance(value, tuple):
                out.append((False, f"{a} has several values, must be one of {allowed}"))
            else:
                ok = any(_same_scalar(value, v) for v in self.in_)
                verb = "is" if ok else "is not"
                out.append((ok, f"{a} {_show(value)} {verb} one of {allowed}"))
        if (
            self.contains_all is not None
            or self.contains_none is not None
            or self.contains_any is not None
        ):
            out.extend(self._contains_checks(value))
        if self.min is not None or self.max is not None:
            out.append(self._range_check(value, unit))
        if self.matches is not None:
            pat = self.matches.pattern
            if value is None:
                out.append(self._missing(False, f"must match /{pat}/"))
            else:
                m = self.matches.search(_show(value))
                if m:
                    out.append((True, f"{a} matches /{pat}/ at '{m.group(0)[:40]}'"))
                else:
                    out.append((False, f"{a} does not match /{pat}/"))
        if self.not_matches is not None:
            pat = self.not_matches.pattern
            if value is None:
                out.append(self._missing(True, f"must not match /{pat}/"))
            else:
                m = self.not_matches.search(_show(value))
                if m:
                    out.append((False, f"{a} matches excluded pattern at '{m.group(0)[:40]}'"))
                else:
                    out.append((True, f"{a} does not match /{pat}/"))
        return out

    def _contains_checks(self, value: Any) -> list[tuple[bool, str]]:
        a = self.attribute
        out: list[tuple[bool, str]] = []
        have = {str(v).strip().upper() for v in _as_tuple(value)} if value is not None else set()
        if self.contains_all is not None:
            if value is None:
                out.append(self._missing(False, f"must contain {', '.join(self.contains_all)}"))
            else:
                lacking = [v for v in self.contains_all if v.upper() not in have]
                if lacking:
                    out.append((False, f"{a} lacks {', '.join(lacking)}"))
                else:
                    out.append((True, f"{a} contains {', '.join(self.contains_all)}"))
        if self.contains_none is not None:
            if value is None:
                out.append(self._missing(True, f"must not contain {', '.join(self.contains_none)}"))
            else:
                present = [v for v in self.contains_none if v.upper() in have]
                if present:
                    out.append((False, f"{a} contains {', '.join(present)}"))
                else:
                    out.append((True, f"{a} contains none of {', '.join(self.contains_none)}"))
        if self.contains_any is not None:
            if value is None:
                out.append(
                    self._missing(False, f"must contain one of {', '.join(self.contains_any)}")
                )
            else:
                present = [v for v in self.contains_any if v.upper() in have]
                if present:
                    out.append((True, f"{a} contains {', '.join(present)}"))
                else:
                    out.append((False, f"{a} contains none of {', '.join(self.contains_any)}"))
        return out

    def _range_check(self, value: Any, unit: str) -> tuple[bool, str]:
        a = self.attribute
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            bounds = f"{_fmt_num(lo)}–{_fmt_num(hi)}{unit}"
            want = f"within {bounds}"
        elif lo is not None:
            bounds = f"{_fmt_num(lo)}{unit}"
            want = f"at least {bounds}"
        else:
            assert hi is not None
            bounds = f"{_fmt_num(hi)}{unit}"
            want = f"at most {bounds}"
        if value is None:
            return self._missing(False, f"must be {want}")
        if isinstance(value, tuple):
            return False, f"{a} has several values, must be a single number {want}"
        try:
            number = float(value)  # a numeric string (e.g. an unparsed DS) still counts
        except (TypeError, ValueError):
            return False, f"{a} is not a number (must be {want})"
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            if lo is not None and hi is not None:
                return False, f"{a} {_fmt_num(number)} outside {bounds}"
            side = "below" if lo is not None else "above"
            return False, f"{a} {_fmt_num(number)} {side} {bounds}"
        return True, f"{a} {_fmt_num(number)} {want}"


def _same_scalar(value: Any, allowed: Any) -> bool:
    """``in`` compares strings case-insensitively (CS values vary in case in the wild), numbers
    numerically."""
    if isinstance(allowed, str) or isinstance(value, str):
        return str(value).strip().upper() == str(allowed).strip().upper()
    try:
        return float(value) == float(allowed)
    except (TypeError, ValueError):
        return False


_AXES: dict[str, tuple[float, float, float]] = {
    "axial": (0.0, 0.0, 1.0),  # normal along the patient z (feet–head) axis
    "coronal": (0.0, 1.0, 0.0),  # normal along y (anterior–posterior)
    "sagittal": (1.0, 0.0, 0.0),  # normal along x (right–left)
}


@dataclass(frozen=True)
class OrientationCondition:
    """The slice plane is within ``max_angle_degrees`` of the named plane.

    The angle is between the slice normal, cross(row, column) of ImageOrientationPatient, and the
    plane's patient axis; the sign of the normal does not matter (feet-first and head-first stacks
    are both axial).
    """

    plane: str
    max_angle_degrees: float

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset({"ImageOrientationPatient"})

    def angle(self, normal: tuple[float, float, float]) -> float:
        ax = _AXES[self.plane]
        norm = math.sqrt(sum(v * v for v in normal))
        if norm == 0.0:
            return 90.0
        cos = abs(sum(a * b for a, b in zip(ax, normal))) / norm
        return math.degrees(math.acos(min(1.0, cos)))

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        normal = facts.slice_normal()
        if normal is None:
            return Verdict(
                False, ("ImageOrientationPatient missing or malformed (orientation unknown)",)
            )
        angle = self.angle(normal)
        ok = angle <= self.max_angle_degrees
        limit = _fmt_num(self.max_angle_degrees).removesuffix(".0")
        note = f"orientation {angle:.1f}° from {self.plane} (max {limit}°)"
        return Verdict(ok, (note,))


@dataclass(frozen=True)
class MinInstancesCondition:
    """The series has at least ``minimum`` distinct instances (a few slices cannot be a chest CT)."""

    minimum: int

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset()

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        n = facts.instance_count
        if n < self.minimum:
            return Verdict(False, (f"{n} instances, fewer than {self.minimum}",))
        return Verdict(True, (f"{n} instances (min {self.minimum})",))


@dataclass(frozen=True)
class AllOf:
    """AND: every condition must hold; a failure lists every failing condition, not just the first,
    so an operator sees all reasons at once."""

    conditions: tuple[Condition, ...]

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset().union(*(c.attributes for c in self.conditions))

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        verdicts = [c.evaluate(facts) for c in self.conditions]
        failed = [n for v in verdicts if not v.ok for n in v.notes]
        if any(not v.ok for v in verdicts):
            return Verdict(False, tuple(failed))
        return Verdict(True, tuple(n for v in verdicts for n in v.notes))


@dataclass(frozen=True)
class AnyOf:
    """OR: at least one condition must hold."""

    conditions: tuple[Condition, ...]

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset().union(*(c.attributes for c in self.conditions))

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        notes: list[str] = []
        for c in self.conditions:
            v = c.evaluate(facts)
            if v.ok:
                return v
            notes.append("; ".join(v.notes))
        return Verdict(False, ("none of: " + " | ".join(notes),))


@dataclass(frozen=True)
class Not:
    """NOT: the inner condition must fail."""

    condition: Condition

    @property
    def attributes(self) -> frozenset[str]:
        return self.condition.attributes

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        v = self.condition.evaluate(facts)
        if v.ok:
            return Verdict(False, tuple(f"excluded by not: {n}" for n in v.notes))
        return Verdict(True, tuple(f"not: {n}" for n in v.notes))


Condition = AttributeCondition | OrientationCondition | MinInstancesCondition | AllOf | AnyOf | Not


@dataclass(frozen=True)
class PreferKey:
    """One ranking key: ``most``/``least`` of ``instances`` or of a numeric attribute."""

    direction: Literal["most", "least"]
    key: str  # "instances" or a DICOM keyword

    def describe(self) -> str:
        return f"{self.direction} {self.key}"

    def sort_value(self, facts: SeriesFacts) -> tuple[int, float]:
        """Ascending sort value; a series without the value sorts after every series with one."""
        if self.key == "instances":
            raw: Any = facts.instance_count
        else:
            raw = facts.value(self.key)
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return (1, 0.0)
        if math.isnan(number):
            return (1, 0.0)
        return (0, -number if self.direction == "most" else number)


@dataclass(frozen=True)
class SeriesRules:
    """Which series of a study the model may see, and which of the acceptable ones it prefers.

    ``condition`` is the top-level ``all:`` group; ``prefer`` ranks accepted series (ties end in
    Series Instance UID order, so the choice never depends on arrival order).
    """

    condition: AllOf
    prefer: tuple[PreferKey, ...]
    source: str = "<memory>"

    @property
    def attributes(self) -> frozenset[str]:
        """Every DICOM keyword the rules read: headers need only these (plus geometry)."""
        keys = {p.key for p in self.prefer if p.key != "instances"}
        return self.condition.attributes | keys

    def evaluate(self, facts: SeriesFacts) -> Verdict:
        return self.condition.evaluate(facts)

    def sort_key(self, facts: SeriesFacts) -> tuple[tuple[int, float], ...]:
        return tuple(p.sort_value(facts) for p in self.prefer)


_ATTRIBUTE_KEYS = frozenset(
    {
        "attribute",
        "in",
        "contains_all",
        "contains_none",
        "contains_any",
        "min",
        "max",
        "matches",
        "not_matches",
        "unit",
        "if_missing",
    }
)
_KINDS = ("attribute", "orientation", "min_instances", "all", "any", "not")
_TOP_KEYS = frozenset({"version", "all", "prefer"})


def load_series_rules(path: Path | None = None) -> SeriesRules:
    """Read and validate ``series_rules.yaml`` (default: the one in :func:`mappings_dir`).

    Raises :class:`ConfigError` naming the file and the key path (``all[2].any[0].contains_al``)
    of the first thing it does not understand.
    """
    path = path or mappings_dir() / "series_rules.yaml"
    data, _ = read_yaml(path, "series rules")
    return parse_series_rules(data, source=str(path))


def parse_series_rules(data: Any, source: str = "<memory>") -> SeriesRules:
    """Validate already-parsed YAML (a mapping) into :class:`SeriesRules`."""
    where = Path(source).name if source != "<memory>" else source
    if not isinstance(data, Mapping):
        raise ConfigError(f"series rules {where}: top level must be a mapping with an 'all:' list")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"series rules {where}: unknown top-level key {unknown[0]!r} "
            f"(expected {', '.join(sorted(_TOP_KEYS))})"
        )
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError(
            f"series rules {where}: version: unsupported version {version!r} (expected 1)"
        )
    if "all" not in data:
        raise ConfigError(f"series rules {where}: missing top-level key 'all'")
    condition = _parse_group("all", data["all"], "all", where)
    assert isinstance(condition, AllOf)
    prefer = _parse_prefer(data.get("prefer", []), where)
    return SeriesRules(condition=condition, prefer=prefer, source=source)


def _fail(where: str, key_path: str, message: str) -> ConfigError:
    return ConfigError(f"series rules {where}: {key_path}: {message}")


def _parse_condition(node: Any, key_path: str, where: str) -> Condition:
    if not isinstance(node, Mapping) or not node:
        raise _fail(where, key_path, "a condition must be a non-empty mapping")
    keys = [str(k) for k in node]
    kinds = [k for k in keys if k in _KINDS]
    if len(kinds) != 1:
        if not kinds:
            bad = next((k for k in keys if k not in _ATTRIBUTE_KEYS | {"max_angle_degrees"}), None)
            if bad is None:
                raise _fail(
                    where, f"{key_path}.attribute", f"missing 'attribute' for test {keys[0]!r}"
                )
            raise _fail(
                where,
                f"{key_path}.{bad}",
                f"unknown condition key {bad!r} (a condition starts with one of {', '.join(_KINDS)})",
            )
        raise _fail(where, key_path, f"one condition per item, got {', '.join(kinds)}")
    kind = kinds[0]
    if kind in ("all", "any", "not"):
        extra = [k for k in keys if k != kind]
        if extra:
            raise _fail(
                where, f"{key_path}.{extra[0]}", f"unknown key {extra[0]!r} next to {kind!r}"
            )
        return _parse_group(kind, node[kind], f"{key_path}.{kind}", where)
    if kind == "orientation":
        return _parse_orientation(node, keys, key_path, where)
    if kind == "min_instances":
        extra = [k for k in keys if k != kind]
        if extra:
            raise _fail(
                where, f"{key_path}.{extra[0]}", f"unknown key {extra[0]!r} next to 'min_instances'"
            )
        n = node[kind]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _fail(
                where, f"{key_path}.min_instances", f"must be a positive integer, got {n!r}"
            )
        return MinInstancesCondition(n)
    return _parse_attribute(node, keys, key_path, where)


def _parse_group(kind: str, body: Any, key_path: str, where: str) -> Condition:
    if kind == "not":
        return Not(_parse_condition(body, key_path, where))
    if not isinstance(body, list) or not body:
        raise _fail(where, key_path, f"'{kind}:' needs a non-empty list of conditions")
    items = tuple(_parse_condition(item, f"{key_path}[{i}]", where) for i, item in enumerate(body))
    return AllOf(items) if kind == "all" else AnyOf(items)


def _parse_orientation(
    node: Mapping[str, Any], keys: list[str], key_path: str, where: str
) -> Condition:
    extra = [k for k in keys if k not in ("orientation", "max_angle_degrees")]
    if extra:
        raise _fail(
            where, f"{key_path}.{extra[0]}", f"unknown key {extra[0]!r} in an orientation condition"
        )
    plane = node["orientation"]
    if plane not in _AXES:
        raise _fail(
            where, f"{key_path}.orientation", f"must be one of {', '.join(_AXES)}, got {plane!r}"
        )
    if "max_angle_degrees" not in node:
        raise _fail(where, f"{key_path}.max_angle_degrees", "required with 'orientation'")
    angle = node["max_angle_degrees"]
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 <= angle <= 90:
        raise _fail(
            where, f"{key_path}.max_angle_degrees", f"must be a number in 0–90, got {angle!r}"
        )
    return OrientationCondition(plane=str(plane), max_angle_degrees=float(angle))


def _parse_attribute(
    node: Mapping[str, Any], keys: list[str], key_path: str, where: str
) -> Condition:
    unknown = [k for k in keys if k not in _ATTRIBUTE_KEYS]
    if unknown:
        raise _fail(
            where,
            f"{key_path}.{unknown[0]}",
            f"unknown condition key {unknown[0]!r} (expected one of {', '.join(sorted(_ATTRIBUTE_KEYS - {'attribute'}))})",
        )
    attribute = node["attribute"]
    if not isinstance(attribute, str) or tag_for_keyword(attribute) is None:
        raise _fail(where, f"{key_path}.attribute", f"{attribute!r} is not a DICOM keyword")
    operators = [k for k in keys if k not in ("attribute", "unit", "if_missing")]
    if not operators:
        raise _fail(
            where,
            key_path,
            f"condition on {attribute} has no test (in, contains_*, min, max, matches…)",
        )

    def str_list(key: str) -> tuple[str, ...] | None:
        if key not in node:
            return None
        v = node[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise _fail(where, f"{key_path}.{key}", "must be a non-empty list of strings")
        return tuple(v)

    def number(key: str) -> float | None:
        if key not in node:
            return None
        v = node[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(where, f"{key_path}.{key}", f"must be a number, got {v!r}")
        return float(v)

    def regex(key: str) -> re.Pattern[str] | None:
        if key not in node:
            return None
        v = node[key]
        if not isinstance(v, str) or not v:
            raise _fail(where, f"{key_path}.{key}", "must be a non-empty regular expression string")
        try:
            # Case-insensitive: descriptions are typed by people and vendors in any case.
            return re.compile(v, re.IGNORECASE)
        except re.error as exc:
            raise _fail(where, f"{key_path}.{key}", f"invalid regular expression: {exc}") from exc

    in_: tuple[Any, ...] | None = None
    if "in" in node:
        v = node["in"]
        if (
            not isinstance(v, list)
            or not v
            or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v)
        ):
            raise _fail(where, f"{key_path}.in", "must be a non-empty list of strings or numbers")
        in_ = tuple(v)
    lo, hi = number("min"), number("max")
    if lo is not None and hi is not None and lo > hi:
        raise _fail(where, f"{key_path}.min", f"min {lo} is greater than max {hi}")
    unit = node.get("unit", "")
    if not isinstance(unit, str):
        raise _fail(where, f"{key_path}.unit", "must be a string")
    if_missing = node.get("if_missing")
    if if_missing not in (None, "pass", "fail"):
        raise _fail(
            where, f"{key_path}.if_missing", f"must be 'pass' or 'fail', got {if_missing!r}"
        )
    return AttributeCondition(
        attribute=attribute,
        in_=in_,
        contains_all=str_list("contains_all"),
        contains_none=str_list("contains_none"),
        contains_any=str_list("contains_any"),
        min=lo,
        max=hi,
        matches=regex("matches"),
        not_matches=regex("not_matches"),
        unit=unit,
        if_missing=if_missing,
    )


def _parse_prefer(body: Any, where: str) -> tuple[PreferKey, ...]:
    if not isinstance(body, list):
        raise _fail(
            where, "prefer", "must be a list like [{most: instances}, {least: SliceThickness}]"
        )
    out: list[PreferKey] = []
    for i, item in enumerate(body):
        kp = f"prefer[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise _fail(where, kp, "each entry is one mapping: {most: <key>} or {least: <key>}")
        ((direction, key),) = item.items()
        if direction not in ("most", "least"):
            raise _fail(
                where,
                f"{kp}.{direction}",
                f"unknown preference {direction!r} (expected most, least)",
            )
        if not isinstance(key, str) or (key != "instances" and tag_for_keyword(key) is None):
            raise _fail(
                where, f"{kp}.{direction}", f"{key!r} is neither 'instances' nor a DICOM keyword"
            )
        out.append(PreferKey(direction=direction, key=key))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Anatomies and findings: mappings/anatomies.yaml, mappings/findings.yaml
# ---------------------------------------------------------------------------------------------

Verification = Literal["ps3.16", "corroborated", "unverified"]
"""How a code row was checked (see mappings/README.md): ``ps3.16`` = found with this meaning in
DICOM PS3.16 as shipped in pydicom; ``corroborated`` = SNOMED CT code seen with this meaning in
independent public uses, not checked in a SNOMED CT browser; ``unverified`` = still to be checked."""

_VERIFICATIONS: tuple[str, ...] = ("ps3.16", "corroborated", "unverified")
_SCHEMES = ("SCT", "RADLEX", "DCM")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_PROFILE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class CodedConcept:
    """A DICOM coded concept (Code Value, Coding Scheme Designator, Code Meaning).

    ``verification`` records how the row was checked; it is provenance, not part of the concept,
    so it takes no part in equality.
    """

    value: str
    scheme: str
    meaning: str
    verification: Verification = field(default="unverified", compare=False)

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme}, {self.meaning!r})"


ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure", "ps3.16")
"""DICOM PS3.16 CID 7150 segmentation category used when a table names none."""


@dataclass(frozen=True)
class Anatomy:
    """One anatomy a checkpoint embeds.

    ``label`` is its value in our anatomy label map and ``label - 1`` its index in the checkpoint
    (query token, projection head), so the order of a profile is the order of the weights.
    ``totalsegmentator`` lists the TotalSegmentator v2 ``total`` ids that make it up; ``code``
    codes it as SEG Segmented Property Type and SR Finding Site.

    How an incoming SEG that codes the anatomy in parts still gives it (we never write these):
    ``part_sets`` are alternative complete sets of parts (left + right lung; the five lobes) —
    the anatomy is taken from parts only when every member of one set is there, because one
    lobe scored as "the lung" would report findings on an organ mostly never looked at;
    ``additions`` are structures united into the anatomy once it is found (the left atrial
    appendage into the heart, as the release groups them) that never stand for it alone.
    """

    name: str
    label: int
    totalsegmentator: tuple[int, ...]
    code: CodedConcept
    segmentation_category: CodedConcept = ANATOMICAL_STRUCTURE
    note: str = ""
    part_sets: tuple[tuple[PartCode, ...], ...] = ()
    additions: tuple[PartCode, ...] = ()

    @property
    def matching_codes(self) -> tuple[CodedConcept, ...]:
        """Every Segmented Property Type that may count for this anatomy: its own code, the
        parts of its sets and its additions (each once)."""
        found = [self.code]
        for part in (*(p for ps in self.part_sets for p in ps), *self.additions):
            if part.code not in found:
                found.append(part.code)
        return tuple(found)


LATERALITIES = ("left", "right")
"""Sides a part code may require, read from the SEG's Segmented Property Type Modifier."""


@dataclass(frozen=True)
class PartCode:
    """A part of an anatomy as a SEG codes it: a concept, optionally on one side only (the side
    given as a laterality modifier, as with the generic lobe codes)."""

    code: CodedConcept
    laterality: str | None = None

    def __str__(self) -> str:
        return f"{self.code}" + (f" ({self.laterality})" if self.laterality else "")


@dataclass(frozen=True)
class FindingDefinition:
    """One zero-shot finding: the anatomy embedding it reads, its two prompts, its SR code.

    ``default_threshold`` is the documented uncalibrated default; calibrated per-finding
    thresholds from ``fvlm-pacs calibrate`` override it (score ranges differ per finding).
    """

    name: str
    anatomy: str
    positive: str
    negative: str
    code: CodedConcept
    default_threshold: float
    note: str = ""


@dataclass(frozen=True)
class AnatomyTable:
    """The anatomies of one profile, in label order (= index order of the checkpoint).

    ``known_names`` holds the anatomy names of every profile of the file, so that a finding whose
    anatomy exists only in another profile is skipped, while a misspelt one is an error.
    """

    profile: str
    anatomies: tuple[Anatomy, ...]
    known_names: frozenset[str] = frozenset()
    description: str = ""
    source: str = "<memory>"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.anatomies)

    def by_name(self, name: str) -> Anatomy:
        """The anatomy called ``name``; ``KeyError`` naming the profile if it has none."""
        for a in self.anatomies:
            if a.name == name:
                return a
        raise KeyError(f"anatomy {name!r} is not in profile {self.profile!r}")

    def label_of(self, name: str) -> int:
        return self.by_name(name).label

    @cached_property
    def _lookup(self) -> np.ndarray:
        """TotalSegmentator id → our label; index 0 (background) and unlisted ids stay 0."""
        top = max((i for a in self.anatomies for i in a.totalsegmentator), default=0)
        dtype = np.uint8 if len(self.anatomies) < 256 else np.uint16
        lut = np.zeros(top + 1, dtype=dtype)
        for a in self.anatomies:
            lut[list(a.totalsegmentator)] = a.label
        return lut

    def group_totalsegmentator(self, labelmap: np.ndarray) -> np.ndarray:
        """Map a TotalSegmentator ``total`` label map to our anatomy labels (0 = background).

        One vectorised table look-up; ids this profile does not use (and negative or
        out-of-range values) become 0. Float label maps (as NIfTI readers often return) are
        accepted when every value is integral.
        """
        arr = np.asarray(labelmap)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise ValueError("TotalSegmentator label map holds non-integer values")
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iub":
            raise ValueError(f"TotalSegmentator label map must be integer, got dtype {arr.dtype}")
        lut = self._lookup
        inside = (arr >= 0) & (arr < lut.shape[0])
        return np.where(inside, lut[np.where(inside, arr, 0)], 0).astype(lut.dtype, copy=False)


def _mfail(table: str, where: str, key_path: str, message: str) -> ConfigError:
    return ConfigError(f"{table} {where}: {key_path}: {message}")


def _checked_name(node: Mapping[str, Any], table: str, where: str, kp: str) -> str:
    """A row's ``name``: lower-case letters, digits and ``_`` (it becomes a key elsewhere)."""
    name = node["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _mfail(
            table, where, f"{kp}.name", f"must be lower case letters, digits and _, got {name!r}"
        )
    return name


def read_yaml(path: Path, table: str) -> tuple[Any, str]:
    """Parse one ``mappings/`` table; return the data and the hex sha256 of the file's bytes.

    Shared by every table loader here and by :mod:`fvlm_pacs.triage`, so all of them fail alike:
    :class:`ConfigError` starting with ``table`` for a file that cannot be read or is not UTF-8
    YAML. The sha256 is of the raw bytes, read once with the data, so it names exactly the file
    that was parsed (triage stamps it into every result).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{table}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{table} {path.name}: not valid YAML: {exc}") from exc
    return data, hashlib.sha256(raw).hexdigest()


def _check_keys(
    node: Any,
    allowed: frozenset[str],
    required: tuple[str, ...],
    table: str,
    where: str,
    key_path: str,
) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        raise _mfail(table, where, key_path, "must be a mapping")
    unknown = sorted(str(k) for k in node if str(k) not in allowed)
    if unknown:
        raise _mfail(
            table,
            where,
            f"{key_path}.{unknown[0]}" if key_path else unknown[0],
            f"unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})",
        )
    for key in required:
        if key not in node:
            raise _mfail(
                table, where, f"{key_path}.{key}" if key_path else key, "required key missing"
            )
    return node


def _check_version(data: Mapping[str, Any], table: str, where: str) -> None:
    version = data.get("version", 1)
    if version != 1:
        raise _mfail(table, where, "version", f"unsupported version {version!r} (expected 1)")


def _text(node: Mapping[str, Any], key: str, table: str, where: str, key_path: str) -> str:
    v = node.get(key, "")
    if not isinstance(v, str) or not v.strip():
        raise _mfail(table, where, f"{key_path}.{key}", "must be a non-empty string")
    return v.strip()


_CODE_KEYS = frozenset({"scheme", "value", "meaning", "verified"})


def _parse_code(node: Any, table: str, where: str, key_path: str) -> CodedConcept:
    """A coded concept; values are checked against DICOM's VRs (SH value, LO meaning)."""
    node = _check_keys(node, _CODE_KEYS, ("scheme", "value", "meaning"), table, where, key_path)
    scheme = node["scheme"]
    if scheme not in _SCHEMES:
        raise _mfail(
            table,
            where,
            f"{key_path}.scheme",
            f"must be one of {', '.join(_SCHEMES)}, got {scheme!r}",
        )
    raw = node["value"]
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise _mfail(table, where, f"{key_path}.value", f"must be a string, got {raw!r}")
    value = str(raw).strip()
    if scheme in ("SCT", "DCM") and not re.fullmatch(r"[0-9]{3,18}", value):
        raise _mfail(
            table, where, f"{key_path}.value", f"{scheme} code must be digits only, got {value!r}"
        )
    if scheme == "RADLEX" and not re.fullmatch(r"RID[0-9]+", value):
        raise _mfail(
            table, where, f"{key_path}.value", f"RADLEX code must look like RID1234, got {value!r}"
        )
    if not value or len(value) > 16:
        raise _mfail(table, where, f"{key_path}.value", "must be 1–16 characters (DICOM SH)")
    meaning = node["meaning"]
    if not isinstance(meaning, str) or not meaning.strip() or len(meaning) > 64:
        raise _mfail(
            table, where, f"{key_path}.meaning", "must be a non-empty string of ≤ 64 characters"
        )
    verified = node.get("verified", "unverified")
    if verified not in _VERIFICATIONS:
        raise _mfail(
            table,
            where,
            f"{key_path}.verified",
            f"must be one of {', '.join(_VERIFICATIONS)}, got {verified!r}",
        )
    return CodedConcept(value=value, scheme=scheme, meaning=meaning.strip(), verification=verified)


_ANATOMY_TOP = frozenset({"version", "segmentation_category", "profiles"})
_PROFILE_KEYS = frozenset({"description", "anatomies"})
_ANATOMY_KEYS = frozenset(
    {
        "name",
        "label",
        "totalsegmentator",
        "code",
        "segmentation_category",
        "note",
        "part_sets",
        "additions",
    }
)


def _parse_part(node: Any, table: str, where: str, key_path: str) -> PartCode:
    """A code with an optional ``laterality`` (left | right)."""
    if not isinstance(node, Mapping):
        raise _mfail(table, where, key_path, "must be a mapping")
    side = node.get("laterality")
    if side is not None and side not in LATERALITIES:
        raise _mfail(
            table,
            where,
            f"{key_path}.laterality",
            f"must be one of {', '.join(LATERALITIES)}, got {side!r}",
        )
    rest = {k: v for k, v in node.items() if k != "laterality"}
    return PartCode(code=_parse_code(rest, table, where, key_path), laterality=side)


def parse_anatomies(data: Any, source: str = "<memory>") -> dict[str, AnatomyTable]:
    """Validate already-parsed ``anatomies.yaml`` into one :class:`AnatomyTable` per profile."""
    table = "anatomies"
    where = Path(source).name if source != "<memory>" else source
    data = _check_keys(data, _ANATOMY_TOP, ("profiles",), table, where, "")
    _check_version(data, table, where)
    category = ANATOMICAL_STRUCTURE
    if "segmentation_category" in data:
        category = _parse_code(data["segmentation_category"], table, where, "segmentation_category")
    profiles = data["profiles"]
    if not isinstance(profiles, Mapping) or not profiles:
        raise _mfail(table, where, "profiles", "must be a non-empty mapping of profile → anatomies")
    parsed: dict[str, tuple[str, list[Anatomy]]] = {}
    for pname, body in profiles.items():
        kp = f"profiles.{pname}"
        if not isinstance(pname, str) or not _PROFILE_RE.match(pname):
            raise _mfail(table, where, kp, "profile names are lower case letters, digits, - and _")
        body = _check_keys(body, _PROFILE_KEYS, ("anatomies",), table, where, kp)
        description = body.get("description", "")
        if not isinstance(description, str):
            raise _mfail(table, where, f"{kp}.description", "must be a string")
        items = body["anatomies"]
        if not isinstance(items, list) or not items:
            raise _mfail(table, where, f"{kp}.anatomies", "must be a non-empty list")
        parsed[pname] = (description, _parse_profile(items, category, where, f"{kp}.anatomies"))
    known = frozenset(a.name for _, anatomies in parsed.values() for a in anatomies)
    return {
        pname: AnatomyTable(
            profile=pname,
            anatomies=tuple(sorted(anatomies, key=lambda a: a.label)),
            known_names=known,
            description=description,
            source=source,
        )
        for pname, (description, anatomies) in parsed.items()
    }


def _parse_profile(
    items: list[Any], category: CodedConcept, where: str, key_path: str
) -> list[Anatomy]:
    table = "anatomies"
    out: list[Anatomy] = []
    owner: dict[int, str] = {}  # TotalSegmentator id → anatomy that claimed it
    code_owner: dict[tuple[str, str], str] = {}  # (value, scheme) → anatomy that claimed it
    for i, item in enumerate(items):
        kp = f"{key_path}[{i}]"
        node = _check_keys(
            item, _ANATOMY_KEYS, ("name", "label", "totalsegmentator", "code"), table, where, kp
        )
        name = _checked_name(node, table, where, kp)
        if any(a.name == name for a in out):
            raise _mfail(table, where, f"{kp}.name", f"duplicate anatomy name {name!r}")
        label = node["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 1:
            raise _mfail(table, where, f"{kp}.label", f"must be a positive integer, got {label!r}")
        clash = next((a.name for a in out if a.label == label), None)
        if clash is not None:
            raise _mfail(table, where, f"{kp}.label", f"label {label} already used by {clash!r}")
        ids = node["totalsegmentator"]
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in ids)
        ):
            raise _mfail(
                table,
                where,
                f"{kp}.totalsegmentator",
                "must be a non-empty list of positive TotalSegmentator label ids",
            )
        for x in ids:
            if x in owner:
                other = owner[x]
                msg = (
                    f"id {x} listed twice"
                    if other == name
                    else f"id {x} already belongs to {other!r}"
                )
                raise _mfail(table, where, f"{kp}.totalsegmentator", msg)
            owner[x] = name
        note = node.get("note", "")
        if not isinstance(note, str):
            raise _mfail(table, where, f"{kp}.note", "must be a string")
        code = _parse_code(node["code"], table, where, f"{kp}.code")
        raw_sets = node.get("part_sets", [])
        if not isinstance(raw_sets, list) or not all(isinstance(x, list) and x for x in raw_sets):
            raise _mfail(
                table, where, f"{kp}.part_sets", "must be a list of non-empty lists of codes"
            )
        part_sets = tuple(
            tuple(
                _parse_part(c, table, where, f"{kp}.part_sets[{i}][{j}]") for j, c in enumerate(ps)
            )
            for i, ps in enumerate(raw_sets)
        )
        raw_additions = node.get("additions", [])
        if not isinstance(raw_additions, list):
            raise _mfail(table, where, f"{kp}.additions", "must be a list of codes")
        additions = tuple(
            _parse_part(c, table, where, f"{kp}.additions[{j}]")
            for j, c in enumerate(raw_additions)
        )
        # A SEG segment must map to one anatomy: a code belongs to one anatomy of the profile
        # (the same part may sit in several sets of its own anatomy).
        owned: list[tuple[str, tuple[str, str]]] = [(f"{kp}.code", (code.value, code.scheme))]
        owned += [
            (f"{kp}.part_sets[{i}][{j}]", (p.code.value, p.code.scheme))
            for i, ps in enumerate(part_sets)
            for j, p in enumerate(ps)
        ]
        owned += [
            (f"{kp}.additions[{j}]", (p.code.value, p.code.scheme)) for j, p in enumerate(additions)
        ]
        for where_kp, key in owned:
            owner_name = code_owner.setdefault(key, name)
            if owner_name != name:
                raise _mfail(
                    table,
                    where,
                    where_kp,
                    f"code {key[0]} ({key[1]}) already counts for {owner_name!r}",
                )
        if code in {p.code for ps in part_sets for p in ps} | {p.code for p in additions}:
            raise _mfail(table, where, f"{kp}.code", "the anatomy's own code cannot be a part")
        out.append(
            Anatomy(
                name=name,
                label=label,
                totalsegmentator=tuple(ids),
                code=code,
                part_sets=part_sets,
                additions=additions,
                segmentation_category=(
                    _parse_code(
                        node["segmentation_category"], table, where, f"{kp}.segmentation_category"
                    )
                    if "segmentation_category" in node
                    else category
                ),
                note=note,
            )
        )
    labels = sorted(a.label for a in out)
    if labels != list(range(1, len(out) + 1)):
        raise _mfail(
            table,
            where,
            key_path,
            f"labels must be 1..{len(out)} without gaps, got {', '.join(map(str, labels))}",
        )
    return out


def load_anatomy_profiles(path: Path | None = None) -> dict[str, AnatomyTable]:
    """Every profile of ``anatomies.yaml`` (default: the one in :func:`mappings_dir`)."""
    path = path or mappings_dir() / "anatomies.yaml"
    data, _ = read_yaml(path, "anatomies")
    return parse_anatomies(data, source=str(path))


def load_anatomies(profile: str = "ct-rate", path: Path | None = None) -> AnatomyTable:
    """The anatomies of one profile; :class:`ConfigError` if the file or profile is wrong.

    The whole file is validated, not just the chosen profile, so a broken profile cannot wait in
    the file until a site switches to it.
    """
    tables = load_anatomy_profiles(path)
    if profile not in tables:
        where = (path or mappings_dir() / "anatomies.yaml").name
        raise _mfail(
            "anatomies",
            where,
            f"profiles.{profile}",
            f"no such profile (have {', '.join(sorted(tables))})",
        )
    return tables[profile]


_FINDINGS_TOP = frozenset({"version", "default_threshold", "findings"})
_FINDING_KEYS = frozenset({"name", "anatomy", "positive", "negative", "code", "threshold", "note"})


def _threshold(v: Any, table: str, where: str, key_path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
        raise _mfail(
            table, where, key_path, f"must be a number strictly between 0 and 1, got {v!r}"
        )
    return float(v)


def parse_findings(
    data: Any, anatomies: AnatomyTable, source: str = "<memory>"
) -> tuple[FindingDefinition, ...]:
    """Validate already-parsed ``findings.yaml``; keep the findings of ``anatomies``' profile.

    Every row is validated, including rows for anatomies of other profiles; an anatomy that no
    profile knows is an error (a typo must not silently drop a finding).
    """
    table = "findings"
    where = Path(source).name if source != "<memory>" else source
    data = _check_keys(data, _FINDINGS_TOP, ("default_threshold", "findings"), table, where, "")
    _check_version(data, table, where)
    default = _threshold(data["default_threshold"], table, where, "default_threshold")
    items = data["findings"]
    if not isinstance(items, list) or not items:
        raise _mfail(table, where, "findings", "must be a non-empty list")
    known = anatomies.known_names or frozenset(anatomies.names)
    seen: set[str] = set()
    out: list[FindingDefinition] = []
    for i, item in enumerate(items):
        kp = f"findings[{i}]"
        node = _check_keys(
            item,
            _FINDING_KEYS,
            ("name", "anatomy", "positive", "negative", "code"),
            table,
            where,
            kp,
        )
        name = _checked_name(node, table, where, kp)
        if name in seen:
            raise _mfail(table, where, f"{kp}.name", f"duplicate finding name {name!r}")
        seen.add(name)
        anatomy = node["anatomy"]
        if anatomy not in known:
            raise _mfail(
                table,
                where,
                f"{kp}.anatomy",
                f"unknown anatomy {anatomy!r} (anatomies.yaml has {', '.join(sorted(known))})",
            )
        positive = _text(node, "positive", table, where, kp)
        negative = _text(node, "negative", table, where, kp)
        if positive.casefold() == negative.casefold():
            raise _mfail(table, where, f"{kp}.negative", "must differ from the positive prompt")
        code = _parse_code(node["code"], table, where, f"{kp}.code")
        threshold = (
            _threshold(node["threshold"], table, where, f"{kp}.threshold")
            if "threshold" in node
            else default
        )
        note = node.get("note", "")
        if not isinstance(note, str):
            raise _mfail(table, where, f"{kp}.note", "must be a string")
        if anatomy in anatomies.names:
            out.append(
                FindingDefinition(
                    name=name,
                    anatomy=anatomy,
                    positive=positive,
                    negative=negative,
                    code=code,
                    default_threshold=threshold,
                    note=note,
                )
            )
    return tuple(out)


def load_findings(
    anatomies: AnatomyTable, path: Path | None = None
) -> tuple[FindingDefinition, ...]:
    """The findings of ``findings.yaml`` (default: in :func:`mappings_dir`) scored by this profile."""
    path = path or mappings_dir() / "findings.yaml"
    data, _ = read_yaml(path, "findings")
    return parse_findings(data, anatomies, source=str(path))


def check_mappings(directory: Path | None = None) -> list[str]:
    """Load and validate every table of a ``mappings/`` folder (triage rules included); return a
    readable summary.

    Raises :class:`ConfigError` on the first problem, so a site can test its own tables before
    pointing the service at them (``fvlm-pacs mappings check``).
    """
    directory = directory or mappings_dir()
    lines: list[str] = [f"mappings in {directory}"]
    rules = load_series_rules(directory / "series_rules.yaml")
    lines.append(
        f"series_rules.yaml: {len(rules.condition.conditions)} conditions, "
        f"prefer {', '.join(p.describe() for p in rules.prefer) or '(none)'}"
    )
    profiles = load_anatomy_profiles(directory / "anatomies.yaml")
    findings_path = directory / "findings.yaml"
    unverified: list[str] = []
    for pname, t in profiles.items():
        listing = ", ".join(
            f"{a.label} {a.name}"
            + (f" +{len(a.part_sets)} part sets" if a.part_sets else "")
            + (f" +{len(a.additions)} additions" if a.additions else "")
            for a in t.anatomies
        )
        lines.append(f"anatomies.yaml: profile {pname}: {len(t.anatomies)} anatomies ({listing})")
        unverified += [
            f"anatomy {pname}/{a.name} {c}"
            for a in t.anatomies
            for c in a.matching_codes
            if c.verification == "unverified"
        ]
    seen: set[str] = set()
    for pname, t in profiles.items():
        found = load_findings(t, findings_path)
        thresholds = sorted({f.default_threshold for f in found})
        shown = ", ".join(f"{x:g}" for x in thresholds) or "-"
        lines.append(
            f"findings.yaml: profile {pname}: {len(found)} findings "
            f"(uncalibrated default threshold {shown})"
        )
        for f in found:
            if f.name not in seen and f.code.verification == "unverified":
                unverified.append(f"finding {f.name} {f.code}")
            seen.add(f.name)
    from fvlm_pacs.triage import load_triage_rules  # triage builds on this module

    lines.append(load_triage_rules(directory / "triage.yaml", known_findings=seen).describe())
    if unverified:
        lines.append(f"{len(unverified)} codes still unverified (see mappings/README.md):")
        lines += [f"  {u}" for u in unverified]
    else:
        lines.append("every code has a recorded check")
    return lines
