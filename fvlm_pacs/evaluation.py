"""Zero-shot finding evaluation and per-finding threshold calibration (pure functions on arrays).

Why: fVLM scores are narrow and differ per disease (FVLM.md "Zero-shot scoring"), so every
finding needs its own threshold, and its quality is judged threshold-free by the ROC AUC. This
module holds no model code: it takes one score array and one 0/1 label array per finding.

Conventions shared by every function here:

* a case is **positive** when ``score >= threshold`` — the predictor's rule (a score equal to
  the threshold is "present");
* a non-finite score (NaN, ±inf, or ``None`` in a list) means **not assessable** (the predictor's
  ``not_assessable``, score None): such cases are excluded from every statistic and counted;
* labels are 0/1 (or bool); anything else is a :class:`ValueError` naming ``labels``;
* AUC is exact and tie-aware (= Mann-Whitney U / (n_pos · n_neg), a tie counting one half);
  it is ``None`` when the assessable cases lack one of the two classes.

Calibration protocol (CT-CLIP's, used by fVLM): the threshold is the ROC point closest to (0, 1).
**Calibrate on the validation split only, never on the test split** — a threshold chosen on the
data it is then measured on gives optimistic sensitivity/specificity. :func:`split_cases` makes a
deterministic train/validation/test split; :func:`calibrate` + :func:`write_thresholds` produce
the file :func:`fvlm_pacs.model.predictor.load_thresholds` reads; :func:`evaluate` on the test
split with those thresholds gives the honest report. ``evaluate(..., thresholds=None)``
calibrates on the evaluated data itself and labels every such threshold ``optimistic``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .domain import Finding

log = logging.getLogger(__name__)

ScoresLike = ArrayLike | Sequence[float | None]
"""One score per case; ``None`` or a non-finite value marks a case not assessable."""

CALIBRATION_METHOD = "roc-closest-to-(0,1)"
"""Recorded in the thresholds file so a reader knows how the thresholds were chosen."""

_BOOTSTRAP_CHUNK = 1 << 22
"""Resampled cases held in memory at once by :func:`bootstrap_auc_ci` (bounds memory use)."""


# -- inputs ---------------------------------------------------------------------------------


def _clean(scores: ScoresLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """(finite scores float64, labels int8, number of not-assessable cases) after validation."""
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be numbers (None/NaN = not assessable): {exc}") from exc
    lab = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    if lab.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {lab.shape}")
    if s.shape != lab.shape:
        raise ValueError(
            f"scores and labels must have the same length, got {s.shape[0]} and {lab.shape[0]}"
        )
    if lab.dtype == bool:
        y = lab.astype(np.int8)
    else:
        try:
            lf = lab.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"labels must be 0/1 or bool: {exc}") from exc
        bad = ~((lf == 0) | (lf == 1))
        if bad.any():
            raise ValueError(
                f"labels must be 0/1 or bool, got {lab[bad][0]!r} at index {int(np.argmax(bad))}"
            )
        y = lf.astype(np.int8)
    finite = np.isfinite(s)
    return s[finite], y[finite], int(s.size - finite.sum())


def _groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct scores ascending, group index of each case)."""
    distinct, inverse = np.unique(s, return_inverse=True)
    return distinct, inverse.reshape(-1)


# -- ROC and AUC ----------------------------------------------------------------------------


def roc_curve(scores: ScoresLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical ROC curve: ``(fpr, tpr, thresholds)``, thresholds descending.

    Point i is the operating point of the rule ``score >= thresholds[i]``; the first point is
    (0, 0) with threshold +inf, then one point per distinct finite score (tied scores move
    together, so the curve is tie-aware). Not-assessable cases are excluded. Both classes must
    be present among the assessable cases, else :class:`ValueError` naming ``labels``.
    """
    s, y, _ = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"labels: the ROC curve needs positive and negative assessable cases, "
            f"got {n_pos} positive and {n_neg} negative"
        )
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order].astype(np.int64)
    # last index of each run of equal scores (descending order)
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def roc_auc(scores: ScoresLike, labels: ArrayLike) -> float | None:
    """Exact, tie-aware ROC AUC = Mann-Whitney U / (n_pos · n_neg); ``None`` if a class is missing.

    U counts, over all (positive, negative) pairs of assessable cases, 1 when the positive scores
    higher and ½ on a tie; computed from mid-ranks in O(n log n). Not-assessable cases are
    excluded.
    """
    s, y, _ = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse = _groups(s)
    counts = np.bincount(inverse)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    mid_rank = ends - (counts - 1) / 2.0
    rank_sum_pos = float(mid_rank[inverse][y == 1].sum())
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def co_finding_auc(
    scores: Mapping[str, ScoresLike],
    labels: Mapping[str, ArrayLike],
    anatomy_of: Mapping[str, str],
) -> dict[str, float | None]:
    """Per finding, the AUC over only the cases whose anatomy holds *another* finding.

    Why: an anatomy-level model can score "this anatomy is abnormal" instead of the finding
    asked for. Where findings co-occur (most abnormal lungs carry several) such a score still
    earns a fair AUC over all cases — the healthy anatomies rank low — but near chance among the
    abnormal ones, which is where a worklist needs it. This is that second number: the cases
    where at least one other finding of the same anatomy (``anatomy_of``: finding → anatomy)
    is labelled 1. ``None`` where those cases lack a class; not-assessable cases drop out as in
    :func:`roc_auc`.
    """
    _check_keys(scores, labels)
    out: dict[str, float | None] = {}
    for name, keep in co_finding_cases(labels, anatomy_of).items():
        y = np.asarray(labels[name])
        s = np.asarray(scores[name], dtype=np.float64)  # None -> NaN: not assessable
        out[name] = roc_auc(s[keep], y[keep]) if keep.any() else None
    return out


def co_finding_cases(
    labels: Mapping[str, ArrayLike], anatomy_of: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """Per finding, bool per case: another finding of its anatomy is labelled 1 (the cases
    :func:`co_finding_auc` keeps)."""
    out: dict[str, np.ndarray] = {}
    for name in labels:
        if name not in anatomy_of:
            raise ValueError(f"anatomy_of: no anatomy for finding {name!r}")
        keep = np.zeros(np.shape(labels[name]), dtype=bool)
        for m in labels:
            if m != name and anatomy_of.get(m) == anatomy_of[name]:
                keep |= np.asarray(labels[m]) == 1
        out[name] = keep
    return out


def bootstrap_auc_ci(
    scores: ScoresLike,
    labels: ArrayLike,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Percentile bootstrap ``(low, high)`` confidence interval of the AUC at level 1 − ``alpha``.

    Resamples the assessable cases with replacement ``n`` times (``numpy.random.default_rng(seed)``:
    the same inputs and seed give the same interval); a resample that lacks one class has no
    AUC and is skipped. ``None`` when the AUC itself is undefined or every resample was skipped.
    Vectorised: each resample is a vector of case weights over the tie groups of the scores, so
    1000 resamples of 2,000 cases take a fraction of a second.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    s, y, _ = _clean(scores, labels)
    m = int(s.size)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == m:
        return None
    _, group = _groups(s)
    n_groups = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOTSTRAP_CHUNK // max(m, n_groups))
    aucs: list[np.ndarray] = []
    done = 0
    while done < n:
        b = min(per_chunk, n - done)
        idx = rng.integers(0, m, size=(b, m))
        key = (np.arange(b)[:, None] * n_groups + group[idx]).ravel()
        total = np.bincount(key, minlength=b * n_groups).reshape(b, n_groups)
        pos = np.bincount(key, weights=y[idx].ravel(), minlength=b * n_groups).reshape(b, n_groups)
        neg = total - pos
        neg_below = np.cumsum(neg, axis=1) - neg  # negatives scoring strictly lower
        num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        ok = den > 0
        aucs.append(num[ok] / den[ok])
        done += b
    values = np.concatenate(aucs)
    if values.size == 0:
        return None
    if values.size < n:
        log.debug(
            "bootstrap: %d of %d resamples lacked a class and were skipped", n - values.size, n
        )
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# -- thresholds -----------------------------------------------------------------------------


def calibrate_threshold(scores: ScoresLike, labels: ArrayLike) -> float:
    """The threshold of the ROC point closest to (0, 1): minimises (fpr)² + (1 − tpr)².

    Returns an observed score t such that the rule ``score >= t`` (the predictor's) reproduces
    that ROC point exactly. Distances are compared exactly (integer arithmetic), and of equally
    close points the **higher** threshold wins (fewer false positives for the same distance).
    Both classes must be present among the assessable cases, else :class:`ValueError`.
    """
    fpr, tpr, thresholds = roc_curve(scores, labels)
    s, y, _ = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    # fpr = fp / N, 1 - tpr = fn / P  →  d² · N² · P² = (fp · P)² + (fn · N)², exact in Python ints
    fp = np.rint(fpr[1:] * n_neg).astype(np.int64).tolist()
    fn = (n_pos - np.rint(tpr[1:] * n_pos).astype(np.int64)).tolist()
    best_i = 0
    best_d: int | None = None
    for i, (a, b) in enumerate(zip(fp, fn, strict=True)):  # thresholds[1:] descend
        d = (a * n_pos) ** 2 + (b * n_neg) ** 2
        if best_d is None or d < best_d:  # strict: the earlier (higher) threshold keeps a tie
            best_i, best_d = i, d
    return float(thresholds[1:][best_i])


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion counts and rates of the rule ``score >= threshold`` on the assessable cases.

    A rate whose denominator is zero is ``None`` (e.g. sensitivity without positive cases).
    ``f1_weighted`` is sklearn's ``f1_score(average="weighted")`` over the classes {0, 1}: the F1
    of each class weighted by its support (a class with an undefined F1 counts 0, sklearn's
    ``zero_division`` default).
    """

    threshold: float
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    f1_weighted: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "n": self.n,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "accuracy": self.accuracy,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "precision": self.precision,
            "f1_weighted": self.f1_weighted,
        }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def binary_metrics(scores: ScoresLike, labels: ArrayLike, threshold: float) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, precision, weighted F1 and counts at ``threshold``."""
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold must be a number, got NaN")
    s, y, _ = _clean(scores, labels)
    pred = s >= t
    truth = y == 1
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    tn = int((~pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    n = tp + fp + tn + fn
    n_pos, n_neg = tp + fn, tn + fp
    f1_pos = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if (2 * tn + fn + fp) else 0.0
    f1_weighted = (f1_pos * n_pos + f1_neg * n_neg) / n if n else None
    return BinaryMetrics(
        threshold=t,
        n=n,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_ratio(tp + tn, n),
        sensitivity=_ratio(tp, n_pos),
        specificity=_ratio(tn, n_neg),
        precision=_ratio(tp, tp + fp),
        f1_weighted=f1_weighted,
    )


def calibrate(
    scores: Mapping[str, ScoresLike], labels: Mapping[str, ArrayLike]
) -> dict[str, float]:
    """One :func:`calibrate_threshold` per finding — on the **validation** split, never on test.

    A finding whose assessable cases lack a class cannot be calibrated: it is left out (with a
    warning), so the predictor keeps that finding's documented default threshold.
    """
    _check_keys(scores, labels)
    out: dict[str, float] = {}
    for name in scores:
        s, y, _ = _clean_named(name, scores[name], labels[name])
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            log.warning(
                "calibrate: %s has %d positive and %d negative assessable cases; not calibrated",
                name,
                n_pos,
                int(y.size) - n_pos,
            )
            continue
        out[name] = calibrate_threshold(s, y)
    return out


def write_thresholds(
    path: str | Path,
    thresholds: Mapping[str, float],
    model_sha256: str,
    prompts: Mapping[str, tuple[str, str]] | None = None,
) -> Path:
    """Write ``{"model_sha256", "method", "thresholds"[, "prompts"]}`` atomically (temp file,
    fsync, rename).

    This is the format :func:`fvlm_pacs.model.predictor.load_thresholds` accepts; the sha256
    binds the thresholds to the weights they were calibrated for, ``prompts`` ({finding:
    (positive, negative)}, e.g. ``Predictor.prompt_pairs()``) to the prompt pairs whose scores
    they cut. Every threshold must be a finite number in [0, 1] (the predictor's scores are
    probabilities).
    """
    if not isinstance(model_sha256, str) or not model_sha256.strip():
        raise ValueError("model_sha256 must name the weights the thresholds were calibrated for")
    clean: dict[str, float] = {}
    for name, value in thresholds.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.floating, np.integer))
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(f"thresholds: {name} must be a number in [0, 1], got {value!r}")
        clean[str(name)] = float(value)
    payload = {
        "model_sha256": model_sha256,
        "method": CALIBRATION_METHOD,
        "thresholds": dict(sorted(clean.items())),
    }
    if prompts is not None:
        payload["prompts"] = {name: list(pair) for name, pair in sorted(prompts.items())}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2) + "\n"
    _atomic_write(target, text.encode("utf-8"))
    log.info("thresholds: %d written to %s", len(clean), target)
    return target


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- splits ---------------------------------------------------------------------------------


class Split(NamedTuple):
    """Case ids of each part, each sorted."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_cases(
    case_ids: Iterable[str],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Split:
    """A deterministic train/validation/test split of unique case ids.

    The result depends only on the *set* of ids and ``seed`` (not on their order): ids are
    sorted, permuted by ``numpy.random.default_rng(seed)`` and cut into parts whose sizes are
    ``fractions · n`` rounded by largest remainder. Use it once and keep the lists: calibrate
    thresholds on ``val``, report on ``test`` only, never calibrate on ``test``. Pass patient
    (or study) ids, not scan ids, when a patient has several scans, so one patient cannot
    sit in two parts. A duplicate id is a :class:`ValueError`.
    """
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        dup = next(c for c, k in Counter(ids).items() if k > 1)
        raise ValueError(f"case_ids must be unique, {dup!r} occurs more than once")
    f = [float(x) for x in fractions]
    if len(f) != 3 or any(not math.isfinite(x) or x < 0 for x in f) or abs(sum(f) - 1) > 1e-9:
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions!r}"
        )
    ordered = sorted(ids)
    n = len(ordered)
    exact = [x * n for x in f]
    sizes = [math.floor(e) for e in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in perm]
    a, b = sizes[0], sizes[0] + sizes[1]
    return Split(
        train=tuple(sorted(shuffled[:a])),
        val=tuple(sorted(shuffled[a:b])),
        test=tuple(sorted(shuffled[b:])),
    )


# -- predictor output → arrays ----------------------------------------------------------------


def scores_from_findings(cases: Sequence[Sequence[Finding]]) -> dict[str, np.ndarray]:
    """Per finding, one score per case (case order kept) from the predictor's findings.

    ``not_assessable`` (score None) and a finding missing from a case both become NaN, which
    every function here counts as not assessable.
    """
    names: dict[str, None] = {}
    for findings in cases:
        for f in findings:
            names.setdefault(f.finding, None)
    out = {name: np.full(len(cases), np.nan) for name in names}
    for i, findings in enumerate(cases):
        for f in findings:
            if f.score is not None and f.status != "not_assessable":
                out[f.finding][i] = f.score
    return out


# -- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingEval:
    """The evaluation of one finding.

    ``n``: assessable cases evaluated (``n_pos`` + ``n_neg``); ``n_not_assessable``: cases
    excluded for a non-finite score. ``threshold_source``: ``"given"`` (calibrated elsewhere, the
    honest case) or ``"optimistic"`` (calibrated on these same cases). ``metrics`` is None when no
    threshold could be had. ``co_finding_auc``: :func:`co_finding_auc` when the evaluation was
    told each finding's anatomy, else None.
    """

    finding: str
    n: int
    n_pos: int
    n_neg: int
    n_not_assessable: int
    auc: float | None
    auc_ci: tuple[float, float] | None
    threshold: float | None
    threshold_source: str | None
    metrics: BinaryMetrics | None
    roc: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    co_finding_auc: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "n": self.n,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "n_not_assessable": self.n_not_assessable,
            "auc": self.auc,
            "auc_ci": list(self.auc_ci) if self.auc_ci is not None else None,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "metrics": self.metrics.as_dict() if self.metrics is not None else None,
            "co_finding_auc": self.co_finding_auc,
        }


@dataclass(frozen=True)
class EvalReport:
    """Per-finding evaluations plus the mean AUC over the findings whose AUC is defined."""

    findings: tuple[FindingEval, ...]
    n_bootstrap: int
    alpha: float
    seed: int

    @property
    def mean_auc(self) -> float | None:
        aucs = [f.auc for f in self.findings if f.auc is not None]
        return float(np.mean(aucs)) if aucs else None

    @property
    def mean_co_finding_auc(self) -> float | None:
        """Mean of the defined :attr:`FindingEval.co_finding_auc` (None when none is)."""
        values = [f.co_finding_auc for f in self.findings if f.co_finding_auc is not None]
        return float(np.mean(values)) if values else None

    @property
    def optimistic(self) -> bool:
        """True when any threshold was calibrated on the evaluated data itself."""
        return any(f.threshold_source == "optimistic" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean_auc": self.mean_auc,
            "n_findings_with_auc": sum(f.auc is not None for f in self.findings),
            "mean_co_finding_auc": self.mean_co_finding_auc,
            "optimistic_thresholds": self.optimistic,
            "ci_level": 1.0 - self.alpha,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "findings": [f.as_dict() for f in self.findings],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON: ``mean_auc``, ``findings`` (a list of dicts) and settings."""
        return json.dumps(self.as_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A Markdown table, one row per finding, then the mean AUC."""
        level = f"{100 * (1 - self.alpha):g}"
        lines: list[str] = []
        if self.optimistic:
            lines += [
                "**Optimistic:** thresholds marked * were calibrated on the evaluated cases "
                "themselves; their sensitivity/specificity overstate performance.",
                "",
            ]
        co = self.mean_co_finding_auc is not None
        lines += [
            f"| finding | n | pos | not assessable | AUC ({level} % CI) | threshold "
            "| sensitivity | specificity | accuracy | F1 (weighted) |"
            + (" AUC, another finding present |" if co else ""),
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if co else ""),
        ]
        for f in self.findings:
            if f.auc is None:
                auc = "n/a"
            elif f.auc_ci is None:
                auc = f"{f.auc:.3f}"
            else:
                auc = f"{f.auc:.3f} ({f.auc_ci[0]:.3f}–{f.auc_ci[1]:.3f})"
            thr = "n/a" if f.threshold is None else f"{f.threshold:.4g}"
            if f.threshold_source == "optimistic":
                thr += "*"
            m = f.metrics
            cells = [
                f.finding,
                str(f.n),
                str(f.n_pos),
                str(f.n_not_assessable),
                auc,
                thr,
                _fmt(m.sensitivity if m else None),
                _fmt(m.specificity if m else None),
                _fmt(m.accuracy if m else None),
                _fmt(m.f1_weighted if m else None),
            ]
            if co:
                cells.append(_fmt(f.co_finding_auc))
            lines.append("| " + " | ".join(cells) + " |")
        mean = self.mean_auc
        with_auc = sum(f.auc is not None for f in self.findings)
        lines += [
            "",
            f"Mean AUC over {with_auc} finding(s) with a defined AUC: "
            + ("n/a" if mean is None else f"{mean:.3f}"),
        ]
        if co:
            lines += [
                "",
                "AUC, another finding present: over only the cases whose anatomy holds another "
                "finding — near 0.5 where a score says 'abnormal anatomy' rather than the "
                f"finding; mean {self.mean_co_finding_auc:.3f}.",
            ]
        return "\n".join(lines) + "\n"

    def save_roc_png(self, path: str | Path) -> Path:
        """Draw one ROC curve per finding (legend with AUCs, axes, chance line) as a PNG.

        Drawn with Pillow (no plotting library needed); written atomically.
        """
        return _draw_roc_png(Path(path), self.findings)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _check_keys(scores: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
    missing = [k for k in scores if k not in labels]
    if missing:
        raise ValueError(f"labels: no labels for finding(s) {', '.join(map(str, missing))}")
    extra = [k for k in labels if k not in scores]
    if extra:
        raise ValueError(f"scores: no scores for finding(s) {', '.join(map(str, extra))}")


def _clean_named(
    name: str, scores: ScoresLike, labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        return _clean(scores, labels)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def evaluate(
    scores: Mapping[str, ScoresLike],
    labels: Mapping[str, ArrayLike],
    thresholds: Mapping[str, float] | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    anatomy_of: Mapping[str, str] | None = None,
) -> EvalReport:
    """Evaluate every finding: counts, AUC with bootstrap CI, metrics at its threshold, and,
    given ``anatomy_of`` (finding → anatomy), :func:`co_finding_auc`.

    ``thresholds``: calibrated on *other* data (the validation split) — then every finding must
    have one (a missing one is a :class:`ValueError`). ``None``: each threshold is calibrated on
    these same cases and marked ``optimistic`` in every output. Findings keep the order of
    ``scores``; the same ``seed`` gives the same intervals.
    """
    _check_keys(scores, labels)
    if thresholds is not None:
        missing = [k for k in scores if k not in thresholds]
        if missing:
            raise ValueError(
                f"thresholds: none for finding(s) {', '.join(missing)} "
                "(pass thresholds=None for optimistic, self-calibrated ones)"
            )
    co = co_finding_auc(scores, labels, anatomy_of) if anatomy_of is not None else {}
    results: list[FindingEval] = []
    for name in scores:
        s, y, n_na = _clean_named(name, scores[name], labels[name])
        n_pos = int(y.sum())
        n_neg = int(y.size) - n_pos
        both = n_pos > 0 and n_neg > 0
        auc = roc_auc(s, y) if both else None
        ci = bootstrap_auc_ci(s, y, n=n_bootstrap, seed=seed, alpha=alpha) if both else None
        roc: tuple[np.ndarray, np.ndarray] | None = None
        if both:
            fpr, tpr, _ = roc_curve(s, y)
            roc = (fpr, tpr)
        threshold: float | None
        source: str | None
        if thresholds is not None:
            threshold, source = float(thresholds[name]), "given"
        elif both:
            threshold, source = calibrate_threshold(s, y), "optimistic"
        else:
            threshold, source = None, None
        metrics = binary_metrics(s, y, threshold) if threshold is not None and y.size else None
        results.append(
            FindingEval(
                finding=name,
                n=int(y.size),
                n_pos=n_pos,
                n_neg=n_neg,
                n_not_assessable=n_na,
                auc=auc,
                auc_ci=ci,
                threshold=threshold,
                threshold_source=source,
                metrics=metrics,
                roc=roc,
                co_finding_auc=co.get(name),
            )
        )
    return EvalReport(findings=tuple(results), n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)


# -- ROC picture ----------------------------------------------------------------------------

_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def _color(i: int, name: str) -> tuple[int, int, int]:
    if i < len(_PALETTE):
        return _PALETTE[i]
    h = hashlib.sha256(name.encode("utf-8")).digest()
    return (h[0] // 2 + 40, h[1] // 2 + 40, h[2] // 2 + 40)


def _draw_roc_png(path: Path, findings: Sequence[FindingEval]) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    left, top, size = 70, 40, 520
    legend_x = left + size + 30
    row = 18
    width = legend_x + 330
    height = max(top + size + 60, top + 20 + row * (len(findings) + 1))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return left + fx * size, top + (1.0 - fy) * size

    draw.text((left, 12), "ROC per finding", fill="black", font=font)
    # grid, ticks and tick labels
    for k in range(6):
        v = k / 5
        gx, _ = xy(v, 0)
        _, gy = xy(0, v)
        draw.line([(gx, top), (gx, top + size)], fill=(230, 230, 230))
        draw.line([(left, gy), (left + size, gy)], fill=(230, 230, 230))
        draw.line([(gx, top + size), (gx, top + size + 5)], fill="black")
        draw.line([(left - 5, gy), (left, gy)], fill="black")
        draw.text((gx, top + size + 8), f"{v:.1f}", fill="black", font=small, anchor="mt")
        draw.text((left - 8, gy), f"{v:.1f}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, left + size, top + size], outline="black")
    # chance line, dashed
    steps = 40
    for k in range(0, steps, 2):
        draw.line([xy(k / steps, k / steps), xy((k + 1) / steps, (k + 1) / steps)], fill="gray")
    # axis titles
    draw.text(
        (left + size / 2, top + size + 28),
        "False positive rate",
        fill="black",
        font=font,
        anchor="mt",
    )
    label = Image.new("RGB", (200, 18), "white")
    ImageDraw.Draw(label).text((100, 9), "True positive rate", fill="black", font=font, anchor="mm")
    rotated = label.rotate(90, expand=True)
    img.paste(rotated, (8, int(top + size / 2 - rotated.height / 2)))
    # curves and legend
    draw.text((legend_x, top), "finding (AUC)", fill="black", font=font)
    for i, f in enumerate(findings):
        color = _color(i, f.finding)
        if f.roc is not None:
            fpr, tpr = f.roc
            pts = [xy(float(a), float(b)) for a, b in zip(fpr, tpr, strict=True)]
            if len(pts) >= 2:
                draw.line(pts, fill=color, width=2)
        y = top + row * (i + 1) + 4
        draw.line([(legend_x, y + 7), (legend_x + 22, y + 7)], fill=color, width=3)
        auc = "n/a" if f.auc is None else f"{f.auc:.3f}"
        draw.text((legend_x + 28, y), f"{f.finding} ({auc})", fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
