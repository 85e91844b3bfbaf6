"""HTTP API: health, Prometheus metrics, studies, jobs and exports as JSON, retry, STOW-RS intake,
the worklist (JSON and a server-rendered page).

Responses identify studies by Study Instance UID and jobs by id, never by patient name.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from fvlm_pacs import __version__
from fvlm_pacs.config import Settings
from fvlm_pacs.db import Export, Job, Result, Series, Study, audit, utcnow
from fvlm_pacs.export.queue import STATES as EXPORT_STATES
from fvlm_pacs.export.queue import ExportQueue
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
    exports: ExportQueue


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


def export_json(export: Export, study_instance_uid: str | None) -> dict[str, Any]:
    return {
        "id": export.id,
        "result_id": export.result_id,
        "study_instance_uid": study_instance_uid,
        "destination": export.destination,
        "state": export.state,
        "attempts": export.attempts,
        "next_attempt_at": _iso(export.next_attempt_at),
        "last_error": export.last_error,
        "lease_owner": export.lease_owner,
        "created_at": _iso(export.created_at),
        "updated_at": _iso(export.updated_at),
    }


def _exports_query() -> Any:
    """Exports with the Study Instance UID of their result, newest first."""
    return (
        select(Export, Result.study_instance_uid)
        .join(Result, Result.id == Export.result_id)
        .order_by(Export.id.desc())
    )


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


def _given_token(request: Request) -> bytes | None:
    """The token of ``Authorization: Bearer <token>``, or the password of ``Basic`` (any user
    name): a browser can only send the latter, and does so for the worklist page's links too."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return given.strip().encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(given.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None


def require_token(request: Request) -> str:
    """Bearer-token check when ``api_tokens`` is set; returns an actor name for audit."""
    tokens: list[bytes] = request.app.state.api_tokens
    if not tokens:
        return "anonymous"
    given = _given_token(request)
    if given is not None and any(hmac.compare_digest(given, t) for t in tokens):
        return "token"
    raise HTTPException(
        401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
    )


def require_page_token(request: Request) -> str:
    """:func:`require_token` for pages a browser opens: the challenge is HTTP Basic, so the
    browser asks for the token (as the password) once and sends it with every refresh."""
    try:
        return require_token(request)
    except HTTPException:
        raise HTTPException(
            401,
            "the token is required (as the password; any user name)",
            headers={"WWW-Authenticate": 'Basic realm="fvlm_pacs", charset="UTF-8"'},
        ) from None


Actor = Annotated[str, Depends(require_token)]
PageActor = Annotated[str, Depends(require_page_token)]

PAGE_HEADERS = {
    # the page is self-contained: no script, no external asset, nothing may embed it
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="fvlm_pacs", version=__version__)
    app.state.api_tokens = [t.get_secret_value().encode() for t in ctx.settings.api_tokens]
    exports = ctx.exports

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
        for (destination, state), n in exports.depth().items():
            ctx.metrics.exports.labels(destination, state).set(n)
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
            study_exports = session.execute(
                _exports_query().where(Result.study_instance_uid == study_uid)
            ).all()
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
            "exports": [export_json(e, uid) for e, uid in study_exports],
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

    @app.get("/api/exports")
    def list_exports(
        _actor: Actor,
        state: str | None = Query(None, description=f"one of {', '.join(EXPORT_STATES)}"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        if state is not None and state not in EXPORT_STATES:
            raise HTTPException(400, f"state must be one of {', '.join(EXPORT_STATES)}")
        query = _exports_query().limit(limit)
        if state:
            query = query.where(Export.state == state)
        with ctx.sessions() as session:
            rows = session.execute(query).all()
        return {"exports": [export_json(e, uid) for e, uid in rows]}

    @app.get("/api/exports/{export_id}")
    def get_export(export_id: int, _actor: Actor) -> dict[str, Any]:
        with ctx.sessions() as session:
            row = session.execute(_exports_query().where(Export.id == export_id)).first()
        if row is None:
            raise HTTPException(404, "no such export")
        return export_json(*row)

    def export_action(action: Callable[..., Any], export_id: int, actor: str) -> dict[str, Any]:
        """Run an operator action on one export row; 404 unknown, 409 not in a fitting state."""
        try:
            action(export_id, actor=f"api:{actor}")
        except KeyError:
            raise HTTPException(404, "no such export") from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        with ctx.sessions() as session:
            row = session.execute(_exports_query().where(Export.id == export_id)).one()
        return export_json(*row)

    @app.post("/api/exports/{export_id}/retry")
    def retry_export(export_id: int, actor: Actor) -> dict[str, Any]:
        return export_action(exports.retry, export_id, actor)

    @app.post("/api/exports/{export_id}/cancel")
    def cancel_export(export_id: int, actor: Actor) -> dict[str, Any]:
        return export_action(exports.cancel, export_id, actor)

    from fvlm_pacs.worklist import WorklistPage, WorklistQuery, load_worklist  # imports api

    page = WorklistPage()

    def worklist_data(request: Request, query: WorklistQuery) -> dict[str, Any]:
        with ctx.sessions() as session:
            return load_worklist(
                session, query, now=utcnow(), base_url=request.scope.get("root_path", "")
            )

    @app.get("/api/worklist")
    def worklist(
        request: Request,
        _actor: Actor,
        hours: float = Query(24.0, gt=0, le=24 * 366),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        return worklist_data(request, WorklistQuery(hours, limit, offset))

    @app.get("/", response_class=HTMLResponse)
    def worklist_page(
        request: Request,
        _actor: PageActor,
        hours: float = Query(24.0, gt=0, le=24 * 366),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
        refresh: int = Query(30, ge=5, le=3600),
    ) -> HTMLResponse:
        data = worklist_data(request, WorklistQuery(hours, limit, offset))
        html = page.render(
            data, refresh_seconds=refresh, base_url=request.scope.get("root_path", "")
        )
        return HTMLResponse(html, headers=PAGE_HEADERS)

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

            def record() -> None:
                with ctx.sessions.begin() as session:
                    for uid, n in outcome.studies.items():
                        audit(
                            session,
                            "instances_received",
                            actor=f"stow:{actor}",
                            study_instance_uid=uid,
                            detail={"instances": n, "peer": peer},
                        )

            # a database write may wait on SQLite's lock: never on the event loop
            await run_in_threadpool(record)
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
