"""Fixtures: a database per test on SQLite and (when configured) PostgreSQL, settings, parts,
and a real Orthanc PACS per module.

CI starts a private PostgreSQL cluster and exports FVLM_PACS_TEST_POSTGRES_URL; there, a missing
URL is an error rather than a silent skip, so the PostgreSQL half of the suite always runs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fvlm_pacs.config import Settings, load_settings
from fvlm_pacs.ingest.scp import StorageSCP
from fvlm_pacs.service import Parts, build, make_app
from tests.helpers import Orthanc

PG_ENV = "FVLM_PACS_TEST_POSTGRES_URL"


def postgres_base_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} must be set in CI (.ci/run starts PostgreSQL)")
        pytest.skip(f"PostgreSQL tests need {PG_ENV}")
    return url


def new_postgres_database() -> tuple[str, str]:
    """Create an empty database; returns (its URL, its name)."""
    base = postgres_base_url()
    name = "t_" + uuid.uuid4().hex[:16]
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base).set(database=name).render_as_string(hide_password=False), name


def drop_postgres_database(name: str) -> None:
    admin = create_engine(postgres_base_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fvlm.db'}"
        return
    url, name = new_postgres_database()
    yield url
    drop_postgres_database(name)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url, name = new_postgres_database()
    yield url
    drop_postgres_database(name)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        dicom_port=0,
        http_port=0,
        stable_seconds=30,
        job_backoff_seconds=1,
        job_lease_seconds=30,
    )


@pytest.fixture
def parts(settings: Settings) -> Iterator[Parts]:
    p = build(settings)
    yield p
    p.engine.dispose()


@pytest.fixture
def make_parts(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Parts]]:
    """Parts built from settings with overrides (api_tokens, stow_max_bytes, ...)."""
    built: list[Parts] = []

    def make(**overrides: Any) -> Parts:
        settings = load_settings(
            data_dir=tmp_path / "variant",
            database_url=database_url,
            dicom_port=0,
            http_port=0,
            **{"stable_seconds": 30, **overrides},
        )
        p = build(settings)
        built.append(p)
        return p

    yield make
    for p in built:
        p.engine.dispose()


def client_for(parts: Parts) -> TestClient:
    return TestClient(make_app(parts))


@pytest.fixture
def client(parts: Parts) -> Iterator[TestClient]:
    with client_for(parts) as c:
        yield c


@pytest.fixture
def scp(parts: Parts) -> Iterator[StorageSCP]:
    """A running SCP on a free loopback port, storing through ``parts``."""
    server = StorageSCP(parts.settings, parts.intake, parts.sessions, parts.metrics)
    server.start()
    yield server
    server.stop(grace_seconds=2)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc (+ DICOMweb) per test module: skipped locally when it is not installed."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()
