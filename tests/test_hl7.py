"""HL7 v2.5.1 ORU^R01 over MLLP against a loopback listener; the message is read back with the
``hl7`` package (an independent parser), never with our own code."""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fvlm_pacs.config import Hl7Destination as Hl7Settings
from fvlm_pacs.config import load_settings
from fvlm_pacs.errors import ConfigError, ExportError
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.hl7 import END_BLOCK, START_BLOCK, Hl7Destination, escape, parse_ack
from fvlm_pacs.triage import assess, parse_triage_rules
from tests.helpers import free_port
from tests.test_triage import KNOWN, finding

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PATIENT_ID = "PAT|0042"  # a delimiter in the ID: must arrive escaped and unescape intact
PATIENT_NAME = "Müller^Jörg^Q^Dr^III"

RULES = parse_triage_rules(
    {
        "version": 1,
        "rules": [
            {"name": "effusion", "findings": ["pleural_effusion", "pericardial_effusion"], "priority": "high"},
            {"name": "pe_critical", "findings": ["pericardial_effusion"], "priority": "critical", "margin": 0.2},
        ],
    },
    KNOWN,
)  # fmt: skip


def sr_file(
    folder: Path, study_uid: str, *, patient_id: str = PATIENT_ID, name: str = "sr.dcm"
) -> Path:
    """A small SR-like Part 10 file with the patient and study modules the HL7 export reads."""
    ds = Dataset()
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP&A"
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = "19600229"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC^123"
    ds.StudyDate = "20250102"
    ds.StudyTime = "093015.123"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def outgoing(tmp_path: Path, findings: list[dict[str, Any]] | None = None) -> Outgoing:
    study = generate_uid()
    rows = findings if findings is not None else [
        finding("pericardial_effusion", 0.81),
        finding("pleural_effusion", 0.62),
        finding("emphysema", 0.31),
        finding("cardiomegaly", None),
    ]  # fmt: skip
    png = tmp_path / "summary.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return Outgoing(
        result_id=7,
        study_instance_uid=study,
        files=(png, sr_file(tmp_path, study)),
        payload={"findings": rows, "triage": assess(rows, RULES).as_dict()},
    )


class MllpListener:
    """One MLLP peer on a free loopback port: records each framed message, answers via
    ``reply`` (bytes to frame and send, or None to say nothing and wait for the client to go)."""

    def __init__(self, reply: Callable[[bytes], bytes | None]) -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # so that close() ends the accept loop promptly
        self.stopped = threading.Event()
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                buf = b""
                while END_BLOCK not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                if END_BLOCK not in buf:
                    continue
                message = buf[buf.index(START_BLOCK) + 1 : buf.index(END_BLOCK)]
                self.received.append(message)
                answer = self.reply(message)
                if answer is None:
                    try:
                        conn.recv(1)  # until the client gives up
                    except OSError:
                        pass
                    continue
                conn.sendall(START_BLOCK + answer + END_BLOCK)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


def ack_with(code: str) -> Callable[[bytes], bytes]:
    """An ACK built by the hl7 package from the message received."""

    def reply(message: bytes) -> bytes:
        return str(hl7.parse(message.decode("utf-8")).create_ack(code)).encode("utf-8")

    return reply


@pytest.fixture
def listen() -> Iterator[Callable[[Callable[[bytes], bytes | None]], MllpListener]]:
    started: list[MllpListener] = []

    def start(reply: Callable[[bytes], bytes | None]) -> MllpListener:
        listener = MllpListener(reply)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.close()


def settings(port: int, **kw: Any) -> Hl7Settings:
    return Hl7Settings(
        name="ris",
        kind="hl7",
        host="127.0.0.1",
        port=port,
        sending_application="FVLM_PACS",
        sending_facility="RADIOLOGY",
        receiving_application="RIS",
        receiving_facility="HOSPITAL",
        **{"timeout": 5.0, **kw},
    )


def field(msg: hl7.Message, segment: hl7.Segment, index: int) -> str:
    return str(msg.unescape(str(segment[index])))


def component(msg: hl7.Message, segment: hl7.Segment, index: int, comp: int) -> str:
    """Component ``comp`` (1-based) of field ``index`` of one segment, unescaped."""
    value = segment[index]
    if isinstance(value, hl7.Field) and len(value) and isinstance(value[0], hl7.Repetition):
        value = value[0]
    parts = list(value) if isinstance(value, (hl7.Repetition, hl7.Field)) else [value]
    if len(parts) == 1 and comp > 1:
        return ""
    part = parts[comp - 1] if comp <= len(parts) else ""
    return str(msg.unescape(str(part)))


def received(listener: MllpListener) -> hl7.Message:
    (raw,) = listener.received
    return hl7.parse(raw.decode("utf-8"))


# --- the message -------------------------------------------------------------------------------


def test_oru_round_trip(tmp_path: Path, listen: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    listener = listen(ack_with("AA"))
    out = outgoing(tmp_path)
    Hl7Destination(settings(listener.port)).send(out)
    msg = received(listener)
    # triage OBX + its two flags, the Study Instance UID, 3 findings × 3 OBX, 1 not assessable × 2
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "OBR", "TQ1", "OBX", "NTE", "NTE", "OBX"] + [
        "OBX"
    ] * 11  # fmt: skip

    msh = msg.segment("MSH")
    assert str(msh[2]) == "^~\\&"
    assert [str(msh[i]) for i in (3, 4, 5, 6)] == ["FVLM_PACS", "RADIOLOGY", "RIS", "HOSPITAL"]
    assert str(msh[9]) == "ORU^R01^ORU_R01"
    assert len(str(msh[10])) == 20
    assert (str(msh[11]), str(msh[12]), str(msh[18])) == ("P", "2.5.1", "UNICODE UTF-8")

    pid = msg.segment("PID")
    assert component(msg, pid, 3, 1) == PATIENT_ID
    assert component(msg, pid, 3, 4) == "HOSP&A"
    # DICOM family^given^middle^prefix^suffix → HL7 XPN family^given^middle^suffix^prefix
    assert [component(msg, pid, 5, i) for i in range(1, 6)] == ["Müller", "Jörg", "Q", "III", "Dr"]
    assert (str(pid[7]), str(pid[8])) == ("19600229", "F")

    obr = msg.segment("OBR")
    assert component(msg, obr, 3, 1) == out.study_instance_uid
    assert component(msg, obr, 3, 2) == "FVLM_PACS"
    assert component(msg, obr, 4, 1) == "fvlm_ct"
    assert str(obr[5]) == "S"  # critical → stat
    assert str(obr[7]) == "20250102093015"
    assert field(msg, obr, 18) == "ACC^123"
    assert (str(obr[24]), str(obr[25])) == ("CT", "F")
    tq1 = msg.segment("TQ1")
    assert [component(msg, tq1, 9, i) for i in (1, 3, 4)] == ["S", "HL70485", "critical"]

    obx = msg.segments("OBX")
    assert [int(str(o[1])) for o in obx] == list(range(1, len(obx) + 1))
    triage = obx[0]
    assert component(msg, triage, 3, 1) == "fvlm_triage"
    assert [component(msg, triage, 5, i) for i in (1, 2, 3, 4)] == [
        "S", "Stat", "HL70485", "critical"
    ]  # fmt: skip
    assert (str(triage[8]), str(triage[11])) == ("AA", "F")
    notes = [field(msg, n, 3) for n in msg.segments("NTE")]
    assert notes == [
        "pericardial_effusion (heart) score 0.81 ≥ threshold 0.5 + margin 0.2 "
        "(rule pe_critical → critical)",
        "pleural_effusion (lung) score 0.62 ≥ threshold 0.5 (rule effusion → high)",
    ]
    uid = obx[1]
    assert str(uid[2]) == "HD" and component(msg, uid, 3, 1) == "110180"
    assert field(msg, uid, 5) == out.study_instance_uid

    groups: dict[str, list[hl7.Segment]] = {}
    for o in obx[2:]:
        groups.setdefault(str(o[4]), []).append(o)
    assert list(groups) == ["1", "2", "3", "4"]
    by_code = {component(msg, g[0], 3, 1): g for g in groups.values()}
    assert set(by_code) == {f["code"][0] for f in out.payload["findings"]}

    pe = by_code["373945007"]  # pericardial effusion: present
    assert [str(o[2]) for o in pe] == ["CWE", "CWE", "NM"]
    assert component(msg, pe[0], 3, 3) == "SCT"
    assert [component(msg, pe[0], 5, i) for i in (1, 2, 3)] == ["52101004", "Present", "SCT"]
    assert (str(pe[0][8]), str(pe[0][11])) == ("A", "F")
    assert component(msg, pe[0], 17, 1) == "fvlm-test"
    assert component(msg, pe[1], 3, 1) == "363698007"
    assert [component(msg, pe[1], 5, i) for i in (1, 2, 3)] == ["80891009", "Heart", "SCT"]
    assert (field(msg, pe[2], 5), component(msg, pe[2], 6, 1), component(msg, pe[2], 6, 3)) == (
        "0.81", "1", "UCUM"
    )  # fmt: skip
    assert (field(msg, pe[2], 7), str(pe[2][8])) == ("<0.5", "A")

    emphysema = by_code["87433001"]
    assert component(msg, emphysema[0], 5, 1) == "272519000"  # Absent
    assert str(emphysema[0][8]) == "N" and field(msg, emphysema[2], 5) == "0.31"
    assert component(msg, emphysema[1], 5, 2) == "Lung"

    cardiomegaly = by_code["8186001"]  # not assessable: no value, status X, no score
    assert [str(o[2]) for o in cardiomegaly] == ["CWE", "CWE"]
    assert (str(cardiomegaly[0][5]), str(cardiomegaly[0][11])) == ("", "X")

    log_text = caplog.text
    assert out.study_instance_uid in log_text and "accepted (AA)" in log_text
    # UIDs (logged on purpose) are random digit runs that may contain "0042" by chance; the
    # digit fragments of the PHI are looked for in the rest of the log
    without_uids = re.sub(r"\d+(?:\.\d+)+", "<uid>", log_text)
    for phi in ("Müller", "Jörg", "PAT", "0042", "ACC", "19600229"):
        assert phi not in without_uids


def test_message_is_utf8_and_segments_end_with_cr(tmp_path: Path, listen: Any) -> None:
    listener = listen(ack_with("AA"))
    Hl7Destination(settings(listener.port)).send(outgoing(tmp_path))
    (raw,) = listener.received
    assert "Müller".encode() in raw
    assert raw.endswith(b"\r") and b"\n" not in raw


def test_routine_high_and_no_triage(tmp_path: Path) -> None:
    dest = Hl7Destination(settings(1))
    now = datetime(2025, 1, 2, tzinfo=UTC)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    high = outgoing(tmp_path / "a", [finding("pleural_effusion", 0.7)])
    routine = outgoing(tmp_path / "b", [finding("emphysema", 0.7)])
    bare = Outgoing(routine.result_id, routine.study_instance_uid, routine.files, {"findings": []})
    for out, obr5, flag in ((high, "A", "A"), (routine, "R", "")):
        msg = hl7.parse(dest.message(out, "c1", now))
        assert str(msg.segment("OBR")[5]) == obr5
        assert str(msg.segment("TQ1")[9]).startswith(obr5 + "^")
        assert str(msg.segments("OBX")[0][8]) == flag
    msg = hl7.parse(dest.message(bare, "c1", now))  # no triage stored: no priority claimed
    assert str(msg.segment("OBR")[5]) == ""
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "OBR", "OBX"]


def test_preliminary_status(tmp_path: Path) -> None:
    text = Hl7Destination(settings(1, result_status="P")).message(
        outgoing(tmp_path), "c1", datetime.now(UTC)
    )
    msg = hl7.parse(text)
    assert str(msg.segment("OBR")[25]) == "P"
    assert {str(o[11]) for o in msg.segments("OBX")} == {"P", "X"}


def test_escape() -> None:
    assert escape("a|b^c&d~e\\f\rg\nh\x01i") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\X0A\\hi"
    msg = hl7.parse("MSH|^~\\&|A\rOBX|1|ST|x||" + escape("1|2^3&4~5\\6"))
    assert msg.unescape(str(msg.segment("OBX")[5])) == "1|2^3&4~5\\6"


# --- ACKs and transport errors -----------------------------------------------------------------


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_accepted(tmp_path: Path, listen: Any, code: str) -> None:
    listener = listen(ack_with(code))
    Hl7Destination(settings(listener.port)).send(outgoing(tmp_path))
    assert len(listener.received) == 1


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_nack_is_permanent(tmp_path: Path, listen: Any, code: str) -> None:
    listener = listen(ack_with(code))
    with pytest.raises(ExportError) as err:
        Hl7Destination(settings(listener.port)).send(outgoing(tmp_path))
    assert err.value.retryable is False
    assert code in str(err.value)


def test_nack_error_code_without_free_text(tmp_path: Path, listen: Any) -> None:
    def reply(message: bytes) -> bytes:
        ack = str(hl7.parse(message.decode()).create_ack("AE"))
        return (
            ack + "ERR|||204^Unknown key identifier^HL70357|E||||Patient PAT-0042 unknown\r"
        ).encode()

    listener = listen(reply)
    with pytest.raises(ExportError, match="error code 204") as err:
        Hl7Destination(settings(listener.port)).send(outgoing(tmp_path))
    assert "PAT" not in str(err.value) and err.value.retryable is False


def test_nothing_listening_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="refused") as err:
        Hl7Destination(settings(free_port())).send(outgoing(tmp_path))
    assert err.value.retryable is True


def test_no_ack_in_time_is_retryable(tmp_path: Path, listen: Any) -> None:
    listener = listen(lambda message: None)
    with pytest.raises(ExportError, match="no ACK within 0.5 s") as err:
        Hl7Destination(settings(listener.port, timeout=0.5)).send(outgoing(tmp_path))
    assert err.value.retryable is True


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"MSH|^~\\&|RIS|H|F|R|20250101||ACK|1|P|2.5.1\rMSA|AA|someone-else\r", "another message"),
        (b"hello", "unreadable ACK"),
    ],
)
def test_odd_answers_are_retryable(
    tmp_path: Path, listen: Any, answer: bytes, message: str
) -> None:
    listener = listen(lambda m: answer)
    with pytest.raises(ExportError, match=message) as err:
        Hl7Destination(settings(listener.port)).send(outgoing(tmp_path))
    assert err.value.retryable is True


def test_connection_closed_before_ack_is_retryable(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def close_after_read() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=close_after_read, daemon=True)
    t.start()
    try:
        with pytest.raises(ExportError) as err:
            Hl7Destination(settings(port)).send(outgoing(tmp_path))
        assert err.value.retryable is True
    finally:
        t.join(5)
        server.close()


def test_parse_ack() -> None:
    ack = parse_ack(b"MSH|^~\\&|R|H|F|S|20250101||ACK|9|P|2.5.1\rMSA|AE|abc\rERR|||207^x^HL70357\r")
    assert (ack.code, ack.control_id, ack.error_code) == ("AE", "abc", "207")
    with pytest.raises(ValueError):
        parse_ack(b"MSH|^~\\&|R\r")


# --- what the objects must carry ---------------------------------------------------------------


def test_no_patient_id_is_permanent(tmp_path: Path) -> None:
    out = outgoing(tmp_path)
    bad = Outgoing(
        1, out.study_instance_uid, (sr_file(tmp_path, out.study_instance_uid, patient_id="", name="x.dcm"),), out.payload
    )  # fmt: skip
    with pytest.raises(ExportError, match="no Patient ID") as err:
        Hl7Destination(settings(1)).send(bad)
    assert err.value.retryable is False


def test_objects_of_another_study_are_permanent(tmp_path: Path) -> None:
    out = outgoing(tmp_path)
    other = Outgoing(1, generate_uid(), out.files, out.payload)
    with pytest.raises(ExportError, match="another study") as err:
        Hl7Destination(settings(1)).send(other)
    assert err.value.retryable is False


def test_no_dicom_object_is_permanent(tmp_path: Path) -> None:
    out = outgoing(tmp_path)
    with pytest.raises(ExportError, match="no DICOM object") as err:
        Hl7Destination(settings(1)).send(Outgoing(1, out.study_instance_uid, out.files[:1], {}))
    assert err.value.retryable is False
    with pytest.raises(ExportError, match="missing") as err:
        Hl7Destination(settings(1)).send(
            Outgoing(1, out.study_instance_uid, (tmp_path / "gone.dcm",), {})
        )
    assert err.value.retryable is False


# --- configuration -----------------------------------------------------------------------------


def test_config_accepts_an_hl7_destination(tmp_path: Path) -> None:
    s = load_settings(
        data_dir=tmp_path,
        destinations=[{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575}],
    )
    (dest,) = s.destinations
    assert isinstance(dest, Hl7Settings)
    assert (dest.sending_application, dest.timeout, dest.result_status) == ("FVLM_PACS", 30.0, "F")
    assert Hl7Destination(dest).name == "ris"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"receiving_facility": "A^B"}, "receiving_facility"),
        ({"port": 0}, "port"),
        ({"timeout": 0}, "timeout"),
        ({"result_status": "C"}, "result_status"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, extra: dict[str, Any], key: str) -> None:
    dest = {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575, **extra}
    with pytest.raises(ConfigError, match=rf"destinations\.0\.hl7\.{key}"):
        load_settings(data_dir=tmp_path, destinations=[dest])
