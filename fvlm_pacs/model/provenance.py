"""Which cases a model was trained on, kept in its folder, so that evaluation and calibration
can refuse them.

Why: a zero-shot AUC or a threshold measured on training cases says nothing about new studies,
and on phantoms the trap is easy to fall into — ``fvlm-pacs synth --seed S`` gives case i the
seed S + i, so a "held-out" set written with seed 1 is the training set of seed 0 shifted by one
case, under other case ids. A case is therefore keyed by what makes it: a phantom by its seed
(the same seed on another grid is the same patient), any other case by its id (CT-RATE's
``VolumeName``).

File: ``training_cases.json`` in the model folder, written by the trainer:
``{"manifest": <file name>, "cases": {<case id>: <key>}}`` — the manifest's name, not its path:
a model folder is shipped and copied, and the build machine's folders mean nothing elsewhere.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

TRAINING_CASES_FILE = "training_cases.json"


def case_keys(manifest: Path, case_ids: Iterable[str]) -> dict[str, str]:
    """Key of each of ``case_ids``: ``seed:<seed>`` when ``manifest`` is a phantom manifest (it
    has a ``seed`` column), else ``case:<id>``."""
    wanted = list(case_ids)
    seeds: dict[str, str] = {}
    if manifest.suffix == ".csv" and manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "seed" in (reader.fieldnames or []) and "case_id" in (reader.fieldnames or []):
                seeds = {row["case_id"]: row["seed"] for row in reader}
    return {cid: f"seed:{seeds[cid]}" if cid in seeds else f"case:{cid}" for cid in wanted}


def write_training_cases(model_dir: Path, manifest: Path, case_ids: Iterable[str]) -> Path:
    """Record the cases a model was trained on (see the module docstring)."""
    path = model_dir / TRAINING_CASES_FILE
    doc = {"manifest": manifest.name, "cases": case_keys(manifest, case_ids)}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def training_overlap(model_dir: Path, manifest: Path, case_ids: Iterable[str]) -> list[str]:
    """Those of ``case_ids`` (rows of ``manifest``) that the model in ``model_dir`` was trained
    on, by key; empty when the folder records no training cases (a released or imported model)."""
    path = model_dir / TRAINING_CASES_FILE
    if not path.is_file():
        return []
    trained = set(json.loads(path.read_text(encoding="utf-8")).get("cases", {}).values())
    return [cid for cid, key in case_keys(manifest, case_ids).items() if key in trained]
