"""Export to a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback ports.

Objects go in by C-STORE and by STOW-RS and are looked up again through Orthanc's REST API.
Orthanc only accepts our calling AE title from 127.0.0.1 (as a hospital PACS would), which also
gives a real permanent rejection. Skipped locally when Orthanc is missing; a failure in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fvlm_pacs import config
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.dicomweb import DicomwebDestination
from fvlm_pacs.export.dimse import DimseDestination
from fvlm_pacs.service import Parts, make_export_worker
from tests.helpers import free_port, wait_until
from tests.test_export_destinations import make_objects, outgoing_for, sop_uids
from tests.test_export_queue import at, exports_of, one_export, store_result

ORTHANC_AET = "ORTHANC"
OUR_AET = "FVLM_PACS"  # the default ae_title: what the export worker calls with
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str:
    """Orthanc and its DICOMweb plugin; skipped locally when missing, a failure in CI."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    missing = [str(p) for p in (Path(binary), DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Orthanc is required in CI (.ci/run installs it): {missing} missing")
        pytest.skip(f"Orthanc not installed ({', '.join(missing)} missing)")
    return binary


class Orthanc:
    """One Orthanc process with its own storage, on free (or given) loopback ports."""

    def __init__(self, workdir: Path, *, dicom_port: int | None = None) -> None:
        self.binary = orthanc_binary()
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "fvlm-export-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP from loopback only
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # a PACS that knows its modalities: only our AE title, only from 127.0.0.1
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"fvlm": [OUR_AET, "127.0.0.1", 11112]},
            "StorageCompression": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=2))
        self.log_path = self.workdir / "orthanc.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                cwd=self.workdir,
            )
        wait_until(self._ready, timeout=60, interval=0.2)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            requests.get(f"{self.url}/system", timeout=1).raise_for_status()
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except (requests.RequestException, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def instances_in_study(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs Orthanc holds in the study (REST /tools/find)."""
        r = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            timeout=10,
        )
        r.raise_for_status()
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in r.json()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def cstore_to(
    server: Orthanc, *, calling: str = OUR_AET, called: str = ORTHANC_AET
) -> DimseDestination:
    cfg = config.DimseDestination(
        name="orthanc-dimse",
        kind="dimse",
        host="127.0.0.1",
        port=server.dicom_port,
        ae_title=called,
    )
    return DimseDestination(cfg, calling_ae_title=calling, timeout=10)


def stow_to(server: Orthanc) -> DicomwebDestination:
    cfg = config.DicomwebDestination(
        name="orthanc-web", kind="dicomweb", url=f"{server.url}/dicom-web"
    )
    return DicomwebDestination(cfg, timeout=10)


# -- destinations against Orthanc --------------------------------------------------------------


def test_cstore_lands_in_the_study(orthanc: Orthanc, tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path)
    cstore_to(orthanc).send(outgoing_for(study, paths))
    assert orthanc.instances_in_study(study) == sop_uids(paths)
    cstore_to(orthanc).send(outgoing_for(study, paths))  # a resend is harmless
    assert orthanc.instances_in_study(study) == sop_uids(paths)


def test_stow_lands_in_the_study(orthanc: Orthanc, tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path)
    stow_to(orthanc).send(outgoing_for(study, paths))
    assert orthanc.instances_in_study(study) == sop_uids(paths)


@pytest.mark.parametrize(
    ("calling", "called"), [("STRANGER", ORTHANC_AET), (OUR_AET, "NOT_ORTHANC")]
)
def test_orthanc_rejecting_the_association_is_permanent(
    orthanc: Orthanc, tmp_path: Path, calling: str, called: str
) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    with pytest.raises(ExportError) as caught:
        cstore_to(orthanc, calling=calling, called=called).send(outgoing_for(study, paths))
    assert not caught.value.retryable
    assert "rejected-permanent" in str(caught.value)
    assert orthanc.instances_in_study(study) == set()


def test_stow_into_another_study_is_permanent(orthanc: Orthanc, tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    wrong = Outgoing(result_id=1, study_instance_uid="1.2.3.4", files=tuple(paths), payload={})
    with pytest.raises(ExportError) as caught:  # Orthanc: 409 with a Failed SOP Sequence
        stow_to(orthanc).send(wrong)
    assert not caught.value.retryable
    assert orthanc.instances_in_study(study) == set()


# -- the queue and worker against Orthanc (both databases) -------------------------------------


def dimse(name: str, server: Orthanc, ae_title: str = ORTHANC_AET) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "dimse",
        "host": "127.0.0.1",
        "port": server.dicom_port,
        "ae_title": ae_title,
    }


def test_good_destinations_deliver_while_a_rejecting_one_is_dead(
    orthanc: Orthanc, make_parts: Callable[..., Parts]
) -> None:
    parts = make_parts(
        destinations=[
            dimse("pacs", orthanc),
            {"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
            dimse("misconfigured", orthanc, ae_title="NOT_ORTHANC"),
        ]
    )
    _, study, paths = store_result(parts)
    parts.exports.clock = at(0)
    worker = make_export_worker(parts)
    worker.poll_seconds = 0.05
    worker.start()
    try:

        def settled() -> bool:
            return all(e.state in ("done", "dead") for e in exports_of(parts))

        wait_until(settled, timeout=60)
    finally:
        worker.stop(grace_seconds=5)
    assert one_export(parts, "pacs").state == "done"
    assert one_export(parts, "web").state == "done"
    bad = one_export(parts, "misconfigured")
    assert bad.state == "dead" and bad.attempts == 1
    assert bad.last_error and "rejected-permanent" in bad.last_error
    assert orthanc.instances_in_study(study) == sop_uids(paths)


def test_destination_down_backs_off_then_delivers(
    make_parts: Callable[..., Parts], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    later_orthanc = Orthanc(tmp_path / "orthanc", dicom_port=port)
    parts = make_parts(
        destinations=[
            {
                "name": "pacs",
                "kind": "dimse",
                "host": "127.0.0.1",
                "port": port,
                "ae_title": "ORTHANC",
            }
        ],
        export_backoff_seconds=10,
        export_backoff_max_seconds=600,
    )
    _, study, paths = store_result(parts)
    worker = make_export_worker(parts)

    next_attempts = []
    for offset in (0, 11):
        parts.exports.clock = at(offset)
        assert worker.deliver_one("pacs") == "pending"
        row = one_export(parts, "pacs")
        assert row.next_attempt_at is not None
        assert row.last_error and "connection refused" in row.last_error
        next_attempts.append(row.next_attempt_at)
    assert next_attempts[1] - next_attempts[0] > (next_attempts[0] - at(0)())  # growing delays

    later_orthanc.start()
    try:
        parts.exports.clock = at(11 + 21)
        assert worker.deliver_one("pacs") == "done"
        row = one_export(parts, "pacs")
        assert row.state == "done" and row.attempts == 3
        assert later_orthanc.instances_in_study(study) == sop_uids(paths)
    finally:
        later_orthanc.stop()
