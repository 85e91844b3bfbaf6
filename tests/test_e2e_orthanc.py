"""End to end with a real PACS: a CT study goes in by C-STORE, its results come out in Orthanc.

The user's whole path in one test, every peer a real program on 127.0.0.1: dcmtk's ``storescu``
sends a synthetic CT series and its anatomy SEG to ``fvlm-pacs serve`` (a tiny random-weight
model, ``segmentation_provider: dicom-seg``); the study completes, the job runs the pipeline, and
the export worker sends the SEG, SR and Secondary Capture to Orthanc by C-STORE and to a folder.
Orthanc already holds the source study (as the PACS that forwarded it would), so "the same study"
is checked where it matters: Orthanc files our objects under the study resource it already had,
which it only does when the Study Instance UID *and* the patient module match. The objects are
then read back from Orthanc — as a viewer would get them — and must pass ``dciodvfy`` and our
checklist. Skipped locally without Orthanc, dcmtk or dicom3tools; a failure in CI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from fvlm_pacs.codes import load_anatomies
from fvlm_pacs.writers.sr import COMPREHENSIVE_3D_SR_STORAGE
from fvlm_pacs.writers.summary import SECONDARY_CAPTURE_IMAGE_STORAGE
from fvlm_pacs.writers.validate import SEGMENTATION_STORAGE, validate_files
from tests.helpers import (
    ORTHANC_AET,
    OUR_AET,
    Orthanc,
    ServeProcess,
    require_tool,
    storescu,
    wait_until,
)
from tests.test_predictor import build_model_dir
from tests.test_segmentation import anatomy_segments, boxes, make_study, write_seg

pytestmark = pytest.mark.timeout(180)

TABLE = load_anatomies("ct-rate")
KIND_OF_CLASS = {
    COMPREHENSIVE_3D_SR_STORAGE: "sr",
    SEGMENTATION_STORAGE: "seg",
    SECONDARY_CAPTURE_IMAGE_STORAGE: "summary",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("e2e-model"))


def settled(server: ServeProcess, uid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The study and its exports once its job has finished and no export is still in flight."""
    try:
        doc = server.get(f"/api/studies/{uid}")
        exports = server.get("/api/exports")["exports"]
    except Exception:  # not received yet (404), or a transient HTTP error: poll again
        return None
    if doc["status"] not in ("done", "failed"):
        return None
    mine = [e for e in exports if e["study_instance_uid"] == uid]
    if doc["status"] == "done" and (
        len(mine) < 2 or any(e["state"] in ("pending", "sending") for e in mine)
    ):
        return None
    return doc, mine


def orthanc_study(orthanc: Orthanc, uid: str) -> str:
    """Orthanc's ID of the one study resource with this Study Instance UID."""
    found = orthanc.studies_with_uid(uid)
    assert len(found) == 1, f"Orthanc holds {len(found)} studies with this UID"
    return found[0]


def dciodvfy_errors(exe: str, path: Path) -> list[str]:
    """dciodvfy's "Error" lines (its warnings are advisory, as in ``fvlm-pacs validate``)."""
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def test_ct_study_by_cstore_ends_as_results_in_the_pacs_study(
    orthanc: Orthanc, model_dir: Path, tmp_path: Path
) -> None:
    require_tool("storescu")
    dciodvfy = require_tool("dciodvfy")
    datasets, volume, ct_paths = make_study(tmp_path / "study")
    anatomy_seg = write_seg(
        datasets,
        volume,
        boxes(TABLE),
        anatomy_segments(TABLE),
        tmp_path / "study" / "ct" / "anatomy-seg.dcm",
    )
    uid = str(datasets[0].StudyInstanceUID)

    # The PACS holds the study it forwards to us.
    for path in [*ct_paths, anatomy_seg]:
        orthanc.upload(path)
    study_id = orthanc_study(orthanc, uid)
    source_series = {s["ID"] for s in orthanc.get(f"/studies/{study_id}/series")}
    assert len(source_series) == 2  # the CT and the anatomy SEG

    (tmp_path / "serve").mkdir()
    folder = tmp_path / "folder-destination"
    server = ServeProcess(
        tmp_path / "serve",
        model_dir=str(model_dir),
        segmentation_provider="dicom-seg",
        stable_seconds=1.0,
        export_backoff_seconds=1.0,
        export_timeout_seconds=10.0,
        destinations=[
            {
                "name": "pacs",
                "kind": "dimse",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "ae_title": ORTHANC_AET,
            },
            {"name": "folder", "kind": "folder", "path": str(folder)},
        ],
        ae_title=OUR_AET,  # the calling AE title Orthanc knows
    ).start()
    try:
        storescu(server.dicom_port, [*ct_paths, anatomy_seg])
        try:
            found = wait_until(lambda: settled(server, uid), timeout=60, interval=0.25)
        except AssertionError:  # say why: an export retrying, a job still running, …
            raise AssertionError(
                f"not settled within 60 s; exports: {server.get('/api/exports')}\n"
                f"{server.log_path.read_text()[-3000:]}"
            ) from None
        assert found is not None  # wait_until returns only a truthy value
        doc, exports = found

        # the job succeeded, every destination got the result once
        [job] = doc["jobs"]
        assert job["state"] == "succeeded", job["last_error"]
        assert {e["destination"]: e["state"] for e in exports} == {
            "pacs": "done",
            "folder": "done",
        }, [e["last_error"] for e in exports]
        payload = doc["result"]["payload"]
        outputs = {o["kind"]: o for o in payload["outputs"] if o.get("sop_instance_uid")}
        assert set(outputs) == {"seg", "sr", "summary"}

        # the worklist lists the study with the priority its result set, and the page shows it
        priority = payload["triage"]["priority"]
        listed = [
            s for s in server.get("/api/worklist")["studies"] if s["study_instance_uid"] == uid
        ]
        assert len(listed) == 1
        assert listed[0]["priority"] == priority and listed[0]["status"] == "done"
        html = server.get_text("/")
        assert f'data-uid="{uid}" data-priority="{priority}"' in html
    finally:
        assert server.terminate() == 0

    # the folder destination holds the exact bytes of each output, laid out by UIDs
    outputs_root = tmp_path / "serve" / "data" / "outputs"
    for o in outputs.values():
        copied = folder / uid / o["series_instance_uid"] / f"{o['sop_instance_uid']}.dcm"
        assert copied.read_bytes() == (outputs_root / o["path"]).read_bytes()

    # Orthanc filed them under the study it already had, each in a new series of its own
    assert orthanc_study(orthanc, uid) == study_id
    new_series = [
        s for s in orthanc.get(f"/studies/{study_id}/series") if s["ID"] not in source_series
    ]
    assert len(new_series) == 3
    pulled: dict[str, Path] = {}
    for series in new_series:
        [instance] = series["Instances"]
        path = orthanc.download(instance, tmp_path / f"{instance}.dcm")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = KIND_OF_CLASS[str(ds.SOPClassUID)]
        assert ds.StudyInstanceUID == uid
        assert ds.SeriesInstanceUID == series["MainDicomTags"]["SeriesInstanceUID"]
        assert ds.SOPInstanceUID == outputs[kind]["sop_instance_uid"]
        assert ds.SeriesInstanceUID == outputs[kind]["series_instance_uid"]
        pulled[kind] = path
    assert set(pulled) == {"sr", "seg", "summary"}

    # what a viewer gets from the PACS passes dciodvfy and our checklist
    for kind, path in pulled.items():
        assert dciodvfy_errors(dciodvfy, path) == [], kind
    sources: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]
    reports = validate_files(
        [pulled["sr"], pulled["seg"], pulled["summary"]], sources, dciodvfy=False
    )
    assert all(r.ok for r in reports), [r.lines() for r in reports]
