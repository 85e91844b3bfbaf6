"""Zero-shot scores of a labelled dataset, for ``fvlm-pacs eval`` and ``fvlm-pacs calibrate``.

Reads our synthetic layout (``manifest.csv`` + ``case_*/case.npz`` with HU, anatomy labels and
the LPS affine, ``labels.json`` with per-finding 0/1) — the same label maps the model would get
from segmentation, so evaluation measures the model, not a segmenter. Which cases are used is
decided by :func:`fvlm_pacs.evaluation.split_cases`: ``calibrate`` reads the validation part,
``eval`` the test part, never the other way round.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np

from fvlm_pacs.domain import Finding, LabelMap, Volume
from fvlm_pacs.evaluation import Split, scores_from_findings, split_cases
from fvlm_pacs.model.predictor import Predictor
from fvlm_pacs.segmentation.base import SegmentationProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledScores:
    """Per-finding score and label arrays over the same cases (NaN score = not assessable)."""

    case_ids: tuple[str, ...]
    scores: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def dataset_split(manifest: Path, seed: int = 0) -> Split:
    """The train/validation/test split of a manifest's cases (deterministic per seed)."""
    with manifest.open(newline="", encoding="utf-8") as fh:
        ids = [row["case_id"] for row in csv.DictReader(fh)]
    return split_cases(ids, seed=seed)


def part_manifest(manifest: Path, ids: tuple[str, ...], name: str) -> Path:
    """``manifest_<name>.csv`` beside ``manifest``, same columns, only the ``ids`` rows.

    The trainer reads a whole manifest, so training on the train part of a split needs its own
    file; written in the same folder so the relative case paths stay valid.
    """
    keep = set(ids)
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r["case_id"] in keep]
    path = manifest.with_name(f"manifest_{name}.csv")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def load_case(folder: Path, anatomies: tuple[str, ...]) -> tuple[Volume, LabelMap, dict[str, int]]:
    """One case of the synthetic layout as the predictor's inputs plus its finding labels."""
    with np.load(folder / "case.npz") as data:
        hu = data["hu"].astype(np.float32)
        labels = data["labels"]
        affine = data["affine"]
    volume = Volume(
        voxels=hd.Volume(hu, affine, "PATIENT"),
        study_instance_uid="",
        series_instance_uid=folder.name,
        source_instances=(),
        sop_class_uid="",
    )
    meta = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return (
        volume,
        LabelMap(array=labels, anatomies=anatomies, source="dataset"),
        {k: int(v) for k, v in meta["findings"].items()},
    )


def score_cases(
    predictor: Predictor,
    root: Path,
    case_ids: tuple[str, ...],
    segmentation: SegmentationProvider | None = None,
) -> LabelledScores:
    """Run the predictor on each case; collect scores and ground-truth labels per finding.

    The label maps are the phantoms' exact ones, unless ``segmentation`` is given: then each
    volume is segmented by it, as a study is when served — what the model scores then depends
    on the segmenter too (the anatomy HU histograms most: a mask that strays into bone adds
    bone to them)."""
    return score_cases_shared((predictor,), root, case_ids, segmentation)[0]


def score_cases_shared(
    predictors: Sequence[Predictor],
    root: Path,
    case_ids: tuple[str, ...],
    segmentation: SegmentationProvider | None = None,
) -> tuple[LabelledScores, ...]:
    """:func:`score_cases` for several predictors of the same weights (e.g. candidate prompt
    tables), one per result: each case is encoded once, by the first, and scored by all —
    the encoder is nearly all of the time, so N tables cost about one pass, not N."""
    if not predictors:
        raise ValueError("score_cases_shared: no predictor")
    first = predictors[0]
    findings: list[list[list[Finding]]] = [[] for _ in predictors]
    truth: list[dict[str, list[int]]] = [{f.name: [] for f in p.findings} for p in predictors]
    for i, cid in enumerate(case_ids, start=1):
        volume, labelmap, labels = load_case(root / cid, first.anatomies)
        if segmentation is not None:
            labelmap = segmentation.segment(volume, ())
        encoded = first.encode(volume, labelmap)
        for p, out, names in zip(predictors, findings, truth, strict=True):
            out.append(list(p.score(encoded).findings))
            for name in names:
                names[name].append(labels.get(name, 0))
        log.info("scored %s (%d/%d)", cid, i, len(case_ids))
    results = []
    for out, names in zip(findings, truth, strict=True):
        scores = scores_from_findings(out)
        results.append(
            LabelledScores(
                case_ids=case_ids,
                scores={n: scores.get(n, np.full(len(case_ids), np.nan)) for n in names},
                labels={n: np.asarray(v, dtype=np.int8) for n, v in names.items()},
            )
        )
    return tuple(results)
