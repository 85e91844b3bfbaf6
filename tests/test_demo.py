"""`fvlm-pacs demo`: one phantom through a real `serve` subprocess (C-STORE in, job, SR/SEG/PNG,
folder export), and the failures a newcomer can hit, each a clear message and no process left."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from fvlm_pacs.cli import main
from fvlm_pacs.db import Export, Job
from fvlm_pacs.demo import (
    DEFAULT_CAVEAT,
    MARKER,
    Deadline,
    DemoError,
    _Watch,
    model_caveat,
    prepare_dir,
)
from tests.test_predictor import build_model_dir

CAVEAT = "tiny random test model, scores mean nothing"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_model_dir(tmp_path_factory.mktemp("demo-model"))
    (folder / "MODEL_CARD.md").write_text(f"# tiny\n\n- **Caveat:** {CAVEAT}\n")
    return folder


def serve_processes(config: Path) -> list[int]:
    """Pids of live processes whose command line names ``config`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(config) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_demo_end_to_end(model_dir: Path, tmp_path: Path, capsys) -> None:
    demo = tmp_path / "demo"
    argv = ["demo", "--exit", "--dir", str(demo), "--model", str(model_dir), "--timeout", "150"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert serve_processes(demo / "fvlm-pacs.yaml") == []

    # what it printed: findings table, triage, model identity and caveat, links
    assert "fVLM findings (tiny 0.1)" in out
    for word in ("anatomy", "threshold", "phantom truth", "pleural_effusion", "hiatal_hernia"):
        assert word in out
    assert "Triage priority: " in out
    assert "Model: tiny 0.1 (sha256 " in out and f"Caveat: {CAVEAT}" in out
    [study_dir] = (demo / "data" / "outputs").iterdir()
    uid = study_dir.name
    assert f"/api/studies/{uid}" in out and "Worklist:   http://127.0.0.1:" in out
    assert "Pipeline stages: assembly" in out and "writing" in out

    # SR, SEG, summary written by the job, and their absolute paths printed
    job_dir = study_dir / "job-1"
    names = ("seg.dcm", "sr.dcm", "summary.dcm", "summary.png")
    for name in names:
        assert (job_dir / name).is_file()
        assert str((job_dir / name).resolve()) in out
    # the folder destination holds the three DICOM objects under study/series/sop
    exported = sorted((demo / "exported" / uid).rglob("*.dcm"))
    assert len(exported) == 3
    for path in exported:
        assert str(path.resolve()) in out
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in exported}
    written = {
        pydicom.dcmread(job_dir / n, stop_before_pixels=True).SOPInstanceUID for n in names[:3]
    }
    assert sops == written

    # the service recorded it the same way
    engine = create_engine(f"sqlite:///{demo / 'data' / 'fvlm.db'}")
    try:
        with Session(engine) as s:
            assert [j.state for j in s.scalars(select(Job))] == ["succeeded"]
            assert [e.state for e in s.scalars(select(Export))] == ["done"]
    finally:
        engine.dispose()


def test_missing_model_exits_2_before_starting_anything(tmp_path: Path, capsys) -> None:
    demo = tmp_path / "demo"
    argv = ["demo", "--exit", "--dir", str(demo), "--model", str(tmp_path / "no-such-model")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no-such-model does not exist" in err
    assert not demo.exists()


def test_model_the_service_refuses_exits_2_with_its_log(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    demo = tmp_path / "demo"
    argv = ["demo", "--exit", "--dir", str(demo), "--model", str(broken), "--timeout", "90"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the service exited with status 2" in err and "cannot start" in err
    assert str(demo / "serve.log") in err
    assert serve_processes(demo / "fvlm-pacs.yaml") == []


def test_a_folder_the_demo_did_not_make_is_refused(model_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--exit", "--dir", str(tmp_path), "--model", str(model_dir)]) == 2
    assert "not made by `fvlm-pacs demo`" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_demo_folder_is_cleaned_of_its_own_entries_only(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text("")
    (tmp_path / "study" / "old").mkdir(parents=True)
    (tmp_path / "serve.log").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    layout = prepare_dir(tmp_path)
    assert layout.root == tmp_path.resolve()
    assert not (tmp_path / "study").exists() and not (tmp_path / "serve.log").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_job_reports_its_last_error(tmp_path: Path) -> None:
    study = {"status": "failed", "jobs": [{"state": "dead", "last_error": "NoUsableSeries: x"}]}
    service = SimpleNamespace(
        check_alive=lambda: None,
        get=lambda path: study,
        layout=SimpleNamespace(log=tmp_path / "serve.log"),
    )
    watch = _Watch(service, "1.2.3")  # type: ignore[arg-type]
    with pytest.raises(DemoError, match="job for study 1.2.3 failed: NoUsableSeries: x"):
        watch.job_done()


def test_timeout_names_what_it_waited_for_and_the_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with pytest.raises(DemoError) as info:
        Deadline(0.05, log).wait_for(lambda: "study 1.2.3 to be done", lambda: False, poll=0.01)
    assert "waiting for study 1.2.3 to be done" in str(info.value)
    assert str(log) in str(info.value)


def test_model_caveat(tmp_path: Path) -> None:
    assert model_caveat(tmp_path) == DEFAULT_CAVEAT
    (tmp_path / "MODEL_CARD.md").write_text("# m\ncaveat: trained on phantoms only\n")
    assert model_caveat(tmp_path) == "trained on phantoms only"


def test_findings_table_keeps_small_thresholds_readable() -> None:
    """The shipped cardiomegaly threshold is 4.2e-05: a fixed 4-decimal column printed it as
    0.0000, which reads as "always present"."""
    from rich.console import Console

    from fvlm_pacs.demo import _findings_table

    payload = {
        "model": {"name": "m", "version": "1"},
        "findings": [
            {
                "anatomy": "heart",
                "finding": "cardiomegaly",
                "score": 3.1e-05,
                "threshold": 4.176e-05,
                "status": "absent",
            },
            {
                "anatomy": "lung",
                "finding": "emphysema",
                "score": None,
                "threshold": 0.836,
                "status": "not assessable",
            },
        ],
    }
    console = Console(width=200, record=True)
    console.print(_findings_table(payload, {"cardiomegaly": False}))
    text = console.export_text()
    assert "4.176e-05" in text and "3.1e-05" in text and "0.836" in text
    assert "0.0000" not in text


def test_demo_study_is_on_the_demo_models_own_grid() -> None:
    """The demo model is trained and evaluated on the recipe's phantom grid; a demo study on a
    coarser one under-sells it (seed 19's pericardial effusion: 0.415 at 5 × 2.5 × 2.5 mm, 0.93
    at the recipe's 3 × 1.5 × 1.5 mm)."""
    from fvlm_pacs.demo import PHANTOM_SHAPE, PHANTOM_SPACING
    from fvlm_pacs.model.demo_build import DemoRecipe

    recipe = DemoRecipe()
    assert (PHANTOM_SHAPE, PHANTOM_SPACING) == (recipe.shape, recipe.spacing)
