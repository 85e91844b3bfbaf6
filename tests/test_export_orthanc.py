"""Export to a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback ports.

Objects go in by C-STORE and by STOW-RS and are looked up again through Orthanc's REST API.
Orthanc only accepts our calling AE title from 127.0.0.1 (as a hospital PACS would), which also
gives a real permanent rejection. Skipped locally when Orthanc is missing; a failure in CI.
The server and its ``orthanc`` fixture live in ``tests/helpers.py`` and ``tests/conftest.py``
(``tests/test_e2e_orthanc.py`` uses them too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fvlm_pacs import config
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.dicomweb import DicomwebDestination
from fvlm_pacs.export.dimse import DimseDestination
from fvlm_pacs.service import Parts, make_export_worker
from tests.helpers import ORTHANC_AET, OUR_AET, Orthanc, free_port, wait_until
from tests.test_export_destinations import make_objects, outgoing_for, sop_uids
from tests.test_export_queue import at, exports_of, one_export, store_result


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
