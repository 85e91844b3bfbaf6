"""The worklist: GET /api/worklist and the page at /, on both backends, and the page rendered by
a real headless Chromium against a real server on a loopback port."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from fvlm_pacs.config import load_settings
from fvlm_pacs.db import Job, Result, Study, utcnow
from fvlm_pacs.service import Parts, build, make_app
from fvlm_pacs.triage import assess, load_triage_rules
from tests.conftest import client_for
from tests.helpers import free_port, require_tool, wait_until
from tests.test_triage import CRITICAL, finding

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_ENV = "FVLM_PACS_TEST_ARTIFACTS"


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (CI keeps this folder)."""
    path = Path(os.environ.get(ARTIFACTS_ENV) or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_study(
    parts: Parts,
    *,
    minutes_ago: float,
    job: str | None = None,
    findings: list[dict[str, Any]] | None = None,
    triage: bool = True,
    revision: int = 1,
    result_revision: int | None = None,
    uid: str | None = None,
) -> str:
    """A study as the service would have stored it: the study row, its newest job in state
    ``job`` (None: still receiving), and — when ``findings`` is given — a result whose payload
    has the findings and the triage made by :func:`assess` (what the pipeline stores)."""
    uid = uid or generate_uid()
    arrived = utcnow() - timedelta(minutes=minutes_ago)
    with parts.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=uid,
                first_received_at=arrived,
                last_received_at=arrived + timedelta(seconds=20),
                instance_count=120,
                revision=revision,
                completed_revision=revision if job else revision - 1,
            )
        )
        session.flush()
        job_ids: list[int] = []
        for rev in sorted({result_revision or revision, revision}):
            row = Job(
                study_instance_uid=uid,
                pipeline_version="test",
                study_revision=rev,
                state=job if rev == revision else "superseded",
                attempts=1,
                max_attempts=5,
                next_attempt_at=arrived,
                created_at=arrived,
            )
            if job or rev != revision:
                session.add(row)
                session.flush()
                job_ids.append(row.id)
        if findings is not None:
            payload: dict[str, Any] = {
                "pipeline_version": "test",
                "model": {"name": "fvlm-test", "version": "1", "sha256": "0" * 64},
                "findings": findings,
                "study_revision": result_revision or revision,
            }
            if triage:
                payload["triage"] = assess(findings, CRITICAL).as_dict()
            session.add(
                Result(
                    job_id=job_ids[0],
                    study_instance_uid=uid,
                    pipeline_version="test",
                    payload=payload,
                    created_at=arrived + timedelta(minutes=2),
                )
            )
    return uid


ROUTINE = [finding("emphysema", 0.7), finding("pleural_effusion", 0.2)]
HIGH = [finding("pleural_effusion", 0.7), finding("emphysema", 0.1)]
CRITICAL_FINDINGS = [finding("pericardial_effusion", 0.9), finding("cardiomegaly", None)]


def scenario(parts: Parts) -> dict[str, str]:
    """One study per situation, arrival times chosen so that priority must beat arrival."""
    return {
        "queued_oldest": add_study(parts, minutes_ago=60, job="queued"),
        "routine": add_study(parts, minutes_ago=50, job="succeeded", findings=ROUTINE),
        "high_older": add_study(parts, minutes_ago=45, job="succeeded", findings=HIGH),
        "high": add_study(parts, minutes_ago=40, job="succeeded", findings=HIGH),
        "critical": add_study(parts, minutes_ago=30, job="succeeded", findings=CRITICAL_FINDINGS),
        "failed": add_study(parts, minutes_ago=20, job="dead"),
        "processing": add_study(parts, minutes_ago=15, job="running"),
        "receiving": add_study(parts, minutes_ago=1),
        "last_week": add_study(parts, minutes_ago=7 * 24 * 60, job="succeeded", findings=HIGH),
    }


ORDER = ["critical", "high_older", "high", "queued_oldest", "routine", "failed", "processing",
         "receiving"]  # fmt: skip


def test_worklist_order_status_and_flags(client: TestClient, parts: Parts) -> None:
    uids = scenario(parts)
    name = {v: k for k, v in uids.items()}
    r = client.get("/api/worklist")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 8 and body["hours"] == 24 and body["offset"] == 0
    studies = body["studies"]
    assert [name[s["study_instance_uid"]] for s in studies] == ORDER
    by = {name[s["study_instance_uid"]]: s for s in studies}

    assert [(k, by[k]["status"]) for k in ("queued_oldest", "failed", "processing", "receiving")] == [
        ("queued_oldest", "queued"), ("failed", "failed"), ("processing", "processing"),
        ("receiving", "receiving"),
    ]  # fmt: skip
    for k in ("queued_oldest", "failed", "processing", "receiving"):  # no result = no flag
        assert (by[k]["priority"], by[k]["flags"], by[k]["result"]) == (None, [], None)
        assert by[k]["findings"] == []

    crit = by["critical"]
    assert (crit["status"], crit["priority"]) == ("done", "critical")
    assert [f["finding"] for f in crit["flags"]] == ["pericardial_effusion"]
    assert crit["flags"][0]["reason"].endswith("(rule pe_critical → critical)")
    assert crit["not_assessable"] == [{"finding": "cardiomegaly", "anatomy": "heart", "rules": []}]
    assert crit["findings"][0] == {
        "finding": "pericardial_effusion",
        "anatomy": "heart",
        "status": "present",
        "score": 0.9,
        "threshold": 0.5,
    }
    assert crit["result"]["current"] is True and crit["result"]["model"]["name"] == "fvlm-test"
    assert crit["links"]["study"] == f"/api/studies/{uids['critical']}"
    assert client.get(crit["links"]["study"]).json()["result"]["payload"]["triage"]["priority"] == (
        "critical"
    )
    assert (by["routine"]["priority"], by["routine"]["flags"]) == ("routine", [])
    assert by["high"]["flags"][0]["rule"] == "effusion"

    wide = client.get("/api/worklist", params={"hours": 24 * 8}).json()
    assert wide["total"] == 9
    assert [name[s["study_instance_uid"]] for s in wide["studies"]][:4] == [
        "critical", "last_week", "high_older", "high"
    ]  # fmt: skip


def test_pagination(client: TestClient, parts: Parts) -> None:
    uids = scenario(parts)
    name = {v: k for k, v in uids.items()}
    pages = [
        client.get("/api/worklist", params={"limit": 3, "offset": o}).json() for o in (0, 3, 6)
    ]
    assert [p["total"] for p in pages] == [8, 8, 8]
    assert [name[s["study_instance_uid"]] for p in pages for s in p["studies"]] == ORDER
    assert client.get("/api/worklist", params={"limit": 0}).status_code == 422
    assert client.get("/api/worklist", params={"limit": 1001}).status_code == 422
    assert client.get("/api/worklist", params={"hours": 0}).status_code == 422


def test_reopened_study_keeps_its_flag_until_the_new_result(
    client: TestClient, parts: Parts
) -> None:
    uid = add_study(
        parts, minutes_ago=30, job="queued", findings=HIGH, revision=2, result_revision=1
    )
    (s,) = client.get("/api/worklist").json()["studies"]
    assert s["study_instance_uid"] == uid
    assert (s["status"], s["priority"]) == ("queued", "high")
    assert s["result"]["study_revision"] == 1 and s["result"]["current"] is False
    assert "earlier revision" in client.get("/").text


def test_result_without_triage_has_no_flag(client: TestClient, parts: Parts) -> None:
    add_study(parts, minutes_ago=10, job="succeeded", findings=HIGH, triage=False)
    (s,) = client.get("/api/worklist").json()["studies"]
    assert (s["priority"], s["flags"]) == (None, [])
    assert [f["finding"] for f in s["findings"]] == ["pleural_effusion", "emphysema"]


def test_shipped_rules_end_to_end(client: TestClient, parts: Parts) -> None:
    uid = generate_uid()
    add_study(parts, minutes_ago=5, job="succeeded", findings=[], uid=uid)
    with parts.sessions.begin() as session:
        result = session.query(Result).filter_by(study_instance_uid=uid).one()
        rows = [finding("consolidation", 0.8)]
        result.payload = {
            "findings": rows,
            "triage": assess(rows, load_triage_rules()).as_dict(),
        }
    (s,) = client.get("/api/worklist").json()["studies"]
    assert s["priority"] == "high" and s["flags"][0]["rule"] == "consolidation"


# --- the page ----------------------------------------------------------------------------------


def rows_of(html: str) -> list[str]:
    return re.findall(r'<tr class="study [a-z]+" data-uid="([^"]*)"', html)


def test_page(client: TestClient, parts: Parts) -> None:
    uids = scenario(parts)
    name = {v: k for k, v in uids.items()}
    r = client.get("/", params={"refresh": 15})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    html = r.text
    assert [name[u] for u in rows_of(html)] == ORDER
    assert '<meta http-equiv="refresh" content="15">' in html
    assert "pericardial_effusion (heart) score 0.9 ≥ threshold 0.5 + margin 0.2" in html
    assert f'href="/api/studies/{uids["critical"]}"' in html
    assert html.count('class="badge none"') == 4
    assert '<span class="badge critical">CRITICAL</span>' in html
    assert '<td class="num">0.900</td><td class="num">0.500</td>' in html
    # self-contained: no script, no external asset
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)
    assert "/api/worklist?hours=24&amp;limit=100&amp;offset=0" in html


def test_page_pagination_links(client: TestClient, parts: Parts) -> None:
    scenario(parts)
    html = client.get("/", params={"limit": 3, "offset": 3}).text
    assert len(rows_of(html)) == 3
    assert 'href="/?hours=24&amp;limit=3&amp;offset=0"' in html
    assert 'href="/?hours=24&amp;limit=3&amp;offset=6"' in html


def test_page_escapes_everything(client: TestClient, parts: Parts) -> None:
    evil = "1.2.3<b>x</b>&\"'"
    rows = [finding("pleural_effusion", 0.8)]
    rows[0]["finding"] = "<script>alert(1)</script>"
    rows[0]["anatomy"] = 'lung" onmouseover="x'
    add_study(parts, minutes_ago=5, job="succeeded", findings=rows, uid=evil)
    html = client.get("/").text
    assert "<script" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onmouseover="x' not in html
    assert 'href="/api/studies/1.2.3%3Cb%3Ex%3C%2Fb%3E%26%22%27"' in html


def test_studies_are_named_by_uid_only(client: TestClient, parts: Parts) -> None:
    scenario(parts)
    (s, *_) = client.get("/api/worklist").json()["studies"]
    assert set(s) == {
        "study_instance_uid", "status", "priority", "flags", "not_assessable", "instances",
        "first_received_at", "last_received_at", "findings", "result", "links",
    }  # fmt: skip
    assert "patient" not in client.get("/").text.lower()


def test_tokens(make_parts: Any) -> None:
    parts = make_parts(api_tokens=["s3cret"])
    uid = add_study(parts, minutes_ago=5, job="succeeded", findings=HIGH)
    basic = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"reader:nope").decode()
    with client_for(parts) as c:
        r = c.get("/api/worklist")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/api/worklist", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="fvlm_pacs"')
        assert c.get("/", headers={"Authorization": wrong}).status_code == 401
        assert c.get("/", headers={"Authorization": "Basic %%%"}).status_code == 401
        page = c.get("/", headers={"Authorization": basic})
        assert page.status_code == 200 and uid in page.text
        assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # the browser re-sends Basic credentials on the page's links: they must work too
        assert c.get(f"/api/studies/{uid}", headers={"Authorization": basic}).status_code == 200
        assert c.get("/api/worklist", headers={"Authorization": wrong}).status_code == 401


# --- a real browser ------------------------------------------------------------------------------


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[Parts, str]]:
    """The API served by uvicorn on a free loopback port (SQLite: the browser is the point)."""
    settings = load_settings(
        data_dir=tmp_path / "data", dicom_port=0, http_port=0, stable_seconds=30
    )
    parts = build(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_app(parts), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=30)
        yield parts, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        parts.engine.dispose()


def chromium(tool: str, profile: Path, *args: str) -> str:
    proc = subprocess.run(
        [tool, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
        capture_output=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode("utf-8")


def test_page_in_headless_chromium(live_server: tuple[Parts, str], tmp_path: Path) -> None:
    tool = require_tool("chromium")
    parts, url = live_server
    uids = scenario(parts)
    name = {v: k for k, v in uids.items()}

    dom = chromium(tool, tmp_path / "profile", "--dump-dom", f"{url}/")
    assert [name[u] for u in rows_of(dom)] == ORDER
    assert "pericardial_effusion (heart) score 0.9 ≥ threshold 0.5 + margin 0.2 " in dom
    assert "(rule pe_critical → critical)" in dom
    assert "pleural_effusion (lung) score 0.7 ≥ threshold 0.5 (rule effusion → high)" in dom
    badges = re.findall(r'<span class="badge ([a-z]+)"[^>]*>([^<]+)</span>', dom)
    assert badges[:3] == [("critical", "CRITICAL"), ("high", "HIGH"), ("high", "HIGH")]
    assert badges[3:] == [("none", "no AI result"), ("routine", "ROUTINE")] + [
        ("none", "no AI result")
    ] * 3  # fmt: skip

    shot = artifacts_dir() / "worklist.png"
    shot.unlink(missing_ok=True)
    chromium(
        tool, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,800", f"{url}/"
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 800)


def test_artifacts_dir_is_ignored_by_git() -> None:
    assert "test-artifacts/" in (ROOT / ".gitignore").read_text().splitlines()
