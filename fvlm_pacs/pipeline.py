"""``run_study``: the only place that knows the order of the stages.

Stage 1 (now): series selection and volume assembly. Segmentation, fVLM prediction, triage,
SR/SEG writing and export are added here, after assembly, as they land.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.codes import SeriesRules
from fvlm_pacs.db import Instance
from fvlm_pacs.errors import NoUsableSeries
from fvlm_pacs.ingest.spool import Spool
from fvlm_pacs.jobs.queue import ClaimedJob
from fvlm_pacs.studies.assembly import assemble_study

log = logging.getLogger(__name__)

PIPELINE_VERSION = "1"
"""Bumped whenever a stage changes what a job produces; part of the job's unique key."""


@dataclass(frozen=True)
class PipelineContext:
    """What the stages need, built once per process."""

    sessions: sessionmaker[Session]
    spool: Spool
    series_rules: SeriesRules


def run_study(ctx: PipelineContext, job: ClaimedJob) -> dict[str, Any]:
    """Run every stage on one study revision; returns the JSON result stored with the job."""
    timings: dict[str, float] = {}
    with ctx.sessions() as session:
        rel_paths = list(
            session.scalars(
                select(Instance.path).where(Instance.study_instance_uid == job.study_instance_uid)
            )
        )
    if not rel_paths:
        raise NoUsableSeries("the study has no stored instances")
    started = time.perf_counter()
    choice, volume, warnings = assemble_study(
        [ctx.spool.absolute(p) for p in rel_paths], ctx.series_rules
    )
    timings["assembly_s"] = round(time.perf_counter() - started, 3)
    log.info(
        "job %d: assembled series %s into %s",
        job.id,
        volume.series_instance_uid,
        volume.array.shape,
    )
    return {
        "pipeline_version": PIPELINE_VERSION,
        "study_revision": job.study_revision,
        "assembly": {
            "series_choice": choice.as_dict(),
            "volume": volume.describe(),
            "warnings": warnings,
        },
        "timings": timings,
    }
