"""Job queue: leases, backoff, dead-letter, fencing, retry; the lease heartbeat workers share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest

from fvlm_pacs.db import Job, Result, utcnow
from fvlm_pacs.errors import NoUsableSeries, TransientPipelineError
from fvlm_pacs.jobs.lease import LeaseKeeper
from fvlm_pacs.jobs.queue import JobQueue
from fvlm_pacs.service import Parts
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.helpers import encode, wait_until
from tests.test_completion import sweep_at


def make_job(parts: Parts) -> int:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    parts.intake.receive(encode(ds), source="dimse")
    [job_id] = sweep_at(parts, 31).sweep()
    return job_id


T0 = 31  # jobs are created by a sweep whose clock runs 31 s ahead; queue times count from there


def queue_at(parts: Parts, offset_s: float, backoff: float = 10) -> JobQueue:
    """A queue whose clock is ``offset_s`` seconds after the job was created."""
    return JobQueue(
        parts.sessions,
        lease_seconds=30,
        backoff_seconds=backoff,
        clock=lambda: utcnow() + timedelta(seconds=T0 + offset_s),
    )


def get(parts: Parts, job_id: int) -> Job:
    with parts.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_claim_and_succeed(parts: Parts) -> None:
    job_id = make_job(parts)
    q = queue_at(parts, 0)
    job = q.claim("w1")
    assert job is not None and job.id == job_id and job.attempt == 1
    assert q.claim("w2") is None  # nothing else due
    result_id = q.succeed(job, {"ok": True})
    assert result_id is not None
    row = get(parts, job_id)
    assert row.state == "succeeded" and row.lease_owner is None
    with parts.sessions() as s:
        result = s.get(Result, result_id)
        assert result is not None and result.payload == {"ok": True}


def test_transient_failure_backs_off_then_dies(parts: Parts) -> None:
    job_id = make_job(parts)
    q = queue_at(parts, 0, backoff=10)
    job = q.claim("w1")
    assert job is not None
    assert q.fail(job, TransientPipelineError("disk busy")) == "queued"
    row = get(parts, job_id)
    assert row.last_error == "TransientPipelineError: disk busy"
    delay = (row.next_attempt_at - utcnow()).total_seconds() - T0
    assert 8 < delay <= 10
    assert q.claim("w1") is None  # not due yet
    # second attempt, 20 s backoff; third attempt exhausts max_attempts=3
    job = queue_at(parts, 11).claim("w1")
    assert job is not None and job.attempt == 2
    assert queue_at(parts, 11, backoff=10).fail(job, OSError("again")) == "queued"
    delay2 = (get(parts, job_id).next_attempt_at - utcnow()).total_seconds() - T0
    assert 28 < delay2 <= 31  # 11 s ahead + 20 s
    job = queue_at(parts, 40).claim("w1")
    assert job is not None and job.attempt == 3
    assert queue_at(parts, 40).fail(job, OSError("still")) == "dead"
    assert queue_at(parts, 1000).claim("w1") is None


def test_permanent_failure_is_not_retried(parts: Parts) -> None:
    job_id = make_job(parts)
    q = queue_at(parts, 0)
    job = q.claim("w1")
    assert job is not None
    err = NoUsableSeries("no series passes", detail={"assembly": {"series_choice": {}}})
    assert q.fail(job, err) == "failed"
    row = get(parts, job_id)
    assert row.attempts == 1 and row.detail == {"assembly": {"series_choice": {}}}
    assert queue_at(parts, 10_000).claim("w1") is None
    q.retry(job_id, actor="test")
    again = q.claim("w1")
    assert again is not None and again.id == job_id and again.attempt == 1


def test_expired_lease_is_reclaimed_and_old_owner_fenced(parts: Parts) -> None:
    job_id = make_job(parts)
    crashed = queue_at(parts, 0).claim("crashed-worker")
    assert crashed is not None
    assert queue_at(parts, 10).claim("w2") is None  # lease (30 s) still valid
    later = queue_at(parts, 31)
    taken = later.claim("w2")
    assert taken is not None and taken.id == job_id and taken.attempt == 2
    assert get(parts, job_id).last_error == "lease of worker crashed-worker expired"
    # the crashed worker comes back: its outcome is discarded
    assert queue_at(parts, 32).succeed(crashed, {"stale": True}) is None
    assert queue_at(parts, 32).renew(crashed) is False
    assert later.succeed(taken, {"fresh": True}) is not None
    assert get(parts, job_id).detail == {"fresh": True}


def test_release_returns_job_without_counting(parts: Parts) -> None:
    job_id = make_job(parts)
    q = queue_at(parts, 0)
    job = q.claim("w1")
    assert job is not None and q.release(job)
    row = get(parts, job_id)
    assert (row.state, row.attempts) == ("queued", 0)


def test_retry_only_from_terminal_states(parts: Parts) -> None:
    job_id = make_job(parts)
    q = queue_at(parts, 0)
    with pytest.raises(ValueError, match="queued"):
        q.retry(job_id, actor="test")
    with pytest.raises(KeyError):
        q.retry(999_999, actor="test")


def test_depth_counts_states(parts: Parts) -> None:
    make_job(parts)
    make_job(parts)
    q = queue_at(parts, 0)
    job = q.claim("w1")
    assert job is not None
    depth = q.depth()
    assert depth["queued"] == 1 and depth["running"] == 1 and depth["dead"] == 0


# -- LeaseKeeper: what WorkerPool and ExportWorker share ---------------------------------------


@dataclass(frozen=True)
class FakeClaim:
    id: int


def test_lease_keeper_renews_what_is_held_and_releases_it_at_stop() -> None:
    renewed: list[int] = []
    released: list[int] = []

    def renew(claim: FakeClaim) -> bool:
        renewed.append(claim.id)
        return claim.id != 2  # claim 2 was fenced out: logged, nothing else

    def release(claim: FakeClaim) -> bool:
        released.append(claim.id)
        if claim.id == 3:
            raise RuntimeError("database gone")  # its lease expires instead; stop() goes on
        return True

    keeper = LeaseKeeper(renew, release, lease_seconds=0.3, what="test")
    assert keeper.interval == 0.5  # never busier than twice a second
    keeper.start()
    with keeper.holding(FakeClaim(9)):
        pass  # finished before a beat: never renewed, not released
    with keeper.holding(FakeClaim(1)), keeper.holding(FakeClaim(2)), keeper.holding(FakeClaim(3)):
        wait_until(lambda: {1, 2, 3} <= set(renewed), timeout=5)
        keeper.stop()  # a shutdown while they still run: every one is given back
        assert sorted(released) == [1, 2, 3]
        assert keeper._thread is not None and not keeper._thread.is_alive()
    assert keeper.held() == [] and 9 not in renewed
