"""A model folder records the cases it was trained on, and evaluation refuses them.

Why: an AUC or a threshold measured on training cases is meaningless, and with phantoms the
overlap hides behind case ids — ``synth --seed 1`` writes the training set of ``--seed 0``
shifted by one case. Phantoms are therefore matched by seed, other cases by id.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fvlm_pacs.cli import main
from fvlm_pacs.model.provenance import case_keys, training_overlap, write_training_cases


def phantom_manifest(folder: Path, first_seed: int, n: int) -> Path:
    """A manifest as ``write_dataset(n, first_seed)`` lays it out (ids restart at 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "seed", "npz"])
        for i in range(n):
            writer.writerow([f"case_{i:05d}", first_seed + i, f"case_{i:05d}/case.npz"])
    return path


def test_phantoms_are_keyed_by_seed_other_cases_by_id(tmp_path: Path) -> None:
    manifest = phantom_manifest(tmp_path / "a", 10, 3)
    assert case_keys(manifest, ["case_00000", "case_00002"]) == {
        "case_00000": "seed:10",
        "case_00002": "seed:12",
    }
    reports = tmp_path / "reports.csv"  # e.g. CT-RATE: no seed column
    reports.write_text("VolumeName,Findings_EN\ntrain_1_a_1.nii.gz,x\n", encoding="utf-8")
    assert case_keys(reports, ["train_1_a_1"]) == {"train_1_a_1": "case:train_1_a_1"}


def test_a_shifted_seed_block_overlaps_under_other_case_ids(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    trained_on = phantom_manifest(tmp_path / "train", 0, 5)  # seeds 0-4
    write_training_cases(model, trained_on, [f"case_{i:05d}" for i in range(5)])
    record = json.loads((model / "training_cases.json").read_text(encoding="utf-8"))
    assert record["manifest"] == trained_on.name  # no build-machine path in a shipped folder
    shifted = phantom_manifest(tmp_path / "seed1", 1, 5)  # seeds 1-5
    ids = [f"case_{i:05d}" for i in range(5)]
    assert training_overlap(model, shifted, ids) == ids[:4]
    disjoint = phantom_manifest(tmp_path / "heldout", 100_000, 5)
    assert training_overlap(model, disjoint, ids) == []
    # a folder without the record (a released or imported model) cannot be checked
    assert training_overlap(tmp_path / "other", shifted, ids) == []


def test_calibrate_refuses_training_cases_before_loading_anything(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"  # no weights at all: the refusal must come first
    model.mkdir()
    write_training_cases(
        model, phantom_manifest(tmp_path / "train", 0, 10), [f"case_{i:05d}" for i in range(10)]
    )
    data = phantom_manifest(tmp_path / "seed3", 3, 10).parent
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "7 of 10 cases (split all) were used to train" in err and "--allow-training-cases" in err
