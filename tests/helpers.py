"""Shared test helpers: encoding, free ports, polling, a `fvlm-pacs serve` subprocess."""

from __future__ import annotations

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
    """Send files with dcmtk's storescu (the de facto reference SCU)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(
        ["storescu", "-aet", calling_aet, "-aec", "FVLM_PACS", "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )


class ServeProcess:
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

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

    def get(self, path: str) -> Any:
        r = requests.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def get_text(self, path: str) -> str:
        r = requests.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.text

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
