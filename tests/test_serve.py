"""`fvlm-pacs serve` and `fvlm-pacs worker` as real processes: the user's view end to end."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from fvlm_pacs.config import load_settings
from fvlm_pacs.db import AuditEvent, Instance, Job, utcnow
from fvlm_pacs.pipeline import STAGES_VERSION
from fvlm_pacs.service import build
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series
from tests.helpers import (
    ServeProcess,
    c_store,
    encode,
    require_tool,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


def study_status(server: ServeProcess, uid: str) -> dict[str, Any] | None:
    try:
        doc = server.get(f"/api/studies/{uid}")
    except Exception:
        return None
    return doc if doc["status"] in ("done", "failed") else None


def test_storescu_study_becomes_a_completed_job(tmp_path: Path) -> None:
    require_tool("storescu")
    study_uid = "1.2.826.0.1.3680043.8.498.1001"
    axial = ct_series(SeriesSpec(n_slices=30), study_instance_uid=study_uid)
    scout = ct_series(
        SeriesSpec(
            n_slices=2,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            orientation=(0, 1, 0, 0, 0, -1),
            series_number=1,
            series_description="Topogram",
        ),
        study_instance_uid=study_uid,
    )
    paths = write_series(axial + scout, tmp_path / "in")
    server = ServeProcess(tmp_path).start()
    try:
        storescu(server.dicom_port, paths)
        doc = wait_until(lambda: study_status(server, study_uid), timeout=60)
        assert doc["status"] == "done", doc
        assert doc["instances"] == 32 and len(doc["series"]) == 2
        assembly = doc["assembly"]
        assert assembly["series_choice"]["chosen_series_uid"] == axial[0].SeriesInstanceUID
        assert assembly["volume"]["shape"] == [30, 64, 64]
        assert len(doc["jobs"]) == 1 and doc["jobs"][0]["state"] == "succeeded"
        assert server.get("/api/jobs?state=succeeded")["jobs"][0]["id"] == doc["jobs"][0]["id"]
        metrics = server.get_text("/metrics")
        assert 'fvlm_instances_received_total{source="dimse"} 32.0' in metrics
    finally:
        assert server.terminate() == 0  # SIGTERM: clean shutdown
    assert "stopped" in server.log_path.read_text()


def test_study_without_usable_series_fails_clearly(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1002"
    scout = ct_series(
        SeriesSpec(n_slices=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        study_instance_uid=study_uid,
    )
    server = ServeProcess(tmp_path).start()
    try:
        assert c_store(server.dicom_port, scout) == [0, 0]
        doc = wait_until(lambda: study_status(server, study_uid), timeout=60)
        assert doc["status"] == "failed"
        [job] = doc["jobs"]
        assert job["state"] == "failed" and job["attempts"] == 1  # not retried
        assert "NoUsableSeries" in job["last_error"] and "LOCALIZER" in job["last_error"]
        verdicts = doc["assembly"]["series_choice"]
        assert verdicts["chosen_series_uid"] is None
        assert any("LOCALIZER" in r for r in verdicts["candidates"][scout[0].SeriesInstanceUID])
    finally:
        server.stop()


def test_sigkill_after_acknowledgement_loses_nothing(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1003"
    series = ct_series(SeriesSpec(n_slices=24), study_instance_uid=study_uid)
    # a long stable window: the study must still be "receiving" when we kill the server
    server = ServeProcess(tmp_path, stable_seconds=3).start()
    acked = []
    for chunk in (series[:8], series[8:16]):
        statuses = c_store(server.dicom_port, chunk)
        acked += [ds.SOPInstanceUID for ds, st in zip(chunk, statuses) if st == 0]
    assert len(acked) == 16
    server.kill()  # SIGKILL: no shutdown code runs
    server.start()
    try:
        settings = load_settings(data_dir=tmp_path / "data")
        parts = build(settings)
        with parts.sessions() as s:
            rows = {r.sop_instance_uid: r.path for r in s.scalars(select(Instance))}
        assert set(acked) <= set(rows)
        for uid in acked:
            assert parts.spool.absolute(rows[uid]).stat().st_size > 0
        parts.engine.dispose()
        # the rest of the study arrives after the restart; it still completes as one study
        assert c_store(server.dicom_port, series[16:]) == [0] * 8
        doc = wait_until(lambda: study_status(server, study_uid), timeout=60)
        assert doc["status"] == "done" and doc["instances"] == 24
        assert doc["assembly"]["volume"]["shape"][0] == 24
    finally:
        server.stop()


def test_two_postgres_workers_never_run_the_same_job(tmp_path: Path, postgres_url: str) -> None:
    settings = load_settings(data_dir=tmp_path / "data", database_url=postgres_url)
    parts = build(settings)
    for _ in range(16):
        series = ct_series(SeriesSpec(n_slices=20, rows=32, columns=32))
        for ds in series:
            parts.intake.receive(encode(ds), source="dimse")
    config = tmp_path / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "database_url": postgres_url,
                "workers": 2,
                # idle threads poll every 0.1 s, not 1 s: with fast jobs one process could drain
                # all 16 before the other's next poll, and the test would prove nothing
                "sweep_interval_seconds": 0.1,
            }
        )
    )
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "fvlm_pacs.cli", "worker", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        for log in logs
    ]
    try:
        # Jobs become due only once both processes poll: on a loaded machine one process can
        # import torch seconds after the other and would otherwise find the queue empty.
        wait_until(
            lambda: all("worker pool" in log.read_text(errors="replace") for log in logs),
            timeout=120,
            interval=0.2,
        )
        created = CompletionSweep(
            parts.sessions,
            stable_seconds=1,
            pipeline_version=STAGES_VERSION,
            max_attempts=3,
            clock=lambda: utcnow() + timedelta(seconds=5),
        ).sweep()
        assert len(created) == 16

        def all_done() -> bool:
            with parts.sessions() as s:
                states = [j.state for j in s.scalars(select(Job))]
            return all(state == "succeeded" for state in states)

        wait_until(all_done, timeout=120, interval=0.5)
    finally:
        for w in workers:
            w.terminate()
        codes = [w.wait(timeout=60) for w in workers]
    assert codes == [0, 0]
    with parts.sessions() as s:
        claims = Counter(
            e.job_id for e in s.scalars(select(AuditEvent).where(AuditEvent.kind == "job_claimed"))
        )
        owners = {
            e.actor.split(":")[1]
            for e in s.scalars(select(AuditEvent).where(AuditEvent.kind == "job_claimed"))
            if e.actor
        }
        attempts = [j.attempts for j in s.scalars(select(Job))]
    assert sorted(claims) == sorted(created)
    assert set(claims.values()) == {1}, "a job was claimed twice"
    assert attempts == [1] * 16
    assert len(owners) == 2, "both worker processes should have taken jobs"
    parts.engine.dispose()
