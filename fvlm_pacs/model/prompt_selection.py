"""Per-finding prompts: the candidate pair that ranks a finding's cases the right way round.

Why: zero-shot scoring asks whether an anatomy embedding lies nearer the positive prompt
("Emphysema.") or the negative one, and a model trained from scratch places the negative only
where its training texts taught it to. The release's "Not Emphysema." is a phrase our text
tower never read; the anatomy's normal template ("Lung shows no significant abnormalities.") is
the text of every normal anatomy it was trained on, but an abnormal anatomy's text may lie nearer
it than the positive prompt does (a lung report about emphysema, scored for pleural effusion).
Which of the two works differs per finding and per training run — on a stem demo model trained on
672 phantoms, "Not X." left three findings inverted on 200 held-out phantoms (septal thickening
0.024, pericardial effusion 0.001), the template three others (pleural effusion 0.297).

Two ways to choose, per finding, between :func:`candidate_negatives` (a tie, or too few cases
with or without the finding, keeps the table's):

* **On labelled images** (:func:`select_on_images`, :func:`select_negatives_on_images`): the
  zero-shot AUC of each candidate on the validation part — the cases calibration scores, never
  the test part. Measures what serving will do.
* **On the training reports** (:func:`select_negatives`): each training case's anatomy text, as
  the trainer gave it to the text tower, is encoded once; ``cos(text, positive) − cos(text,
  negative)`` is its margin, and the AUC of the margins against the label is what an image
  embedding equal to its own report would score. Training texts and labels only, no image. A
  ceiling, not a measurement: it predicts the images only as far as they lie near their
  reports. On the 672-phantom model it chose right everywhere (0.694 against 0.521 with
  "Not X." and 0.640 with the template); on two stem models trained on 168 phantoms, whose images
  had learned little, it chose the template for emphysema and hiatal hernia and the held-out
  mean fell 0.639 → 0.583 and 0.615 → 0.579; on the shipped run it kept hiatal hernia inverted
  (``bench/README.md``).

**Positive prompts in the reports' own words** (:func:`candidate_positives`, on images only):
besides the table's "Cardiomegaly.", the sentences of the training reports that say the finding
— those at least :data:`MIN_CASES` training cases with the finding use for the anatomy, and that
at least :data:`MIN_PRECISION` of the cases using them have — ranked by how many cases use them,
up to :data:`POSITIVE_CANDIDATES`. A model trained on its reports places a finding where they
say it, and a report says "Cardiac enlargement is noted." more often than the table's word. The
choice is greedy: the negative first, with the table's positive (as before positives were
candidates), then the positive with that negative, both on the validation images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codes import FindingDefinition, load_findings
from ..evaluation import roc_auc
from ..phantoms import FINDINGS
from ..reports import normal_text, split_sentences
from .checkpoint import read_meta
from .config import ModelConfig
from .dataset import ManifestDataset
from .fvlm import FvlmModel
from .model_prompts import PROMPTS_FILE, write_model_prompts
from .predictor import Predictor, anatomy_table_for
from .train import TrainConfig
from .zeroshot_eval import LabelledScores, score_cases_shared

log = logging.getLogger(__name__)

MIN_CASES = 10
"""Training cases needed on each side of a finding's label before its prompts are chosen."""
MIN_IMAGE_CASES = 5
"""The same for labelled images: a wrong polarity shows as an AUC far below 0.5 on a few cases
(a 144-case validation part holds 8 pericardial effusions)."""

POSITIVE_CANDIDATES = 3
"""Report sentences tried as a finding's positive prompt besides the table's."""
MIN_PRECISION = 0.9
"""Share of the training cases using a sentence (for the finding's anatomy) that must have the
finding before the sentence is a candidate positive: "Coronary artery calcification." in a heart
whose cardiomegaly it accompanies names another finding."""

TextEncoder = Callable[[list[str]], torch.Tensor]
"""``texts -> [N, E]`` L2-normalised embeddings, e.g. ``FvlmModel.encode_text``."""


@dataclass(frozen=True)
class TrainingTexts:
    """Each training case's anatomy texts (the trainer's) and its finding labels.

    ``texts[i][k]`` is case i's text for ``anatomies[k]``; ``labels[i, j]`` the case's label for
    ``FINDINGS[j]`` (1, 0, or −1 = not given).
    """

    anatomies: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]
    labels: np.ndarray


def training_texts(dataset: ManifestDataset, rows: Sequence[int] | None = None) -> TrainingTexts:
    """The anatomy texts and labels of ``rows`` (default: every case) as the trainer reads them
    (the dataset's decomposer and ``normal_wording``); no volume is loaded."""
    picked = list(range(len(dataset)) if rows is None else rows)
    labels = np.array([dataset.records[i].findings for i in picked], dtype=np.int64)
    return TrainingTexts(
        anatomies=dataset.anatomies,
        texts=tuple(dataset.texts(i).texts for i in picked),
        labels=labels.reshape(len(picked), len(FINDINGS)),
    )


@dataclass(frozen=True)
class PromptChoice:
    """The prompts chosen for one finding: the negative, with the AUC of every candidate
    negative (paired with the table's positive), and — on images — the positive, with the AUC
    of every candidate positive (paired with the chosen negative)."""

    finding: str
    positive: str
    table_negative: str
    candidates: tuple[tuple[str, float | None], ...]
    chosen: str
    with_finding: int
    without_finding: int
    positives: tuple[tuple[str, float | None], ...] = ()
    chosen_positive: str = ""

    @property
    def scored_positive(self) -> str:
        """The positive prompt the model is scored with (the table's unless one was chosen)."""
        return self.chosen_positive or self.positive

    @property
    def changed(self) -> bool:
        """Whether the model's wording differs from the findings table's."""
        return self.chosen != self.table_negative or self.scored_positive != self.positive

    def overrides(self) -> dict[str, str]:
        """What ``prompts.yaml`` must say for this finding (empty: the table's pair)."""
        out = {}
        if self.scored_positive != self.positive:
            out["positive"] = self.scored_positive
        if self.chosen != self.table_negative:
            out["negative"] = self.chosen
        return out


def candidate_negatives(definition: FindingDefinition) -> tuple[str, ...]:
    """The table's negative prompt, then the anatomy's normal template (first wins a tie)."""
    out = [definition.negative]
    template = normal_text(definition.anatomy)
    if template.casefold() != definition.negative.casefold():
        out.append(template)
    return tuple(out)


@torch.inference_mode()
def encode_case_texts(encode: TextEncoder, data: TrainingTexts) -> torch.Tensor:
    """[N, K, E] embeddings of every case's anatomy texts; each distinct text encoded once
    (most normal anatomies share one template)."""
    distinct = list(dict.fromkeys(t for case in data.texts for t in case))
    rows = {t: i for i, t in enumerate(distinct)}
    table = torch.cat([encode(distinct[s : s + 256]) for s in range(0, len(distinct), 256)])
    index = torch.tensor([[rows[t] for t in case] for case in data.texts])
    return table[index]


@torch.inference_mode()
def text_side_auc(
    encode: TextEncoder,
    embedded: torch.Tensor,
    data: TrainingTexts,
    definition: FindingDefinition,
    negatives: Sequence[str],
) -> list[float | None]:
    """AUC of each negative in ``negatives`` paired with ``definition.positive``, over the cases
    labelled for the finding (None: the finding's label is unknown or one class is missing)."""
    if definition.name not in FINDINGS or definition.anatomy not in data.anatomies:
        return [None] * len(negatives)
    y = data.labels[:, FINDINGS.index(definition.name)]
    known = y >= 0
    anatomy = embedded[:, data.anatomies.index(definition.anatomy)]  # [N, E]
    prompts = encode([definition.positive, *negatives])
    margins = ((anatomy @ prompts[0])[:, None] - anatomy @ prompts[1:].T).numpy()  # [N, C]
    return [roc_auc(margins[known, c], y[known]) for c in range(len(negatives))]


def select_negatives(
    encode: TextEncoder,
    data: TrainingTexts,
    findings: Sequence[FindingDefinition],
    *,
    min_cases: int = MIN_CASES,
) -> tuple[PromptChoice, ...]:
    """Per finding, the candidate negative (:func:`candidate_negatives`) whose pair orders the
    training texts best; see the module docstring for the rule."""
    if not data.texts:
        raise ValueError("no training texts to choose prompts on")
    embedded = encode_case_texts(encode, data)
    out = []
    for d in findings:
        negatives = candidate_negatives(d)
        aucs = text_side_auc(encode, embedded, data, d, negatives)
        labels = data.labels[:, FINDINGS.index(d.name)] if d.name in FINDINGS else np.zeros(0, int)
        out.append(choose(d, negatives, aucs, labels, min_cases))
    log.info(
        "negative prompts chosen on %d training cases: %d of %d finding(s) differ from the table",
        len(data.texts),
        sum(c.changed for c in out),
        len(out),
    )
    return tuple(out)


def select_negatives_on_images(
    findings: Sequence[FindingDefinition],
    scores: Sequence[Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    *,
    min_cases: int = MIN_IMAGE_CASES,
) -> tuple[PromptChoice, ...]:
    """Per finding, the candidate negative whose zero-shot scores rank labelled images best.

    ``scores[c][finding]`` are the scores of the images (e.g. the validation part, which
    calibration scores anyway; never the test part) with the ``c``-th candidate of
    :func:`candidate_negatives` as the finding's negative prompt, NaN where not assessable;
    ``labels[finding]`` their 0/1 labels. Why images: the text side is only a ceiling, and where
    a model's image embeddings lie far from their reports it chooses wrong (module docstring).
    Measured on 200 independent phantoms through the demo build: 0.686 where the text side gave
    0.655 (the shipped recipe's seed-1 run; per-finding best 0.696).
    """
    out = []
    for d in findings:
        negatives = candidate_negatives(d)
        y = np.asarray(labels.get(d.name, np.zeros(0)), dtype=np.int64)
        aucs = [roc_auc(scores[c][d.name], y) if y.size else None for c in range(len(negatives))]
        out.append(choose(d, negatives, aucs, y, min_cases))
    log.info(
        "negative prompts chosen on %d labelled images: %d of %d finding(s) differ from the table",
        max((len(v) for v in labels.values()), default=0),
        sum(c.changed for c in out),
        len(out),
    )
    return tuple(out)


def choose(
    definition: FindingDefinition,
    negatives: Sequence[str],
    aucs: Sequence[float | None],
    labels: np.ndarray,
    min_cases: int,
) -> PromptChoice:
    """The negative of :func:`best_candidate` (``negatives[0]`` is the table's)."""
    return PromptChoice(
        finding=definition.name,
        positive=definition.positive,
        table_negative=definition.negative,
        candidates=tuple(zip(negatives, aucs, strict=True)),
        chosen=best_candidate(negatives, aucs, labels, min_cases),
        with_finding=int((labels == 1).sum()),
        without_finding=int((labels == 0).sum()),
    )


def best_candidate(
    texts: Sequence[str], aucs: Sequence[float | None], labels: np.ndarray, min_cases: int
) -> str:
    """The text with the highest AUC; the first (the table's) on a tie, when no AUC is
    defined, or when fewer than ``min_cases`` cases carry (or lack) the finding."""
    chosen = texts[0]
    if min(int((labels == 1).sum()), int((labels == 0).sum())) >= min_cases:
        best = None
        for text, auc in zip(texts, aucs, strict=True):
            if auc is not None and (best is None or auc > best):
                chosen, best = text, auc
    return chosen


def write_choices(path: Path, choices: Sequence[PromptChoice]) -> Path | None:
    """The model's ``prompts.yaml`` with the findings whose chosen prompts are not the table's;
    an existing file is removed when none differs (the table's prompts then apply)."""
    changed = {c.finding: c.overrides() for c in choices if c.changed}
    if not changed:
        path.unlink(missing_ok=True)
        return None
    return write_model_prompts(path, changed)


def choices_table(choices: Sequence[PromptChoice]) -> str:
    """Markdown: per finding, the AUC (text side or images, as chosen) of the table's negative
    and of the template, and which one the model is scored with; where positives were
    candidates too, the positive scored with and its AUC beside the table's positive's."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    with_positives = any(c.positives for c in choices)
    head = "| finding | cases with / without | table's negative | normal template | scored with |"
    rule = "|---|---|---|---|---|"
    if with_positives:
        head += " positive scored with | its AUC | table's positive |"
        rule += "---|---:|---:|"
    lines = [head, rule]
    for c in choices:
        aucs = dict(c.candidates)
        template = next((t for t in aucs if t != c.table_negative), None)
        line = (
            f"| {c.finding} | {c.with_finding} / {c.without_finding} "
            f"| {fmt(aucs[c.table_negative])} "
            f"| {fmt(aucs[template]) if template is not None else 'n/a'} "
            f"| {'normal template' if c.chosen != c.table_negative else 'table'} |"
        )
        if with_positives:
            positives = dict(c.positives)
            line += (
                f" {c.scored_positive} | {fmt(positives.get(c.scored_positive))} "
                f"| {fmt(positives.get(c.positive))} |"
            )
        lines.append(line)
    return "\n".join(lines)


def candidate_positives(
    definition: FindingDefinition,
    data: TrainingTexts,
    *,
    limit: int = POSITIVE_CANDIDATES,
    min_cases: int = MIN_CASES,
    min_precision: float = MIN_PRECISION,
) -> tuple[str, ...]:
    """The table's positive prompt, then up to ``limit`` sentences of the training texts that
    say the finding (module docstring: how many cases with the finding use each, and how few
    without), most used first; a sentence equal to the table's (ignoring case) is not repeated."""
    out = [definition.positive]
    if definition.name not in FINDINGS or definition.anatomy not in data.anatomies:
        return tuple(out)
    k = data.anatomies.index(definition.anatomy)
    y = data.labels[:, FINDINGS.index(definition.name)]
    with_finding: dict[str, int] = {}
    labelled: dict[str, int] = {}
    for texts, label in zip(data.texts, y, strict=True):
        if label < 0:
            continue
        for sentence in set(split_sentences(texts[k])):
            labelled[sentence] = labelled.get(sentence, 0) + 1
            with_finding[sentence] = with_finding.get(sentence, 0) + int(label == 1)
    ranked = sorted(
        (t for t, n in with_finding.items() if n >= min_cases and n >= min_precision * labelled[t]),
        key=lambda t: (-with_finding[t], t),
    )
    seen = {
        t.casefold()
        for t in (definition.positive, definition.negative, normal_text(definition.anatomy))
    }
    for text in ranked:
        if len(out) > limit:
            break
        if text.casefold() not in seen:
            seen.add(text.casefold())
            out.append(text)
    return tuple(out)


def select_on_images(
    model_dir: Path,
    root: Path,
    cases: tuple[str, ...],
    device: str = "cpu",
    positives: Mapping[str, Sequence[str]] | None = None,
) -> tuple[tuple[PromptChoice, ...], LabelledScores]:
    """Score ``cases`` (labelled phantoms of the synthetic layout, e.g. the validation part)
    through the model folder's :class:`~fvlm_pacs.model.Predictor` with each candidate pair
    (each image encoded once, :func:`score_cases_shared`), keep per finding the best negative
    (:func:`select_negatives_on_images`, with the table's positive), then — where
    ``positives`` gives a finding's candidates (:func:`candidate_positives`, the table's first)
    — the best positive with that negative, in its ``prompts.yaml``, and return the choices with
    the scores of the chosen prompts — what calibration on the same cases needs (a finding's
    score depends on its own pair only, so no further pass)."""
    table = model_findings(model_dir)
    negatives = [candidate_negatives(d) for d in table]
    given = positives or {}
    pos = [tuple(given.get(d.name, ())) or (d.positive,) for d in table]
    for d, p in zip(table, pos, strict=True):
        if p[0] != d.positive:
            raise ValueError(f"positives: {d.name}'s candidates must start with the table's")
    grid = [(i, j) for i in range(max(map(len, pos))) for j in range(2)]
    variants = [
        tuple(
            dataclasses.replace(d, positive=p[min(i, len(p) - 1)], negative=n[min(j, len(n) - 1)])
            for d, p, n in zip(table, pos, negatives, strict=True)
        )
        for i, j in grid
    ]
    (model_dir / PROMPTS_FILE).unlink(missing_ok=True)  # score the candidates, not an old choice
    scored = score_cases_shared(
        [Predictor(model_dir, device=device, findings=v) for v in variants], root, cases
    )
    by_pair = dict(zip(grid, scored, strict=True))
    labels = scored[0].labels
    choices = list(
        select_negatives_on_images(table, [by_pair[(0, j)].scores for j in range(2)], labels)
    )
    picked = {}
    for k, (d, p, n) in enumerate(zip(table, pos, negatives, strict=True)):
        j = n.index(choices[k].chosen)
        if len(p) > 1:
            y = np.asarray(labels.get(d.name, np.zeros(0)), dtype=np.int64)
            aucs = [
                roc_auc(by_pair[(i, j)].scores[d.name], y) if y.size else None
                for i in range(len(p))
            ]
            choices[k] = dataclasses.replace(
                choices[k],
                positives=tuple(zip(p, aucs, strict=True)),
                chosen_positive=best_candidate(p, aucs, y, MIN_IMAGE_CASES),
            )
        i = p.index(choices[k].scored_positive)
        picked[d.name] = by_pair[(i, j)].scores[d.name]
    write_choices(model_dir / PROMPTS_FILE, choices)
    if given:
        log.info(
            "positive prompts chosen on %d labelled images: %d finding(s) use a report sentence",
            len(cases),
            sum(c.scored_positive != c.positive for c in choices),
        )
    return tuple(choices), LabelledScores(cases, picked, labels)


def positives_from_training_reports(
    model_dir: Path, training: TrainConfig
) -> dict[str, tuple[str, ...]]:
    """:func:`candidate_positives` of every finding of the model in ``model_dir`` on the reports
    of ``training``, read as the trainer read them (whole texts, its decomposer)."""
    dataset = training.dataset(train=False)
    dataset.anatomies = ModelConfig.from_dict(read_meta(model_dir)["model"]).anatomies
    data = training_texts(dataset)
    return {d.name: candidate_positives(d, data) for d in model_findings(model_dir)}


def select_on_training_reports(model_dir: Path, training: TrainConfig) -> tuple[PromptChoice, ...]:
    """:func:`select_negatives` on the reports of ``training``, the run that made ``model_dir``,
    read as the trainer read them (its manifest, layout and ``normal_wording``)."""
    model = FvlmModel.from_checkpoint(model_dir, device="cpu").eval()
    dataset = training.dataset(train=False)
    dataset.anatomies = model.anatomies
    return select_negatives(model.encode_text, training_texts(dataset), model_findings(model_dir))


def model_findings(model_dir: Path) -> tuple[FindingDefinition, ...]:
    """The findings table for the anatomies of the model in ``model_dir``, with the table's
    prompts (the candidates start from them, whatever ``prompts.yaml`` says now)."""
    anatomies = ModelConfig.from_dict(read_meta(model_dir)["model"]).anatomies
    return tuple(load_findings(anatomy_table_for(anatomies)))
