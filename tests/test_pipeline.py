"""The whole pipeline with a model: files → assembly → DICOM SEG anatomies → fVLM findings,
through `run_stages`, `fvlm-pacs run`, and a job in `serve`'s worker path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from fvlm_pacs.cli import main
from fvlm_pacs.codes import load_anatomies, load_series_rules
from fvlm_pacs.config import load_settings
from fvlm_pacs.db import Job, utcnow
from fvlm_pacs.errors import ConfigError
from fvlm_pacs.jobs.queue import ClaimedJob, JobQueue
from fvlm_pacs.model import Predictor
from fvlm_pacs.pipeline import STAGES_VERSION, Stages, run_stages, run_study
from fvlm_pacs.segmentation import make_provider
from fvlm_pacs.service import Parts, build, build_stages
from fvlm_pacs.studies.completion import CompletionSweep
from fvlm_pacs.triage import assess
from fvlm_pacs.writers.validate import validate_files
from tests.test_predictor import build_model_dir
from tests.test_segmentation import anatomy_segments, boxes, make_study, write_seg

TABLE = load_anatomies("ct-rate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("pipeline-model"))


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, list[Path]]:
    """A CT series (24 × 64²) plus a SEG with lung and heart; returns (study UID, all files)."""
    datasets, volume, paths = make_study(tmp_path)
    seg = write_seg(
        datasets, volume, boxes(TABLE), anatomy_segments(TABLE), tmp_path / "ct" / "seg.dcm"
    )
    return datasets[0].StudyInstanceUID, [*paths, seg]


def check_findings(result: dict) -> None:
    findings = {f["finding"]: f for f in result["findings"]}
    assert len(findings) == 16
    for f in findings.values():
        if f["anatomy"] in ("lung", "heart"):
            assert 0.0 < f["score"] < 1.0 and f["status"] in ("present", "absent")
        else:
            assert f["score"] is None and f["status"] == "not_assessable"
    assert set(result["not_assessable"]) == {"esophagus", "aorta"}
    # how the scores were computed travels with them (one crop per present anatomy)
    assert result["inference"] == {
        "mode": "crops",
        "precision": "fp32",
        "device": "cpu",
        "crops": 2,
    }
    assert result["segmentation"]["source"] == "dicom-seg"
    assert set(result["segmentation"]["provenance"]) == {
        "seg_sop_instance_uid",
        "seg_series_instance_uid",
        "segments",
        "matched_by",
    }
    # triage is stored with the result and agrees with the findings it was made from
    triage = result["triage"]
    assert triage == assess(result["findings"]).as_dict()
    flagged = {f["finding"] for f in triage["flags"]}
    assert flagged <= {f["finding"] for f in findings.values() if f["status"] == "present"}
    assert {n["anatomy"] for n in triage["not_assessable"]} <= {"esophagus", "aorta"}


def test_run_stages_with_model_and_dicom_seg(model_dir: Path, study) -> None:
    _uid, paths = study
    stages = Stages(
        series_rules=load_series_rules(),
        segmenter=make_provider("dicom-seg", TABLE),
        predictor=Predictor(model_dir, anatomy_table=TABLE, device="cpu"),
    )
    assert stages.version == f"{STAGES_VERSION}+tiny-0.1"
    result = run_stages(stages, paths)
    check_findings(result)
    assert result["assembly"]["volume"]["shape"] == [24, 64, 64]
    assert {"assembly_s", "segmentation_s", "preprocess_s", "encode_s", "score_s"} <= set(
        result["timings"]
    )


def test_cli_run_prints_findings_and_writes_json(model_dir: Path, study, tmp_path, capsys) -> None:
    _uid, paths = study
    out = tmp_path / "result.json"
    argv = ["run", str(paths[0].parent), "--model", str(model_dir), "--json", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "fVLM findings" in printed and "emphysema" in printed and "not_assessable" in printed
    assert "crops mode" in printed and "fp32 on cpu" in printed
    check_findings(json.loads(out.read_text()))


def test_cli_run_without_model_assembles_only(study, tmp_path, capsys) -> None:
    _uid, paths = study
    assert main(["run", str(paths[0].parent), "--data-dir", str(tmp_path / "d")]) == 0
    assert "assembly only" in capsys.readouterr().out


def test_builtin_provider_fails_at_start_naming_the_setting(model_dir: Path, tmp_path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        model_dir=model_dir,
        segmentation_provider="builtin",
        builtin_segmentation_dir=tmp_path / "no-weights",
    )
    with pytest.raises(ConfigError, match="segmentation_provider.*builtin_segmentation_dir"):
        build_stages(settings)


@contextmanager
def claimed_job(
    model_dir: Path, paths: list[Path], data_dir: Path
) -> Iterator[tuple[Parts, JobQueue, ClaimedJob]]:
    """``serve``'s parts after the study arrived over DIMSE and a sweep a minute later made its
    job, claimed the way a worker does; the engine is closed afterwards."""
    settings = load_settings(data_dir=data_dir, model_dir=model_dir, stable_seconds=30)
    parts = build(settings)
    try:
        for path in paths:
            parts.intake.receive(path.read_bytes(), source="dimse")
        later = lambda: utcnow() + timedelta(seconds=60)  # noqa: E731
        sweep = CompletionSweep(
            parts.sessions,
            stable_seconds=30,
            pipeline_version=parts.pipeline.stages.version,
            max_attempts=3,
            clock=later,
        )
        [job_id] = sweep.sweep()
        queue = JobQueue(parts.sessions, lease_seconds=60, backoff_seconds=1, clock=later)
        job = queue.claim("test-worker")
        assert job is not None and job.id == job_id
        yield parts, queue, job
    finally:
        parts.engine.dispose()


def test_job_in_the_service_gets_findings(model_dir: Path, study, tmp_path) -> None:
    _uid, paths = study
    with claimed_job(model_dir, paths, tmp_path / "data") as (parts, queue, job):
        assert job.pipeline_version == f"{STAGES_VERSION}+tiny-0.1"
        assert queue.succeed(job, run_study(parts.pipeline, job)) is not None
        with parts.sessions() as s:
            row = s.scalars(select(Job).where(Job.id == job.id)).one()
        assert row.state == "succeeded"
        check_findings(row.detail or {})


def test_serve_with_a_broken_model_dir_fails_at_start(tmp_path, capsys) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    argv = ["serve", "--data-dir", str(tmp_path / "d"), "--dicom-port", "0", "--http-port", "0"]
    settings_file = tmp_path / "c.yaml"
    settings_file.write_text(f"model_dir: {broken}\n")
    assert main([*argv, "--config", str(settings_file)]) == 2
    assert "cannot start" in capsys.readouterr().err


# -- DICOM outputs ---------------------------------------------------------------------------
def _stages(model_dir: Path) -> Stages:
    return Stages(
        series_rules=load_series_rules(),
        segmenter=make_provider("dicom-seg", TABLE),
        predictor=Predictor(model_dir, anatomy_table=TABLE, device="cpu"),
        anatomy_table=TABLE,
    )


def test_run_stages_writes_validated_outputs(model_dir: Path, study, tmp_path: Path) -> None:
    _uid, paths = study
    out = tmp_path / "out"
    result = run_stages(_stages(model_dir), paths, out)
    check_findings(result)
    kinds = [o["kind"] for o in result["outputs"]]
    assert kinds == ["seg", "sr", "summary", "summary-png"]
    assert "writing_s" in result["timings"]
    files = [out / o["path"] for o in result["outputs"]]
    assert all(f.is_file() for f in files) and all(
        not Path(o["path"]).is_absolute() for o in result["outputs"]
    )
    ct = [p for p in paths if p.name != "seg.dcm"]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
    reports = validate_files([f for f in files if f.suffix == ".dcm"], sources)
    assert all(r.ok for r in reports), [r.lines() for r in reports]
    sr = pydicom.dcmread(out / "sr.dcm")
    seg = pydicom.dcmread(out / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "heart"]
    by_kind = {o["kind"]: o for o in result["outputs"]}
    assert by_kind["sr"]["sop_instance_uid"] == sr.SOPInstanceUID
    assert by_kind["seg"]["series_instance_uid"] == seg.SeriesInstanceUID


def test_cli_run_out_writes_objects_that_validate(
    model_dir: Path, study, tmp_path: Path, capsys
) -> None:
    _uid, paths = study
    out = tmp_path / "out"
    argv = ["run", str(paths[0].parent), "--model", str(model_dir), "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 0
    assert "sr: " in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "seg.dcm",
        "sr.dcm",
        "summary.dcm",
        "summary.png",
    ]
    dicom = [str(out / n) for n in ("sr.dcm", "seg.dcm", "summary.dcm")]
    assert main(["validate", *dicom, "--sources", str(paths[0].parent)]) == 0


def test_job_writes_outputs_and_a_rerun_names_its_predecessor(
    model_dir: Path, study, tmp_path: Path
) -> None:
    uid, paths = study
    with claimed_job(model_dir, paths, tmp_path / "data") as (parts, queue, job):
        first = run_study(parts.pipeline, job)
        root = parts.settings.data_dir / "outputs"
        assert parts.pipeline.outputs_root == root
        sr_out = next(o for o in first["outputs"] if o["kind"] == "sr")
        assert Path(sr_out["path"]).parts[:2] == (uid, f"job-{job.id}")
        first_sr = pydicom.dcmread(root / sr_out["path"])
        assert "PredecessorDocumentsSequence" not in first_sr
        assert queue.succeed(job, first) is not None

        rerun = replace(job, id=job.id + 1000)  # another job of the same study (e.g. new model)
        second = run_study(parts.pipeline, rerun)
        sr2_out = next(o for o in second["outputs"] if o["kind"] == "sr")
        assert Path(sr2_out["path"]).parts[:2] == (uid, f"job-{rerun.id}")
        second_sr = pydicom.dcmread(root / sr2_out["path"])
        assert second_sr.SOPInstanceUID != first_sr.SOPInstanceUID
        assert second_sr.SeriesInstanceUID != first_sr.SeriesInstanceUID
        ref = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == first_sr.SeriesInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
