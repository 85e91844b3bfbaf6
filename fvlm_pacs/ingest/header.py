"""Read a received DICOM Part 10 byte string far enough to file it, and check it is whole.

Pure parsing, no storage or database: C-STORE, STOW-RS and the folder export destination all
place objects by the same identifying attributes, checked the same way (UIDs validated before
they become file names; truncated objects refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from fvlm_pacs.domain import InstanceRef
from fvlm_pacs.errors import InvalidInstance
from fvlm_pacs.ingest.spool import validate_uid

_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    """The identifying attributes of one received object."""

    ref: InstanceRef
    transfer_syntax_uid: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None


def parse_header(data: bytes) -> Header:
    """Parse a DICOM Part 10 byte string far enough to file it, and check it is complete.

    pydicom reads a truncated file without complaint (the last value is just short), so each
    top-level element's length is compared with the bytes actually present.
    """
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except Exception as exc:  # pydicom raises many types for garbage input
        raise InvalidInstance(f"not a readable DICOM object: {type(exc).__name__}") from None
    _check_complete(ds)
    _check_pixel_data_length(ds)
    return _header(ds)


def _header(ds: Dataset) -> Header:
    """The identifying attributes of a data set, with pydicom's value conversions."""
    try:
        ref = InstanceRef(
            study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID"),
            series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID"),
            sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID"),
            sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOP Class UID"),
        )
        meta = getattr(ds, "file_meta", None)
        tsuid = str(meta.TransferSyntaxUID) if meta and "TransferSyntaxUID" in meta else None
        number = ds.get("SeriesNumber")
        description = ds.get("SeriesDescription")
        modality = ds.get("Modality")
    except InvalidInstance:
        raise
    except Exception as exc:
        raise InvalidInstance(f"unreadable identifying attributes: {type(exc).__name__}") from None
    return Header(
        ref=ref,
        transfer_syntax_uid=tsuid,
        modality=str(modality)[:16] if modality else None,
        series_number=int(number) if number not in (None, "") else None,
        series_description=str(description)[:64] if description else None,
    )


def _check_complete(ds: Dataset) -> None:
    for tag, elem in ds._dict.items():
        if (
            isinstance(elem, RawDataElement)
            and elem.length != _UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) != elem.length
        ):
            raise InvalidInstance(
                f"truncated object: element {tag} has {len(elem.value)} of {elem.length} bytes"
            )


def _check_pixel_data_length(ds: Dataset) -> None:
    """Native (uncompressed) Pixel Data must hold every frame the image header describes.

    Catches a data set cut short whose length fields were then made consistent (some SCUs
    re-encode a damaged file before sending it), which the element check cannot see.
    """
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if "PixelData" not in ds or (tsuid is not None and tsuid.is_compressed):
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInstance("Pixel Data without a usable image pixel description") from None
    expected_bits = rows * cols * samples * bits * frames
    expected = (expected_bits + 7) // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise InvalidInstance(f"truncated Pixel Data: {actual} of {expected} bytes")
