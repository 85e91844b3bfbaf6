"""Put masks from another grid onto the CT volume's voxel grid, and merge anatomy masks.

Both providers end here: a DICOM SEG and a TotalSegmentator result are masks in patient space
(LPS) on a grid of their own that usually, but not always, equals the CT grid up to axis order,
flips and cropping. :func:`place_on_grid` first tries highdicom's exact
:meth:`highdicom.Volume.match_geometry` (permute, flip, pad, crop — no interpolation) and falls back
to nearest-neighbour sampling through the two affines when the grids differ in spacing or
alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import highdicom as hd
import numpy as np

from fvlm_pacs.codes import AnatomyTable
from fvlm_pacs.domain import LabelMap, Volume

logger = logging.getLogger(__name__)


def place_on_grid(labels: hd.Volume, volume: Volume) -> np.ndarray:
    """``labels`` (3-D, one channel, patient coordinates) sampled on ``volume``'s grid.

    Values are kept (masks or label ids; nearest neighbour, never interpolated); voxels of the CT
    grid outside the source's extent are 0. The caller checks Frames of
    Reference: highdicom 0.28's ``match_geometry`` compares the UID with itself, so it cannot.
    """
    target = volume.voxels
    try:
        matched = labels.match_geometry(target.get_geometry())
        out = np.asarray(matched.array)
        if out.shape == target.spatial_shape:
            return out
        logger.info("match_geometry gave shape %s, not %s", out.shape, target.spatial_shape)
    except RuntimeError as exc:
        logger.info("grids differ (%s); sampling nearest-neighbour", exc)
    return _nearest(np.asarray(labels.array), labels.affine, target.spatial_shape, target.affine)


def _nearest(
    src: np.ndarray, src_affine: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray
) -> np.ndarray:
    """Sample ``src`` at the centre of every voxel of the target grid (nearest voxel).

    One slice at a time, so memory stays at one plane of coordinates even for 512² × 1000 CTs.
    """
    to_src = np.linalg.inv(src_affine) @ affine
    out = np.zeros(shape, dtype=src.dtype)
    rr, cc = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    plane = np.stack([np.zeros(rr.size), rr.ravel(), cc.ravel(), np.ones(rr.size)])
    limits = np.array(src.shape[:3]).reshape(3, 1)
    for k in range(shape[0]):
        plane[0] = k
        idx = np.rint((to_src @ plane)[:3]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < limits), axis=0)
        values = np.zeros(rr.size, dtype=src.dtype)
        values[inside] = src[idx[0, inside], idx[1, inside], idx[2, inside]]
        out[k] = values.reshape(shape[1], shape[2])
    return out


def merge_anatomy_masks(
    masks: Mapping[str, np.ndarray], table: AnatomyTable, shape: tuple[int, ...], source: str
) -> LabelMap:
    """One label map from per-anatomy bool masks (missing anatomies stay 0).

    Where masks overlap, the anatomy with fewer voxels wins, ties going to the lower label: a
    coarse mask of a large organ (lung drawn around the mediastinum) must not erase a small
    structure (oesophagus), which loses a far larger share of its voxels. fVLM ignores an anatomy
    in a crop once it keeps < 90 % of its voxels (FVLM.md), so small structures matter most.
    """
    dtype = np.uint8 if len(table.anatomies) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    present = [(a, masks[a.name]) for a in table.anatomies if a.name in masks]
    # paint large first, small last; at equal size the lower label paints last and wins
    present.sort(key=lambda am: (-int(am[1].sum()), -am[0].label))
    for anatomy, mask in present:
        out[mask] = anatomy.label
    return LabelMap(array=out, anatomies=table.names, source=source)
