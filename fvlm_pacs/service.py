"""Assembles one process from the parts: SCP, HTTP API, completion sweep, worker pool, exporter.

``serve`` runs all five; ``worker`` runs only the pool and the exporter (more of both on
PostgreSQL). The order of start and stop matters: the database is migrated and the spool
reconciled before the SCP accepts anything; on shutdown the SCP stops accepting first, the
workers finish or release their jobs (whose results may still add exports), the exporter last.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fvlm_pacs.api import AppContext, create_app
from fvlm_pacs.codes import load_anatomies, load_series_rules
from fvlm_pacs.config import Settings
from fvlm_pacs.db import make_engine, session_factory, upgrade
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.export import make_destination
from fvlm_pacs.export.queue import ExportQueue
from fvlm_pacs.export.worker import ExportWorker
from fvlm_pacs.ingest.intake import Intake
from fvlm_pacs.ingest.scp import StorageSCP
from fvlm_pacs.ingest.spool import FolderSpool
from fvlm_pacs.jobs.queue import ClaimedJob, JobQueue
from fvlm_pacs.jobs.worker import WorkerPool
from fvlm_pacs.metrics import Metrics
from fvlm_pacs.pipeline import PipelineContext, Stages, run_study
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.triage import load_triage_rules

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Parts:
    """The long-lived objects of one process, built once from the settings."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    spool: FolderSpool
    metrics: Metrics
    intake: Intake
    queue: JobQueue
    sweep: CompletionSweep
    pipeline: PipelineContext
    exports: ExportQueue


def build_stages(settings: Settings) -> Stages:
    """Series rules always; segmentation and the model (loaded once) when ``model_dir`` is set.

    Settings that cannot work (no weights, a provider that is not available) fail here, at
    start, naming the setting — not at the first study.
    """
    rules = load_series_rules()
    if settings.model_dir is None:
        log.info("no model_dir: jobs stop after volume assembly")
        return Stages(series_rules=rules)
    from fvlm_pacs.model.predictor import Predictor
    from fvlm_pacs.segmentation import SegmentationUnavailable, make_provider

    table = load_anatomies(settings.anatomy_profile)
    options: dict[str, object] = {}
    if settings.segmentation_provider == "totalsegmentator":
        options = {
            "weights_dir": settings.totalsegmentator_weights,
            "device": settings.totalsegmentator_device,
            "fast": settings.totalsegmentator_fast,
        }
    elif settings.segmentation_provider == "builtin":
        options = {"model_dir": settings.builtin_segmentation_dir}
    try:
        segmenter = make_provider(settings.segmentation_provider, table, **options)
        check = getattr(segmenter, "check", None)
        if callable(check):
            check()
    except SegmentationUnavailable as exc:
        raise ConfigError(f"segmentation_provider: {exc}") from None
    predictor = Predictor(
        settings.model_dir,
        anatomy_table=table,
        mode=settings.inference_mode,
        precision=settings.inference_precision,
    )
    return Stages(
        series_rules=rules,
        segmenter=segmenter,
        predictor=predictor,
        anatomy_table=table,
        triage_rules=load_triage_rules(),
    )


def build(settings: Settings) -> Parts:
    """Migrate the database and build the parts; every process runs this first."""
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    spool = FolderSpool(settings.spool_dir)
    metrics = Metrics()
    stages = build_stages(settings)
    exports = ExportQueue.from_settings(sessions, settings)
    return Parts(
        settings=settings,
        engine=engine,
        sessions=sessions,
        spool=spool,
        metrics=metrics,
        intake=Intake(spool, sessions, metrics),
        queue=JobQueue(
            sessions,
            lease_seconds=settings.job_lease_seconds,
            backoff_seconds=settings.job_backoff_seconds,
            on_result=exports.enqueue_result,  # export rows commit with their result
        ),
        sweep=CompletionSweep(
            sessions,
            stable_seconds=settings.stable_seconds,
            pipeline_version=stages.version,
            max_attempts=settings.job_max_attempts,
            metrics=metrics,
        ),
        pipeline=PipelineContext(
            sessions=sessions,
            spool=spool,
            stages=stages,
            outputs_root=settings.outputs_dir,
            installation=settings.ae_title,
        ),
        exports=exports,
    )


def make_app(parts: Parts) -> FastAPI:
    """The HTTP API over this process's parts."""
    return create_app(
        AppContext(
            settings=parts.settings,
            sessions=parts.sessions,
            intake=parts.intake,
            queue=parts.queue,
            metrics=parts.metrics,
            exports=parts.exports,
        )
    )


def make_worker_pool(parts: Parts) -> WorkerPool:
    def run(job: ClaimedJob) -> dict[str, object]:
        return run_study(parts.pipeline, job)

    return WorkerPool(
        parts.queue,
        run,
        threads=parts.settings.workers,
        lease_seconds=parts.settings.job_lease_seconds,
        poll_seconds=min(1.0, parts.settings.resolved_sweep_interval),
        metrics=parts.metrics,
    )


def make_export_worker(parts: Parts) -> ExportWorker:
    """One sender thread per configured destination; a destination that cannot be built (an
    unknown kind, HL7 not installed) stops the process here, at start."""
    destinations = {
        d.name: make_destination(d, parts.settings) for d in parts.settings.destinations
    }
    return ExportWorker(
        parts.exports,
        destinations,
        lease_seconds=parts.settings.export_lease_seconds,
        poll_seconds=min(1.0, parts.settings.resolved_sweep_interval),
        metrics=parts.metrics,
    )


class _HttpServer(uvicorn.Server):
    """uvicorn, minus re-raising the signal after its graceful stop.

    uvicorn re-sends SIGTERM to itself once it has stopped, which would kill the process before
    the SCP, scheduler and workers are shut down; here the signal only ends the HTTP loop and
    :func:`serve` stops the rest, then exits 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def _sweep_safely(sweep: CompletionSweep) -> None:
    try:
        sweep.sweep()
    except Exception:
        log.exception("completion sweep failed; it runs again at the next interval")


def serve(settings: Settings) -> None:
    """Run SCP + HTTP + sweep + workers until SIGINT/SIGTERM."""
    parts = build(settings)
    recovered = parts.intake.recover()
    if recovered:
        log.warning("start-up: %d spool files indexed", recovered)
    scp = StorageSCP(settings, parts.intake, parts.sessions, parts.metrics)
    workers = make_worker_pool(parts)
    exporter = make_export_worker(parts)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        _sweep_safely,
        "interval",
        args=[parts.sweep],
        seconds=settings.resolved_sweep_interval,
        max_instances=1,
        coalesce=True,
        id="completion-sweep",
    )
    app = make_app(parts)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.http_host, settings.http_port))
    server = _HttpServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    # Everything built so far lives as long as the process: moving it out of the collector's
    # view shortens full collections, which otherwise pause every association (~76 ms seen).
    gc.collect()
    gc.freeze()
    scp.start()
    scheduler.start()
    workers.start()
    exporter.start()
    log.info("HTTP API on http://%s:%d (SIGTERM or Ctrl-C to stop)", *sock.getsockname()[:2])
    try:
        server.run(sockets=[sock])  # returns on SIGINT/SIGTERM (uvicorn's handlers)
    finally:
        log.info("shutting down")
        scp.stop(grace_seconds=min(10.0, settings.shutdown_grace_seconds))
        scheduler.shutdown(wait=True)
        exporter.request_stop()  # sends in progress finish while the workers do
        workers.stop(settings.shutdown_grace_seconds)
        exporter.stop(settings.shutdown_grace_seconds)
        parts.engine.dispose()
        log.info("stopped")


def work(settings: Settings) -> None:
    """Run only a worker pool and the exporter (no SCP/HTTP) until SIGINT/SIGTERM."""
    parts = build(settings)
    workers = make_worker_pool(parts)
    exporter = make_export_worker(parts)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing running jobs", signum)
        stop.set()

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    workers.start()
    exporter.start()
    while not stop.wait(1.0):
        pass
    exporter.request_stop()
    workers.stop(settings.shutdown_grace_seconds)
    exporter.stop(settings.shutdown_grace_seconds)
    parts.engine.dispose()
