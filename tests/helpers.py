"""Shared test helpers: encoding, free ports, polling, a `fvlm-pacs serve` subprocess, and a
real Orthanc (+ DICOMweb plugin) on loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES

T = TypeVar("T")


def encode(ds: Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (what STOW-RS parts and C-STORE spool files hold)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def require_tool(name: str) -> str:
    """Path of a peer program; skipped locally when missing, a failure in CI (which installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def c_store(
    port: int,
    datasets: Sequence[Dataset],
    *,
    calling_aet: str = "TEST_SCU",
    called_aet: str = "FVLM_PACS",
) -> list[int]:
    """Send datasets over one association with pynetdicom; returns the statuses."""
    ae = AE(ae_title=calling_aet)
    # a context per (SOP class, transfer syntax) the data sets use: the acceptor chooses one
    # syntax per context, so a compressed data set needs a context offering only its own
    for sop_class, tsuid in sorted(
        {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}
    ):
        ae.add_requested_context(sop_class, tsuid)
    for sop_class in sorted({d.SOPClassUID for d in datasets}):
        ae.add_requested_context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association was not accepted"
    try:
        statuses = []
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        return statuses
    finally:
        assoc.release()


def storescu(port: int, paths: Sequence[Path], *, calling_aet: str = "STORESCU") -> None:
    """Send files with dcmtk's storescu (the de facto reference SCU).

    ``-R`` proposes exactly the (SOP class, transfer syntax) pairs the files need: storescu's
    default list leaves out some storage classes (Segmentation Storage among them).
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(
        ["storescu", "-R", "-aet", calling_aet, "-aec", "FVLM_PACS", "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )


class LoopbackHttp:
    """A server under test with an HTTP API on ``127.0.0.1:http_port``: GETs that fail the test
    on an HTTP error (``fvlm-pacs serve``'s API, Orthanc's REST API)."""

    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        """A resource as JSON (``/api/exports``, ``/studies/{id}/series``…)."""
        r = requests.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def get_text(self, path: str) -> str:
        """A resource as text (``/metrics``, the worklist page)."""
        r = requests.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.text


class ServeProcess(LoopbackHttp):
    """``fvlm-pacs serve`` in a subprocess with its own config file and free ports."""

    def __init__(self, workdir: Path, **settings: Any) -> None:
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        config = {
            "data_dir": str(workdir / "data"),
            "dicom_port": self.dicom_port,
            "http_port": self.http_port,
            "stable_seconds": 1.0,
            "job_backoff_seconds": 0.5,
            **settings,
        }
        self.config_path = workdir / "fvlm.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fvlm_pacs.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._healthy, timeout=60)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(f"{self.url}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


# -- a real PACS: Orthanc ---------------------------------------------------------------------

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


class Orthanc(LoopbackHttp):
    """One Orthanc process with its own storage, on free (or given) loopback ports."""

    def __init__(self, workdir: Path, *, dicom_port: int | None = None) -> None:
        self.binary = orthanc_binary()
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

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

    def studies_with_uid(self, study_uid: str) -> list[str]:
        """Orthanc IDs of the study resources with this Study Instance UID (one per patient)."""
        r = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
            timeout=10,
        )
        r.raise_for_status()
        return [str(i) for i in r.json()]

    def upload(self, path: Path) -> str:
        """Store a file through the REST API (as the PACS's own content); its Orthanc ID."""
        r = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=10)
        r.raise_for_status()
        return str(r.json()["ID"])

    def download(self, instance_id: str, target: Path) -> Path:
        """The stored Part 10 file of an instance, byte for byte (``/instances/{id}/file``)."""
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=10)
        r.raise_for_status()
        target.write_bytes(r.content)
        return target
