"""A one-picture summary of the findings: a Secondary Capture image (and the same pixels as PNG).

Why: not every viewer renders SR content trees or SEG overlays, but every viewer shows an image.
The summary shows, for each anatomy with a finding flagged present, its *key slice* (the axial
slice with the largest area of that anatomy) with the anatomy outlined in its SEG display colour,
and below the tiles the full findings list as text. With no finding present it shows the middle
slice and the list.

Kept small and deterministic: tiles of at most :data:`TILE` pixels, Pillow's built-in font, no
dates or patient data drawn (Burned In Annotation NO), the same inputs give the same pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fvlm_pacs import __version__
from fvlm_pacs.codes import AnatomyTable
from fvlm_pacs.domain import LabelMap, ModelInfo, Volume
from fvlm_pacs.errors import OutputError
from fvlm_pacs.writers.equipment import (
    AI_MARK,
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    manufacturer_model_name,
    software_versions,
)
from fvlm_pacs.writers.seg import check_sources, display_rgb, with_patient_study_attributes
from fvlm_pacs.writers.sr import ReportedFinding

log = logging.getLogger(__name__)

SECONDARY_CAPTURE_IMAGE_STORAGE = SecondaryCaptureImageStorage

TILE = 256
"""Longest side of one key-slice tile in pixels."""
TILES_PER_ROW = 4
LINE = 14
"""Text line height in pixels (Pillow's default font is about 11 px high)."""
MARGIN = 8
MIN_WIDTH = 640

WINDOWS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0)}
"""Display window (level, width) in HU by anatomy name; others use :data:`SOFT_TISSUE`."""
SOFT_TISSUE = (40.0, 400.0)
OVERVIEW = (-600.0, 1500.0)
"""Window of the middle slice shown when no finding is present."""

_STATUS_TEXT = {"present": "PRESENT", "absent": "absent", "not_assessable": "not assessable"}
_STATUS_COLOUR = {
    "present": (255, 200, 0),
    "absent": (200, 200, 200),
    "not_assessable": (140, 140, 140),
}


@dataclass(frozen=True)
class KeySlice:
    """One tile: the slice index, the anatomy outlined (None for the overview) and its caption."""

    index: int
    anatomy: str | None
    caption: tuple[str, ...]


def key_slices(
    labelmap: LabelMap, table: AnatomyTable, findings: Sequence[ReportedFinding]
) -> list[KeySlice]:
    """The tiles to show: one per anatomy with a present finding (table order), else the middle."""
    arr = np.asarray(labelmap.array)
    flagged: dict[str, list[str]] = {}
    for f in findings:
        if f.status == "present":
            flagged.setdefault(f.anatomy, []).append(f.finding)
    out: list[KeySlice] = []
    for anatomy in table.anatomies:
        names = flagged.get(anatomy.name)
        if not names or anatomy.name not in labelmap.anatomies:
            continue
        value = labelmap.anatomies.index(anatomy.name) + 1
        area = (arr == value).sum(axis=(1, 2))
        if not area.any():
            continue
        k = int(np.argmax(area))  # first slice of maximal area: deterministic
        caption = (f"{anatomy.name} - slice {k + 1} of {arr.shape[0]}", *names)
        out.append(KeySlice(k, anatomy.name, caption))
    if not out:
        k = arr.shape[0] // 2
        out.append(KeySlice(k, None, (f"slice {k + 1} of {arr.shape[0]}", "no finding present")))
    return out


def _window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2.0
    scaled = (np.asarray(image, dtype=np.float32) - lo) / width
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def _tile_size(rows: int, cols: int, spacing: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a tile: physical aspect ratio kept, longest side :data:`TILE`."""
    height_mm, width_mm = rows * spacing[0], cols * spacing[1]
    scale = TILE / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _render_tile(
    volume: Volume, labelmap: LabelMap, table: AnatomyTable, key: KeySlice
) -> Image.Image:
    hu = np.asarray(volume.array[key.index])
    level, width = WINDOWS.get(key.anatomy, SOFT_TISSUE) if key.anatomy is not None else OVERVIEW
    h, w = _tile_size(hu.shape[0], hu.shape[1], (volume.spacing[1], volume.spacing[2]))
    gray = Image.fromarray(_window(hu, level, width)).resize((w, h), Image.Resampling.BILINEAR)
    tile = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    if key.anatomy is not None:
        value = labelmap.anatomies.index(key.anatomy) + 1
        mask_full = (np.asarray(labelmap.array[key.index]) == value).astype(np.uint8) * 255
        mask = np.asarray(Image.fromarray(mask_full).resize((w, h), Image.Resampling.NEAREST)) > 0
        tile[_outline(mask)] = display_rgb(table.by_name(key.anatomy))
    return Image.fromarray(tile)


def _finding_cells(f: ReportedFinding) -> tuple[str, str, str, str]:
    """Columns of one findings-list line: anatomy, finding, score, status with threshold."""
    score = "-" if f.score is None else f"{f.score:.3f}"
    return (f.anatomy, f.finding, score, f"{_STATUS_TEXT[f.status]} (t={f.threshold:.3f})")


def render_summary(
    volume: Volume,
    labelmap: LabelMap,
    table: AnatomyTable,
    findings: Sequence[ReportedFinding],
    model: ModelInfo,
) -> tuple[np.ndarray, list[KeySlice]]:
    """The summary as an RGB uint8 array (rows, columns, 3) and the key slices it shows."""
    keys = key_slices(labelmap, table, findings)
    tiles = [_render_tile(volume, labelmap, table, k) for k in keys]
    font = ImageFont.load_default()
    n_cols = min(len(tiles), TILES_PER_ROW)
    n_rows = -(-len(tiles) // TILES_PER_ROW)
    caption_lines = max(len(k.caption) for k in keys)
    cell_w = TILE + MARGIN
    cell_h = TILE + MARGIN + caption_lines * LINE
    header = [
        f"{AI_MARK} - not for diagnosis alone",
        f"fvlm_pacs {__version__} / model {model.name} {model.version}",
    ]
    cells = [_finding_cells(f) for f in findings]
    # the default font is proportional: columns start at fixed offsets, not after padding spaces
    col_w = [
        max([int(font.getlength(row[c])) for row in cells] + [0]) + 2 * MARGIN for c in range(4)
    ]
    col_x = [MARGIN + sum(col_w[:c]) for c in range(4)]
    text_w = max([int(font.getlength(t)) for t in header] + [sum(col_w)])
    width = max(MIN_WIDTH, n_cols * cell_w + MARGIN, text_w + 2 * MARGIN)
    height = MARGIN + len(header) * LINE + MARGIN + n_rows * cell_h + (len(cells) + 1) * LINE
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for text in header:
        draw.text((MARGIN, y), text, fill=(255, 255, 255), font=font)
        y += LINE
    y += MARGIN
    for i, (key, tile) in enumerate(zip(keys, tiles, strict=True)):
        x0 = MARGIN + (i % TILES_PER_ROW) * cell_w
        y0 = y + (i // TILES_PER_ROW) * cell_h
        canvas.paste(tile, (x0, y0))
        colour = (
            display_rgb(table.by_name(key.anatomy)) if key.anatomy is not None else (255, 255, 255)
        )
        for j, text in enumerate(key.caption):
            draw.text((x0, y0 + TILE + 2 + j * LINE), text, fill=colour, font=font)
    y += n_rows * cell_h
    draw.text(
        (MARGIN, y), "findings (score, status, threshold t):", fill=(255, 255, 255), font=font
    )
    y += LINE
    for f, row in zip(findings, cells, strict=True):
        for x, text in zip(col_x, row, strict=True):
            draw.text((x, y), text, fill=_STATUS_COLOUR[f.status], font=font)
        y += LINE
    return np.asarray(canvas, dtype=np.uint8).copy(), keys


_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
"""Patient orientation letters of the +/- LPS axes (PS3.3 C.7.6.1.1.1)."""


def _orientation_letter(direction: Sequence[float]) -> str:
    axis = int(np.argmax(np.abs(direction)))
    return _LETTERS[axis][0 if direction[axis] > 0 else 1]


def build_summary(
    volume: Volume,
    labelmap: LabelMap,
    sources: Sequence[Dataset],
    table: AnatomyTable,
    findings: Sequence[ReportedFinding],
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> tuple[hd.sc.SCImage, np.ndarray]:
    """The Secondary Capture in the source study, and its RGB pixels for the PNG.

    Patient and study attributes are copied from the first source header; Source Image Sequence
    names the CT instances of the key slices shown.
    """
    if not sources:
        raise OutputError("summary: no source instances")
    check_sources(volume, sources)
    sources = with_patient_study_attributes(sources)
    rgb, keys = render_summary(volume, labelmap, table, findings, model)
    ref = sources[0]
    iop = [float(v) for v in ref.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    orientation = (_orientation_letter(iop[:3]), _orientation_letter(iop[3:]))
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=SC_SERIES_DESCRIPTION,
            manufacturer_model_name=manufacturer_model_name(model),
            software_versions=list(software_versions(model)),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"summary: highdicom refused the image: {exc}") from exc
    sc.BurnedInAnnotation = "NO"  # text drawn, but never anything that identifies the patient
    # The slices show a whole (unpaired) body region; saying so satisfies the Type 2C Laterality
    # condition of General Series without an empty value (dciodvfy warns about either otherwise).
    sc.ImageLaterality = "U"
    if ref.get("BodyPartExamined"):
        sc.BodyPartExamined = ref.BodyPartExamined
    used = sorted({k.index for k in keys})
    items = []
    for k in used:
        item = Dataset()
        item.ReferencedSOPClassUID = str(sources[k].SOPClassUID)
        item.ReferencedSOPInstanceUID = str(sources[k].SOPInstanceUID)
        items.append(item)
    sc.SourceImageSequence = items
    log.info("summary: %d tile(s), %dx%d pixels", len(keys), rgb.shape[1], rgb.shape[0])
    return sc, rgb
