"""Findings + rules → a study's reading priority and the flags that explain it.

Triage only ever moves a study *up* a radiologist's worklist: a rule raises the priority when a
finding it watches is present with enough margin over its threshold; a finding the model could not
assess never raises it (it is listed, with the rules that could not be checked, so nobody mistakes
"not looked at" for "normal"). A study without a result has no triage at all — late AI never holds a
study back (PACS.md, "Beyond the peers").

The rules are data (``mappings/triage.yaml``), parsed as strictly as the other tables of
``mappings/``: an unknown key or a finding name that ``findings.yaml`` does not have stops start-up
with a :class:`~fvlm_pacs.errors.ConfigError` naming the key path. :func:`assess` is a pure function
of the findings and the rules, so the pipeline, the HL7 export and the tests get the same answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from fvlm_pacs.codes import (
    _check_keys,
    _check_version,
    _checked_name,
    _mfail,
    load_anatomy_profiles,
    load_findings,
    mappings_dir,
    read_yaml,
)
from fvlm_pacs.domain import FindingStatus

log = logging.getLogger(__name__)

Priority = Literal["routine", "high", "critical"]

PRIORITIES: tuple[Priority, ...] = ("routine", "high", "critical")
"""Lowest to highest; the index is the rank used for sorting (critical first)."""

FINDING_STATUSES: tuple[FindingStatus, ...] = get_args(FindingStatus)
"""Every status a finding row may carry, in :data:`~fvlm_pacs.domain.FindingStatus` order; taken
from the domain type so a new status cannot be added there and forgotten here."""


def priority_rank(priority: str | None) -> int:
    """0 routine, 1 high, 2 critical. ``None`` (no result, no triage) ranks as routine: a study
    the AI has not seen yet keeps its place by arrival and is never pushed down."""
    if priority is None:
        return 0
    return PRIORITIES.index(priority)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Rules: mappings/triage.yaml
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriageRule:
    """Raise the study to ``priority`` when one of ``findings`` is present with
    ``score >= threshold + margin``."""

    name: str
    findings: tuple[str, ...]
    priority: Priority
    margin: float = 0.0
    note: str = ""

    def fires(self, score: float, threshold: float) -> bool:
        # A small tolerance so that a margin of 0.1 over a threshold of 0.5 accepts a score of
        # 0.6 despite binary floating point.
        return score >= threshold + self.margin - 1e-12


@dataclass(frozen=True)
class TriageRules:
    """A validated rule table. ``sha256`` identifies the exact file a triage was made with."""

    rules: tuple[TriageRule, ...]
    source: str = "<memory>"
    sha256: str | None = None

    def watching(self, finding: str) -> tuple[TriageRule, ...]:
        return tuple(r for r in self.rules if finding in r.findings)

    def describe(self) -> str:
        """One line for ``fvlm-pacs mappings check``."""
        by = {p: [r for r in self.rules if r.priority == p] for p in PRIORITIES[1:]}
        parts = [
            f"{p}: "
            + (
                ", ".join(
                    f"{r.name} ({', '.join(r.findings)}"
                    + (f"; margin {r.margin:g}" if r.margin else "")
                    + ")"
                    for r in rs
                )
                or "(none)"
            )
            for p, rs in by.items()
        ]
        return f"triage.yaml: {len(self.rules)} rules; " + "; ".join(parts)


_TABLE = "triage"
_TOP_KEYS = frozenset({"version", "rules"})
_RULE_KEYS = frozenset({"name", "findings", "priority", "margin", "note"})


def parse_triage_rules(
    data: Any, known_findings: Collection[str] | None = None, source: str = "<memory>"
) -> TriageRules:
    """Validate already-parsed ``triage.yaml``.

    ``known_findings``: the finding names of ``findings.yaml``; a rule naming any other finding is
    an error (a misspelt name would otherwise never fire, silently). ``None`` skips that check
    (only for callers that validate the names themselves).
    """
    where = Path(source).name if source != "<memory>" else source
    data = _check_keys(data, _TOP_KEYS, ("rules",), _TABLE, where, "")
    _check_version(data, _TABLE, where)
    items = data["rules"]
    if not isinstance(items, list):
        raise _mfail(_TABLE, where, "rules", "must be a list (may be empty)")
    known = frozenset(known_findings) if known_findings is not None else None
    rules: list[TriageRule] = []
    for i, item in enumerate(items):
        kp = f"rules[{i}]"
        node = _check_keys(item, _RULE_KEYS, ("name", "findings", "priority"), _TABLE, where, kp)
        name = _checked_name(node, _TABLE, where, kp)
        if any(r.name == name for r in rules):
            raise _mfail(_TABLE, where, f"{kp}.name", f"duplicate rule name {name!r}")
        findings = node["findings"]
        if (
            not isinstance(findings, list)
            or not findings
            or not all(isinstance(f, str) for f in findings)
        ):
            raise _mfail(
                _TABLE, where, f"{kp}.findings", "must be a non-empty list of finding names"
            )
        for j, f in enumerate(findings):
            if f in findings[:j]:
                raise _mfail(_TABLE, where, f"{kp}.findings[{j}]", f"{f!r} listed twice")
            if known is not None and f not in known:
                raise _mfail(
                    _TABLE,
                    where,
                    f"{kp}.findings[{j}]",
                    f"unknown finding {f!r} (findings.yaml has {', '.join(sorted(known))})",
                )
        priority = node["priority"]
        if priority not in PRIORITIES[1:]:
            raise _mfail(
                _TABLE,
                where,
                f"{kp}.priority",
                f"must be one of {', '.join(PRIORITIES[1:])}, got {priority!r} "
                "(routine is what a study is when no rule fires)",
            )
        margin = node.get("margin", 0.0)
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not 0.0 <= float(margin) < 1.0
        ):
            raise _mfail(
                _TABLE, where, f"{kp}.margin", f"must be a number in [0, 1), got {margin!r}"
            )
        note = node.get("note", "")
        if not isinstance(note, str):
            raise _mfail(_TABLE, where, f"{kp}.note", "must be a string")
        rules.append(
            TriageRule(
                name=name,
                findings=tuple(findings),
                priority=priority,
                margin=float(margin),
                note=note.strip(),
            )
        )
    return TriageRules(rules=tuple(rules), source=source)


def finding_names(directory: Path | None = None) -> frozenset[str]:
    """Every finding name of ``findings.yaml`` in ``directory``, whatever its anatomy profile."""
    directory = directory or mappings_dir()
    names: set[str] = set()
    for table in load_anatomy_profiles(directory / "anatomies.yaml").values():
        names.update(f.name for f in load_findings(table, directory / "findings.yaml"))
    return frozenset(names)


def load_triage_rules(
    path: Path | None = None, *, known_findings: Collection[str] | None = None
) -> TriageRules:
    """Load and validate ``triage.yaml`` (default: in :func:`~fvlm_pacs.codes.mappings_dir`).

    Finding names are checked against ``known_findings`` or, when not given, against the
    ``anatomies.yaml`` + ``findings.yaml`` next to the file. Load once at start and pass the
    result to :func:`assess`: a broken table must stop the service, not the first study.
    """
    path = path or mappings_dir() / "triage.yaml"
    data, digest = read_yaml(path, _TABLE)
    if known_findings is None:
        known_findings = finding_names(path.parent)
    rules = parse_triage_rules(data, known_findings, source=str(path))
    return TriageRules(rules=rules.rules, source=str(path), sha256=digest)


# ---------------------------------------------------------------------------------------------
# Assessment
# ---------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class Flag:
    """Why a study got its priority: one fired rule on one finding."""

    rule: str
    priority: Priority
    finding: str
    anatomy: str
    score: float
    threshold: float
    margin: float

    @property
    def reason(self) -> str:
        bar = f"threshold {_fmt(self.threshold)}"
        if self.margin:
            bar += f" + margin {_fmt(self.margin)}"
        return (
            f"{self.finding} ({self.anatomy}) score {_fmt(self.score)} ≥ {bar} "
            f"(rule {self.rule} → {self.priority})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "priority": self.priority,
            "finding": self.finding,
            "anatomy": self.anatomy,
            "score": self.score,
            "threshold": self.threshold,
            "margin": self.margin,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class NotAssessed:
    """A finding the model could not score; ``rules`` are the rules that therefore went unchecked."""

    finding: str
    anatomy: str
    rules: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"finding": self.finding, "anatomy": self.anatomy, "rules": list(self.rules)}


@dataclass(frozen=True)
class Triage:
    """The outcome for one result: priority, the flags that raised it, what could not be checked."""

    priority: Priority
    flags: tuple[Flag, ...]
    not_assessable: tuple[NotAssessed, ...]
    rules_source: str
    rules_sha256: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form stored as ``payload["triage"]`` and read by the worklist and HL7."""
        return {
            "priority": self.priority,
            "flags": [f.as_dict() for f in self.flags],
            "not_assessable": [n.as_dict() for n in self.not_assessable],
            "rules": {"source": Path(self.rules_source).name, "sha256": self.rules_sha256},
        }


def _number(value: Any, key_path: str, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key_path}: must be a finite number, got {value!r}")
    return float(value)


def assess(findings: Sequence[Mapping[str, Any]], rules: TriageRules | None = None) -> Triage:
    """Priority and flags for one result's findings (``Finding.as_dict()`` rows).

    ``rules``: the table loaded once at start (:func:`load_triage_rules`); ``None`` loads the
    shipped one (convenient for tools, wasteful per study). Per finding, the highest-priority
    rule that fires gives its flag (the first in the file among equals), so one finding is
    flagged once. Flags come critical first, then by how far the score exceeds the threshold.

    Raises ``ValueError`` naming the row for a malformed finding: the findings come from our own
    predictor, so a bad row is a bug to surface, not data to guess at.
    """
    if rules is None:
        rules = load_triage_rules()
    flags: list[Flag] = []
    unassessed: list[NotAssessed] = []
    for i, row in enumerate(findings):
        kp = f"findings[{i}]"
        name, anatomy, status = row.get("finding"), row.get("anatomy"), row.get("status")
        if not isinstance(name, str) or not isinstance(anatomy, str):
            raise ValueError(f"{kp}: finding and anatomy must be strings")
        if status not in FINDING_STATUSES:
            raise ValueError(f"{kp}.status: must be one of {', '.join(FINDING_STATUSES)}")
        watching = rules.watching(name)
        if status == "not_assessable":
            unassessed.append(NotAssessed(name, anatomy, tuple(r.name for r in watching)))
            continue
        if status != "present" or not watching:
            continue
        score = _number(row.get("score"), f"{kp}.score", optional=False)
        threshold = _number(row.get("threshold"), f"{kp}.threshold", optional=False)
        assert score is not None and threshold is not None
        fired = [r for r in watching if r.fires(score, threshold)]
        if not fired:
            continue
        best = max(fired, key=lambda r: priority_rank(r.priority))  # first among equals
        flags.append(
            Flag(
                rule=best.name,
                priority=best.priority,
                finding=name,
                anatomy=anatomy,
                score=score,
                threshold=threshold,
                margin=best.margin,
            )
        )
    flags.sort(key=lambda f: (-priority_rank(f.priority), -(f.score - f.threshold), f.finding))
    priority: Priority = flags[0].priority if flags else "routine"
    return Triage(
        priority=priority,
        flags=tuple(flags),
        not_assessable=tuple(unassessed),
        rules_source=rules.source,
        rules_sha256=rules.sha256,
    )
