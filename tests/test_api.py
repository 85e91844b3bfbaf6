"""The HTTP API (health, metrics, studies, jobs, retry, auth) on both backends."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fvlm_pacs import __version__
from fvlm_pacs.db import utcnow
from fvlm_pacs.errors import NoUsableSeries
from fvlm_pacs.jobs.queue import ClaimedJob
from fvlm_pacs.pipeline import STAGES_VERSION
from fvlm_pacs.service import Parts
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.conftest import client_for
from tests.helpers import encode


def receive_study(
    parts: Parts, specs: list[SeriesSpec], study: str | None = None
) -> tuple[str, list[list[Dataset]]]:
    """Receive the series of one study as the C-STORE SCP would; returns (study UID, series)."""
    study = study or generate_uid()
    all_series = [ct_series(spec, study_instance_uid=study) for spec in specs]
    for series in all_series:
        for ds in series:
            parts.intake.receive(encode(ds), source="dimse", calling_ae_title="MODALITY")
    return study, all_series


LATER = timedelta(seconds=120)  # well past stable_seconds (30)


def later() -> datetime:
    return utcnow() + LATER


@pytest.fixture
def queue_clock_later(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeps below run two minutes ahead (the study is idle by then), so the job they
    create is due two minutes ahead too: the queue runs on the same clock."""
    monkeypatch.setattr(parts.queue, "clock", later)


def future_sweep(parts: Parts) -> list[int]:
    return CompletionSweep(
        parts.sessions,
        stable_seconds=parts.settings.stable_seconds,
        pipeline_version=STAGES_VERSION,
        max_attempts=parts.settings.job_max_attempts,
        clock=later,
    ).sweep()


def claim(parts: Parts, owner: str = "w1") -> ClaimedJob:
    job = parts.queue.claim(owner)
    assert job is not None
    return job


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text exposition."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    sample = f"{name}{{{label_text}}}" if labels else name
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in metrics"
    return float(match.group(1))


CHEST = SeriesSpec(n_slices=3, rows=16, columns=16, series_number=2)
SCOUT = SeriesSpec(
    n_slices=1,
    rows=16,
    columns=16,
    series_number=1,
    series_description="Scout",
    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
)


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": __version__}


@pytest.mark.usefixtures("queue_clock_later")
def test_metrics(client: TestClient, parts: Parts) -> None:
    text = client.get("/metrics").text
    assert "fvlm_instances_received_total" in text
    assert metric(text, "fvlm_jobs", state="queued") == 0

    receive_study(parts, [CHEST])
    assert future_sweep(parts) != []

    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "fvlm_instances_received_total", source="dimse") == 3
    assert metric(text, "fvlm_jobs", state="queued") == 1
    assert metric(text, "fvlm_jobs", state="running") == 0

    claim(parts)
    text = client.get("/metrics").text
    assert metric(text, "fvlm_jobs", state="queued") == 0
    assert metric(text, "fvlm_jobs", state="running") == 1


@pytest.mark.usefixtures("queue_clock_later")
def test_study_lifecycle(client: TestClient, parts: Parts) -> None:
    study, (chest, scout) = receive_study(parts, [CHEST, SCOUT])

    def listed() -> dict[str, Any]:
        r = client.get("/api/studies")
        assert r.status_code == 200
        body = r.json()
        assert body["total"] == 1 and len(body["studies"]) == 1
        entry: dict[str, Any] = body["studies"][0]
        assert entry["study_instance_uid"] == study
        return entry

    entry = listed()
    assert (entry["status"], entry["instances"], entry["revision"]) == ("receiving", 4, 1)
    assert entry["latest_job_id"] is None
    assert client.get(f"/api/studies/{study}").json()["status"] == "receiving"

    assert parts.sweep.sweep() == []  # not idle yet by the real clock
    assert listed()["status"] == "receiving"
    (job_id,) = future_sweep(parts)
    entry = listed()
    assert (entry["status"], entry["latest_job_id"]) == ("queued", job_id)

    job = claim(parts)
    assert job.id == job_id and job.study_instance_uid == study
    assert listed()["status"] == "processing"
    running = client.get(f"/api/studies/{study}").json()
    assert running["status"] == "processing"
    assert running["jobs"][0]["state"] == "running"
    assert running["jobs"][0]["lease_owner"] == "w1"
    assert running["result"] is None and running["assembly"] is None

    payload = {
        "assembly": {
            "series_choice": {"series_instance_uid": chest[0].SeriesInstanceUID, "slices": 3},
            "volume": {"shape": [3, 16, 16], "spacing": [1.0, 0.8, 0.8]},
        },
        "timings": {"assembly_s": 0.01},
    }
    result_id = parts.queue.succeed(job, payload)
    assert result_id is not None
    assert listed()["status"] == "done"

    r = client.get(f"/api/studies/{study}")
    assert r.status_code == 200
    detail = r.json()
    assert detail["study_instance_uid"] == study
    assert (detail["status"], detail["instances"]) == ("done", 4)
    assert detail["series"] == [
        {
            "series_instance_uid": scout[0].SeriesInstanceUID,
            "modality": "CT",
            "series_number": 1,
            "series_description": "Scout",
            "instances": 1,
        },
        {
            "series_instance_uid": chest[0].SeriesInstanceUID,
            "modality": "CT",
            "series_number": 2,
            "series_description": "Chest 1.0 mm",
            "instances": 3,
        },
    ]
    assert [(j["id"], j["state"], j["attempts"]) for j in detail["jobs"]] == [
        (job_id, "succeeded", 1)
    ]
    assert detail["jobs"][0]["pipeline_version"] == STAGES_VERSION
    assert detail["jobs"][0]["finished_at"] is not None
    assert detail["result"]["id"] == result_id
    assert detail["result"]["job_id"] == job_id
    assert detail["result"]["supersedes_result_id"] is None
    assert detail["result"]["payload"] == payload
    assert detail["assembly"] == payload["assembly"]
    # No patient identity in the API.
    assert "Synthetic" not in r.text and "SYNTH0001" not in r.text

    job_detail = client.get(f"/api/jobs/{job_id}").json()
    assert job_detail["state"] == "succeeded" and job_detail["detail"] == payload

    assert client.get(f"/api/studies/{generate_uid()}").status_code == 404

    # A further instance re-opens the study.
    late = ct_series(
        CHEST, study_instance_uid=study, series_instance_uid=chest[0].SeriesInstanceUID
    )[0]
    parts.intake.receive(encode(late), source="dimse")
    entry = listed()
    assert (entry["status"], entry["instances"], entry["revision"]) == ("receiving", 5, 2)
    assert entry["latest_job_id"] == job_id

    # ... and its next burst gets a superseding job; the old result and assembly stay visible.
    (job2_id,) = future_sweep(parts)
    assert job2_id != job_id
    entry = listed()
    assert (entry["status"], entry["latest_job_id"]) == ("queued", job2_id)
    detail = client.get(f"/api/studies/{study}").json()
    assert [(j["id"], j["state"], j["study_revision"]) for j in detail["jobs"]] == [
        (job_id, "succeeded", 1),
        (job2_id, "queued", 2),
    ]
    assert detail["jobs"][1]["supersedes_job_id"] == job_id
    assert detail["result"]["job_id"] == job_id
    assert detail["assembly"] == payload["assembly"]
    assert detail["series"][1]["instances"] == 4


def test_studies_listed_newest_first(client: TestClient, parts: Parts) -> None:
    older, _ = receive_study(parts, [SeriesSpec(n_slices=1, rows=8, columns=8)])
    newer, _ = receive_study(parts, [SeriesSpec(n_slices=1, rows=8, columns=8)])

    body = client.get("/api/studies").json()
    assert body["total"] == 2
    assert [s["study_instance_uid"] for s in body["studies"]] == [newer, older]
    page = client.get("/api/studies", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 2
    assert [s["study_instance_uid"] for s in page["studies"]] == [older]
    assert client.get("/api/studies", params={"limit": 0}).status_code == 422


@pytest.mark.usefixtures("queue_clock_later")
def test_failed_job_and_retry(client: TestClient, parts: Parts) -> None:
    study, _ = receive_study(parts, [SCOUT])
    (job_id,) = future_sweep(parts)
    job = claim(parts)
    why = {
        "assembly": {
            "series_choice": None,
            "rejected": {"1.2.3": "image type LOCALIZER"},
        }
    }
    assert parts.queue.fail(job, NoUsableSeries("no usable series", detail=why)) == "failed"

    entry = client.get("/api/studies").json()["studies"][0]
    assert (entry["study_instance_uid"], entry["status"]) == (study, "failed")
    detail = client.get(f"/api/studies/{study}").json()
    assert detail["status"] == "failed"
    assert detail["assembly"] == why["assembly"]
    assert detail["result"] is None
    (job_json,) = detail["jobs"]
    assert job_json["state"] == "failed"
    assert job_json["last_error"] == "NoUsableSeries: no usable series"

    r = client.get("/api/jobs", params={"state": "failed"})
    assert r.status_code == 200
    assert [j["id"] for j in r.json()["jobs"]] == [job_id]
    assert client.get("/api/jobs", params={"state": "queued"}).json() == {"jobs": []}
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [job_id]

    r = client.post(f"/api/jobs/{job_id}/retry")
    assert r.status_code == 200, r.text
    retried = r.json()
    assert (retried["id"], retried["state"], retried["attempts"]) == (job_id, "queued", 0)
    assert retried["finished_at"] is None
    assert client.get(f"/api/studies/{study}").json()["status"] == "queued"
    assert [j["id"] for j in client.get("/api/jobs?state=queued").json()["jobs"]] == [job_id]
    assert client.get("/api/jobs?state=failed").json() == {"jobs": []}

    # Only failed, dead or superseded jobs can be retried.
    r = client.post(f"/api/jobs/{job_id}/retry")
    assert r.status_code == 409
    assert "queued" in r.json()["detail"]
    again = claim(parts, "w2")
    assert again.id == job_id and again.attempt == 1
    r = client.post(f"/api/jobs/{job_id}/retry")
    assert r.status_code == 409
    assert client.get(f"/api/jobs/{job_id}").json()["state"] == "running"

    assert client.post("/api/jobs/999999/retry").status_code == 404
    assert client.get("/api/jobs/999999").status_code == 404
    r = client.get("/api/jobs", params={"state": "bogus"})
    assert r.status_code == 400
    assert "queued" in r.json()["detail"]


def test_api_token(make_parts: Callable[..., Parts]) -> None:
    parts = make_parts(api_tokens=["secret"], stable_seconds=30)
    study, _ = receive_study(parts, [SCOUT])

    with client_for(parts) as client:
        r = client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"

        for path in ("/api/studies", f"/api/studies/{study}", "/api/jobs", "/api/jobs/1"):
            r = client.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            r = client.get(path, headers={"Authorization": "Bearer not-the-secret"})
            assert r.status_code == 401, path
        assert client.post("/api/jobs/1/retry").status_code == 401

        good = {"Authorization": "Bearer secret"}
        r = client.get("/api/studies", headers=good)
        assert r.status_code == 200
        assert [s["study_instance_uid"] for s in r.json()["studies"]] == [study]
        assert client.get(f"/api/studies/{study}", headers=good).status_code == 200
        assert client.get("/api/jobs/1", headers=good).status_code == 404
