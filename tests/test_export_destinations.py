"""Export destinations against in-process peers: a pynetdicom Storage SCP, a local HTTP server
and a folder. Checks what each peer received and how every failure is classified."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from fvlm_pacs import config
from fvlm_pacs.config import load_settings
from fvlm_pacs.errors import ConfigError, ExportError
from fvlm_pacs.export import make_destination
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.dicomweb import DicomwebDestination
from fvlm_pacs.export.dimse import (
    DimseDestination,
    association_error,
    classify_status,
    requested_contexts,
)
from fvlm_pacs.export.folder import FolderDestination
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.helpers import free_port

CALLING = "FVLM_PACS"


# -- objects to send ---------------------------------------------------------------------------


def make_objects(
    folder: Path, *, study: str | None = None, n_ct: int = 2, secondary_capture: bool = True
) -> tuple[str, list[Path]]:
    """Small Part 10 files of one study: ``n_ct`` CT slices (the first in Implicit VR) and
    optionally a Secondary Capture — two SOP classes and two transfer syntaxes, like a result's
    SEG + SR. Returns (Study Instance UID, paths)."""
    study = study or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    datasets = ct_series(SeriesSpec(n_slices=n_ct, rows=16, columns=16), study_instance_uid=study)
    if n_ct:
        datasets[0].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if secondary_capture:
        sc = ct_series(SeriesSpec(n_slices=1, rows=16, columns=16), study_instance_uid=study)[0]
        sc.SOPClassUID = SecondaryCaptureImageStorage
        sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        sc.Modality = "OT"
        sc.ConversionType = "WSD"
        datasets.append(sc)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def outgoing_for(study: str, paths: list[Path], result_id: int = 1) -> Outgoing:
    return Outgoing(result_id=result_id, study_instance_uid=study, files=tuple(paths), payload={})


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# -- a pynetdicom Storage SCP ------------------------------------------------------------------


@dataclass
class StorageScp:
    """What the SCP received, and the status it answers (per call, by a function)."""

    port: int = 0
    stored: list[str] = field(default_factory=list)
    requested: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    status: Callable[[Dataset], int] = lambda ds: 0x0000


def run_scp(
    sop_classes: list[str] | None = None,
    *,
    require_calling_aet: list[str] | None = None,
    maximum_associations: int = 10,
) -> tuple[StorageScp, Any]:
    state = StorageScp()
    ae = AE(ae_title="STORE_SCP")
    ae.maximum_associations = maximum_associations
    if require_calling_aet:
        ae.require_calling_aet = require_calling_aet
    for sop in sop_classes or [CTImageStorage, SecondaryCaptureImageStorage]:
        ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def on_store(event: Event) -> int:
        ds = event.dataset
        if not state.requested:
            state.requested = sorted(
                (str(cx.abstract_syntax), tuple(str(t) for t in cx.transfer_syntax))
                for cx in event.assoc.requestor.requested_contexts
            )
        status = state.status(ds)
        if status in (0x0000, 0xB000, 0x0111):
            state.stored.append(str(ds.SOPInstanceUID))
        return status

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    state.port = server.server_address[1]
    return state, server


@pytest.fixture
def scp() -> Iterator[StorageScp]:
    state, server = run_scp()
    yield state
    server.shutdown()


def dimse_to(port: int, *, ae_title: str = "STORE_SCP", timeout: float = 5) -> DimseDestination:
    cfg = config.DimseDestination(
        name="pacs", kind="dimse", host="127.0.0.1", port=port, ae_title=ae_title
    )
    return DimseDestination(cfg, calling_ae_title=CALLING, timeout=timeout)


def test_status_classification() -> None:
    assert classify_status(0x0000) == "success"
    for warning in (0x0001, 0xB000, 0xB006, 0xB007, 0x0111):
        assert classify_status(warning) == "warning"
    for retry in (0xA700, 0xA7FF, 0x0213):
        assert classify_status(retry) == "retryable"
    for permanent in (0xA900, 0xC000, 0xCFFF, 0x0122, 0x0124, 0x0110, 0x0117, 0xFFFF):
        assert classify_status(permanent) == "permanent"


def test_contexts_are_exactly_what_the_files_need(tmp_path: Path) -> None:
    _, paths = make_objects(tmp_path)
    datasets = [dcmread(p) for p in paths]
    contexts = dict(requested_contexts(datasets))
    assert set(contexts) == {CTImageStorage, SecondaryCaptureImageStorage}
    # the CT files use both little-endian syntaxes; each context offers both, nothing else
    assert set(contexts[CTImageStorage]) == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    assert set(contexts[SecondaryCaptureImageStorage]) == {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    }


def test_dimse_stores_everything_over_one_association(tmp_path: Path, scp: StorageScp) -> None:
    study, paths = make_objects(tmp_path)
    dimse_to(scp.port).send(outgoing_for(study, paths))
    assert set(scp.stored) == sop_uids(paths)
    assert [sop for sop, _ in scp.requested] == sorted(
        [CTImageStorage, SecondaryCaptureImageStorage]
    )


def test_dimse_warning_and_duplicate_count_as_stored(tmp_path: Path, scp: StorageScp) -> None:
    study, paths = make_objects(tmp_path)
    answers = iter([0xB000, 0x0111, 0x0000])
    scp.status = lambda ds: next(answers)
    dimse_to(scp.port).send(outgoing_for(study, paths))
    assert len(scp.stored) == 3


@pytest.mark.parametrize(
    ("statuses", "retryable"),
    [
        ([0x0000, 0xA700, 0x0000], True),  # out of resources: later
        ([0x0000, 0xC000, 0x0000], False),  # cannot understand
        ([0xA900, 0x0000, 0x0000], False),  # does not match SOP class
        ([0xA700, 0xC000, 0x0000], False),  # one permanent failure makes the attempt permanent
        ([0x0122, 0x0000, 0x0000], False),  # SOP class not supported
    ],
)
def test_dimse_failure_statuses_are_classified(
    tmp_path: Path, scp: StorageScp, statuses: list[int], retryable: bool
) -> None:
    study, paths = make_objects(tmp_path)
    answers = iter(statuses)
    scp.status = lambda ds: next(answers)
    with pytest.raises(ExportError) as caught:
        dimse_to(scp.port).send(outgoing_for(study, paths))
    assert caught.value.retryable is retryable
    assert "0x" in str(caught.value)


def test_dimse_nothing_listening_is_retryable(tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path)
    started = time.monotonic()
    with pytest.raises(ExportError) as caught:
        dimse_to(free_port()).send(outgoing_for(study, paths))
    assert caught.value.retryable
    assert time.monotonic() - started < 5


def test_dimse_calling_ae_rejected_is_permanent(tmp_path: Path) -> None:
    state, server = run_scp(require_calling_aet=["SOMEONE_ELSE"])
    try:
        study, paths = make_objects(tmp_path)
        with pytest.raises(ExportError) as caught:
            dimse_to(state.port).send(outgoing_for(study, paths))
        assert not caught.value.retryable
        assert "rejected-permanent by service-user: calling AE title not recognised" in str(
            caught.value
        )
        assert state.stored == []
    finally:
        server.shutdown()


def test_dimse_transient_rejection_is_retryable(tmp_path: Path) -> None:
    state, server = run_scp(maximum_associations=1)
    try:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(CTImageStorage)
        held = holder.associate("127.0.0.1", state.port, ae_title="STORE_SCP")
        assert held.is_established
        study, paths = make_objects(tmp_path)
        with pytest.raises(ExportError) as caught:
            dimse_to(state.port).send(outgoing_for(study, paths))
        assert caught.value.retryable
        assert "rejected-transient" in str(caught.value)
        held.release()
    finally:
        server.shutdown()


def test_dimse_unsupported_sop_class_is_permanent_and_sends_nothing(tmp_path: Path) -> None:
    state, server = run_scp([CTImageStorage])  # no Secondary Capture
    try:
        study, paths = make_objects(tmp_path)
        with pytest.raises(ExportError) as caught:
            dimse_to(state.port).send(outgoing_for(study, paths))
        assert not caught.value.retryable
        assert SecondaryCaptureImageStorage in str(caught.value)
        assert state.stored == []  # checked before the first C-STORE: no half-sent result
    finally:
        server.shutdown()


def test_dimse_no_context_at_all_is_permanent(tmp_path: Path) -> None:
    state, server = run_scp([SecondaryCaptureImageStorage])
    try:
        study, paths = make_objects(tmp_path, secondary_capture=False)
        with pytest.raises(ExportError) as caught:
            dimse_to(state.port).send(outgoing_for(study, paths))
        assert not caught.value.retryable
        assert "presentation context" in str(caught.value)
    finally:
        server.shutdown()


def test_dimse_unreadable_file_is_permanent(tmp_path: Path, scp: StorageScp) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(ExportError) as caught:
        dimse_to(scp.port).send(outgoing_for("1.2.3", [bad]))
    assert not caught.value.retryable


# -- a local DICOMweb server -------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] | None = None
    delay: float = 0.0


@dataclass
class HttpPeer:
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    reply: Callable[[], Reply] = Reply


@pytest.fixture
def http_peer() -> Iterator[HttpPeer]:
    peer = HttpPeer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length") or 0)
            if self.headers.get("transfer-encoding") == "chunked":
                body = self._read_chunked()
            else:
                body = self.rfile.read(length)
            peer.requests.append(
                {"path": self.path, "headers": dict(self.headers), "bytes": len(body)}
            )
            reply = peer.reply()
            time.sleep(reply.delay)
            data = json.dumps(reply.body).encode() if reply.body is not None else b""
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (the timeout test)

        def _read_chunked(self) -> bytes:
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    peer.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield peer
    server.shutdown()
    server.server_close()


def stow_to(port: int, *, token: str | None = "s3cret", timeout: float = 5) -> DicomwebDestination:
    cfg = config.DicomwebDestination(
        name="web",
        kind="dicomweb",
        url=f"http://127.0.0.1:{port}/dicom-web",
        token=token,  # type: ignore[arg-type]  # pydantic turns it into a SecretStr
    )
    return DicomwebDestination(cfg, timeout=timeout)


def stow_response(
    stored: Sequence[str] = (), failed: Sequence[tuple[str, int]] = ()
) -> dict[str, Any]:
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds.to_json_dict()


def test_stow_posts_to_the_study_with_the_bearer_token(tmp_path: Path, http_peer: HttpPeer) -> None:
    study, paths = make_objects(tmp_path)
    http_peer.reply = lambda: Reply(200, stow_response(sorted(sop_uids(paths))))
    stow_to(http_peer.port).send(outgoing_for(study, paths))
    [request] = http_peer.requests
    assert request["path"] == f"/dicom-web/studies/{study}"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    assert 'type="application/dicom"' in request["headers"]["Content-Type"]
    assert request["bytes"] > sum(p.stat().st_size for p in paths) * 0.9


def test_stow_without_token_sends_no_authorization(tmp_path: Path, http_peer: HttpPeer) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    http_peer.reply = lambda: Reply(200, None)  # 200 without a body: the status says it all
    stow_to(http_peer.port, token=None).send(outgoing_for(study, paths))
    assert "Authorization" not in http_peer.requests[0]["headers"]


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (401, False), (404, False)],
)
def test_stow_http_status_classification(
    tmp_path: Path, http_peer: HttpPeer, status: int, retryable: bool
) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    http_peer.reply = lambda: Reply(status, {})
    with pytest.raises(ExportError) as caught:
        stow_to(http_peer.port).send(outgoing_for(study, paths))
    assert caught.value.retryable is retryable
    assert f"HTTP {status}" in str(caught.value)
    assert len(http_peer.requests) == 1  # the client's own retries are off


@pytest.mark.parametrize(
    ("http_status", "reason", "retryable"),
    [(202, 0xA700, True), (202, 0xC000, False), (409, 0xA700, True), (409, 0xC000, False)],
)
def test_stow_failed_sop_sequence_is_classified_by_reason(
    tmp_path: Path, http_peer: HttpPeer, http_status: int, reason: int, retryable: bool
) -> None:
    study, paths = make_objects(tmp_path)
    uids = sorted(sop_uids(paths))
    http_peer.reply = lambda: Reply(http_status, stow_response(uids[1:], [(uids[0], reason)]))
    with pytest.raises(ExportError) as caught:
        stow_to(http_peer.port).send(outgoing_for(study, paths))
    assert caught.value.retryable is retryable
    assert uids[0] in str(caught.value)


def test_stow_unacknowledged_object_is_retryable(tmp_path: Path, http_peer: HttpPeer) -> None:
    study, paths = make_objects(tmp_path)
    uids = sorted(sop_uids(paths))
    http_peer.reply = lambda: Reply(200, stow_response(uids[:-1]))
    with pytest.raises(ExportError) as caught:
        stow_to(http_peer.port).send(outgoing_for(study, paths))
    assert caught.value.retryable


def test_stow_connection_refused_and_timeout_are_retryable(
    tmp_path: Path, http_peer: HttpPeer
) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    with pytest.raises(ExportError) as refused:
        stow_to(free_port()).send(outgoing_for(study, paths))
    assert refused.value.retryable
    http_peer.reply = lambda: Reply(200, None, delay=2.0)
    with pytest.raises(ExportError) as slow:
        stow_to(http_peer.port, timeout=0.5).send(outgoing_for(study, paths))
    assert slow.value.retryable


def test_token_never_appears_in_errors(tmp_path: Path, http_peer: HttpPeer) -> None:
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    http_peer.reply = lambda: Reply(401, {})
    with pytest.raises(ExportError) as caught:
        stow_to(http_peer.port).send(outgoing_for(study, paths))
    assert "s3cret" not in str(caught.value)


# -- folder ------------------------------------------------------------------------------------


def test_folder_copies_by_uids_atomically_and_idempotently(tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path / "out")
    dest = FolderDestination(
        config.FolderDestination(name="dir", kind="folder", path=tmp_path / "dest")
    )
    dest.send(outgoing_for(study, paths))
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        target = tmp_path / "dest" / study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == path.read_bytes()
    files = sorted(p for p in (tmp_path / "dest").rglob("*") if p.is_file())
    assert len(files) == len(paths)
    assert not [p for p in files if p.name.startswith(".")]  # no temporary files left
    stamps = [p.stat().st_mtime_ns for p in files]
    dest.send(outgoing_for(study, paths))  # a resend after a crash changes nothing
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_folder_bad_object_is_permanent(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"junk")
    dest = FolderDestination(
        config.FolderDestination(name="dir", kind="folder", path=tmp_path / "dest")
    )
    with pytest.raises(ExportError) as caught:
        dest.send(outgoing_for("1.2.3", [bad]))
    assert not caught.value.retryable


def test_folder_unwritable_target_is_classified(tmp_path: Path) -> None:
    study, paths = make_objects(tmp_path / "out", n_ct=1, secondary_capture=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the destination folder should be")
    dest = FolderDestination(config.FolderDestination(name="dir", kind="folder", path=blocker))
    with pytest.raises(ExportError) as caught:  # ENOTDIR/EEXIST: may be fixed by an operator
        dest.send(outgoing_for(study, paths))
    assert caught.value.retryable
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        dest = FolderDestination(config.FolderDestination(name="d", kind="folder", path=locked))
        with pytest.raises(ExportError) as denied:
            dest.send(outgoing_for(study, paths))
        assert not denied.value.retryable


# -- factory -----------------------------------------------------------------------------------


def test_make_destination_dispatches_on_kind(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        ae_title="OUR_AE",
        export_timeout_seconds=7,
        destinations=[
            {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "X"},
            {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
            {"name": "dir", "kind": "folder", "path": str(tmp_path / "d")},
        ],
    )
    made = [make_destination(d, settings) for d in settings.destinations]
    assert [type(d).__name__ for d in made] == [
        "DimseDestination",
        "DicomwebDestination",
        "FolderDestination",
    ]
    assert [d.name for d in made] == ["pacs", "web", "dir"]
    dimse = made[0]
    assert isinstance(dimse, DimseDestination)
    assert dimse.calling_ae_title == "OUR_AE" and dimse.timeout == 7
    with pytest.raises(ConfigError, match="unknown kind"):
        make_destination(SimpleNamespace(name="x", kind="carrier-pigeon"), settings)


def test_make_destination_hl7_is_imported_lazily(tmp_path: Path) -> None:
    from fvlm_pacs.export.hl7 import Hl7Destination

    settings = load_settings(
        data_dir=tmp_path,
        destinations=[{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575}],
    )
    made = make_destination(settings.destinations[0], settings)
    assert isinstance(made, Hl7Destination) and made.name == "ris"


def test_duplicate_destination_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unique"):
        load_settings(
            data_dir=tmp_path,
            destinations=[
                {"name": "a", "kind": "folder", "path": str(tmp_path / "1")},
                {"name": "a", "kind": "folder", "path": str(tmp_path / "2")},
            ],
        )


def test_dimse_rejection_followed_by_a_reset_is_still_permanent(tmp_path: Path) -> None:
    """A non-pynetdicom peer that rejects and resets the connection at once: dead, not retried."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rejected = 0

    def reject_all() -> None:
        nonlocal rejected
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)  # the A-ASSOCIATE-RQ
                # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE not recognised
                conn.sendall(bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3]))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                rejected += 1

    thread = threading.Thread(target=reject_all, daemon=True)
    thread.start()
    study, paths = make_objects(tmp_path, n_ct=1, secondary_capture=False)
    try:
        for _ in range(5):
            with pytest.raises(ExportError) as caught:
                dimse_to(port).send(outgoing_for(study, paths))
            assert not caught.value.retryable, str(caught.value)
            assert "calling AE title not recognised" in str(caught.value)
    finally:
        listener.close()
    assert rejected == 5


def test_a_rejection_reported_as_an_abort_is_still_permanent() -> None:
    """Against Orthanc, about one rejected association in twenty comes back from pynetdicom as
    aborted (the peer closes right after its A-ASSOCIATE-RJ). The PDU, captured as it arrived,
    decides; without it an abort is retryable."""
    aborted = SimpleNamespace(
        is_rejected=False, is_aborted=True, acceptor=SimpleNamespace(primitive=None)
    )
    pdu = A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = 1, 1, 7
    error = association_error(aborted, "PACS@127.0.0.1:104", pdu)  # type: ignore[arg-type]
    assert not error.retryable
    assert "rejected-permanent by service-user: called AE title not recognised" in str(error)
    assert association_error(aborted, "PACS@127.0.0.1:104").retryable  # type: ignore[arg-type]
    pdu.result, pdu.source, pdu.reason_diagnostic = 2, 3, 1
    assert association_error(aborted, "x", pdu).retryable  # type: ignore[arg-type]
