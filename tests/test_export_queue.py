"""Export queue and worker on both backends: rows created with the result, backoff, dead-letter,
lease recovery, independence of destinations, shutdown, and the exports API."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select, update

from fvlm_pacs.config import load_settings
from fvlm_pacs.db import AuditEvent, Export, Result, utcnow
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.folder import FolderDestination
from fvlm_pacs.export.queue import ExportQueue, dicom_outputs
from fvlm_pacs.export.worker import ExportWorker
from fvlm_pacs.service import Parts, build, make_export_worker
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.conftest import client_for
from tests.helpers import ServeProcess, encode, wait_until
from tests.test_completion import sweep_at
from tests.test_export_destinations import make_objects

T0 = 31.0  # results are stored on a clock 31 s ahead: the sweep needs the study idle for 30 s


def at(offset_s: float) -> Callable[[], datetime]:
    """A clock ``offset_s`` seconds after results were stored."""
    return lambda: utcnow() + timedelta(seconds=T0 + offset_s)


def store_result(
    parts: Parts, *, study: str | None = None, dicom: bool = True, png: bool = True
) -> tuple[int, str, list[Path]]:
    """Receive an instance, let its study complete, run its job to success with outputs written
    under ``<data_dir>/outputs`` as the writers do. Returns (result id, study UID, files)."""
    ds = ct_series(SeriesSpec(n_slices=1, rows=16, columns=16), study_instance_uid=study)[0]
    parts.intake.receive(encode(ds), source="dimse")
    [job_id] = sweep_at(parts, T0).sweep()
    parts.queue.clock = at(0)
    job = parts.queue.claim("test-worker")
    assert job is not None and job.id == job_id
    rel = Path(f"job-{job_id}")
    outputs_dir = parts.settings.data_dir / "outputs"
    outputs: list[dict[str, Any]] = []
    paths: list[Path] = []
    if dicom:
        _, paths = make_objects(outputs_dir / rel, study=ds.StudyInstanceUID, n_ct=1)
        for kind, path in zip(("seg", "sr"), paths, strict=True):
            meta = dcmread(path, stop_before_pixels=True)
            outputs.append(
                {
                    "kind": kind,
                    "path": str(rel / path.name),
                    "sop_class_uid": meta.SOPClassUID,
                    "sop_instance_uid": meta.SOPInstanceUID,
                    "series_instance_uid": meta.SeriesInstanceUID,
                }
            )
    if png:
        (outputs_dir / rel).mkdir(parents=True, exist_ok=True)
        (outputs_dir / rel / "summary.png").write_bytes(b"\x89PNG not sent")
        outputs.append({"kind": "summary-png", "path": str(rel / "summary.png")})
    result_id = parts.queue.succeed(job, {"outputs": outputs, "findings": []})
    assert result_id is not None
    return result_id, str(ds.StudyInstanceUID), paths


def exports_of(parts: Parts, result_id: int | None = None) -> list[Export]:
    with parts.sessions() as s:
        query = select(Export).order_by(Export.id)
        if result_id is not None:
            query = query.where(Export.result_id == result_id)
        return list(s.scalars(query))


def one_export(parts: Parts, destination: str) -> Export:
    [row] = [e for e in exports_of(parts) if e.destination == destination]
    return row


def audit_kinds(parts: Parts) -> list[str]:
    with parts.sessions() as s:
        return [e.kind for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def folder(name: str, path: Path) -> dict[str, Any]:
    return {"name": name, "kind": "folder", "path": str(path)}


class Scripted:
    """A destination that raises the next scripted error (None = delivered)."""

    def __init__(self, name: str, *outcomes: Exception | None) -> None:
        self.name = name
        self.outcomes = list(outcomes)
        self.calls: list[Outgoing] = []

    def send(self, outgoing: Outgoing) -> None:
        self.calls.append(outgoing)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome


class Hanging:
    """A destination whose send blocks until released: a PACS that never answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, outgoing: Outgoing) -> None:
        self.entered.set()
        self.release.wait(30)


def worker_for(parts: Parts, *destinations: Any, clock_offset: float = 0.0) -> ExportWorker:
    parts.exports.clock = at(clock_offset)
    return ExportWorker(
        parts.exports,
        {d.name: d for d in destinations},
        lease_seconds=parts.settings.export_lease_seconds,
        poll_seconds=0.05,
        metrics=parts.metrics,
    )


# -- rows follow results -----------------------------------------------------------------------


def test_result_gets_one_pending_export_per_destination(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("a", tmp_path / "a"), folder("b", tmp_path / "b")])
    result_id, _, _ = store_result(parts)
    rows = exports_of(parts, result_id)
    assert sorted(r.destination for r in rows) == ["a", "b"]
    with parts.sessions() as s:
        result = s.get(Result, result_id)
        assert result is not None
    for row in rows:
        assert row.state == "pending" and row.attempts == 0
        assert row.next_attempt_at == result.created_at  # due when the result is stored
    assert "export_queued" in audit_kinds(parts)
    # only the DICOM objects are sent, SEG before SR; the PNG never
    assert [o["kind"] for o in dicom_outputs(result.payload)] == ["seg", "sr"]


def test_results_without_dicom_outputs_or_destinations_get_none(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("a", tmp_path / "a")])
    png_only, _, _ = store_result(parts, dicom=False)
    assert exports_of(parts, png_only) == []
    bare = make_parts()  # same database, no destinations configured
    result_id, _, _ = store_result(bare)
    assert exports_of(bare, result_id) == []


# -- delivery, backoff, dead-letter ------------------------------------------------------------


def test_folder_export_is_delivered(make_parts: Callable[..., Parts], tmp_path: Path) -> None:
    parts = make_parts(destinations=[folder("dir", tmp_path / "dest")])
    _, study, paths = store_result(parts)
    worker = make_export_worker(parts)
    parts.exports.clock = at(0)
    assert worker.deliver_one("dir") == "done"
    row = one_export(parts, "dir")
    assert row.state == "done" and row.attempts == 1 and row.lease_owner is None
    copied = sorted((tmp_path / "dest" / study).rglob("*.dcm"))
    assert sorted(p.name for p in copied) == sorted(p.name for p in paths)
    assert worker.deliver_one("dir") is None  # nothing else due
    assert "export_done" in audit_kinds(parts)


def test_transient_failures_back_off_exponentially_then_die(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(
        destinations=[folder("flaky", tmp_path / "unused")],
        export_max_attempts=4,
        export_backoff_seconds=10,
        export_backoff_max_seconds=25,
    )
    store_result(parts)
    down = Scripted("flaky", *[ExportError("connection refused", retryable=True)] * 4)
    worker = worker_for(parts, down)

    attempted: list[datetime] = []

    def attempt_at(offset: float) -> str | None:
        # a frozen clock per attempt: the delay is measured from the attempt's own "now", not
        # from a second reading of the wall clock (a loaded CI machine made 10 s read as 9)
        now = at(offset)()
        attempted.append(now)
        parts.exports.clock = lambda: now
        return worker.deliver_one("flaky")

    delays = []
    for offset in (0, 11, 32):
        assert attempt_at(offset) == "pending"
        row = one_export(parts, "flaky")
        assert row.next_attempt_at is not None
        delays.append((row.next_attempt_at - attempted[-1]).total_seconds())
        assert attempt_at(offset + 1) is None  # not due yet
    assert delays == [10.0, 20.0, 25.0]  # doubling, capped at 25
    assert attempt_at(60) == "dead"  # the fourth attempt was the last
    row = one_export(parts, "flaky")
    assert row.state == "dead" and row.attempts == 4 and row.next_attempt_at is None
    assert row.last_error == "ExportError: connection refused"
    assert attempt_at(10_000) is None
    kinds = audit_kinds(parts)
    assert kinds.count("export_retry_scheduled") == 3 and kinds.count("export_dead") == 1


def test_permanent_failure_is_dead_at_once(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("strict", tmp_path / "unused")])
    store_result(parts)
    refusing = Scripted("strict", ExportError("association rejected", retryable=False))
    worker = worker_for(parts, refusing)
    assert worker.deliver_one("strict") == "dead"
    row = one_export(parts, "strict")
    assert row.state == "dead" and row.attempts == 1
    parts.exports.clock = at(100_000)
    assert worker.deliver_one("strict") is None
    assert len(refusing.calls) == 1  # no retry storm


def test_missing_output_file_is_dead(make_parts: Callable[..., Parts], tmp_path: Path) -> None:
    parts = make_parts(destinations=[folder("dir", tmp_path / "dest")])
    _, _, paths = store_result(parts)
    paths[0].unlink()
    worker = make_export_worker(parts)
    parts.exports.clock = at(0)
    assert worker.deliver_one("dir") == "dead"
    row = one_export(parts, "dir")
    assert row.attempts == 1 and row.last_error and "missing" in row.last_error


def test_superseded_result_is_still_exported(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("dir", tmp_path / "dest")])
    first, study, _ = store_result(parts)
    second, _, _ = store_result(parts, study=study)  # a late instance re-ran the study
    with parts.sessions() as s:
        newer = s.get(Result, second)
        assert newer is not None and newer.supersedes_result_id == first
    worker = make_export_worker(parts)
    parts.exports.clock = at(0)
    assert worker.deliver_one("dir") == "done"
    assert worker.deliver_one("dir") == "done"
    assert {e.result_id for e in exports_of(parts) if e.state == "done"} == {first, second}


# -- leases ------------------------------------------------------------------------------------


def test_a_send_interrupted_by_a_crash_is_recovered(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(
        destinations=[folder("dir", tmp_path / "dest")],
        export_lease_seconds=30,
        job_lease_seconds=3600,  # the export lease, not the job lease, governs sends
    )
    _, study, _ = store_result(parts)
    queue = parts.exports
    queue.clock = at(0)
    crashed = queue.claim("crashed-host:1", "dir")
    assert crashed is not None and crashed.attempt == 1
    assert one_export(parts, "dir").state == "sending"
    queue.clock = at(10)
    assert queue.claim("other:2", "dir") is None  # lease still valid
    worker = make_export_worker(parts)
    queue.clock = at(31)  # the lease has run out
    assert worker.deliver_one("dir") == "done"
    row = one_export(parts, "dir")
    assert row.state == "done" and row.attempts == 2
    assert list((tmp_path / "dest" / study).rglob("*.dcm"))
    # the crashed process, if it ever comes back, cannot overwrite the outcome
    assert queue.succeed(crashed) is False
    assert queue.fail(crashed, ExportError("late", retryable=False)) is None
    assert one_export(parts, "dir").state == "done"


def test_lease_expiry_on_the_last_attempt_is_dead(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(
        destinations=[folder("dir", tmp_path / "dest")],
        export_max_attempts=1,
        export_lease_seconds=5,
        job_lease_seconds=3600,
    )
    store_result(parts)
    parts.exports.clock = at(0)
    assert parts.exports.claim("crashed", "dir") is not None
    parts.exports.clock = at(6)
    assert parts.exports.claim("other", "dir") is None
    row = one_export(parts, "dir")
    assert row.state == "dead" and row.last_error and "lease" in row.last_error


def test_renew_keeps_the_lease(make_parts: Callable[..., Parts], tmp_path: Path) -> None:
    parts = make_parts(
        destinations=[folder("dir", tmp_path / "dest")],
        export_lease_seconds=30,
        job_lease_seconds=3600,  # the export lease, not the job lease, governs sends
    )
    store_result(parts)
    queue = parts.exports
    queue.clock = at(0)
    claimed = queue.claim("slow-sender", "dir")
    assert claimed is not None
    queue.clock = at(25)
    assert queue.renew(claimed)
    queue.clock = at(40)  # past the first lease, within the renewed one
    assert queue.claim("other", "dir") is None
    assert queue.renew(claimed) and queue.succeed(claimed)


# -- independence and shutdown (real threads) --------------------------------------------------


def test_a_dead_or_hanging_destination_never_blocks_another(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(
        destinations=[
            folder("good", tmp_path / "good"),
            folder("dead", tmp_path / "x"),
            folder("hangs", tmp_path / "y"),
        ]
    )
    for _ in range(2):
        store_result(parts)
    hanging = Hanging("hangs")
    good = FolderDestination(parts.settings.destinations[0])  # type: ignore[arg-type]
    dead = Scripted("dead", *[ExportError("calling AE not recognised", retryable=False)] * 2)
    worker = worker_for(parts, good, dead, hanging)
    worker.start()
    try:
        assert hanging.entered.wait(10)

        def states(name: str) -> list[str]:
            return [e.state for e in exports_of(parts) if e.destination == name]

        wait_until(lambda: states("good") == ["done", "done"], timeout=20)
        wait_until(lambda: states("dead") == ["dead", "dead"], timeout=20)
        assert sorted(states("hangs")) == ["pending", "sending"]  # still stuck on its first row
        hanging.release.set()
        wait_until(lambda: states("hangs") == ["done", "done"], timeout=20)
    finally:
        hanging.release.set()
        worker.stop(grace_seconds=5)
    text = client_for(parts).get("/metrics").text
    assert 'fvlm_export_send_seconds_count{destination="good",outcome="done"} 2.0' in text


def test_stop_releases_a_send_in_progress(make_parts: Callable[..., Parts], tmp_path: Path) -> None:
    parts = make_parts(destinations=[folder("hangs", tmp_path / "y")])
    store_result(parts)
    hanging = Hanging("hangs")
    worker = worker_for(parts, hanging)
    worker.start()
    try:
        assert hanging.entered.wait(10)
        worker.stop(grace_seconds=0.2)
        row = one_export(parts, "hangs")
        assert row.state == "pending" and row.attempts == 0 and row.lease_owner is None
        assert "export_released" in audit_kinds(parts)
    finally:
        hanging.release.set()
    # the send that finished after its release is fenced out: the row stays pending
    wait_until(lambda: not any(t.is_alive() for t in worker._threads), timeout=10)
    assert one_export(parts, "hangs").state == "pending"


def test_worker_without_destinations_starts_nothing(parts: Parts) -> None:
    worker = make_export_worker(parts)
    worker.start()
    assert worker._threads == []
    worker.stop(grace_seconds=1)


# -- API ---------------------------------------------------------------------------------------


def test_exports_api_list_get_retry(make_parts: Callable[..., Parts], tmp_path: Path) -> None:
    parts = make_parts(destinations=[folder("good", tmp_path / "g"), folder("bad", tmp_path / "b")])
    result_id, study, _ = store_result(parts)
    worker = worker_for(
        parts,
        FolderDestination(parts.settings.destinations[0]),  # type: ignore[arg-type]
        Scripted("bad", ExportError("HTTP 400", retryable=False)),
    )
    assert worker.deliver_one("good") == "done"
    assert worker.deliver_one("bad") == "dead"
    client = client_for(parts)

    listed = client.get("/api/exports").json()["exports"]
    assert {(e["destination"], e["state"]) for e in listed} == {("good", "done"), ("bad", "dead")}
    dead = client.get("/api/exports", params={"state": "dead"}).json()["exports"]
    assert len(dead) == 1
    [row] = dead
    assert row["result_id"] == result_id and row["study_instance_uid"] == study
    assert row["attempts"] == 1 and row["next_attempt_at"] is None
    assert row["last_error"] == "ExportError: HTTP 400"
    assert client.get("/api/exports", params={"state": "lost"}).status_code == 400

    assert client.get(f"/api/exports/{row['id']}").json() == row
    assert client.get("/api/exports/999999").status_code == 404

    retried = client.post(f"/api/exports/{row['id']}/retry")
    assert retried.status_code == 200
    body = retried.json()
    assert body["state"] == "pending" and body["attempts"] == 0
    assert client.post(f"/api/exports/{row['id']}/retry").status_code == 409  # already due
    done = next(e for e in listed if e["state"] == "done")
    assert client.post(f"/api/exports/{done['id']}/retry").status_code == 409
    assert client.post("/api/exports/999999/retry").status_code == 404
    assert "export_retried" in audit_kinds(parts)

    # the re-driven export is delivered on the next pass
    worker.destinations["bad"] = Scripted("bad")
    parts.exports.clock = at(1)
    assert worker.deliver_one("bad") == "done"

    study_json = client.get(f"/api/studies/{study}").json()
    assert sorted(e["destination"] for e in study_json["exports"]) == ["bad", "good"]
    text = client.get("/metrics").text
    assert 'fvlm_exports{destination="bad",state="done"} 1.0' in text
    assert 'fvlm_exports{destination="good",state="dead"} 0.0' in text


def test_retry_of_a_pending_export_that_failed_makes_it_due_now(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("flaky", tmp_path / "f")], export_backoff_seconds=3600)
    store_result(parts)
    worker = worker_for(parts, Scripted("flaky", ExportError("timeout", retryable=True)))
    assert worker.deliver_one("flaky") == "pending"
    assert worker.deliver_one("flaky") is None  # an hour to wait
    row = one_export(parts, "flaky")
    client = client_for(parts)
    assert client.post(f"/api/exports/{row.id}/retry").status_code == 200
    assert worker.deliver_one("flaky") == "done"


def test_cancel_a_pending_export_keeps_it_on_record(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    """An operator stops a pending send (e.g. its destination was removed from the config): the
    row becomes dead with the reason and an audit event, and can still be retried later."""
    parts = make_parts(destinations=[folder("a", tmp_path / "a"), folder("b", tmp_path / "b")])
    store_result(parts)
    client = client_for(parts)
    row_a, row_b = one_export(parts, "a"), one_export(parts, "b")
    cancelled = client.post(f"/api/exports/{row_a.id}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["state"] == "dead" and body["last_error"].startswith("cancelled by api:")
    assert "export_cancelled" in audit_kinds(parts)
    assert client.post(f"/api/exports/{row_a.id}/cancel").status_code == 409  # already dead
    assert client.post("/api/exports/999999/cancel").status_code == 404
    parts.exports.clock = at(0)
    assert parts.exports.claim("sender", "b") is not None
    sending = client.post(f"/api/exports/{row_b.id}/cancel")  # cannot recall a send in flight
    assert sending.status_code == 409 and "sending" in sending.json()["detail"]
    worker = worker_for(parts, FolderDestination(parts.settings.destinations[0]))  # type: ignore[arg-type]
    assert worker.deliver_one("a") is None  # a cancelled row is never sent
    assert client.post(f"/api/exports/{row_a.id}/retry").status_code == 200
    assert worker.deliver_one("a") == "done"


def test_exports_need_the_api_token(make_parts: Callable[..., Parts]) -> None:
    parts = make_parts(api_tokens=["t0ken"])
    client = client_for(parts)
    assert client.get("/api/exports").status_code == 401
    assert client.post("/api/exports/1/retry").status_code == 401
    assert client.post("/api/exports/1/cancel").status_code == 401
    ok = client.get("/api/exports", headers={"Authorization": "Bearer t0ken"})
    assert ok.status_code == 200 and ok.json() == {"exports": []}


def test_queue_depth_lists_every_configured_destination(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    parts = make_parts(destinations=[folder("a", tmp_path / "a")])
    store_result(parts)
    depth = parts.exports.depth()
    assert depth[("a", "pending")] == 1
    assert depth[("a", "dead")] == 0
    queue = ExportQueue.from_settings(parts.sessions, parts.settings)
    queue.destinations = ()
    assert queue.unconfigured() == {"a": 1}


# -- fvlm-pacs serve ---------------------------------------------------------------------------


def test_serve_delivers_pending_exports_and_stops_cleanly(tmp_path: Path) -> None:
    """The exporter runs inside ``fvlm-pacs serve``: a result stored before start (a restart with
    work left) is delivered, and SIGTERM still exits 0."""
    server = ServeProcess(tmp_path, destinations=[folder("dir", tmp_path / "dest")])
    parts = build(load_settings(server.config_path))
    try:
        _, study, paths = store_result(parts)
        with parts.sessions.begin() as s:  # due now on the real clock
            s.execute(update(Export).values(next_attempt_at=utcnow()))
    finally:
        parts.engine.dispose()
    server.start()
    try:
        wait_until(
            lambda: [e["state"] for e in server.get("/api/exports")["exports"]] == ["done"],
            timeout=30,
        )
        assert len(list((tmp_path / "dest" / study).rglob("*.dcm"))) == len(paths)
        assert 'fvlm_exports{destination="dir",state="done"} 1.0' in server.get_text("/metrics")
        assert server.terminate() == 0
    finally:
        server.stop()
