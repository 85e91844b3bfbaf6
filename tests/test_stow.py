"""STOW-RS intake (``POST /dicomweb/studies[/{study}]``) through the HTTP app, on both backends.

Bodies are multipart/related built by hand, so the tests control every byte the parser sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage
from sqlalchemy import select

from fvlm_pacs.db import Instance, Job, Series, Study, utcnow
from fvlm_pacs.pipeline import STAGES_VERSION
from fvlm_pacs.service import Parts
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.conftest import client_for
from tests.helpers import encode

BOUNDARY = "fvlm-test-b0undary-5f3c9a"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILURE_PROCESSING = 0xC000

# DICOM JSON keys (PS3.18 F.2)
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
RETRIEVE_URL = "00081190"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

Part = bytes | tuple[str | bytes, bytes]


def multipart(parts: list[Part], boundary: str = BOUNDARY) -> bytes:
    """A multipart/related body; a bare ``bytes`` part is ``application/dicom``, a tuple
    ``(content type, data)`` sets the part's Content-Type (bytes: written verbatim)."""
    out = bytearray()
    for part in parts:
        ctype, data = part if isinstance(part, tuple) else ("application/dicom", part)
        ctype_bytes = ctype if isinstance(ctype, bytes) else ctype.encode("latin-1")
        out += b"--" + boundary.encode() + b"\r\n"
        out += b"Content-Type: " + ctype_bytes + b"\r\n\r\n"
        out += data + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    assert boundary.encode() not in b"".join(p[1] if isinstance(p, tuple) else p for p in parts), (
        "boundary occurs in a part"
    )
    return bytes(out)


def small_series(n: int = 3, study: str | None = None, **spec: Any) -> list[Dataset]:
    return ct_series(SeriesSpec(n_slices=n, rows=16, columns=16, **spec), study_instance_uid=study)


def post(client: TestClient, body: bytes, *, study: str | None = None, **headers: str) -> Any:
    url = "/dicomweb/studies" + (f"/{study}" if study else "")
    return client.post(url, content=body, headers={"Content-Type": STOW_TYPE, **headers})


def referenced(js: dict[str, Any]) -> set[tuple[str, str]]:
    items = js.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return {
        (i[REFERENCED_SOP_CLASS_UID]["Value"][0], i[REFERENCED_SOP_INSTANCE_UID]["Value"][0])
        for i in items
    }


def failed(js: dict[str, Any]) -> list[dict[str, Any]]:
    """Failed SOP items as {"cls", "uid", "reason"} (None where the item omits a UID)."""
    return [
        {
            "cls": i.get(REFERENCED_SOP_CLASS_UID, {}).get("Value", [None])[0],
            "uid": i.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [None])[0],
            "reason": i[FAILURE_REASON]["Value"][0],
        }
        for i in js.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    ]


def instance_rows(parts: Parts) -> list[Instance]:
    with parts.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.sop_instance_uid)))


def spool_files(parts: Parts) -> set[str]:
    root = parts.spool.absolute("")
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def spool_path(ds: Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def future_sweep(parts: Parts, seconds: float = 120) -> CompletionSweep:
    return CompletionSweep(
        parts.sessions,
        stable_seconds=parts.settings.stable_seconds,
        pipeline_version=STAGES_VERSION,
        max_attempts=parts.settings.job_max_attempts,
        clock=lambda: utcnow() + timedelta(seconds=seconds),
    )


def test_stow_three_slices(client: TestClient, parts: Parts) -> None:
    series = small_series(3)
    data = [encode(ds) for ds in series]
    study = series[0].StudyInstanceUID

    r = post(client, multipart(list(data)))

    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert "warning" not in r.headers
    js = r.json()
    assert referenced(js) == {(CTImageStorage, ds.SOPInstanceUID) for ds in series}
    assert len(js[REFERENCED_SOP_SEQUENCE]["Value"]) == 3
    assert FAILED_SOP_SEQUENCE not in js
    assert js[RETRIEVE_URL]["Value"] == [f"http://testserver/dicomweb/studies/{study}"]

    assert spool_files(parts) == {spool_path(ds) for ds in series}
    for ds, raw in zip(series, data):
        assert parts.spool.absolute(spool_path(ds)).read_bytes() == raw

    rows = instance_rows(parts)
    assert {r.sop_instance_uid for r in rows} == {ds.SOPInstanceUID for ds in series}
    assert {r.source for r in rows} == {"stow"}
    assert {r.study_instance_uid for r in rows} == {study}
    assert {r.sop_class_uid for r in rows} == {CTImageStorage}
    assert sorted(r.size_bytes for r in rows) == sorted(len(d) for d in data)
    assert all(r.peer_host == "testclient" for r in rows)
    with parts.sessions() as session:
        study_row = session.get(Study, study)
        assert study_row is not None and study_row.instance_count == 3
        series_row = session.get(Series, series[0].SeriesInstanceUID)
        assert series_row is not None
        assert (series_row.instance_count, series_row.modality) == (3, "CT")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_stow_mixed_good_and_bad_parts(client: TestClient, parts: Parts) -> None:
    series = small_series(5)
    good = series[:2]
    truncated_ds, text_plain_ds, bad_uid_ds = series[2:]
    truncated = encode(truncated_ds)[:-100]  # cut inside the 512-byte pixel data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        bad_uid_ds.SOPInstanceUID = "1.2.3/../4"
        bad_uid_ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3/../4")
        bad_uid = encode(bad_uid_ds)
    body = multipart(
        [
            encode(good[0]),
            truncated,
            b"this is certainly not a DICOM object\x00\x01\x02" * 8,
            ("text/plain", encode(text_plain_ds)),
            bad_uid,
            encode(good[1]),
        ]
    )

    r = post(client, body)

    assert r.status_code == 202, r.text
    assert r.headers["warning"].startswith("299 ")
    js = r.json()
    assert referenced(js) == {(CTImageStorage, ds.SOPInstanceUID) for ds in good}
    fails = failed(js)
    assert len(fails) == 4
    assert all(f["reason"] == FAILURE_PROCESSING for f in fails)
    # The truncated instance's header is readable: it is named; the others are not.
    assert {(f["cls"], f["uid"]) for f in fails if f["uid"]} == {
        (CTImageStorage, truncated_ds.SOPInstanceUID)
    }
    assert "1.2.3/../4" not in r.text
    assert text_plain_ds.SOPInstanceUID not in r.text  # text/plain is never parsed

    stored = {ds.SOPInstanceUID for ds in good}
    assert {row.sop_instance_uid for row in instance_rows(parts)} == stored
    assert spool_files(parts) == {spool_path(ds) for ds in good}
    # Nothing escaped the spool via the "../" in the UID.
    data_dir = parts.settings.data_dir
    assert not list(data_dir.parent.rglob("4.dcm"))
    with parts.sessions() as session:
        study_row = session.get(Study, series[0].StudyInstanceUID)
        assert study_row is not None and study_row.instance_count == 2
    rejected = parts.metrics.instances_rejected.labels("stow", "invalid")._value.get()
    assert rejected == 3  # truncated, garbage, bad UID (text/plain never reaches intake)


def test_stow_all_parts_bad_is_409(client: TestClient, parts: Parts) -> None:
    ds = small_series(1)[0]
    body = multipart([encode(ds)[:-50], b"garbage" * 30, ("text/plain", b"hello")])

    r = post(client, body)

    assert r.status_code == 409, r.text
    js = r.json()
    assert REFERENCED_SOP_SEQUENCE not in js
    fails = failed(js)
    assert len(fails) == 3
    assert [f["reason"] for f in fails] == [FAILURE_PROCESSING] * 3
    assert fails[0]["uid"] == ds.SOPInstanceUID
    assert "warning" in r.headers
    assert instance_rows(parts) == []
    assert spool_files(parts) == set()
    with parts.sessions() as session:
        assert session.scalars(select(Study)).all() == []


def test_stow_odd_part_types_fail_the_part_only(client: TestClient, parts: Parts) -> None:
    """A part's Content-Type is latin-1 text the client chose: a non-UTF-8 byte, a quote or a
    backslash must fail that part (and not break the Warning header), not the request."""
    ds = small_series(1)[0]
    body = multipart([encode(ds), (b"text/pl\xe4in", b"x"), (b'text/x"y\\z', b"y")])

    r = post(client, body)

    assert r.status_code == 202, r.text
    assert referenced(r.json()) == {(CTImageStorage, ds.SOPInstanceUID)}
    assert [f["reason"] for f in failed(r.json())] == [FAILURE_PROCESSING] * 2
    warning = r.headers["warning"]
    assert warning.isascii()
    assert warning.startswith('299 fvlm-pacs "') and warning.endswith('"')
    assert warning.count('"') == 2 and "\\" not in warning
    assert "text/pl?in" in warning and "text/x?y?z" in warning


@pytest.mark.parametrize("cut", [len(f"\r\n--{BOUNDARY}--\r\n"), 300], ids=["no-close", "mid-part"])
def test_stow_body_ending_inside_a_part(client: TestClient, parts: Parts, cut: int) -> None:
    """A body that stops before the last part's boundary: that part is reported failed (not a
    200 that silently drops it) and not stored."""
    first, last = small_series(2)
    body = multipart([encode(first), encode(last)])[:-cut]

    r = post(client, body)

    assert r.status_code == 202, r.text
    assert referenced(r.json()) == {(CTImageStorage, first.SOPInstanceUID)}
    assert failed(r.json()) == [
        {"cls": CTImageStorage, "uid": last.SOPInstanceUID, "reason": FAILURE_PROCESSING}
    ]
    assert [row.sop_instance_uid for row in instance_rows(parts)] == [first.SOPInstanceUID]
    assert spool_files(parts) == {spool_path(first)}

    # a lone unterminated part: nothing complete at all
    r = post(client, multipart([encode(small_series(1)[0])])[:-cut])
    assert r.status_code == 400, r.text
    assert len(instance_rows(parts)) == 1


def test_stow_to_named_study_refuses_other_studies(client: TestClient, parts: Parts) -> None:
    mine = small_series(1)[0]
    other = small_series(1)[0]
    assert mine.StudyInstanceUID != other.StudyInstanceUID

    r = post(client, multipart([encode(other), encode(mine)]), study=mine.StudyInstanceUID)

    assert r.status_code == 202, r.text
    js = r.json()
    assert referenced(js) == {(CTImageStorage, mine.SOPInstanceUID)}
    assert failed(js) == [
        {"cls": CTImageStorage, "uid": other.SOPInstanceUID, "reason": FAILURE_PROCESSING}
    ]
    assert js[RETRIEVE_URL]["Value"] == [
        f"http://testserver/dicomweb/studies/{mine.StudyInstanceUID}"
    ]
    assert [row.sop_instance_uid for row in instance_rows(parts)] == [mine.SOPInstanceUID]
    assert spool_files(parts) == {spool_path(mine)}
    with parts.sessions() as session:
        assert session.get(Study, other.StudyInstanceUID) is None


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 415),
        ("application/dicom", 415),
        (f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}', 415),
        (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415),
        ('multipart/related; type="application/dicom"', 400),
        ("multipart/related", 400),
    ],
)
def test_stow_request_media_type(
    client: TestClient, parts: Parts, content_type: str, status: int
) -> None:
    body = multipart([encode(small_series(1)[0])])

    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})

    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert instance_rows(parts) == []
    assert spool_files(parts) == set()


def test_stow_without_content_type_is_415(client: TestClient, parts: Parts) -> None:
    body = multipart([encode(small_series(1)[0])])
    request = client.build_request("POST", "/dicomweb/studies", content=body)
    assert "content-type" not in request.headers  # httpx adds none for raw bytes

    r = client.send(request)

    assert r.status_code == 415, r.text
    assert instance_rows(parts) == []


@pytest.mark.parametrize(
    "body",
    [
        f"--{BOUNDARY}--\r\n".encode(),
        b"",
        b"just a preamble without any boundary line\r\n",
    ],
    ids=["close-only", "empty", "preamble-only"],
)
def test_stow_without_parts_is_400(client: TestClient, parts: Parts, body: bytes) -> None:
    r = post(client, body)

    assert r.status_code == 400, r.text
    assert instance_rows(parts) == []


def test_stow_body_over_limit_is_413(make_parts: Callable[..., Parts]) -> None:
    limit = 4096
    parts = make_parts(stow_max_bytes=limit)
    small = small_series(1)[0]
    big = ct_series(SeriesSpec(n_slices=1, rows=64, columns=64))[0]
    small_body = multipart([encode(small)])
    big_body = multipart([encode(big)])
    assert len(small_body) < limit < len(big_body)

    def chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    with client_for(parts) as client:
        # declared by Content-Length: refused before the body is read
        r = post(client, big_body)
        assert r.status_code == 413, r.text
        assert str(limit) in r.json()["error"]

        # streamed without Content-Length (chunked): refused once the count passes the limit
        request = client.build_request(
            "POST",
            "/dicomweb/studies",
            content=chunks(big_body),
            headers={"Content-Type": STOW_TYPE},
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        r = client.send(request)
        assert r.status_code == 413, r.text

        assert instance_rows(parts) == []
        assert spool_files(parts) == set()

        # under the limit, both ways, is fine
        assert post(client, small_body).status_code == 200
        request = client.build_request(
            "POST",
            "/dicomweb/studies",
            content=chunks(small_body),
            headers={"Content-Type": STOW_TYPE},
        )
        r = client.send(request)
        assert r.status_code == 200, r.text
        assert referenced(r.json()) == {(CTImageStorage, small.SOPInstanceUID)}
    assert [row.sop_instance_uid for row in instance_rows(parts)] == [small.SOPInstanceUID]


def test_stow_and_dimse_make_one_study_and_one_job(client: TestClient, parts: Parts) -> None:
    series = small_series(4)
    study = series[0].StudyInstanceUID
    for ds in series[:2]:  # what the C-STORE SCP does with each instance
        receipt = parts.intake.receive(encode(ds), source="dimse", calling_ae_title="MODALITY")
        assert receipt.new

    r = post(client, multipart([encode(ds) for ds in series[2:]]))

    assert r.status_code == 200, r.text
    assert referenced(r.json()) == {(CTImageStorage, ds.SOPInstanceUID) for ds in series[2:]}
    with parts.sessions() as session:
        studies = session.scalars(select(Study)).all()
        assert [(s.study_instance_uid, s.instance_count) for s in studies] == [(study, 4)]
    sources = {row.sop_instance_uid: row.source for row in instance_rows(parts)}
    assert sources == {
        **{ds.SOPInstanceUID: "dimse" for ds in series[:2]},
        **{ds.SOPInstanceUID: "stow" for ds in series[2:]},
    }

    assert parts.sweep.sweep() == []  # just received: not idle yet
    created = future_sweep(parts).sweep()
    assert len(created) == 1
    assert future_sweep(parts).sweep() == []  # the burst is complete; no second job
    with parts.sessions() as session:
        jobs = session.scalars(select(Job)).all()
        assert [(j.id, j.study_instance_uid, j.study_revision, j.state) for j in jobs] == [
            (created[0], study, 1, "queued")
        ]


def test_stow_resend_is_idempotent(client: TestClient, parts: Parts) -> None:
    ds = small_series(1)[0]
    body = multipart([encode(ds)])

    first = post(client, body)
    second = post(client, body)

    for r in (first, second):
        assert r.status_code == 200, r.text
        assert referenced(r.json()) == {(CTImageStorage, ds.SOPInstanceUID)}
    assert [row.sop_instance_uid for row in instance_rows(parts)] == [ds.SOPInstanceUID]
    assert spool_files(parts) == {spool_path(ds)}
    with parts.sessions() as session:
        study = session.get(Study, ds.StudyInstanceUID)
        assert study is not None
        assert (study.instance_count, study.revision) == (1, 1)


def test_stow_requires_token_when_configured(make_parts: Callable[..., Parts]) -> None:
    parts = make_parts(api_tokens=["secret"])
    ds = small_series(1)[0]
    body = multipart([encode(ds)])

    with client_for(parts) as client:
        r = post(client, body)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"

        for value in ("Bearer wrong", "Bearer secre", "Basic secret", "secret", "Bearer"):
            r = post(client, body, Authorization=value)
            assert r.status_code == 401, value
            assert r.headers["www-authenticate"] == "Bearer"
        assert instance_rows(parts) == []

        r = post(client, body, Authorization="Bearer secret")
        assert r.status_code == 200, r.text
        assert referenced(r.json()) == {(CTImageStorage, ds.SOPInstanceUID)}
        r = post(client, body, study=ds.StudyInstanceUID, Authorization="bearer secret")
        assert r.status_code == 200, r.text
    assert [row.sop_instance_uid for row in instance_rows(parts)] == [ds.SOPInstanceUID]
