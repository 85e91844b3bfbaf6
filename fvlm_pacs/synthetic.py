"""Synthetic CT data made on the spot: no real CT can be downloaded here.

This module makes geometrically correct DICOM CT series (UIDs, positions, orientation, rescale to
HU) for tests, benchmarks and the demo. The chest phantoms with anatomy masks and reports that
training needs build on :func:`ct_series`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

SyntheticHU = Callable[[int, int, int], np.ndarray]
"""Returns the HU image (rows × columns) for slice index ``k`` of ``n``: ``f(k, rows, cols)``."""


def sphere_phantom(n_slices: int) -> SyntheticHU:
    """A water cylinder in air with a dense sphere in its middle: enough structure to check that
    slices end up in the right order and orientation."""

    def make(k: int, rows: int, cols: int) -> np.ndarray:
        yy, xx = np.mgrid[0:rows, 0:cols]
        cy, cx = rows / 2, cols / 2
        r = min(rows, cols) * 0.4
        img = np.full((rows, cols), -1000.0)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 0.0
        # the sphere's radius varies with k, so slice order is visible in the volume
        sr = r * 0.5 * (1 - abs(2 * k / max(n_slices - 1, 1) - 1))
        img[(yy - cy) ** 2 + (xx - cx * 1.1) ** 2 < sr**2] = 400.0 + k
        return img

    return make


@dataclass(frozen=True)
class SeriesSpec:
    """What a synthetic series looks like. Defaults: a thin axial chest series."""

    n_slices: int = 40
    rows: int = 64
    columns: int = 64
    pixel_spacing: tuple[float, float] = (0.8, 0.8)
    slice_thickness: float = 1.0
    slice_spacing: float = 1.0
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    origin: tuple[float, float, float] = (-25.0, -25.0, -100.0)
    series_description: str = "Chest 1.0 mm"
    series_number: int = 2
    modality: str = "CT"
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0


def ct_series(
    spec: SeriesSpec = SeriesSpec(),
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "SYNTH0001",
    hu: SyntheticHU | None = None,
) -> list[Dataset]:
    """Make one CT series as a list of complete datasets (with file meta), in slice order.

    Slices are stacked along the normal of ``orientation`` (row × column direction), spaced by
    ``slice_spacing``; InstanceNumber follows the stacking order.
    """
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    hu = hu or sphere_phantom(spec.n_slices)
    row_dir = np.array(spec.orientation[:3], dtype=float)
    col_dir = np.array(spec.orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    out: list[Dataset] = []
    for k in range(spec.n_slices):
        pos = np.array(spec.origin) + normal * spec.slice_spacing * k
        image = hu(k, spec.rows, spec.columns)
        stored = np.round((image - spec.rescale_intercept) / spec.rescale_slope)
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
        out.append(_ct_dataset(spec, study_uid, series_uid, for_uid, patient_id, k, pos, stored))
    return out


def _ct_dataset(
    spec: SeriesSpec,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    patient_id: str,
    k: int,
    position: np.ndarray,
    stored: np.ndarray,
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = spec.modality
    ds.Manufacturer = "fvlm_pacs synthetic"
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.InstanceNumber = k + 1
    ds.ImageType = list(spec.image_type)
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
    ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    ds.SliceThickness = spec.slice_thickness
    ds.KVP = 120
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = spec.rescale_intercept
    ds.RescaleSlope = spec.rescale_slope
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    return ds


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write datasets as DICOM Part 10 files named by SOP Instance UID; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
