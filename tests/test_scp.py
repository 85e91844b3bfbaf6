"""The DICOM SCP against real peers on loopback: pynetdicom SCU and dcmtk storescu."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from fvlm_pacs.config import AllowedCaller, Settings
from fvlm_pacs.db import AuditEvent, Instance
from fvlm_pacs.ingest.scp import StorageSCP
from fvlm_pacs.service import Parts
from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series
from tests.helpers import c_store, require_tool, storescu, wait_until


def instance_count(parts: Parts) -> int:
    with parts.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_echo(scp: StorageSCP) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="FVLM_PACS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_pynetdicom_store(scp: StorageSCP, parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=5))
    assert c_store(scp.address[1], series) == [0] * 5
    assert instance_count(parts) == 5


def test_dcmtk_storescu(scp: StorageSCP, parts: Parts, tmp_path: Path) -> None:
    require_tool("storescu")
    paths = write_series(ct_series(SeriesSpec(n_slices=8)), tmp_path / "in")
    storescu(scp.address[1], paths)
    assert instance_count(parts) == 8
    with parts.sessions() as s:
        row = s.scalars(select(Instance).limit(1)).one()
        assert row.calling_ae_title == "STORESCU" and row.source == "dimse"
    # the association's receipt is audited once it closes
    wait_until(lambda: _audited(parts) == 8, timeout=10)


def _audited(parts: Parts) -> int:
    with parts.sessions() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.kind == "instances_received"))
        return sum((e.detail or {}).get("instances", 0) for e in events)


def test_bad_instances_get_failure_status_and_server_keeps_serving(
    scp: StorageSCP, parts: Parts
) -> None:
    good, missing_uid, traversal, truncated_later = ct_series(SeriesSpec(n_slices=4))
    del missing_uid.StudyInstanceUID
    traversal.SeriesInstanceUID = "1.2.3/../../../tmp"
    statuses = c_store(scp.address[1], [good, missing_uid, traversal])
    assert statuses[0] == 0
    assert statuses[1] == 0xC001
    assert statuses[2] == 0xC002
    assert not list(Path("/tmp").glob("fvlm-escape*"))
    # the next association is served normally
    assert c_store(scp.address[1], [truncated_later]) == [0]
    assert instance_count(parts) == 2


def test_truncated_dataset_over_the_wire(scp: StorageSCP, parts: Parts, tmp_path: Path) -> None:
    """A peer whose data set ends early: pynetdicom sends a file path's bytes without decoding."""
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    path = tmp_path / "truncated.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes()[:-500])
    ae = AE(ae_title="RAW_SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="FVLM_PACS")
    assert assoc.is_established
    status = int(assoc.send_c_store(path).Status)
    assoc.release()
    assert status == 0xC000
    assert instance_count(parts) == 0


@pytest.fixture
def restricted(parts: Parts) -> Iterator[StorageSCP]:
    settings: Settings = parts.settings.model_copy(
        update={
            "allowed_callers": (
                AllowedCaller(ae_title="GOOD_SCU"),
                AllowedCaller(ae_title="HOST_SCU", host="127.0.0.2"),
            )
        }
    )
    server = StorageSCP(settings, parts.intake, parts.sessions, parts.metrics)
    server.start()
    yield server
    server.stop(grace_seconds=2)


def test_unknown_calling_ae_is_rejected(restricted: StorageSCP, parts: Parts) -> None:
    port = restricted.address[1]
    for calling in ("EVIL_SCU", "HOST_SCU"):  # HOST_SCU is only allowed from 127.0.0.2
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="FVLM_PACS")
        assert assoc.is_rejected and not assoc.is_established
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert c_store(port, ct_series(SeriesSpec(n_slices=1)), calling_aet="GOOD_SCU") == [0]


def test_dcmtk_sees_rejection(restricted: StorageSCP) -> None:
    require_tool("echoscu")
    proc = subprocess.run(
        [
            "echoscu",
            "-aet",
            "EVIL_SCU",
            "-aec",
            "FVLM_PACS",
            "127.0.0.1",
            str(restricted.address[1]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr or "Rejected" in proc.stderr


def test_garbage_on_the_port_does_not_stop_the_server(scp: StorageSCP, parts: Parts) -> None:
    with socket.create_connection(("127.0.0.1", scp.address[1]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 1000)
    assert c_store(scp.address[1], ct_series(SeriesSpec(n_slices=1))) == [0]
