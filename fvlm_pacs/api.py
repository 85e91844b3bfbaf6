"""HTTP API: health, Prometheus metrics, studies and jobs as JSON, job retry, STOW-RS intake.

Responses identify studies by Study Instance UID and jobs by id, never by patient name.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs import __version__
from fvlm_pacs.config import Settings
from fvlm_pacs.db import Job, Result, Series, Study, audit
from fvlm_pacs.ingest.dicomweb import StowRequestError, store_instances
from fvlm_pacs.ingest.intake import Intake
from fvlm_pacs.jobs.queue import STATES, JobQueue
from fvlm_pacs.metrics import Metrics

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    sessions: sessionmaker[Session]
    intake: Intake
    queue: JobQueue
    metrics: Metrics


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "study_instance_uid": job.study_instance_uid,
        "pipeline_version": job.pipeline_version,
        "study_revision": job.study_revision,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "next_attempt_at": _iso(job.next_attempt_at),
        "lease_owner": job.lease_owner,
        "lease_expires_at": _iso(job.lease_expires_at),
        "last_error": job.last_error,
        "supersedes_job_id": job.supersedes_job_id,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


_STATUS_OF_JOB = {
    "queued": "queued",
    "running": "processing",
    "succeeded": "done",
    "failed": "failed",
    "dead": "failed",
    "superseded": "queued",
}


def study_status(study: Study, latest_job: Job | None) -> str:
    """receiving | queued | processing | done | failed."""
    if study.completed_revision < study.revision or latest_job is None:
        return "receiving"
    return _STATUS_OF_JOB[latest_job.state]


def _latest_jobs(session: Session, uids: list[str]) -> dict[str, Job]:
    if not uids:
        return {}
    jobs = session.scalars(
        select(Job).where(Job.study_instance_uid.in_(uids)).order_by(Job.study_revision, Job.id)
    )
    return {job.study_instance_uid: job for job in jobs}  # last one wins


def require_token(request: Request) -> str:
    """Bearer-token check when ``api_tokens`` is set; returns an actor name for audit."""
    tokens: list[bytes] = request.app.state.api_tokens
    if not tokens:
        return "anonymous"
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and any(
        hmac.compare_digest(given.strip().encode(), t) for t in tokens
    ):
        return "token"
    raise HTTPException(
        401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
    )


Actor = Annotated[str, Depends(require_token)]


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="fvlm_pacs", version=__version__)
    app.state.api_tokens = [t.get_secret_value().encode() for t in ctx.settings.api_tokens]

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            with ctx.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "error", "database": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        for state, n in ctx.queue.depth().items():
            ctx.metrics.queue_depth.labels(state).set(n)
        return PlainTextResponse(
            generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/api/studies")
    def list_studies(
        _actor: Actor, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
    ) -> dict[str, Any]:
        with ctx.sessions() as session:
            studies = list(
                session.scalars(
                    select(Study)
                    .order_by(Study.last_received_at.desc())
                    .limit(limit)
                    .offset(offset)
                )
            )
            latest = _latest_jobs(session, [s.study_instance_uid for s in studies])
            total = session.scalar(select(func.count()).select_from(Study))
        return {
            "total": total,
            "studies": [
                {
                    "study_instance_uid": s.study_instance_uid,
                    "status": study_status(s, latest.get(s.study_instance_uid)),
                    "instances": s.instance_count,
                    "revision": s.revision,
                    "first_received_at": _iso(s.first_received_at),
                    "last_received_at": _iso(s.last_received_at),
                    "latest_job_id": latest[s.study_instance_uid].id
                    if s.study_instance_uid in latest
                    else None,
                }
                for s in studies
            ],
        }

    @app.get("/api/studies/{study_uid}")
    def get_study(study_uid: str, _actor: Actor) -> dict[str, Any]:
        with ctx.sessions() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise HTTPException(404, "no such study")
            series = list(
                session.scalars(
                    select(Series)
                    .where(Series.study_instance_uid == study_uid)
                    .order_by(Series.series_number, Series.series_instance_uid)
                )
            )
            jobs = list(
                session.scalars(
                    select(Job).where(Job.study_instance_uid == study_uid).order_by(Job.id)
                )
            )
            result = session.scalars(
                select(Result)
                .where(Result.study_instance_uid == study_uid)
                .order_by(Result.id.desc())
                .limit(1)
            ).first()
        latest = jobs[-1] if jobs else None
        # The newest job that looked at the series (succeeded or failed) explains the choice.
        explained = next((j for j in reversed(jobs) if j.detail), None)
        assembly = (explained.detail or {}).get("assembly") if explained else None
        return {
            "study_instance_uid": study.study_instance_uid,
            "status": study_status(study, latest),
            "instances": study.instance_count,
            "revision": study.revision,
            "first_received_at": _iso(study.first_received_at),
            "last_received_at": _iso(study.last_received_at),
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "series_number": s.series_number,
                    "series_description": s.series_description,
                    "instances": s.instance_count,
                }
                for s in series
            ],
            "assembly": assembly,
            "jobs": [job_json(j) for j in jobs],
            "result": {
                "id": result.id,
                "job_id": result.job_id,
                "supersedes_result_id": result.supersedes_result_id,
                "created_at": _iso(result.created_at),
                "payload": result.payload,
            }
            if result
            else None,
        }

    @app.get("/api/jobs")
    def list_jobs(
        _actor: Actor,
        state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise HTTPException(400, f"state must be one of {', '.join(STATES)}")
        with ctx.sessions() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if state:
                query = query.where(Job.state == state)
            jobs = list(session.scalars(query))
        return {"jobs": [job_json(j) for j in jobs]}

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: int, _actor: Actor) -> dict[str, Any]:
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise HTTPException(404, "no such job")
        return {**job_json(job), "detail": job.detail}

    @app.post("/api/jobs/{job_id}/retry")
    def retry_job(job_id: int, actor: Actor) -> dict[str, Any]:
        try:
            job = ctx.queue.retry(job_id, actor=f"api:{actor}")
        except KeyError:
            raise HTTPException(404, "no such job") from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return job_json(job)

    async def stow(request: Request, actor: str, study_uid: str | None) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > ctx.settings.stow_max_bytes:
            return JSONResponse(
                {"error": f"request body exceeds stow_max_bytes ({ctx.settings.stow_max_bytes})"},
                413,
            )
        peer = request.client.host if request.client else None
        try:
            outcome = await store_instances(
                ctx.intake,
                request.stream(),
                request.headers.get("content-type"),
                max_bytes=ctx.settings.stow_max_bytes,
                study_uid=study_uid,
                peer_host=peer,
            )
        except StowRequestError as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        if outcome.studies:
            with ctx.sessions.begin() as session:
                for uid, n in outcome.studies.items():
                    audit(
                        session,
                        "instances_received",
                        actor=f"stow:{actor}",
                        study_instance_uid=uid,
                        detail={"instances": n, "peer": peer},
                    )
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        headers = {}
        if outcome.failed:
            reasons = "; ".join(sorted({c for *_, c in outcome.failed}))
            # Reasons can echo client input (a part's Content-Type): keep the quoted-string
            # printable ASCII without quotes or backslashes.
            reasons = "".join(
                ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in reasons
            )[:500]
            headers["Warning"] = f'299 fvlm-pacs "{reasons}"'
        return JSONResponse(
            outcome.response(base, study_uid),
            outcome.http_status,
            media_type=DICOM_JSON,
            headers=headers,
        )

    @app.post("/dicomweb/studies")
    async def stow_any(request: Request, actor: Actor) -> JSONResponse:
        return await stow(request, actor, None)

    @app.post("/dicomweb/studies/{study_uid}")
    async def stow_study(study_uid: str, request: Request, actor: Actor) -> JSONResponse:
        return await stow(request, actor, study_uid)

    return app
