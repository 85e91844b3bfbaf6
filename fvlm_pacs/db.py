"""Database schema and session factory (SQLite in WAL mode, or PostgreSQL).

The schema is the durable state of the service: what was received (studies, series, instances),
what must be done (jobs), what came out (results), where it went (exports) and who did what
(audit events). Alembic migrations in ``fvlm_pacs/migrations`` create and evolve it;
:func:`upgrade` applies them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

#: any SELECT statement; claim helpers return the statement they were given, typed the same
SelectT = TypeVar("SelectT", bound=Select)

UID = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One study as received. ``revision`` counts bursts of arrivals: it goes up when an instance
    arrives after the previous burst already got a job (the study re-opens)."""

    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    first_received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    completed_revision: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the spool directory."""

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # dimse | stow | spool-recovery
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Job(Base):
    """A unit of work for the worker: run the pipeline on one revision of one study.

    The unique key (study, pipeline version, study revision) makes job creation idempotent across
    processes: two sweeps racing on the same study insert one row.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "pipeline_version", "study_revision"),
        Index("ix_jobs_claim", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    pipeline_version: Mapped[str] = mapped_column(String(64))
    study_revision: Mapped[int] = mapped_column(Integer)
    # queued | running | succeeded | failed | dead | superseded
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    supersedes_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Result(Base):
    """What a succeeded job produced. A newer result of the same study names the one it replaces
    through ``supersedes_result_id``; nothing is deleted."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    pipeline_version: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    supersedes_result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Export(Base):
    """One (result, destination) delivery with its own retry state.

    ``pending → sending → done | dead``; a ``sending`` row holds a lease its worker renews, so a
    crashed sender's row is claimed again once ``lease_expires_at`` has passed.
    """

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_exports_claim", "destination", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # pending | sending | done | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditEvent(Base):
    """Who did what to which study or job (received, job created, retried, …); never PHI."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(128))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def make_engine(url: str) -> Engine:
    """Create the engine with the settings each backend needs for concurrent writers.

    SQLite: WAL so readers never block the writer; ``BEGIN IMMEDIATE`` so a transaction takes the
    write lock up front (a deferred one can fail with SQLITE_BUSY when it upgrades); a busy
    timeout so writers queue instead of failing; ``synchronous=FULL`` so a commit is on disk
    before the SCP acknowledges.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=20,
            max_overflow=20,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (safe to call on each start)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def audit(
    session: Any,
    kind: str,
    *,
    actor: str | None = None,
    study_instance_uid: str | None = None,
    job_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session's transaction (committed with the change it records)."""
    session.add(
        AuditEvent(
            at=utcnow(),
            kind=kind,
            actor=actor,
            study_instance_uid=study_instance_uid,
            job_id=job_id,
            detail=detail,
        )
    )


def skip_locked(session: Any, query: SelectT) -> SelectT:
    """Lock the rows a claim query selects, skipping rows other claimers hold (PostgreSQL).

    Many workers on many hosts can then claim from one table without waiting on each other; on
    SQLite the ``BEGIN IMMEDIATE`` write lock already serialises claimers, so nothing is added.
    """
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def insert_ignore(session: Any, model: Any, values: dict[str, Any], keys: list[str]) -> int:
    """INSERT … ON CONFLICT DO NOTHING on SQLite and PostgreSQL; returns rows inserted (0 or 1).

    This is how rows keyed by DICOM UIDs and the job key are created idempotently when several
    threads or processes race to create the same one. RETURNING tells whether the row was new
    (the driver's rowcount is not reliable for this on every backend).
    """
    dialect = session.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)
    key_column = getattr(model, keys[0])
    stmt = ins.values(**values).on_conflict_do_nothing(index_elements=keys).returning(key_column)
    return len(session.execute(stmt).all())
