"""Series selection and volume assembly: a study's files → the one checked HU :class:`Volume`.

The model assumes a regular axial grid of Hounsfield units. A PACS delivers a bag of files: several
series (scouts, thick and thin reconstructions, dose screens), instances in any order, InstanceNumber
that may run either way or not at all. This module

1. picks the series with the data-driven rules of ``mappings/series_rules.yaml`` and records a verdict
   for every candidate (:func:`choose_series`);
2. orders the slices by where they are (position projected on the slice normal), never by
   InstanceNumber, and refuses any geometry the model would silently misread: mixed orientation or
   matrix size, sheared stacks, duplicate positions, missing slices, irregular spacing
   (:func:`assemble_series`);
3. applies the Modality LUT (Rescale Slope/Intercept) per slice to get float32 HU.

Decisions (and why):

* Duplicate positions: the *same* SOP Instance received twice is dropped with a warning (a resend is
  harmless); two *different* instances at one position raise :class:`GeometryError` — that is
  usually two reconstructions or phases mixed in one series and picking one would be a guess.
* Missing slices (a step that is a whole multiple of the nominal spacing) raise
  :class:`GeometryError` naming each gap (position, number of missing slices). The model assumes a
  regular grid; interpolating invented anatomy into a diagnostic pipeline is worse than refusing.
  :func:`assemble_study` then falls back to the next accepted series in rank order, reporting the
  gap in the warnings and in the series' reasons. Any other irregular step raises too.
* Multi-frame (Enhanced / Legacy Converted Enhanced) CT is not supported yet: :func:`choose_series`
  rejects such series with the reason "multi-frame Enhanced CT not supported yet", and
  :func:`assemble_series` raises :class:`GeometryError` if handed one.

Nothing here logs or reports patient demographics: messages name UIDs, positions and rule verdicts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from fvlm_pacs.codes import SeriesRules
from fvlm_pacs.domain import SeriesChoice, Volume
from fvlm_pacs.errors import GeometryError, NoUsableSeries, TransientPipelineError

logger = logging.getLogger(__name__)

__all__ = ["assemble_series", "assemble_study", "choose_series"]

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines of slices in one series (≈0.06°)."""

PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference in PixelSpacing between slices of one series."""

POSITION_TOLERANCE_MM = 0.05
"""Absolute floor of every position tolerance (DS rounding in real headers is well below this)."""

SPACING_RELATIVE_TOLERANCE = 0.01
"""A slice step may differ from the nominal spacing by 1 % (or the 0.05 mm floor, if larger)."""

IN_PLANE_RELATIVE_TOLERANCE = 0.1
"""A slice may sit off the stacking line by 10 % of a pixel (or 0.05 mm) before it is 'sheared'."""

_MULTIFRAME_CT = {str(EnhancedCTImageStorage), str(LegacyConvertedEnhancedCTImageStorage)}
_MULTIFRAME_REASON = "multi-frame Enhanced CT not supported yet"

_HEADER_KEYWORDS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "SliceThickness",
    "SeriesDescription",
    "NumberOfFrames",
    "Rows",
    "Columns",
)
"""What :func:`assemble_study` reads from every header besides the attributes the rules name."""


# ---------------------------------------------------------------------------------------------
# Series selection
# ---------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """A header value as a hashable plain Python value (see ``SeriesFacts.value``); None if empty."""
    if value is None or isinstance(value, DicomSequence):
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = tuple(_freeze(v) for v in value)
        return items or None
    if isinstance(value, bytes):
        return value or None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    text = str(value).strip()
    return text or None


class _SeriesHeaders:
    """One candidate series: its headers (one per distinct SOP instance) and the facts rules ask.

    Implements :class:`fvlm_pacs.codes.SeriesFacts`. Values are the majority value over instances,
    so a single odd header cannot decide a verdict.
    """

    def __init__(self, series_uid: str, headers: Sequence[Dataset]) -> None:
        self.series_uid = series_uid
        unique: dict[str, Dataset] = {}
        for ds in headers:
            unique.setdefault(str(ds.get("SOPInstanceUID", "")) or f"#{len(unique)}", ds)
        self.headers = list(unique.values())
        self._values: dict[str, Any] = {}

    @property
    def instance_count(self) -> int:
        return len(self.headers)

    def value(self, keyword: str) -> Any:
        if keyword not in self._values:
            counts = Counter(_freeze(ds.get(keyword)) for ds in self.headers)
            # most_common keeps first-seen order among ties: deterministic for a given input
            self._values[keyword] = counts.most_common(1)[0][0] if counts else None
        return self._values[keyword]

    def slice_normal(self) -> tuple[float, float, float] | None:
        counts = Counter(
            tuple(round(float(v), 4) for v in iop)
            for ds in self.headers
            if (iop := ds.get("ImageOrientationPatient")) is not None and len(iop) == 6
        )
        if not counts:
            return None
        iop6 = np.array(counts.most_common(1)[0][0], dtype=float)
        n = np.cross(iop6[:3], iop6[3:])
        if not np.any(n):
            return None
        return (float(n[0]), float(n[1]), float(n[2]))

    def unsupported_reason(self) -> str | None:
        """Capability limits of this assembler, independent of the site's rules."""
        sop_class = str(self.value("SOPClassUID") or "")
        frames = self.value("NumberOfFrames")
        multi = isinstance(frames, int) and frames > 1
        if sop_class in _MULTIFRAME_CT or multi:
            name = UID(sop_class).name if sop_class else "unknown SOP Class"
            return f"{_MULTIFRAME_REASON} ({name})"
        return None


def choose_series(headers: Sequence[Dataset], rules: SeriesRules) -> SeriesChoice:
    """Group headers by Series Instance UID, judge every series by ``rules``, rank the accepted.

    ``headers`` may be read with ``stop_before_pixels``. Every candidate gets reasons: ``"accepted"``
    followed by its rank, or one ``"rejected: …"`` per failing rule. The chosen series is the first
    of ``ranking`` (``None`` when nothing is accepted).
    """
    groups: dict[str, list[Dataset]] = {}
    orphans = 0
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            orphans += 1
            continue
        groups.setdefault(uid, []).append(ds)

    reasons: dict[str, list[str]] = {}
    accepted: list[_SeriesHeaders] = []
    for uid, group in groups.items():
        series = _SeriesHeaders(uid, group)
        unsupported = series.unsupported_reason()
        if unsupported:
            reasons[uid] = [f"rejected: {unsupported}"]
            continue
        verdict = rules.evaluate(series)
        if verdict.ok:
            reasons[uid] = ["accepted"]
            accepted.append(series)
        else:
            reasons[uid] = [f"rejected: {note}" for note in verdict.notes]
    if orphans:
        reasons["(no SeriesInstanceUID)"] = [
            f"rejected: {orphans} instance(s) without SeriesInstanceUID"
        ]

    accepted.sort(key=lambda s: (rules.sort_key(s), s.series_uid))
    ranking = [s.series_uid for s in accepted]
    order = ", then ".join(p.describe() for p in rules.prefer) or "Series Instance UID"
    for i, uid in enumerate(ranking, start=1):
        reasons[uid].append(f"rank {i} of {len(ranking)} (prefer {order})")
    chosen = ranking[0] if ranking else None
    for uid, why in reasons.items():
        logger.info("series %s: %s", uid, "; ".join(why))
    logger.info("chosen series: %s (of %d candidates)", chosen, len(reasons))
    return SeriesChoice(chosen_series_uid=chosen, reasons=reasons, ranking=ranking)


# ---------------------------------------------------------------------------------------------
# Volume assembly
# ---------------------------------------------------------------------------------------------


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    sop = ds.get("SOPInstanceUID", "?")
    if value is None or len(value) != n:
        raise GeometryError(f"instance {sop}: {keyword} missing or not {n} values")
    try:
        return np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"instance {sop}: {keyword} is not numeric") from exc


def _majority_str(datasets: Sequence[Dataset], keyword: str) -> str | None:
    counts = Counter(str(ds.get(keyword, "") or "") for ds in datasets)
    counts.pop("", None)
    return counts.most_common(1)[0][0] if counts else None


def assemble_series(
    datasets: Sequence[Dataset], study_instance_uid: str | None = None
) -> tuple[Volume, list[str]]:
    """Sort, check and convert one single-frame CT series into an HU :class:`Volume`.

    Returns the volume and human-readable warnings (dropped re-sent instances, slices thicker or
    thinner than their spacing, missing rescale, …). Raises :class:`GeometryError` when the slices
    do not form one regular grid — see the module docstring for what counts.
    """
    warnings: list[str] = []
    if not datasets:
        raise GeometryError("no instances to assemble")

    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise GeometryError(
            f"instances belong to {len(series_uids)} series: {', '.join(sorted(series_uids))}"
        )
    series_uid = series_uids.pop()

    for ds in datasets:
        frames = ds.get("NumberOfFrames")
        if str(ds.get("SOPClassUID", "")) in _MULTIFRAME_CT or (
            frames is not None and int(frames) > 1
        ):
            raise GeometryError(
                f"series {series_uid}: {_MULTIFRAME_REASON} (instance {ds.get('SOPInstanceUID', '?')})"
            )

    # Same instance received twice: keep the first copy.
    unique: dict[str, Dataset] = {}
    for ds in datasets:
        sop = str(ds.get("SOPInstanceUID", ""))
        if not sop:
            raise GeometryError(f"series {series_uid}: an instance has no SOPInstanceUID")
        unique.setdefault(sop, ds)
    if len(unique) < len(datasets):
        warnings.append(
            f"dropped {len(datasets) - len(unique)} duplicate copies of already received instances"
        )
    slices = list(unique.values())

    # --- per-slice geometry must agree -------------------------------------------------------
    first = slices[0]
    iop0 = _floats(first, "ImageOrientationPatient", 6)
    ps0 = _floats(first, "PixelSpacing", 2)
    rows0, cols0 = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    positions = np.empty((len(slices), 3), dtype=float)
    for i, ds in enumerate(slices):
        sop = ds.SOPInstanceUID
        iop = _floats(ds, "ImageOrientationPatient", 6)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise GeometryError(
                f"series {series_uid}: mixed ImageOrientationPatient — instance {sop} has "
                f"{np.round(iop, 4).tolist()}, instance {first.SOPInstanceUID} has {np.round(iop0, 4).tolist()}"
            )
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if (rows, cols) != (rows0, cols0):
            raise GeometryError(
                f"series {series_uid}: inconsistent Rows/Columns — instance {sop} is {rows}×{cols}, "
                f"instance {first.SOPInstanceUID} is {rows0}×{cols0}"
            )
        ps = _floats(ds, "PixelSpacing", 2)
        if np.max(np.abs(ps - ps0)) > PIXEL_SPACING_TOLERANCE_MM:
            raise GeometryError(
                f"series {series_uid}: inconsistent PixelSpacing — instance {sop} has {ps.tolist()} mm, "
                f"instance {first.SOPInstanceUID} has {ps0.tolist()} mm"
            )
        positions[i] = _floats(ds, "ImagePositionPatient", 3)
    if rows0 <= 0 or cols0 <= 0:
        raise GeometryError(f"series {series_uid}: Rows/Columns missing or zero")
    if np.any(ps0 <= 0):
        raise GeometryError(f"series {series_uid}: PixelSpacing {ps0.tolist()} is not positive")

    row_dir, col_dir = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(col_dir) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row_dir @ col_dir)) > ORIENTATION_TOLERANCE
    ):
        raise GeometryError(
            f"series {series_uid}: ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors"
        )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in slices}
    if len(frames_of_reference - {""}) > 1:
        raise GeometryError(
            f"series {series_uid}: slices in {len(frames_of_reference - {''})} Frames of Reference; "
            "their positions cannot be compared"
        )
    for_uid = next(iter(frames_of_reference - {""}), None)
    if for_uid is None:
        warnings.append("no FrameOfReferenceUID: the volume has no frame of reference")

    # --- order by position along the normal, not by InstanceNumber ----------------------------
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    along = along[order]
    sops = [str(ds.SOPInstanceUID) for ds in slices]

    steps = np.diff(along)
    dup = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        raise GeometryError(
            f"series {series_uid}: {dup.size} duplicate slice position(s); first at "
            f"{_fmt_pos(positions[i])} held by instances {sops[i]} and {sops[i + 1]} "
            "(two reconstructions or phases in one series?)"
        )

    in_plane_tol = max(POSITION_TOLERANCE_MM, IN_PLANE_RELATIVE_TOLERANCE * float(ps0.min()))
    off_line = positions - positions[0] - np.outer(along - along[0], normal)
    offsets = np.linalg.norm(off_line, axis=1)
    if offsets.size and float(offsets.max()) > in_plane_tol:
        k = int(np.argmax(offsets))
        raise GeometryError(
            f"series {series_uid}: slice positions are not stacked along the slice normal — instance "
            f"{sops[k]} is {offsets[k]:.3f} mm off the line (gantry tilt or sheared stack; max "
            f"{in_plane_tol:.3f} mm)"
        )

    n = len(slices)
    if n == 1:
        thickness = first.get("SliceThickness")
        spacing = float(first.get("SpacingBetweenSlices") or thickness or 1.0)
        warnings.append(f"single slice: slice spacing taken as {spacing:g} mm")
    else:
        spacing = _check_spacing(series_uid, steps, along, sops)
        declared = first.get("SpacingBetweenSlices")
        if declared is not None and abs(float(declared) - spacing) > max(
            POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing
        ):
            warnings.append(
                f"SpacingBetweenSlices says {float(declared):g} mm but positions are {spacing:.4g} mm apart; "
                "positions used"
            )
        thickness = first.get("SliceThickness")
        if thickness is not None and str(thickness) != "" and float(thickness) * 1.01 < spacing:
            warnings.append(
                f"slices are {float(thickness):g} mm thick but {spacing:.4g} mm apart: "
                "tissue between slices is not imaged"
            )

    # --- pixels → HU -------------------------------------------------------------------------
    if any("RescaleSlope" not in ds and "ModalityLUTSequence" not in ds for ds in slices):
        warnings.append("some slices have no Rescale Slope/Intercept: stored values taken as HU")
    array = np.empty((n, rows0, cols0), dtype=np.float32)
    for k, ds in enumerate(slices):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # any decoder failure: name the instance, keep the cause
            raise GeometryError(
                f"series {series_uid}: cannot decode pixels of instance {sops[k]}: {exc}"
            ) from exc
        if pixels.shape != (rows0, cols0):
            raise GeometryError(
                f"series {series_uid}: instance {sops[k]} pixel array is {pixels.shape}, "
                f"expected ({rows0}, {cols0}) (multi-sample or multi-frame?)"
            )
        array[k] = apply_modality_lut(pixels, ds)

    voxels = _make_volume(
        array, positions, row_dir, col_dir, normal, ps0, spacing, for_uid, series_uid
    )

    study_uid = study_instance_uid or _majority_str(slices, "StudyInstanceUID") or ""
    if not study_uid:
        raise GeometryError(f"series {series_uid}: no StudyInstanceUID")
    others = {str(ds.get("StudyInstanceUID", "")) for ds in slices} - {study_uid}
    if others:
        warnings.append(
            f"{len(others)} other StudyInstanceUID(s) found in the series; using {study_uid}"
        )
    sop_class = _majority_str(slices, "SOPClassUID") or str(CTImageStorage)

    volume = Volume(
        voxels=voxels,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        source_instances=tuple(sops),
        sop_class_uid=sop_class,
    )
    logger.info(
        "assembled series %s: %d×%d×%d, spacing %.4g/%.4g/%.4g mm, %d warning(s)",
        series_uid,
        n,
        rows0,
        cols0,
        spacing,
        ps0[0],
        ps0[1],
        len(warnings),
    )
    for w in warnings:
        logger.warning("series %s: %s", series_uid, w)
    return volume, warnings


def _fmt_pos(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in p) + ")"


def _check_spacing(series_uid: str, steps: np.ndarray, along: np.ndarray, sops: list[str]) -> float:
    """The regular slice spacing of sorted positions, or GeometryError naming gaps/irregular steps.

    A step that is a whole multiple m ≥ 2 of the nominal (median) spacing is a gap of m − 1 missing
    slices; any other deviation beyond tolerance is irregular spacing.
    """
    nominal = float(np.median(steps))
    tol = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * nominal)
    gaps: list[str] = []
    irregular: list[str] = []
    missing = 0
    for i, step in enumerate(steps.tolist()):
        if abs(step - nominal) <= tol:
            continue
        m = round(step / nominal)
        where = f"between {along[i]:.2f} and {along[i + 1]:.2f} mm along the normal (after slice {i}, instance {sops[i]})"
        if m >= 2 and abs(step - m * nominal) <= tol * m:
            missing += m - 1
            gaps.append(f"{m - 1} missing {where}")
        else:
            irregular.append(f"step {step:.3f} mm {where}")
    if irregular:
        raise GeometryError(
            f"series {series_uid}: irregular slice spacing (nominal {nominal:.3f} mm): "
            + "; ".join(irregular[:3])
            + (f"; … {len(irregular) - 3} more" if len(irregular) > 3 else "")
        )
    if gaps:
        raise GeometryError(
            f"series {series_uid}: {missing} missing slice(s) in a {nominal:.3f} mm grid: "
            + "; ".join(gaps[:5])
            + (f"; … {len(gaps) - 5} more" if len(gaps) > 5 else "")
        )
    # Steps each within tolerance can still drift; the volume's uniform spacing must fit every slice.
    n = along.size
    spacing = float(along[-1] - along[0]) / (n - 1)
    drift = np.abs(along - (along[0] + spacing * np.arange(n)))
    if float(drift.max()) > tol:
        k = int(np.argmax(drift))
        raise GeometryError(
            f"series {series_uid}: irregular slice spacing — slice {k} (instance {sops[k]}) is "
            f"{drift[k]:.3f} mm off a regular {spacing:.4f} mm grid"
        )
    return spacing


def _make_volume(
    array: np.ndarray,
    positions: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    normal: np.ndarray,
    pixel_spacing: np.ndarray,
    spacing: float,
    for_uid: str | None,
    series_uid: str,
) -> hd.Volume:
    """Wrap the array in a highdicom Volume whose affine maps index k to the k-th sorted slice.

    ``Volume.from_attributes`` always builds a right-handed (slice, row, column) frame, i.e. its
    slice axis is cross(column, row) = −normal. Slices here are sorted along +normal, so it would
    index them backwards; when the check finds that, the affine is built directly:
    (k, r, c) → position_k + r·column_dir·row_spacing + c·row_dir·column_spacing.
    """
    n = array.shape[0]
    tol = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing)
    volume = hd.Volume.from_attributes(
        array=array,
        image_position=positions[0].tolist(),
        image_orientation=[*row_dir.tolist(), *col_dir.tolist()],
        pixel_spacing=pixel_spacing.tolist(),
        spacing_between_slices=spacing,
        coordinate_system="PATIENT",
        frame_of_reference_uid=for_uid,
    )
    if not _affine_fits(volume.affine, positions, row_dir, col_dir, pixel_spacing, tol):
        affine = np.eye(4)
        affine[:3, 0] = normal * spacing
        affine[:3, 1] = col_dir * float(pixel_spacing[0])  # row index moves down a column
        affine[:3, 2] = row_dir * float(pixel_spacing[1])  # column index moves along a row
        affine[:3, 3] = positions[0]
        volume = hd.Volume(array, affine, "PATIENT", frame_of_reference_uid=for_uid)
        if not _affine_fits(volume.affine, positions, row_dir, col_dir, pixel_spacing, tol):
            raise GeometryError(
                f"series {series_uid}: cannot build an affine that fits the {n} slice positions"
            )
    return volume


def _affine_fits(
    affine: np.ndarray,
    positions: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: np.ndarray,
    tol: float,
) -> bool:
    n = positions.shape[0]
    idx = np.zeros((4, n))
    idx[0] = np.arange(n)
    idx[3] = 1.0
    mapped = (affine @ idx)[:3].T
    if float(np.abs(mapped - positions).max()) > tol:
        return False
    r1 = affine[:3, :3] @ np.array([0.0, 1.0, 0.0])
    c1 = affine[:3, :3] @ np.array([0.0, 0.0, 1.0])
    return bool(
        np.allclose(r1, col_dir * pixel_spacing[0], atol=1e-6)
        and np.allclose(c1, row_dir * pixel_spacing[1], atol=1e-6)
    )


# ---------------------------------------------------------------------------------------------
# Whole study
# ---------------------------------------------------------------------------------------------


def _read_header(path: Path, keywords: Sequence[str]) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))


def assemble_study(
    paths: Sequence[Path], rules: SeriesRules
) -> tuple[SeriesChoice, Volume, list[str]]:
    """Choose the series of a study's files and assemble it.

    Headers are read without pixel data (only the attributes the rules and the geometry need);
    unreadable files are skipped and reported in the warnings. If the best-ranked series fails
    geometry checks (e.g. a missing slice), the next accepted series is tried, and the failure is
    added to that series' reasons and to the warnings.

    Raises :class:`NoUsableSeries` (every series' UID and reasons in the message) when no series
    passes the rules, :class:`GeometryError` when none of the accepted ones can be assembled.
    """
    warnings: list[str] = []
    keywords = sorted(set(_HEADER_KEYWORDS) | set(rules.attributes))
    headers: list[Dataset] = []
    path_of: dict[str, Path] = {}
    for path in paths:
        try:
            ds = _read_header(Path(path), keywords)
        except Exception as exc:  # noqa: BLE001 — tolerant reading: an unparseable file is skipped
            warnings.append(f"skipped unreadable file {Path(path).name}: {type(exc).__name__}")
            continue
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if not sop:
            warnings.append(f"skipped file {Path(path).name}: no SOPInstanceUID")
            continue
        if sop in path_of:
            continue  # the same instance stored twice; one copy is enough
        path_of[sop] = Path(path)
        headers.append(ds)
    for w in warnings:
        logger.warning("%s", w)

    choice = choose_series(headers, rules)
    reasons = {uid: list(why) for uid, why in choice.reasons.items()}
    if choice.chosen_series_uid is None:
        summary = (
            "; ".join(f"{uid}: {', '.join(why)}" for uid, why in reasons.items())
            or "no readable instances"
        )
        skipped = sum(1 for w in warnings if w.startswith("skipped"))
        extra = f" ({skipped} file(s) skipped as unreadable)" if skipped else ""
        raise NoUsableSeries(
            f"no series passes the selection rules{extra}: {summary}",
            detail=_failure_detail(choice, reasons, warnings),
        )

    failures: list[str] = []
    for uid in choice.ranking:
        series_paths = [
            path_of[str(ds.SOPInstanceUID)]
            for ds in headers
            if str(ds.get("SeriesInstanceUID", "")) == uid
        ]
        datasets: list[Dataset] = []
        for p in series_paths:
            try:
                datasets.append(pydicom.dcmread(p))
            except OSError as exc:
                raise TransientPipelineError(
                    f"series {uid}: cannot read {p.name}: {exc.strerror or exc}"
                ) from exc
            except (
                Exception
            ) as exc:  # readable header, unreadable body: a broken file in this series
                raise GeometryError(
                    f"series {uid}: cannot read {p.name}: {type(exc).__name__}: {exc}"
                ) from exc
        try:
            volume, series_warnings = assemble_series(datasets)
        except GeometryError as exc:
            reasons[uid].append(f"rejected at assembly: {exc}")
            failures.append(f"{uid}: {exc}")
            logger.warning("series %s not assembled: %s", uid, exc)
            continue
        if failures:
            warnings.append(
                f"used series {uid} (rank {choice.ranking.index(uid) + 1}) because higher-ranked series "
                f"failed assembly: {'; '.join(failures)}"
            )
        reasons[uid].append("chosen")
        final = SeriesChoice(chosen_series_uid=uid, reasons=reasons, ranking=list(choice.ranking))
        return final, volume, warnings + series_warnings

    raise GeometryError(
        "no accepted series could be assembled: " + "; ".join(failures),
        detail=_failure_detail(choice, reasons, warnings),
    )


def _failure_detail(
    choice: SeriesChoice, reasons: dict[str, list[str]], warnings: list[str]
) -> dict[str, Any]:
    """What the job keeps when assembly fails: every series' verdict, so the API explains it."""
    verdicts = SeriesChoice(chosen_series_uid=None, reasons=reasons, ranking=list(choice.ranking))
    return {"assembly": {"series_choice": verdicts.as_dict(), "volume": None, "warnings": warnings}}
