"""Report decomposition: a whole CT report → one text per anatomy, and whether the anatomy is normal.

fVLM pairs each anatomy's embedding with the part of the report about that anatomy
(``shared/design/FVLM.md``, "Pre-training objective"). An anatomy is **normal** when the impression
does not mention it as abnormal; its text is then the template
``"{anatomy} shows no significant abnormalities."`` (:data:`NORMAL_TEMPLATE`), so that all normal
samples of an anatomy share one text and count as positives of each other. An abnormal anatomy's
text is the sentences of the findings and the impression that mention it, in report order.

The paper did this with an LLM plus synonym rules. This module is the deterministic part: a
rule-based decomposer (:class:`RuleBasedDecomposer`) driven by the data table
``mappings/report_synonyms.yaml`` (words per anatomy, negation cues), and the seam where a site can
plug an LLM instead (:class:`Decomposer`).

Plugging in an LLM-based decomposer
-----------------------------------
Write a class with a ``decompose(findings_text, impression_text) -> dict[str, AnatomyText]``
method (the :class:`Decomposer` protocol) in your own package, returning one
:class:`AnatomyText` per anatomy of the profile (use :func:`normal_text` for normal ones so the
template stays identical across decomposers). Name it by import path, ``"package.module:Class"``,
and build it with :func:`load_decomposer`; a ``"package.module:factory"`` callable works too. The
class must be constructible without arguments (read its own settings, e.g. an endpoint and model
name from the environment). Nothing in this package calls a network or an LLM; a good practice is
to fall back to :class:`RuleBasedDecomposer` per report when the LLM answer does not parse, and to
compare both on a sample of reports before training.

Negation handling is NegEx-like and deliberately simple (see :class:`RuleBasedDecomposer`); its
known failure cases are listed there.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from fvlm_pacs.codes import mappings_dir
from fvlm_pacs.errors import ConfigError

NORMAL_TEMPLATE = "{anatomy} shows no significant abnormalities."
"""Text of a normal anatomy (FVLM.md); filled by :func:`normal_text` with a capitalised name."""

CT_RATE_ANATOMIES: tuple[str, ...] = ("lung", "heart", "esophagus", "aorta")
"""Default anatomies: the ``ct-rate`` profile of ``mappings/anatomies.yaml`` in label order."""

_TABLE = "report synonyms"


def normal_text(display: str) -> str:
    """The normal template for an anatomy shown as ``display``: ``"Lung shows no ..."``.

    The first letter is upper-cased (the text encoder lower-cases anyway; the point is that every
    decomposer produces the identical string, since identical texts are positives of each other).
    """
    name = display.strip()
    return NORMAL_TEMPLATE.format(anatomy=name[:1].upper() + name[1:])


# ---------------------------------------------------------------------------------------------
# The data table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnatomySynonyms:
    """Words naming one anatomy; ``weak_terms`` count only when no other structure is named."""

    name: str
    display: str
    terms: tuple[str, ...]
    weak_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportSynonyms:
    """The validated content of ``mappings/report_synonyms.yaml`` (see the file's header)."""

    anatomies: Mapping[str, AnatomySynonyms]
    other_structures: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    negation: tuple[str, ...] = ()
    normal: tuple[str, ...] = ()
    pseudo_negation: tuple[str, ...] = ()
    scope_end: tuple[str, ...] = ()
    source: str = "<memory>"


_TOP_KEYS = frozenset({"version", "anatomies", "other_structures", "ignore", "cues"})
_ANATOMY_KEYS = frozenset({"display", "terms", "weak_terms"})
_CUE_KEYS = frozenset({"negation", "normal", "pseudo_negation", "scope_end"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _fail(where: str, key_path: str, message: str) -> ConfigError:
    return ConfigError(f"{_TABLE} {where}: {key_path}: {message}")


def _mapping(node: Any, allowed: frozenset[str], where: str, key_path: str) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        raise _fail(where, key_path or "<top>", "must be a mapping")
    unknown = sorted(str(k) for k in node if str(k) not in allowed)
    if unknown:
        path = f"{key_path}.{unknown[0]}" if key_path else unknown[0]
        raise _fail(
            where, path, f"unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})"
        )
    return node


def _phrases(node: Any, where: str, key_path: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if node is None and allow_empty:
        return ()
    if not isinstance(node, list):
        raise _fail(where, key_path, "must be a list of phrases")
    out: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(node):
        if not isinstance(item, str) or not item.strip():
            raise _fail(where, f"{key_path}[{i}]", f"must be a non-empty string, got {item!r}")
        key = _norm(item)
        if key in seen:
            raise _fail(where, f"{key_path}[{i}]", f"duplicate phrase {item!r}")
        seen.add(key)
        out.append(item.strip())
    if not out and not allow_empty:
        raise _fail(where, key_path, "must list at least one phrase")
    return tuple(out)


def parse_report_synonyms(data: Any, where: str = "<memory>") -> ReportSynonyms:
    """Validate an already-parsed synonyms table; :class:`ConfigError` names the bad key."""
    top = _mapping(data, _TOP_KEYS, where, "")
    if top.get("version") != 1:
        raise _fail(where, "version", f"must be 1, got {top.get('version')!r}")
    raw = top.get("anatomies")
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(where, "anatomies", "must be a non-empty mapping of anatomy name → entry")
    anatomies: dict[str, AnatomySynonyms] = {}
    for name, entry in raw.items():
        path = f"anatomies.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _fail(where, path, "anatomy name must be lower case letters, digits and _")
        body = _mapping(entry, _ANATOMY_KEYS, where, path)
        if "terms" not in body:
            raise _fail(where, f"{path}.terms", "required key missing")
        display = body.get("display", name.replace("_", " "))
        if not isinstance(display, str) or not display.strip():
            raise _fail(where, f"{path}.display", f"must be a non-empty string, got {display!r}")
        terms = _phrases(body["terms"], where, f"{path}.terms", allow_empty=False)
        weak = _phrases(body.get("weak_terms"), where, f"{path}.weak_terms")
        clash = sorted({_norm(t) for t in terms} & {_norm(t) for t in weak})
        if clash:
            raise _fail(where, f"{path}.weak_terms", f"{clash[0]!r} is also in terms")
        anatomies[name] = AnatomySynonyms(name, display.strip(), terms, weak)
    cues = _mapping(top.get("cues", {}), _CUE_KEYS, where, "cues")
    for key in ("negation", "normal"):
        if not cues.get(key):
            raise _fail(where, f"cues.{key}", "required: at least one cue")
    return ReportSynonyms(
        anatomies=anatomies,
        other_structures=_phrases(top.get("other_structures"), where, "other_structures"),
        ignore=_phrases(top.get("ignore"), where, "ignore"),
        negation=_phrases(cues["negation"], where, "cues.negation"),
        normal=_phrases(cues["normal"], where, "cues.normal"),
        pseudo_negation=_phrases(cues.get("pseudo_negation"), where, "cues.pseudo_negation"),
        scope_end=_phrases(cues.get("scope_end"), where, "cues.scope_end"),
        source=where,
    )


def load_report_synonyms(path: Path | None = None) -> ReportSynonyms:
    """Load ``report_synonyms.yaml`` (default: from :func:`fvlm_pacs.codes.mappings_dir`).

    Unknown keys, empty or duplicate phrases, a phrase both strong and weak, and missing cue lists
    raise :class:`ConfigError` naming the key path (e.g. ``anatomies.lung.termz``).
    """
    path = path or mappings_dir() / "report_synonyms.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{_TABLE}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_TABLE} {path.name}: not valid YAML: {exc}") from exc
    return parse_report_synonyms(data, path.name)


# ---------------------------------------------------------------------------------------------
# Sentences and sections
# ---------------------------------------------------------------------------------------------

_HEADER_WORDS = (
    r"findings?|impressions?|conclusions?|technique|comparison|clinical (?:information|history|"
    r"indication|details)|indications?|history|examination|exam|procedure|recommendations?"
)
_HEADER_RE = re.compile(rf"(?im)(?:^|(?<=[\s.]))(?P<h>{_HEADER_WORDS})\s*:")
_IMPRESSION_HEADERS = frozenset({"impression", "impressions", "conclusion", "conclusions"})
_FINDINGS_HEADERS = frozenset({"finding", "findings"})

_ABBREVIATIONS = frozenset(
    """approx appr e.g eg i.e ie vs etc cf ca incl resp max dr mr mrs ms prof fig figs ref vol
    ant lat med inf sup sag cor ax""".split()
)
_BULLET_RE = re.compile(r"^\s*(?:[-*•·▪‣–]|\(?\d{1,2}[.)]|\(?[a-z][.)](?=\s))\s+", re.IGNORECASE)
_INLINE_NUMBER_RE = re.compile(r"(?:(?<=[.!?:;])|^)\s*\(?\d{1,2}[.)]\s+(?=[A-Za-z])")
_BOUNDARY_RE = re.compile(r"[.!?]+(?=\s+|$)")


def split_report(report: str) -> tuple[str, str]:
    """``(findings, impression)`` of a report with ``Findings:`` / ``Impression:`` headers.

    Headers are case-insensitive and may stand on their own line or start a line of text;
    ``Conclusion:`` counts as impression. Text before the first header and under other headers
    (technique, comparison, clinical information, recommendation …) is dropped. Without any
    impression header the impression is ``""``; without any recognised header the whole text is
    the findings (the decomposer then marks every anatomy normal, since FVLM's "normal" is about
    the impression — split such reports yourself).
    """
    matches = list(_HEADER_RE.finditer(report))
    if not matches:
        return report.strip(), ""
    findings: list[str] = []
    impression: list[str] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
        body = report[m.end() : end].strip()
        head = re.sub(r"\s+", " ", m.group("h").lower())
        if head in _FINDINGS_HEADERS:
            findings.append(body)
        elif head in _IMPRESSION_HEADERS:
            impression.append(body)
    return "\n".join(b for b in findings if b), "\n".join(b for b in impression if b)


_CONTINUATION_WORDS = frozenset({"and", "or", "of", "the", "with", "in", "a", "an", "to", "at"})


def _continues(line: str) -> bool:
    """Does a wrapped line obviously go on (ends with a comma, hyphen or a joining word)?"""
    words = line.rsplit(None, 1)
    return line.endswith((",", "-")) or (bool(words) and words[-1].lower() in _CONTINUATION_WORDS)


def _join_lines(text: str) -> list[str]:
    """Physical lines → logical blocks: a blank line, a bullet or a line after end punctuation
    starts a new block; other line breaks are wrapping and are joined with a space."""
    blocks: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if current:
                blocks.append(current)
            current = ""
            continue
        bullet = _BULLET_RE.match(line)
        if bullet:
            line = line[bullet.end() :].strip()
        new_block = (
            bool(bullet)
            or not current
            or current.endswith((".", "!", "?", ":", ";"))
            or (line[:1].isupper() and not _continues(current))
        )
        if new_block:
            if current:
                blocks.append(current)
            current = line
        else:
            current = f"{current} {line}"
    if current:
        blocks.append(current)
    return blocks


def split_sentences(text: str) -> list[str]:
    """Sentences of a report section, in order, whitespace-normalised.

    Robust to: section headers (``Findings:``, ``IMPRESSION:`` … are removed), bullet and
    numbered lists (one item = at least one sentence; ``1. Emphysema. 2. Hiatal hernia.`` inline
    too), hard-wrapped lines, decimals (``3.5 mm``), and abbreviations (``approx.``, ``e.g.``,
    ``vs.``, single initials). Ends at ``.``, ``!`` or ``?`` followed by white space; semicolons
    do not end sentences (they end negation scope instead).
    """
    text = _HEADER_RE.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    sentences: list[str] = []
    for block in _join_lines(text):
        block = _INLINE_NUMBER_RE.sub("\n", block)
        for part in block.split("\n"):
            sentences.extend(_split_block(part))
    return sentences


def _split_block(block: str) -> list[str]:
    out: list[str] = []
    start = 0
    for m in _BOUNDARY_RE.finditer(block):
        before = block[start : m.start()].rsplit(None, 1)
        last = before[-1].lower().lstrip("(") if before else ""
        if m.group() == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        piece = block[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = block[start:].strip()
    if tail:
        out.append(tail)
    cleaned = [re.sub(r"\s+", " ", s).strip(" -") for s in out]
    return [s for s in cleaned if re.search(r"[A-Za-z0-9]", s)]


# ---------------------------------------------------------------------------------------------
# Decomposition
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnatomyText:
    """One anatomy's share of a report.

    ``text`` is what the text encoder sees: :func:`normal_text` when ``normal``, else the findings
    and impression sentences mentioning the anatomy (report order, duplicates dropped, joined by
    a space). ``normal`` follows FVLM.md: not mentioned as abnormal in the impression.
    ``mentioned_in_impression`` is true for any mention there, negated ones included.
    ``sentences`` are the mentioning sentences even when ``normal`` (for review and debugging).
    """

    anatomy: str
    text: str
    normal: bool
    mentioned_in_impression: bool
    sentences: tuple[str, ...] = ()


Decomposition = dict[str, AnatomyText]
"""What a decomposer returns: anatomy name → :class:`AnatomyText`, one per anatomy asked for."""


@runtime_checkable
class Decomposer(Protocol):
    """The seam for report decomposition (rule-based here; an LLM-based one at a site).

    Implementations return one :class:`AnatomyText` for every anatomy they were built for, and use
    :func:`normal_text` for normal ones. See the module docstring for plugging one in.
    """

    def decompose(self, findings_text: str, impression_text: str) -> dict[str, AnatomyText]:
        """Split one report's findings and impression into per-anatomy texts."""
        ...


def load_decomposer(import_path: str) -> Decomposer:
    """Build the decomposer named ``"package.module:Name"`` (a class or a no-argument factory).

    :class:`ConfigError` names the path when it cannot be imported, called, or does not implement
    :class:`Decomposer`. Importing runs the site's code; nothing here talks to a network.
    """
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"decomposer {import_path!r}: expected 'package.module:Name'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"decomposer {import_path!r}: cannot import: {exc}") from exc
    try:
        obj = factory()
    except Exception as exc:  # a site's constructor may fail in any way
        raise ConfigError(f"decomposer {import_path!r}: construction failed: {exc}") from exc
    if not isinstance(obj, Decomposer):
        raise ConfigError(f"decomposer {import_path!r}: has no decompose(findings, impression)")
    return obj


def _norm(phrase: str) -> str:
    return re.sub(r"[\s\-]+", " ", phrase.strip().lower())


def _phrase_regex(phrases: Iterable[str]) -> re.Pattern[str] | None:
    """One alternation, longest first, whole words; spaces/hyphens match runs of either."""
    uniq = sorted({_norm(p) for p in phrases}, key=lambda p: (-len(p), p))
    if not uniq:
        return None
    alts = [r"[\s\-]+".join(re.escape(w) for w in p.split(" ")) for p in uniq]
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", re.IGNORECASE)


def _mask(text: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return text
    return pattern.sub(lambda m: " " * len(m.group()), text)


@dataclass(frozen=True)
class _Mention:
    anatomy: str
    start: int
    negated: bool


_COMMA_SEGMENT_RE = re.compile(r",|\band\b(?=\s+(?:the|there|a|an|its)\b)|\bwith\b", re.IGNORECASE)
_COMMA_SCOPE_END_RE = re.compile(r",(?=\s*(?:a|an|there|which|it|this|these)\b)", re.IGNORECASE)


@dataclass(frozen=True)
class RuleBasedDecomposer:
    """Deterministic decomposer: synonym matching plus NegEx-like negation, per sentence.

    Per sentence: phrases of ``ignore`` and ``pseudo_negation`` are blanked out; the sentence is
    cut into **clauses** at ``scope_end`` words (``but``, ``however``, ``;`` …) and at a comma
    that opens a new clause (``, a``/``, there``/``, which`` …); each clause into **segments** at
    commas, ``with`` and ``and the/there/a``. A mention of an anatomy (longest phrase wins) is
    negated when a ``negation`` cue precedes it in its clause (``No pleural or pericardial
    effusion.``) or a ``normal`` cue is anywhere in its segment (``Heart size is normal, …``,
    ``Esophagus unremarkable.``). A weak term counts only if its segment names no other anatomy
    or structure. A sentence with several anatomies goes to each. An anatomy is abnormal when an
    impression sentence mentions it un-negated.

    Known failure cases (the LLM hook exists for them): a negation list continued past a comma
    into a positive finding (``No effusion, emphysema in both lungs.`` → emphysema negated);
    ``normal`` cues describing only part of a segment (``Enlarged heart with normal
    pericardium`` works only because ``with`` splits); findings named without any anatomy word
    and not listed (``Small hernia.``); uncertainty (``possible``, ``cannot be excluded``) counts
    as a mention, i.e. abnormal; a weak term in a segment of its own is kept even when the next
    segment names its real site (``Atherosclerotic changes with calcified plaques in the coronary
    arteries.`` → aorta and heart); laterality and temporal comparison are ignored.
    """

    synonyms: ReportSynonyms = field(default_factory=load_report_synonyms)
    anatomies: Sequence[str] = CT_RATE_ANATOMIES

    def __post_init__(self) -> None:
        missing = [a for a in self.anatomies if a not in self.synonyms.anatomies]
        if missing:
            raise ConfigError(
                f"{_TABLE} {self.synonyms.source}: anatomies.{missing[0]}: no synonyms for "
                f"anatomy {missing[0]!r} (have {', '.join(sorted(self.synonyms.anatomies))})"
            )
        if not self.anatomies:
            raise ConfigError("report decomposer: anatomies: at least one anatomy is required")
        object.__setattr__(self, "anatomies", tuple(self.anatomies))

    # -- compiled tables -------------------------------------------------------------------

    @cached_property
    def _lexicon(self) -> dict[str, tuple[frozenset[str], bool]]:
        """normalised phrase → (anatomies it names, or {""} for other structures; is it weak)."""
        strong: dict[str, set[str]] = {}
        weak: dict[str, set[str]] = {}
        for a in self.synonyms.anatomies.values():
            for t in a.terms:
                strong.setdefault(_norm(t), set()).add(a.name)
            for t in a.weak_terms:
                weak.setdefault(_norm(t), set()).add(a.name)
        for t in self.synonyms.other_structures:
            strong.setdefault(_norm(t), set()).add("")
        lex = {p: (frozenset(names), True) for p, names in weak.items() if p not in strong}
        lex.update({p: (frozenset(names), False) for p, names in strong.items()})
        return lex

    @cached_property
    def _patterns(self) -> dict[str, re.Pattern[str] | None]:
        s = self.synonyms
        scope = [p for p in s.scope_end if p.strip() != ";"]
        return {
            "terms": _phrase_regex(self._lexicon),
            "mask": _phrase_regex([*s.ignore, *s.pseudo_negation]),
            "negation": _phrase_regex(s.negation),
            "normal": _phrase_regex(s.normal),
            "scope_end": _phrase_regex(scope),
        }

    # -- per sentence ----------------------------------------------------------------------

    def mentions(self, sentence: str) -> list[tuple[str, bool]]:
        """``(anatomy, negated)`` for every anatomy mention in one sentence, in order.

        Only anatomies of this decomposer are returned (other anatomies of the table and other
        structures still silence weak terms).
        """
        p = self._patterns
        text = _mask(sentence, p["mask"])
        cuts = {0, len(text)}
        if p["scope_end"] is not None:
            cuts.update(m.start() for m in p["scope_end"].finditer(text))
        cuts.update(m.start() for m in re.finditer(";", text))
        cuts.update(m.start() for m in _COMMA_SCOPE_END_RE.finditer(text))
        bounds = sorted(cuts)
        found: list[_Mention] = []
        for c0, c1 in zip(bounds, bounds[1:], strict=False):
            found.extend(self._clause_mentions(text, c0, c1))
        return [(m.anatomy, m.negated) for m in found if m.anatomy in self.anatomies]

    def _clause_mentions(self, text: str, c0: int, c1: int) -> list[_Mention]:
        p = self._patterns
        clause = text[c0:c1]
        neg = p["negation"]
        first_neg = min((m.start() for m in neg.finditer(clause)), default=None) if neg else None
        seg_cuts = sorted(
            {0, len(clause), *(m.start() for m in _COMMA_SEGMENT_RE.finditer(clause))}
        )
        out: list[_Mention] = []
        for s0, s1 in zip(seg_cuts, seg_cuts[1:], strict=False):
            seg = clause[s0:s1]
            normal_cue = bool(p["normal"] and p["normal"].search(seg))
            hits: list[tuple[int, frozenset[str], bool]] = []
            if p["terms"] is not None:
                for m in p["terms"].finditer(seg):
                    names, weak = self._lexicon[_norm(m.group())]
                    hits.append((s0 + m.start(), names, weak))
            strong_names: set[str] = set()
            for _, names, weak in hits:
                if not weak:
                    strong_names |= names
            for pos, names, weak in hits:
                if weak and strong_names - names:
                    continue  # the segment names another structure: the weak word is about it
                negated = normal_cue or (first_neg is not None and first_neg < pos)
                out.extend(_Mention(a, c0 + pos, negated) for a in sorted(names) if a)
        return out

    # -- whole report ----------------------------------------------------------------------

    def decompose(self, findings_text: str, impression_text: str) -> dict[str, AnatomyText]:
        """Per-anatomy texts of one report (FVLM.md "Pre-training objective")."""
        findings = split_sentences(findings_text)
        impression = split_sentences(impression_text)
        sentences: dict[str, list[str]] = {a: [] for a in self.anatomies}
        seen: dict[str, set[str]] = {a: set() for a in self.anatomies}
        in_impression: set[str] = set()
        abnormal: set[str] = set()
        for section, items in (("findings", findings), ("impression", impression)):
            for sentence in items:
                ments = self.mentions(sentence)
                for anatomy, negated in ments:
                    key = _norm(sentence)
                    if key not in seen[anatomy]:
                        seen[anatomy].add(key)
                        sentences[anatomy].append(sentence)
                    if section == "impression":
                        in_impression.add(anatomy)
                        if not negated:
                            abnormal.add(anatomy)
        out: dict[str, AnatomyText] = {}
        for anatomy in self.anatomies:
            is_normal = anatomy not in abnormal
            display = self.synonyms.anatomies[anatomy].display
            out[anatomy] = AnatomyText(
                anatomy=anatomy,
                text=normal_text(display) if is_normal else " ".join(sentences[anatomy]),
                normal=is_normal,
                mentioned_in_impression=anatomy in in_impression,
                sentences=tuple(sentences[anatomy]),
            )
        return out

    def decompose_report(self, report: str) -> dict[str, AnatomyText]:
        """:func:`split_report` then :meth:`decompose`."""
        return self.decompose(*split_report(report))
