"""DICOM outputs of a result: SEG of the anatomies, TID 1500 SR of the findings, a summary image.

:func:`write_outputs` is what the pipeline calls. It builds the objects (:mod:`.seg`, :mod:`.sr`,
:mod:`.summary`), writes each to a temporary file, runs every named check of :mod:`.validate` and
``dciodvfy`` (when installed) on what was written, and only then renames the files into place.
Any error raises :class:`~fvlm_pacs.errors.OutputError` with the failed checks, and nothing is
left behind — so an invalid object can never be exported.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fvlm_pacs.codes import AnatomyTable, FindingDefinition
from fvlm_pacs.domain import Finding, InstanceRef, LabelMap, ModelInfo, Volume
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers.base import OutputObject
from fvlm_pacs.writers.equipment import MANUFACTURER
from fvlm_pacs.writers.seg import SegOutput, build_seg
from fvlm_pacs.writers.sr import build_sr, reported_finding
from fvlm_pacs.writers.summary import build_summary
from fvlm_pacs.writers.validate import (
    Context,
    Issue,
    check_dataset,
    redact,
    run_dciodvfy,
    validate_files,
)

log = logging.getLogger(__name__)

__all__ = [
    "MANUFACTURER",
    "OutputObject",
    "SegOutput",
    "build_seg",
    "build_sr",
    "build_summary",
    "check_dataset",
    "read_source_headers",
    "validate_files",
    "write_outputs",
]

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
SUMMARY_FILE = "summary.dcm"
SUMMARY_PNG = "summary.png"


def read_source_headers(paths: Sequence[Path], volume: Volume) -> list[Dataset]:
    """The headers (no pixel data) of the volume's CT instances, in the volume's slice order.

    ``paths`` may hold the whole study; files of other series are skipped. Raises
    :class:`OutputError` when an instance of the volume is not among them.
    """
    wanted = set(volume.source_instances)
    found: dict[str, Dataset] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in wanted:
            found.setdefault(sop, ds)
    missing = [uid for uid in volume.source_instances if uid not in found]
    if missing:
        raise OutputError(
            f"{len(missing)} instance(s) of series {volume.series_instance_uid} not found among "
            "the study's files"
        )
    return [found[uid] for uid in volume.source_instances]


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError as exc:
        raise OutputError(f"output {path.name} is outside the outputs root") from exc


def _validate_written(path: Path, ctx: Context, dciodvfy: bool) -> list[Issue]:
    """Checks on the file as written (read back), so encoding problems count too."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return [Issue("object.readable", f"cannot read back: {exc}")]
    issues = check_dataset(ds, ctx)
    if dciodvfy:
        issues += [Issue(i.check, redact(i.message), i.severity) for i in run_dciodvfy(path)]
    return issues


def write_outputs(
    volume: Volume,
    labelmap: LabelMap,
    findings: Sequence[Finding | Mapping[str, Any]],
    source_paths: Sequence[Path],
    model: ModelInfo,
    table: AnatomyTable,
    definitions: Sequence[FindingDefinition],
    out_dir: Path,
    *,
    outputs_root: Path | None = None,
    predecessor: InstanceRef | None = None,
    installation: str = "",
    dciodvfy: bool = True,
) -> list[OutputObject]:
    """Write ``seg.dcm`` (when an anatomy is present), ``sr.dcm``, ``summary.dcm`` and
    ``summary.png`` into ``out_dir``, validated; return them with paths relative to
    ``outputs_root`` (default ``out_dir``).

    ``source_paths``: files of the study (at least the volume's instances); ``findings``:
    :class:`Finding` objects or their ``as_dict()`` form; ``definitions``: the findings table
    (prompts); ``predecessor``: the SR this result supersedes. Raises :class:`OutputError`.
    """
    root = outputs_root or out_dir
    sources = read_source_headers(source_paths, volume)
    rows = [reported_finding(f) for f in findings]
    seg: SegOutput | None = build_seg(volume, labelmap, sources, table, model)
    sr = build_sr(
        sources,
        findings,
        definitions,
        table,
        model,
        seg=seg,
        predecessor=predecessor,
        installation=installation,
    )
    sc, rgb = build_summary(volume, labelmap, sources, table, rows, model)

    planned: list[tuple[str, str, Dataset]] = []
    if seg is not None:
        planned.append(("seg", SEG_FILE, seg.dataset))
    planned += [("sr", SR_FILE, sr), ("summary", SUMMARY_FILE, sc)]
    ctx = Context(sources=tuple(sources), seg=seg.dataset if seg is not None else None)

    out_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    temps: list[tuple[Path, Path]] = []
    problems: list[Issue] = []
    try:
        for kind, name, ds in planned:
            tmp = out_dir / f".{name}.{token}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            temps.append((tmp, out_dir / name))
            for issue in _validate_written(tmp, ctx, dciodvfy):
                if issue.severity == "error":
                    problems.append(Issue(issue.check, f"{kind}: {issue.message}"))
                else:
                    log.warning("%s %s: %s", kind, issue.check, issue.message)
        if problems:
            raise OutputError(
                f"{len(problems)} validation error(s): "
                + "; ".join(f"{p.check} ({p.message})" for p in problems[:10]),
                detail={"validation": [str(p) for p in problems]},
            )
        png_tmp = out_dir / f".{SUMMARY_PNG}.{token}.tmp"
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(png_tmp, format="PNG")
        temps.append((png_tmp, out_dir / SUMMARY_PNG))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in temps:
        os.replace(tmp, final)

    outputs = [
        OutputObject(
            kind=kind,
            path=_relative(out_dir / name, root),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
        )
        for kind, name, ds in planned
    ]
    outputs.append(OutputObject(kind="summary-png", path=_relative(out_dir / SUMMARY_PNG, root)))
    log.info("series %s: wrote %s", volume.series_instance_uid, ", ".join(o.kind for o in outputs))
    return outputs
