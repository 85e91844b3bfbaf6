"""``run_study``: the only place that knows the order of the stages.

Stages: series selection and volume assembly → (when a model is configured) anatomy
segmentation → fVLM zero-shot prediction. Triage, SR/SEG writing and export are added here, after
prediction, as they land. :func:`run_stages` works on a list of files, so ``fvlm-pacs run`` and
the job worker share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.codes import SeriesRules
from fvlm_pacs.db import Instance
from fvlm_pacs.errors import NoUsableSeries
from fvlm_pacs.ingest.spool import Spool
from fvlm_pacs.jobs.queue import ClaimedJob
from fvlm_pacs.model.predictor import Predictor
from fvlm_pacs.segmentation import SegmentationProvider
from fvlm_pacs.studies.assembly import assemble_study

log = logging.getLogger(__name__)

STAGES_VERSION = "1"
"""Bumped whenever a stage changes what a job produces."""


@dataclass(frozen=True)
class Stages:
    """The stage implementations of one process, built once (the model is loaded here)."""

    series_rules: SeriesRules
    segmenter: SegmentationProvider | None = None
    predictor: Predictor | None = None

    @property
    def version(self) -> str:
        """Part of the job key: a new model version gives every study a new job."""
        if self.predictor is None:
            return STAGES_VERSION
        info = self.predictor.info
        return f"{STAGES_VERSION}+{info.name}-{info.version}"[:64]


@dataclass(frozen=True)
class PipelineContext:
    """What the worker needs: where the study's files are, and the stages."""

    sessions: sessionmaker[Session]
    spool: Spool
    stages: Stages


def run_stages(stages: Stages, paths: Sequence[Path]) -> dict[str, Any]:
    """Run every configured stage on the files of one study; returns the JSON result."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    choice, volume, warnings = assemble_study(paths, stages.series_rules)
    timings["assembly_s"] = round(time.perf_counter() - started, 3)
    result: dict[str, Any] = {
        "pipeline_version": stages.version,
        "assembly": {
            "series_choice": choice.as_dict(),
            "volume": volume.describe(),
            "warnings": warnings,
        },
        "timings": timings,
    }
    if stages.predictor is None or stages.segmenter is None:
        return result
    started = time.perf_counter()
    labelmap = stages.segmenter.segment(volume, paths)
    timings["segmentation_s"] = round(time.perf_counter() - started, 3)
    prediction = stages.predictor.run(volume, labelmap)
    timings.update({f"{k}_s": round(v, 3) for k, v in prediction.timings.items() if k != "total"})
    info = stages.predictor.info
    result["segmentation"] = {"source": labelmap.source, "anatomies": list(labelmap.anatomies)}
    result["model"] = {"name": info.name, "version": info.version, "sha256": info.sha256}
    result["findings"] = prediction.as_dict()["findings"]
    result["not_assessable"] = dict(prediction.not_assessable)
    return result


def run_study(ctx: PipelineContext, job: ClaimedJob) -> dict[str, Any]:
    """Run the stages on one study revision as stored in the spool."""
    with ctx.sessions() as session:
        rel_paths = list(
            session.scalars(
                select(Instance.path).where(Instance.study_instance_uid == job.study_instance_uid)
            )
        )
    if not rel_paths:
        raise NoUsableSeries("the study has no stored instances")
    result = run_stages(ctx.stages, [ctx.spool.absolute(p) for p in rel_paths])
    result["study_revision"] = job.study_revision
    log.info(
        "job %d: study revision %d done (%d findings)",
        job.id,
        job.study_revision,
        len(result.get("findings", [])),
    )
    return result
