"""HL7 v2.5.1 ORU^R01 over MLLP: findings and the triage priority for a RIS or interface engine.

Why HL7 v2 at all: the DICOM SR reaches the PACS and the viewer, but a radiology information
system orders its worklist from HL7 messages. This destination sends one ORU^R01 per result:

- ``MSH`` v2.5.1, a fresh control id per attempt, ``UNICODE UTF-8``; original acknowledgment mode
  (the receiver answers AA/AE/AR; an enhanced-mode receiver's CA/CE/CR is understood too).
- ``PID`` from the patient module of the SR among the outgoing files. The stored result holds no
  patient data on purpose, so the identity is read from the DICOM object that carries it anyway.
- ``OBR`` filler order number = Study Instance UID (a re-run of the study updates the same order),
  accession number in OBR-18 (the IHE radiology convention), universal service id, result status
  (OBR-25), the AI's suggested reading priority in OBR-5 and ``TQ1``-9 (S stat / A ASAP / R
  routine for critical / high / routine).
- ``OBX`` triage priority (CWE, HL7 table 0485, our own priority name as the alternate code) with
  one ``NTE`` per flag and per unchecked rule; ``OBX`` Study Instance UID (HD, DCM 110180); then per
  finding a group sharing one OBX-4 sub-id: the finding (CWE, OBX-3 = the finding's code, OBX-5 =
  SCT Present/Absent, OBX-8 A/N, OBX-11 X when not assessable), its site (SCT 363698007 Finding
  Site = the anatomy's code) and its score (NM, unit UCUM "1", OBX-7 = "<threshold").

MLLP (HL7 v2 transport): ``0x0B`` message ``0x1C 0x0D``. The ACK decides: AA/CA delivered; AE, AR,
CE, CR are permanent (the receiver refused this message; resending it unchanged would be refused
again, so it goes to the dead-letter list to be re-driven after a fix); a refused connection,
a reset, a timeout or an unreadable answer are transient.

Never logged: the message, the patient, the receiver's free-text error (it may quote the patient).
"""

from __future__ import annotations

import logging
import math
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import PersonName

from fvlm_pacs.codes import CodedConcept, load_anatomy_profiles
from fvlm_pacs.config import Hl7Destination as Hl7Settings
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing

log = logging.getLogger(__name__)

VERSION = "2.5.1"
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1024 * 1024

LOCAL = "99FVLM"
"""HL7 local coding system name (``99zzz``) for concepts that have no standard code."""

_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

#: our priority → HL7 table 0027 (OBR-5) / 0485 (TQ1-9) code and text
HL7_PRIORITY = {"critical": ("S", "Stat"), "high": ("A", "ASAP"), "routine": ("R", "Routine")}
#: abnormal flag (OBX-8, HL7 table 0078) of the triage observation
_TRIAGE_FLAG = {"critical": "AA", "high": "A", "routine": ""}

PRESENT = ("52101004", "Present", "SCT")  # PS3.16 CID 240
ABSENT = ("272519000", "Absent", "SCT")  # PS3.16 CID 240
FINDING_SITE = ("363698007", "Finding Site", "SCT")
STUDY_INSTANCE_UID = ("110180", "Study Instance UID", "DCM")
TRIAGE_PRIORITY = ("fvlm_triage", "AI triage priority", LOCAL)
SCORE = ("fvlm_score", "fVLM zero-shot score", LOCAL)
SERVICE = ("fvlm_ct", "AI findings, CT (fVLM)", LOCAL)

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def escape(text: str) -> str:
    """Text safe inside one HL7 component: delimiters as escape sequences (HL7 v2 2.7.4),
    CR/LF as hex escapes (a raw CR would end the segment), other control characters dropped."""
    out: list[str] = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == "\r":
            out.append("\\X0D\\")
        elif ch == "\n":
            out.append("\\X0A\\")
        elif ord(ch) < 0x20 or ch == "\x7f":
            continue
        else:
            out.append(ch)
    return "".join(out)


def _components(*parts: str) -> str:
    """Escaped components joined by ``^``, trailing empty ones dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def _segment(name: str, *fields: str) -> str:
    """Fields are already escaped/encoded; trailing empty fields are dropped."""
    return "|".join((name, *fields)).rstrip("|")


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _number(x: float) -> str:
    """NM without exponent notation or float noise (0.812300 → 0.8123)."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


# ---------------------------------------------------------------------------------------------
# Patient and order facts from the DICOM objects (the payload has none)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFacts:
    """What PID and OBR need from the patient/study modules of the outgoing SR."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: PersonName | None
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    study_time: str


_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
]


def read_study_facts(outgoing: Outgoing) -> StudyFacts:
    """Patient and order identity from the SR among ``outgoing.files`` (else another object of
    the study, e.g. the SEG, which copies the same modules).

    A result whose objects name no patient, or another study, cannot be matched to an order:
    that will not change on retry, so it is a permanent :class:`ExportError`.
    """
    candidates: list[tuple[bool, Any]] = []
    for path in outgoing.files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except FileNotFoundError as exc:
            raise ExportError(f"outgoing file missing: {Path(path).name}", retryable=False) from exc
        except InvalidDicomError:
            continue  # a PNG preview or other non-DICOM file
        except OSError as exc:
            raise ExportError(
                f"cannot read {Path(path).name}: {exc.strerror or exc}", retryable=True
            ) from exc
        if str(ds.get("StudyInstanceUID", "")) != outgoing.study_instance_uid:
            raise ExportError(
                f"{Path(path).name} belongs to another study than result {outgoing.result_id}",
                retryable=False,
            )
        candidates.append((str(ds.get("SOPClassUID", "")).startswith(_SR_CLASS_PREFIX), ds))
    if not candidates:
        raise ExportError("no DICOM object among the outgoing files", retryable=False)
    ds = max(candidates, key=lambda c: c[0])[1]  # the SR if there is one
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        raise ExportError("the outgoing objects have no Patient ID", retryable=False)
    name = ds.get("PatientName")
    return StudyFacts(
        patient_id=patient_id,
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or "").strip(),
        patient_name=PersonName(name) if name else None,
        birth_date=str(ds.get("PatientBirthDate", "") or "").strip(),
        sex=str(ds.get("PatientSex", "") or "").strip().upper(),
        accession_number=str(ds.get("AccessionNumber", "") or "").strip(),
        study_date=str(ds.get("StudyDate", "") or "").strip(),
        study_time=str(ds.get("StudyTime", "") or "").strip(),
    )


def _xpn(name: PersonName | None) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) → HL7 XPN (family^given^middle^suffix^prefix)."""
    if name is None:
        return ""
    return _components(
        name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix
    )


def _observed_at(facts: StudyFacts) -> str:
    """StudyDate + StudyTime (DA/TM) as an HL7 DTM, or empty when unknown."""
    if len(facts.study_date) != 8 or not facts.study_date.isdigit():
        return ""
    digits = "".join(ch for ch in facts.study_time.split(".")[0] if ch.isdigit())[:6]
    return facts.study_date + digits


# ---------------------------------------------------------------------------------------------
# The ORU^R01 message
# ---------------------------------------------------------------------------------------------


def _cwe(code: tuple[str, str, str]) -> str:
    return _components(*code)


def _coded(code: Sequence[Any]) -> tuple[str, str, str]:
    """A payload code ``[value, scheme, meaning]`` → (value, meaning, HL7 coding system)."""
    value, scheme, meaning = (str(x) for x in code)
    return value, meaning, scheme


def build_oru(
    outgoing: Outgoing,
    facts: StudyFacts,
    settings: Hl7Settings,
    *,
    control_id: str,
    now: datetime,
    anatomy_codes: Mapping[str, CodedConcept],
) -> str:
    """The ORU^R01 text, segments ended by CR. Pure: the same inputs give the same message."""
    payload = outgoing.payload
    status = settings.result_status
    triage = payload.get("triage") if isinstance(payload.get("triage"), Mapping) else None
    priority = str(triage.get("priority")) if triage else ""
    hl7_priority = HL7_PRIORITY.get(priority)
    segments = [
        "MSH|^~\\&|"
        + "|".join(
            [
                escape(settings.sending_application),
                escape(settings.sending_facility),
                escape(settings.receiving_application),
                escape(settings.receiving_facility),
                _ts(now),
                "",
                "ORU^R01^ORU_R01",
                escape(control_id),
                "P",
                VERSION,
                "",
                "",
                "",
                "",
                "",
                "UNICODE UTF-8",
            ]
        ),
        _segment(
            "PID",
            "1",
            "",
            _components(facts.patient_id, "", "", facts.issuer_of_patient_id),
            "",
            _xpn(facts.patient_name),
            "",
            escape(facts.birth_date),
            escape(facts.sex if facts.sex in ("M", "F", "O") else ("U" if facts.sex else "")),
        ),
    ]
    obr = [""] * 25
    obr[0] = "1"
    obr[2] = _components(outgoing.study_instance_uid, settings.sending_application)
    obr[3] = _cwe(SERVICE)
    obr[4] = hl7_priority[0] if hl7_priority else ""
    obr[6] = _observed_at(facts)
    obr[17] = escape(facts.accession_number)
    obr[21] = _ts(now)
    obr[23] = "CT"
    obr[24] = status
    segments.append(_segment("OBR", *obr))
    if hl7_priority:
        segments.append(_segment("TQ1", "1", *[""] * 7, _hl7_priority_cwe(priority)))

    observations: list[tuple[list[str], list[str]]] = []  # (OBX fields after set id, NTE texts)
    if triage and hl7_priority:
        notes = [
            str(f.get("reason", "")) for f in triage.get("flags", []) if isinstance(f, Mapping)
        ]
        for na in triage.get("not_assessable", []):
            if isinstance(na, Mapping) and na.get("rules"):
                notes.append(
                    f"not assessable: {na.get('finding')} ({na.get('anatomy')}); "
                    f"rules not checked: {', '.join(str(r) for r in na['rules'])}"
                )
        observations.append(
            (
                ["CWE", _cwe(TRIAGE_PRIORITY), "", _hl7_priority_cwe(priority), "", "",
                 _TRIAGE_FLAG[priority], "", "", status],
                notes,
            )
        )  # fmt: skip
    observations.append(
        (["HD", _cwe(STUDY_INSTANCE_UID), "", escape(outgoing.study_instance_uid)]
         + [""] * 5 + [status], [])
    )  # fmt: skip
    for k, finding in enumerate(payload.get("findings", []), start=1):
        observations += [(fields, []) for fields in _finding_obx(finding, k, status, anatomy_codes)]

    for set_id, (fields, notes) in enumerate(observations, start=1):
        segments.append(_segment("OBX", str(set_id), *fields))
        segments += [_segment("NTE", str(i), "L", escape(n)) for i, n in enumerate(notes, 1)]
    return "\r".join(segments) + "\r"


def _hl7_priority_cwe(priority: str) -> str:
    code, text = HL7_PRIORITY[priority]
    return _components(code, text, "HL70485", priority, priority.capitalize(), LOCAL)


def _finding_obx(
    finding: Mapping[str, Any], sub_id: int, status: str, anatomy_codes: Mapping[str, CodedConcept]
) -> list[list[str]]:
    """The OBX group of one finding (fields after OBX-1)."""
    sub = str(sub_id)
    state = finding.get("status")
    score = finding.get("score")
    threshold = finding.get("threshold")
    model = finding.get("model") or {}
    method = _components(
        str(model.get("name", "")), f"{model.get('name', '')} {model.get('version', '')}".strip()
    )
    method = f"{method}^{LOCAL}" if method else ""
    value, flag, result_status = {
        "present": (_cwe(PRESENT), "A", status),
        "absent": (_cwe(ABSENT), "N", status),
    }.get(str(state), ("", "", "X"))
    code = _coded(finding.get("code") or ("", "", str(finding.get("finding", ""))))
    group = [
        # OBX-2..11, OBX-12..16 empty, OBX-17 observation method = the model
        ["CWE", _cwe(code), sub, value, "", "", flag, "", "", result_status, "", "", "", "", "",
         method],
    ]  # fmt: skip
    anatomy = str(finding.get("anatomy", ""))
    site = anatomy_codes.get(anatomy)
    site_cwe = (
        _cwe((site.value, site.meaning, site.scheme)) if site else _cwe((anatomy, anatomy, LOCAL))
    )
    group.append(["CWE", _cwe(FINDING_SITE), sub, site_cwe, "", "", "", "", "", status])
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        ref = (
            f"<{_number(float(threshold))}"
            if isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            else ""
        )
        group.append(
            ["NM", _cwe(SCORE), sub, _number(float(score)), "1^^UCUM", escape(ref), flag, "", "",
             status]
        )  # fmt: skip
    return group


# ---------------------------------------------------------------------------------------------
# MLLP and the ACK
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """MSA-1 acknowledgment code, MSA-2 the control id it answers, ERR-3 error code if any."""

    code: str
    control_id: str
    error_code: str


def parse_ack(data: bytes) -> Ack:
    """Read an ACK message; ``ValueError`` when it is not one."""
    text = data.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise ValueError("the answer is not an HL7 message")
    sep = segments[0][3]
    component = segments[0][4]
    fields = {s.split(sep, 1)[0]: s.split(sep) for s in reversed(segments)}  # first one wins
    msa = fields.get("MSA")
    if msa is None or len(msa) < 3:
        raise ValueError("the answer has no MSA segment")
    err = fields.get("ERR")
    error_code = ""
    if err is not None and len(err) > 3:
        error_code = err[3].split(component)[0]  # ERR-3 HL7 error code (table 0357)
    return Ack(code=msa[1].strip(), control_id=msa[2].strip(), error_code=error_code[:16])


def mllp_exchange(host: str, port: int, message: bytes, timeout: float) -> bytes:
    """Send one MLLP frame and return the payload of the first frame that comes back.

    Every network failure is a retryable :class:`ExportError`: the receiver may be restarting.
    ``timeout`` bounds the connect and, separately, the whole wait for the answer.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(START_BLOCK + message + END_BLOCK)
            deadline = time.monotonic() + timeout
            buf = b""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ExportError("connection closed before the ACK", retryable=True)
                buf += chunk
                end = buf.find(END_BLOCK)
                if end >= 0:
                    start = buf.find(START_BLOCK)
                    if start < 0 or start > end:
                        raise ExportError("answer is not an MLLP frame", retryable=True)
                    return buf[start + 1 : end]
                if len(buf) > MAX_ACK_BYTES:
                    raise ExportError("answer too long for an ACK", retryable=True)
    except TimeoutError as exc:
        raise ExportError(f"no ACK within {timeout:g} s", retryable=True) from exc
    except ConnectionRefusedError as exc:
        raise ExportError("connection refused", retryable=True) from exc
    except OSError as exc:
        raise ExportError(
            f"network error: {type(exc).__name__}: {exc.strerror or exc}", retryable=True
        ) from exc


class Hl7Destination:
    """A :class:`~fvlm_pacs.export.base.Destination` that sends ORU^R01 over MLLP.

    Built once per configured destination as ``Hl7Destination(cfg)``. The anatomy codes (OBX
    Finding Site) come from ``mappings/anatomies.yaml``, loaded here so that a broken table stops
    start-up, not the first export.
    """

    def __init__(
        self, settings: Hl7Settings, anatomy_codes: Mapping[str, CodedConcept] | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.name
        if anatomy_codes is None:
            anatomy_codes = {
                a.name: a.code
                for table in load_anatomy_profiles().values()
                for a in table.anatomies
            }
        self.anatomy_codes = dict(anatomy_codes)

    def message(self, outgoing: Outgoing, control_id: str, now: datetime) -> str:
        """The ORU^R01 for ``outgoing`` (reads the SR for PID/OBR); for tests and dry runs."""
        facts = read_study_facts(outgoing)
        return build_oru(
            outgoing,
            facts,
            self.settings,
            control_id=control_id,
            now=now,
            anatomy_codes=self.anatomy_codes,
        )

    def send(self, outgoing: Outgoing) -> None:
        """Deliver one result; returns when the receiver accepted it (AA or CA)."""
        control_id = uuid.uuid4().hex[:20]  # MSH-10 is at most 20 characters
        text = self.message(outgoing, control_id, datetime.now(UTC))
        raw = mllp_exchange(
            self.settings.host, self.settings.port, text.encode("utf-8"), self.settings.timeout
        )
        try:
            ack = parse_ack(raw)
        except ValueError as exc:
            raise ExportError(f"{self.name}: unreadable ACK: {exc}", retryable=True) from exc
        if ack.control_id != control_id:
            raise ExportError(
                f"{self.name}: ACK answers another message (MSA-2 {ack.control_id[:20]!r})",
                retryable=True,
            )
        if ack.code in ("AA", "CA"):
            log.info(
                "hl7 %s: result %d of study %s accepted (%s)",
                self.name,
                outgoing.result_id,
                outgoing.study_instance_uid,
                ack.code,
            )
            return
        detail = f", error code {ack.error_code}" if ack.error_code else ""
        raise ExportError(
            f"{self.name}: receiver refused the message ({ack.code[:4]!r}{detail})",
            retryable=False,
        )
