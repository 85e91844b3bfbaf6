"""``run_study``: the only place that knows the order of the stages.

Stages: series selection and volume assembly → (when a model is configured) anatomy
segmentation → fVLM zero-shot prediction → triage (priority + flags, :mod:`fvlm_pacs.triage`)
→ DICOM outputs (SEG, TID 1500 SR, summary image; see :mod:`fvlm_pacs.writers`), validated
before they are listed in the result. Export reads the result's ``outputs``. :func:`run_stages` works on a list of files, so ``fvlm-pacs run`` and the
job worker share it.
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

from fvlm_pacs.codes import AnatomyTable, SeriesRules
from fvlm_pacs.db import Instance, Result
from fvlm_pacs.domain import InstanceRef
from fvlm_pacs.errors import InvalidInstance, NoUsableSeries, OutputError
from fvlm_pacs.ingest.spool import Spool, validate_uid
from fvlm_pacs.jobs.queue import ClaimedJob
from fvlm_pacs.model.predictor import Predictor, anatomy_table_for
from fvlm_pacs.segmentation import SegmentationProvider
from fvlm_pacs.studies.assembly import assemble_study
from fvlm_pacs.triage import TriageRules, assess, load_triage_rules
from fvlm_pacs.writers import write_outputs

log = logging.getLogger(__name__)

STAGES_VERSION = "2"
"""Bumped whenever a stage changes what a job produces."""


@dataclass(frozen=True)
class Stages:
    """The stage implementations of one process, built once (the model is loaded here)."""

    series_rules: SeriesRules
    segmenter: SegmentationProvider | None = None
    predictor: Predictor | None = None
    anatomy_table: AnatomyTable | None = None
    """The predictor's anatomy profile (codes for SEG/SR); looked up from the model if None."""
    triage_rules: TriageRules | None = None
    """``mappings/triage.yaml``; None loads the shipped table."""

    def __post_init__(self) -> None:
        # Resolve the defaults once here, not per study: each is a YAML file read and validated.
        if self.predictor is not None and self.anatomy_table is None:
            object.__setattr__(self, "anatomy_table", anatomy_table_for(self.predictor.anatomies))
        if self.predictor is not None and self.triage_rules is None:
            object.__setattr__(self, "triage_rules", load_triage_rules())

    @property
    def version(self) -> str:
        """Part of the job key: a new model version gives every study a new job."""
        if self.predictor is None:
            return STAGES_VERSION
        info = self.predictor.info
        return f"{STAGES_VERSION}+{info.name}-{info.version}"[:64]


@dataclass(frozen=True)
class PipelineContext:
    """What the worker needs: where the study's files are, the stages, and where outputs go.

    ``outputs_root`` (``<data_dir>/outputs``): a job writes into
    ``<outputs_root>/<StudyInstanceUID>/job-<job id>/``; None writes no outputs.
    ``installation`` distinguishes this site in the SR's Device Observer UID (the AE title).
    """

    sessions: sessionmaker[Session]
    spool: Spool
    stages: Stages
    outputs_root: Path | None = None
    installation: str = ""


def run_stages(
    stages: Stages,
    paths: Sequence[Path],
    out_dir: Path | None = None,
    *,
    outputs_root: Path | None = None,
    predecessor: InstanceRef | None = None,
    installation: str = "",
) -> dict[str, Any]:
    """Run every configured stage on the files of one study; returns the JSON result.

    With a model and an ``out_dir``, the DICOM outputs are written there and listed in
    ``result["outputs"]`` with paths relative to ``outputs_root`` (default ``out_dir``);
    ``predecessor`` is the SR of an earlier result of the study that the new SR supersedes.
    """
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
    table = stages.anatomy_table
    if table is None:  # set by Stages.__post_init__ whenever there is a predictor
        raise RuntimeError("Stages has a predictor but no anatomy table")
    started = time.perf_counter()
    labelmap = stages.segmenter.segment(volume, paths)
    timings["segmentation_s"] = round(time.perf_counter() - started, 3)
    prediction = stages.predictor.run(volume, labelmap)
    timings.update({f"{k}_s": round(v, 3) for k, v in prediction.timings.items() if k != "total"})
    info = stages.predictor.info
    result["segmentation"] = {
        "source": labelmap.source,
        "anatomies": list(labelmap.anatomies),
        "provenance": labelmap.provenance,
    }
    result["model"] = {"name": info.name, "version": info.version, "sha256": info.sha256}
    result["inference"] = {**stages.predictor.arithmetic(), "crops": prediction.crops}
    result["findings"] = prediction.as_dict()["findings"]
    result["not_assessable"] = dict(prediction.not_assessable)
    result["triage"] = assess(result["findings"], stages.triage_rules).as_dict()
    if out_dir is not None:
        started = time.perf_counter()
        outputs = write_outputs(
            volume,
            labelmap,
            prediction.findings,
            paths,
            info,
            table,
            stages.predictor.findings,
            out_dir,
            outputs_root=outputs_root,
            predecessor=predecessor,
            installation=installation,
        )
        timings["writing_s"] = round(time.perf_counter() - started, 3)
        result["outputs"] = [o.as_dict() for o in outputs]
    return result


def previous_sr(
    sessions: sessionmaker[Session], study_instance_uid: str, job_id: int
) -> InstanceRef | None:
    """The SR of the latest earlier result of the study (another job's), if any has one.

    A re-run's SR names it in its Predecessor Documents Sequence. Its UIDs come from a stored
    payload, so they are validated like received ones; a malformed entry is skipped.
    """
    with sessions() as session:
        rows = session.scalars(
            select(Result)
            .where(Result.study_instance_uid == study_instance_uid, Result.job_id != job_id)
            .order_by(Result.id.desc())
        )
        for row in rows:
            for out in (row.payload or {}).get("outputs") or []:
                if not isinstance(out, dict) or out.get("kind") != "sr":
                    continue
                try:
                    return InstanceRef(
                        study_instance_uid=study_instance_uid,
                        series_instance_uid=validate_uid(
                            out.get("series_instance_uid"), "Series Instance UID"
                        ),
                        sop_instance_uid=validate_uid(
                            out.get("sop_instance_uid"), "SOP Instance UID"
                        ),
                        sop_class_uid=validate_uid(out.get("sop_class_uid"), "SOP Class UID"),
                    )
                except InvalidInstance as exc:
                    log.warning("result %d: SR output ignored as predecessor: %s", row.id, exc)
    return None


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
    out_dir: Path | None = None
    predecessor: InstanceRef | None = None
    if ctx.outputs_root is not None:
        try:  # the UID becomes a folder name: only digits and dots may get there
            study_uid = validate_uid(job.study_instance_uid, "Study Instance UID")
        except InvalidInstance as exc:
            raise OutputError(f"cannot write outputs: {exc}") from exc
        out_dir = ctx.outputs_root / study_uid / f"job-{int(job.id)}"
        predecessor = previous_sr(ctx.sessions, study_uid, job.id)
    result = run_stages(
        ctx.stages,
        [ctx.spool.absolute(p) for p in rel_paths],
        out_dir,
        outputs_root=ctx.outputs_root,
        predecessor=predecessor,
        installation=ctx.installation,
    )
    result["study_revision"] = job.study_revision
    log.info(
        "job %d: study revision %d done (%d findings)",
        job.id,
        job.study_revision,
        len(result.get("findings", [])),
    )
    return result
