"""The model's intensity convention: scaled HU in, one channel per HU window out.

The release clips HU to [−1150, 350] and scales that window to [0, 1] (FVLM.md). That single
window throws away what lies above 350 HU (calcium: 350–1000 HU, so a calcified plaque looks like
soft tissue) and gives the −950 HU emphysema threshold 0.06 of the range, and a linear patch
embedding cannot undo a clip or re-stretch a narrow band of a patch it averages over. So the
clipping moves into the model, where its config says which windows it was trained with:

* preprocessing (:func:`scale_hu`, for the predictor and the training dataset alike) maps HU
  linearly with the release's window — −1150 HU → 0, 350 HU → 1 — and clips only at −1150
  (air and padding below it) and at 3071 (the 12-bit CT range), so nothing above 350 is lost;
* the model (:func:`window_channels`, inside the ViT's patch embedding) clips that image to
  each of ``vision.hu_windows`` and stacks one [0, 1] channel per window, ``vision.in_channels``
  of them.

With the release's single window ``((−1150, 350),)`` — the default, and every checkpoint made
before windows existed — the model sees exactly what it saw before: ``clip(image, 0, 1)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import RELEASED_HU_WINDOW

INPUT_HU_FLOOR = RELEASED_HU_WINDOW[0]
"""The lowest HU the model input keeps (the release's window floor; air is −1000)."""
INPUT_HU_CEILING = 3071.0
"""The highest HU the model input keeps: 12-bit CT's top (metal saturates there anyway)."""
HU_PER_UNIT = RELEASED_HU_WINDOW[1] - RELEASED_HU_WINDOW[0]
"""HU per unit of the model input: input × this = HU above :data:`INPUT_HU_FLOOR`."""


def scale_hu(hu: np.ndarray) -> np.ndarray:
    """float32 model input from HU: −1150 → 0, 350 → 1, clipped to [−1150, 3071] HU."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), INPUT_HU_FLOOR, INPUT_HU_CEILING)
    return (clipped - np.float32(INPUT_HU_FLOOR)) / np.float32(HU_PER_UNIT)


def window_channels(
    image: torch.Tensor, windows: tuple[tuple[float, float], ...], dim: int = 1
) -> torch.Tensor:
    """Scaled HU clipped to each HU window ``(low, high)`` and scaled to [0, 1], stacked along
    ``dim``, where ``image`` has size 1 (e.g. [B, 1, D, H, W] → [B, len(windows), D, H, W]).

    One multiply-add and one in-place clamp over the output: on a training batch of
    8 × 96 × 176 × 288 voxels and four windows, separate subtract/divide/clamp/concatenate
    passes cost more than the patch embedding's matrix product. With the release's window
    the multiply-add is ``x · 1 + 0``, i.e. the old ``clip(x, 0, 1)`` bit for bit.
    """
    if image.shape[dim] != 1:
        raise ValueError(
            f"image must hold one scaled-HU channel along dim {dim}, got {tuple(image.shape)}"
        )
    shape = [1] * image.ndim
    shape[dim] = len(windows)
    scale = [HU_PER_UNIT / (high - low) for low, high in windows]
    offset = [-(low - INPUT_HU_FLOOR) / (high - low) for low, high in windows]
    scaled = torch.addcmul(
        torch.tensor(offset, dtype=image.dtype, device=image.device).reshape(shape),
        image,
        torch.tensor(scale, dtype=image.dtype, device=image.device).reshape(shape),
    )
    return scaled.clamp_(0.0, 1.0)


CALCIUM_WINDOW = (130.0, 1130.0)
"""Calcium from the Agatston threshold, 130 HU, up: plaques 450–1000 HU land in its middle where
the release's window clips them to the density of soft tissue at 350 HU."""

FOUR_WINDOWS: tuple[tuple[float, float], ...] = (
    RELEASED_HU_WINDOW,  # lung and mediastinum at once
    (-1000.0, -900.0),  # low attenuation around -950 HU, the emphysema index threshold
    (-160.0, 240.0),  # soft tissue (W 400, L 40): fluid, fat, muscle, myocardium
    CALCIUM_WINDOW,
)
"""Standard radiology windows as four input channels (``vision.hu_windows``, ``in_channels: 4``)."""
