"""The radiologist worklist: recent studies in reading order, with the AI's priority and flags.

Order: priority (critical, high, then everything else) and, within a priority, arrival (oldest
first) — the order a radiologist should read in. A study without a result (receiving, queued,
processing, failed) carries no flag and ranks with routine studies by its arrival: late AI never
holds a study back ("no result = no flag", PACS.md). A study re-opened by late instances keeps the
triage of its previous result (marked ``current: false``) until the new one is stored: dropping a
critical flag while the model re-runs would be worse than showing one a few minutes old.

The triage read here is ``payload["triage"]`` of the study's newest result, as the pipeline stored
it (:func:`fvlm_pacs.triage.assess`); nothing is recomputed at read time, so the page, the JSON
and the HL7 message always agree. Studies are identified by Study Instance UID only: the database
holds no patient data and neither does this page.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from fvlm_pacs.api import _iso, _latest_jobs, study_status
from fvlm_pacs.db import Result, Study
from fvlm_pacs.triage import PRIORITIES, priority_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorklistQuery:
    """Which slice of the worklist: studies that received instances in the last ``hours``."""

    hours: float = 24.0
    limit: int = 100
    offset: int = 0


def _priority_of(payload: Mapping[str, Any] | None) -> str | None:
    triage = payload.get("triage") if payload else None
    if isinstance(triage, Mapping) and triage.get("priority") in PRIORITIES:
        return str(triage["priority"])
    return None


def _summary(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = payload.get("findings")
    if not isinstance(rows, list):
        return []
    return [
        {
            "finding": f.get("finding"),
            "anatomy": f.get("anatomy"),
            "status": f.get("status"),
            "score": f.get("score"),
            "threshold": f.get("threshold"),
        }
        for f in rows
        if isinstance(f, Mapping)
    ]


def load_worklist(
    session: Session, query: WorklistQuery, *, now: datetime, base_url: str = ""
) -> dict[str, Any]:
    """The worklist as JSON-able data (``GET /api/worklist``; the page renders the same data).

    Sorting happens in the database (the priority is read from the result JSON on SQLite and
    PostgreSQL alike), so a page of 100 never loads the whole window.
    """
    since = now - timedelta(hours=query.hours)
    in_window = select(Study.study_instance_uid).where(Study.last_received_at >= since)
    latest = (
        select(Result.study_instance_uid.label("uid"), func.max(Result.id).label("rid"))
        .where(Result.study_instance_uid.in_(in_window))
        .group_by(Result.study_instance_uid)
        .subquery()
    )
    priority = Result.payload[("triage", "priority")].as_string()
    # ranks come from triage.PRIORITIES, so a new priority level sorts without touching this
    rank = case(*((priority == p, priority_rank(p)) for p in PRIORITIES), else_=0)
    rows = session.execute(
        select(Study, Result)
        .outerjoin(latest, latest.c.uid == Study.study_instance_uid)
        .outerjoin(Result, Result.id == latest.c.rid)
        .where(Study.last_received_at >= since)
        .order_by(rank.desc(), Study.first_received_at.asc(), Study.study_instance_uid)
        .limit(query.limit)
        .offset(query.offset)
    ).all()
    total = session.scalar(
        select(func.count()).select_from(Study).where(Study.last_received_at >= since)
    )
    jobs = _latest_jobs(session, [s.study_instance_uid for s, _ in rows])
    studies = []
    for study, result in rows:
        uid = study.study_instance_uid
        payload: Mapping[str, Any] = result.payload if result is not None else {}
        triage = payload.get("triage") if isinstance(payload.get("triage"), Mapping) else None
        revision = payload.get("study_revision")
        studies.append(
            {
                "study_instance_uid": uid,
                "status": study_status(study, jobs.get(uid)),
                "priority": _priority_of(payload),
                "flags": list(triage.get("flags", [])) if triage else [],
                "not_assessable": list(triage.get("not_assessable", [])) if triage else [],
                "instances": study.instance_count,
                "first_received_at": _iso(study.first_received_at),
                "last_received_at": _iso(study.last_received_at),
                "findings": _summary(payload),
                "result": {
                    "id": result.id,
                    "job_id": result.job_id,
                    "created_at": _iso(result.created_at),
                    "study_revision": revision,
                    # an older revision's result while late instances are re-processed
                    "current": not isinstance(revision, int) or revision >= study.revision,
                    "model": payload.get("model"),
                }
                if result is not None
                else None,
                "links": {"study": f"{base_url}/api/studies/{quote(uid, safe='')}"},
            }
        )
    return {
        "generated_at": _iso(now),
        "hours": query.hours,
        "since": _iso(since),
        "total": total,
        "limit": query.limit,
        "offset": query.offset,
        "studies": studies,
    }


def _score(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f}"
    return "—"


class WorklistPage:
    """Renders the worklist as one self-contained HTML page (inline CSS, no script, no external
    assets: it must work on a reading-room PC without internet). Jinja2 autoescaping is on for
    everything; the template ships as package data (``fvlm_pacs/templates``)."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("fvlm_pacs", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["score"] = _score
        self.template = self.env.get_template("worklist.html")

    def render(self, data: Mapping[str, Any], *, refresh_seconds: int, base_url: str = "") -> str:
        q = {"hours": f"{data['hours']:g}", "limit": data["limit"]}
        offset, limit, total = data["offset"], data["limit"], data["total"] or 0
        prev_link = (
            f"{base_url}/?{urlencode({**q, 'offset': max(0, offset - limit)})}"
            if offset > 0
            else None
        )
        next_link = (
            f"{base_url}/?{urlencode({**q, 'offset': offset + limit})}"
            if offset + limit < total
            else None
        )
        return self.template.render(
            data=data,
            refresh_seconds=refresh_seconds,
            json_link=f"{base_url}/api/worklist?{urlencode({**q, 'offset': offset})}",
            prev_link=prev_link,
            next_link=next_link,
        )
