"""Study completion: one job per burst, idempotent across racing sweeps, late instances supersede."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from sqlalchemy import select

from fvlm_pacs.db import Job, Study, utcnow
from fvlm_pacs.pipeline import STAGES_VERSION
from fvlm_pacs.service import Parts
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.helpers import encode


def sweep_at(parts: Parts, offset_s: float) -> CompletionSweep:
    """A sweep whose clock runs ``offset_s`` seconds ahead (stable window 30 s)."""
    return CompletionSweep(
        parts.sessions,
        stable_seconds=30,
        pipeline_version=STAGES_VERSION,
        max_attempts=3,
        clock=lambda: utcnow() + timedelta(seconds=offset_s),
    )


def jobs(parts: Parts, study_uid: str) -> list[Job]:
    with parts.sessions() as s:
        return list(
            s.scalars(select(Job).where(Job.study_instance_uid == study_uid).order_by(Job.id))
        )


def test_idle_study_gets_one_job(parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=6))
    # three "associations" with a few instances each, within the window
    for chunk in (series[:2], series[2:4], series[4:]):
        for ds in chunk:
            parts.intake.receive(encode(ds), source="dimse")
    uid = series[0].StudyInstanceUID
    assert sweep_at(parts, 0).sweep() == []  # not idle yet
    created = sweep_at(parts, 31).sweep()
    assert len(created) == 1
    assert sweep_at(parts, 60).sweep() == []  # exactly once per burst
    [job] = jobs(parts, uid)
    assert (job.state, job.study_revision, job.supersedes_job_id) == ("queued", 1, None)


def test_late_instance_supersedes(parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=3))
    for ds in series[:2]:
        parts.intake.receive(encode(ds), source="dimse")
    uid = series[0].StudyInstanceUID
    [first_id] = sweep_at(parts, 31).sweep()
    parts.intake.receive(encode(series[2]), source="dimse")  # late instance re-opens the study
    with parts.sessions() as s:
        study = s.get(Study, uid)
        assert study is not None and (study.revision, study.completed_revision) == (2, 1)
    [second_id] = sweep_at(parts, 31).sweep()
    first, second = jobs(parts, uid)
    assert (first.id, second.id) == (first_id, second_id)
    assert second.supersedes_job_id == first_id and second.study_revision == 2
    # the first burst's job had not started, so it is skipped rather than run for nothing
    assert first.state == "superseded"


def test_resent_identical_instance_creates_no_job(parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=2))
    for ds in series:
        parts.intake.receive(encode(ds), source="dimse")
    assert len(sweep_at(parts, 31).sweep()) == 1
    parts.intake.receive(encode(series[0]), source="dimse")
    assert sweep_at(parts, 62).sweep() == []
    assert len(jobs(parts, series[0].StudyInstanceUID)) == 1


def test_arrival_during_sweep_window_defers(parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=2))
    parts.intake.receive(encode(series[0]), source="dimse")
    parts.intake.receive(encode(series[1]), source="dimse")
    # a sweep whose clock is only 10 s ahead sees the study as active
    assert sweep_at(parts, 10).sweep() == []


def test_racing_sweeps_create_one_job(parts: Parts) -> None:
    studies = [ct_series(SeriesSpec(n_slices=1)) for _ in range(5)]
    for series in studies:
        parts.intake.receive(encode(series[0]), source="dimse")
    created: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def run() -> None:
        sweep = sweep_at(parts, 31)
        barrier.wait()
        ids = sweep.sweep()
        with lock:
            created.extend(ids)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(created) == sorted(set(created)) and len(created) == 5
    with parts.sessions() as s:
        assert len(list(s.scalars(select(Job)))) == 5


def test_sweep_clock_is_respected(parts: Parts) -> None:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    parts.intake.receive(encode(ds), source="dimse")
    with parts.sessions() as s:
        study = s.get(Study, ds.StudyInstanceUID)
        assert study is not None
        received: datetime = study.last_received_at
    assert received.tzinfo is not None
