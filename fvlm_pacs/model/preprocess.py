"""Preprocessing: an HU :class:`~fvlm_pacs.domain.Volume` and its label map → model inputs.

FVLM.md's recipe, with every convention written down because each one moves the scores:

1. **Orientation** — the arrays are re-ordered (permuted and flipped, never resampled) so that
   axis 0 runs head → feet, axis 1 anterior → posterior (rows), axis 2 right → left (columns):
   patient orientation ``"FPL"`` in highdicom's terms. The voxel order of the series (feet-first,
   reversed InstanceNumber, flipped columns) therefore cannot change what the model sees.
2. **Spacing** — resampled to 3 × 1 × 1 mm along (slice, row, column) = (z, y, x): trilinear for
   the image, nearest neighbour for the labels (MONAI ``Spacing``); only the anatomies plus the
   context margin are resampled (the rest never reaches the model).
3. **Scale** — HU mapped linearly so that −1150 → 0 and 350 → 1 (the release's window), clipped
   at −1150 and 3071 HU only (:func:`~fvlm_pacs.model.intensity.scale_hu`): the model clips to
   its own windows (``vision.hu_windows``; the release's one window gives [0, 1] as before).
4. **Context crop** — the union bounding box of all anatomies, plus 5 slices and 20 pixels, then
   zero-padded at the end to at least (112, 256, 352).
5. **Anatomy crops** — for each anatomy a crop of at least (112, 288, 352) centred on it (wider
   when the anatomy is larger, so it is never cut), end-padded to multiples of the patch
   (16, 16, 32). Other anatomies that touch that crop's border or keep < 90 % of their voxels
   inside it are zeroed in the crop's label map: the crop cannot score them.

An anatomy absent from the label map (or lost by resampling) is *not assessable* — never a 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from fvlm_pacs.domain import Volume
from fvlm_pacs.geometry import LPS_TO_RAS

from .intensity import scale_hu

log = logging.getLogger(__name__)

MODEL_ORIENTATION = "FPL"
"""Axis 0 towards the feet, axis 1 towards posterior, axis 2 towards the patient's left."""
MODEL_SPACING_MM = (3.0, 1.0, 1.0)
CONTEXT_MARGIN = (5, 20, 20)
CONTEXT_MIN_SHAPE = (112, 256, 352)
CROP_MIN_SHAPE = (112, 288, 352)
PATCH = (16, 16, 32)
MIN_KEPT_FRACTION = 0.9


@dataclass(frozen=True)
class ModelGrid:
    """Image and labels on the model's grid, after the context crop.

    ``image`` float32 [D, H, W], scaled HU (0 = −1150 HU, 1 = 350 HU, see
    :func:`~fvlm_pacs.model.intensity.scale_hu`); ``labels`` int16 [D, H, W], 0 = background, k = k-th
    anatomy. ``voxels`` counts each anatomy's voxels on this grid (index 0 unused), so crops can
    tell how much of an anatomy they keep.
    """

    image: np.ndarray
    labels: np.ndarray
    voxels: np.ndarray

    def present(self, label: int) -> bool:
        return bool(self.voxels[label] > 0)


@dataclass(frozen=True)
class AnatomyCrop:
    """One ViT input: a crop centred on ``label``; ``assessable`` lists the labels it can score."""

    label: int
    image: np.ndarray
    labels: np.ndarray
    assessable: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.image.shape)


def _reoriented(volume: hd.Volume) -> hd.Volume:
    return volume.to_patient_orientation(MODEL_ORIENTATION)


def _resampled(array: np.ndarray, affine_lps: np.ndarray, mode: str) -> np.ndarray:
    """MONAI ``Spacing`` works in RAS; the DICOM affine is LPS.

    The sampling grid is computed in float32 (MONAI's default is float64): 0.35 s less per
    300 × 512² volume, and the sample positions move by < 1e-4 voxel (bilinear HU by < 0.1,
    the nearest-neighbour labels not at all on the benchmark study).
    """
    tensor = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array))[None],
        affine=torch.from_numpy(LPS_TO_RAS @ affine_lps),
    )
    spacing = Spacing(pixdim=MODEL_SPACING_MM, mode=mode, padding_mode="zeros", dtype=np.float32)
    out = spacing(tensor)
    return np.asarray(out[0].detach().cpu().numpy())


def _around_anatomies(
    image: hd.Volume, labels: hd.Volume, n_anatomies: int
) -> tuple[hd.Volume, hd.Volume]:
    """Both volumes cut to the anatomies' bounding box plus the context margin and two voxels,
    on the source grid, before resampling.

    Only the context (step 4) ever reaches the model, so resampling the rest of the field of
    view (air, table, arms) is wasted work — about half of a chest CT. The cut is at whole
    source voxels and widened by the margin (in mm) and the interpolation's reach, so the
    context is the same; only the resampled grid's origin moves by a fraction of a voxel.
    With no anatomy nothing is cut.
    """
    present = (labels.array > 0) & (labels.array <= n_anatomies)
    if not present.any():
        return image, labels
    lo, hi = _bbox(present)
    margin_mm = np.array(CONTEXT_MARGIN) * np.array(MODEL_SPACING_MM)
    pad = np.ceil(margin_mm / np.array(image.spacing)).astype(int) + 2
    lo = np.maximum(lo - pad, 0)
    hi = np.minimum(hi + pad, np.array(present.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return image[box], labels[box]  # type: ignore[index]  # highdicom types a 1-tuple


def to_model_grid(volume: Volume, labelmap: np.ndarray, n_anatomies: int) -> ModelGrid:
    """Steps 1–4: orientation, spacing, scale, context crop and pad.

    ``labelmap`` is on ``volume``'s grid (same shape, same voxel order).
    """
    if labelmap.shape != volume.array.shape:
        raise ValueError(
            f"labelmap shape {labelmap.shape} differs from the volume's {volume.array.shape}"
        )
    image = _reoriented(volume.voxels)
    labels = _reoriented(volume.voxels.with_array(labelmap))
    image, labels = _around_anatomies(image, labels, n_anatomies)
    hu = _resampled(image.array.astype(np.float32), image.affine, "bilinear")
    lab_f = labels.array.astype(np.float32)
    lab = np.rint(_resampled(lab_f, labels.affine, "nearest")).astype(np.int16)
    lab[(lab < 0) | (lab > n_anatomies)] = 0
    scaled = scale_hu(hu)
    if lab.any():
        lo, hi = _bbox(lab > 0)
        lo = np.maximum(lo - np.array(CONTEXT_MARGIN), 0)
        hi = np.minimum(hi + np.array(CONTEXT_MARGIN), np.array(lab.shape))
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        scaled, lab = scaled[box], lab[box]
    scaled = _end_pad(scaled, CONTEXT_MIN_SHAPE)
    lab = _end_pad(lab, CONTEXT_MIN_SHAPE)
    voxels = np.bincount(lab.ravel().astype(np.int64), minlength=n_anatomies + 1)
    return ModelGrid(image=scaled, labels=lab, voxels=voxels[: n_anatomies + 1])


def anatomy_crops(grid: ModelGrid) -> list[AnatomyCrop]:
    """Step 5: one crop per present anatomy."""
    crops = []
    n = len(grid.voxels) - 1
    for label in range(1, n + 1):
        if not grid.present(label):
            continue
        lo, hi = _bbox(grid.labels == label)
        extent = hi - lo
        size = np.maximum(extent, np.array(CROP_MIN_SHAPE))
        start = lo + extent // 2 - size // 2
        image, labels = (
            _crop_padded(grid.image, start, size),
            _crop_padded(grid.labels, start, size),
        )
        assessable = [label]
        for other in range(1, n + 1):
            if other == label or not grid.present(other):
                continue
            inside = labels == other
            kept = int(inside.sum()) / int(grid.voxels[other])
            if kept < MIN_KEPT_FRACTION or _touches_border(inside):
                labels[inside] = 0
            else:
                assessable.append(other)
        target = tuple(-(-s // p) * p for s, p in zip(image.shape, PATCH, strict=True))
        crops.append(
            AnatomyCrop(
                label=label,
                image=_end_pad(image, target),
                labels=_end_pad(labels, target),
                assessable=tuple(sorted(assessable)),
            )
        )
    return crops


def context_crop(grid: ModelGrid) -> AnatomyCrop:
    """The single-pass alternative to :func:`anatomy_crops`: the whole context (it holds every
    anatomy whole, by construction) end-padded to patch multiples, scoring all anatomies at once.

    One ViT pass per study instead of one per anatomy; not the release's protocol, so it is a
    measured option (``label`` 0 marks it), not the default.
    """
    target = tuple(-(-s // p) * p for s, p in zip(grid.image.shape, PATCH, strict=True))
    present = tuple(k for k in range(1, len(grid.voxels)) if grid.present(k))
    return AnatomyCrop(
        label=0,
        image=_end_pad(grid.image, target),
        labels=_end_pad(grid.labels, target),
        assessable=present,
    )


def group_by_shape(crops: list[AnatomyCrop]) -> list[list[AnatomyCrop]]:
    """Crops of equal shape, so each group is one batched forward pass."""
    groups: dict[tuple[int, ...], list[AnatomyCrop]] = {}
    for crop in crops:
        groups.setdefault(crop.shape, []).append(crop)
    return list(groups.values())


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of the True voxels along each axis (``mask`` has at least one).

    From one projection per axis rather than ``np.nonzero``, which would materialise the index
    of every voxel of an organ (millions for the lungs).
    """
    lo, hi = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return np.array(lo), np.array(hi)


def _end_pad(array: np.ndarray, min_shape: tuple[int, ...]) -> np.ndarray:
    pad = [(0, max(0, m - s)) for s, m in zip(array.shape, min_shape, strict=True)]
    if not any(after for _, after in pad):
        return array
    return np.pad(array, pad, mode="constant", constant_values=0)


def _crop_padded(array: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """array[start : start + size] with zeros where the window leaves the array."""
    out = np.zeros(tuple(int(s) for s in size), dtype=array.dtype)
    src = tuple(
        slice(max(0, int(a)), min(int(a + s), n))
        for a, s, n in zip(start, size, array.shape, strict=True)
    )
    dst = tuple(
        slice(sl.start - int(a), sl.stop - int(a)) for sl, a in zip(src, start, strict=True)
    )
    out[dst] = array[src]
    return out


def _touches_border(mask: np.ndarray) -> bool:
    if not mask.any():
        return False
    return bool(
        mask[0].any()
        or mask[-1].any()
        or mask[:, 0].any()
        or mask[:, -1].any()
        or mask[:, :, 0].any()
        or mask[:, :, -1].any()
    )
