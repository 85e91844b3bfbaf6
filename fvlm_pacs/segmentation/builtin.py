"""Provider ``builtin``: a small MONAI 3-D U-Net shipped with the package, trained on phantoms.

It exists so that a site without a DICOM SEG in its studies and without a TotalSegmentator install
still gets an anatomy label map — and so the demo runs end to end on any machine. It is trained on
synthetic phantoms only (:mod:`fvlm_pacs.segmentation.builtin_train`, run by ``fvlm-pacs model
build-demo``); its model card states the measured Dice. On real CT expect far less: use
``dicom-seg`` or ``totalsegmentator`` for anything beyond a demonstration.

Inference, with every convention written down because each one moves the masks:

1. **Orientation** — the HU volume is re-ordered (never resampled) to patient orientation
   ``"FPL"``, as :mod:`fvlm_pacs.model.preprocess` does, so the network always sees head → feet,
   anterior → posterior, right → left whatever the series' voxel order.
2. **Working grid** — resampled to :attr:`SegNetConfig.spacing_mm` (4 mm isotropic by default;
   MONAI ``Spacing``, trilinear). Where the CT is at least twice as fine as the working grid along
   an axis it is first box-averaged by that integer factor (anti-aliasing: a 0.7 mm slice sampled
   every 4 mm would keep the full pixel noise, which the network never saw in training).
   4 mm, not 3 mm: lung, heart and aorta are large, and on a 3 × 1.5 × 1.5 mm phantom a
   round trip of the exact labels through the working grid (nearest neighbour down and back)
   keeps Dice lung/heart/esophagus/aorta 0.977/0.981/0.850/0.936 at 3 mm and
   0.968/0.970/0.836/0.925 at 4 mm — the esophagus (14–18 mm wide) loses 1.4 points more — for
   2.4× fewer voxels to train and infer on.
3. **Window** — HU clipped to :attr:`SegNetConfig.hu_window` and scaled to [0, 1]; 0 is air, so
   the zero padding of sliding windows looks like air around the patient. Each of
   :attr:`SegNetConfig.extra_windows` is one more input channel, windowed the same way (air is 0
   in every channel that starts above −1000 HU): a soft-tissue window tells pericardial fluid
   (about 10 HU) from the heart's blood and muscle (about 40 HU), 30 HU that the 1400-HU-wide
   first window squeezes into 0.02.
4. **Network** — MONAI ``UNet`` with K + 1 output channels (background + anatomies in
   :attr:`SegNetConfig.anatomies` order), run with ``sliding_window_inference`` over windows of
   :attr:`SegNetConfig.roi` (the training crop), Gaussian-blended; argmax.
5. **Clean-up** — per anatomy, connected components (26-connectivity) smaller than
   :attr:`SegNetConfig.min_component_fraction` of that anatomy's largest component are dropped
   (two lungs are two components of one label, so "keep the largest" alone would drop one).
   A small gain, measured on 6 held-out phantoms: Dice +0.000 to +0.003 per anatomy after
   400–1000 training steps (the aorta most); after only 150 steps the esophagus lost 0.005.
6. **Back to the CT grid** — the class probabilities (softmax; a voxel the clean-up dropped is
   background with certainty) are interpolated linearly to every CT voxel centre through the two
   affines (patient coordinates) and the argmax taken there, so the label map has exactly the
   shape and voxel order of ``volume.array`` whatever its orientation, including feet-first or
   flipped series, and edges finer than the working grid. Nearest neighbour on the working
   grid's labels (:attr:`SegNetConfig.upsampling` ``"nearest"``, and any oblique series) leaves
   4 mm steps along every edge: the lung mask then takes in chest wall and mediastinum, which
   every lung histogram counts as dense lung (``bench/builtin_segmentation.py``).

Weights: a folder with ``model.safetensors`` and ``config.json`` (format, name, version,
anatomies, the network and grid parameters above, sha256 of the weights file), by default
``fvlm_pacs/models/demo/segmentation/`` (:func:`default_model_dir`), else the folder named by the
``builtin_segmentation_dir`` setting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import ScaleIntensityRange, Spacing
from safetensors.torch import load_file
from scipy import ndimage

from fvlm_pacs.codes import AnatomyTable
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.geometry import LPS_TO_RAS
from fvlm_pacs.model.checkpoint import demo_model_dir, save_weights, sha256_file
from fvlm_pacs.model.predictor import auto_device
from fvlm_pacs.segmentation.base import SegmentationUnavailable

logger = logging.getLogger(__name__)

FORMAT = "fvlm_pacs.segnet"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SETTING = "builtin_segmentation_dir"
"""The setting that points at a weights folder other than the demo model's."""
BUILD_COMMAND = "fvlm-pacs model build-demo"
"""The command that trains the shipped network (with the demo fVLM)."""
SUBDIR = "segmentation"
"""Where the network lives inside the demo model folder."""
SOFT_TISSUE_WINDOW = (-100.0, 150.0)
"""An extra input window (HU) from fat to dense soft tissue: pericardial fluid (0–20 HU) and the
heart's muscle and blood (35–50 HU) are 0.12 apart in it, 0.02 in the default window."""
UPSAMPLINGS = ("linear", "nearest")
"""Step 6 of the module docstring: probabilities interpolated, or labels copied."""
UPSAMPLE_SLAB = 32
"""CT planes upsampled at once (their cells' labels: 8 MB for 512² planes)."""
EDGE = 255
"""Marks a source cell whose corners disagree (labels are 0..K, K < 255)."""


def default_model_dir() -> Path:
    """The shipped network: ``segmentation/`` inside the demo model folder."""
    return demo_model_dir() / SUBDIR


@dataclass(frozen=True)
class SegNetConfig:
    """Everything that fixes what the network sees and computes; stored in ``config.json``.

    ``anatomies`` name output channels 1..K (0 is background). ``roi`` is the training crop and
    the sliding window, (slice, row, column) on the working grid; every entry must be a multiple
    of the product of ``strides`` so the U-Net's skips line up. ``extra_windows`` (HU low, high)
    are input channels after ``hu_window``'s; networks saved before them have none.
    """

    anatomies: tuple[str, ...] = ("lung", "heart", "esophagus", "aorta")
    orientation: str = "FPL"
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    extra_windows: tuple[tuple[float, float], ...] = ()
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"
    roi: tuple[int, int, int] = (48, 64, 80)
    min_component_fraction: float = 0.1
    upsampling: str = "linear"

    def __post_init__(self) -> None:
        if not self.anatomies or len(set(self.anatomies)) != len(self.anatomies):
            raise ValueError(f"anatomies: need unique names, got {self.anatomies}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm: need three positive values, got {self.spacing_mm}")
        for name, window in (
            ("hu_window", self.hu_window),
            *(("extra_windows", w) for w in self.extra_windows),
        ):
            if len(window) != 2 or not window[0] < window[1]:
                raise ValueError(f"{name}: need (low, high) HU with low < high, got {window}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides: need len(channels) - 1 = {len(self.channels) - 1}, got {self.strides}"
            )
        if any(r % self.multiple for r in self.roi) or len(self.roi) != 3:
            raise ValueError(f"roi: need three multiples of {self.multiple}, got {self.roi}")
        if not 0.0 <= self.min_component_fraction <= 1.0:
            raise ValueError(
                f"min_component_fraction: need 0..1, got {self.min_component_fraction}"
            )
        if self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling: one of {UPSAMPLINGS}, got {self.upsampling!r}")

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        """The input channels' HU windows, in channel order."""
        return (self.hu_window, *self.extra_windows)

    @property
    def multiple(self) -> int:
        """Every network input side must be a multiple of this (the total down-sampling)."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown network config keys: {unknown}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "extra_windows":
                values[key] = tuple(tuple(float(v) for v in w) for w in value)
            else:
                values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


def build_network(config: SegNetConfig) -> UNet:
    """The MONAI U-Net of ``config`` (one input channel per window, K + 1 outputs), untrained."""
    return UNet(
        spatial_dims=3,
        in_channels=len(config.windows),
        out_channels=len(config.anatomies) + 1,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm,
    )


# -- weights on disk ---------------------------------------------------------------------------
def save_segnet(
    net: torch.nn.Module,
    config: SegNetConfig,
    out_dir: Path,
    *,
    name: str,
    version: str,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (created); returns it.

    The sha256 in ``config.json`` is of the weights file, so a job record names exactly the
    weights that drew its label map; ``training`` (steps, seed, data) is kept for the card.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key in the weights header, so identical weights hash alike (see save_weights)
    digest = save_weights(net, out / WEIGHTS_FILE, FORMAT)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": "monai.networks.nets.UNet",
        "anatomies": list(config.anatomies),
        "weights": WEIGHTS_FILE,
        "sha256": digest,
        "network": config.to_dict(),
        "training": dict(training or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True)
class LoadedSegNet:
    """A network in eval mode on ``device`` with its config and identity."""

    net: torch.nn.Module
    config: SegNetConfig
    name: str
    version: str
    sha256: str
    device: torch.device


def _unavailable(folder: Path, why: str) -> SegmentationUnavailable:
    return SegmentationUnavailable(
        f"builtin: {why} in {folder}; build the shipped network with `{BUILD_COMMAND}` or point "
        f"setting {SETTING} at a folder holding {WEIGHTS_FILE} and {CONFIG_FILE}"
    )


def load_segnet(folder: Path, device: str | torch.device | None = None) -> LoadedSegNet:
    """Read, verify (format, sha256, strict keys) and load a network folder.

    Every failure is :class:`SegmentationUnavailable` naming the setting and the build command: a
    missing or damaged folder is an installation problem a retry cannot fix.
    """
    folder = Path(folder)
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise _unavailable(folder, f"no {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _unavailable(folder, f"unreadable {CONFIG_FILE} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _unavailable(folder, f"{CONFIG_FILE} is not format {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise _unavailable(folder, f"format_version {meta.get('format_version')} is newer")
    try:
        config = SegNetConfig.from_dict(meta["network"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _unavailable(folder, f"bad network config ({exc})") from None
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise _unavailable(
            folder, f"sha256 of {WEIGHTS_FILE} {digest[:12]} does not match {CONFIG_FILE}"
        )
    net = build_network(config)
    try:
        net.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except (RuntimeError, OSError) as exc:
        raise _unavailable(folder, f"weights do not fit the network ({exc})") from None
    dev = auto_device(device)
    net.to(dev).eval()
    logger.info(
        "loaded builtin segmentation %s %s (sha256 %s) on %s",
        meta.get("name"),
        meta.get("version"),
        digest[:12],
        dev,
    )
    return LoadedSegNet(
        net=net,
        config=config,
        name=str(meta.get("name", "")),
        version=str(meta.get("version", "")),
        sha256=digest,
        device=dev,
    )


# -- the working grid --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkingGrid:
    """The windowed image on the network's grid: ``image`` float32 [C, D, H, W] in [0, 1], one
    channel per window of :attr:`SegNetConfig.windows`, and ``affine`` mapping (slice, row,
    column, 1) to LPS mm."""

    image: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid's (slice, row, column) size."""
        d, h, w = self.image.shape[-3:]
        return int(d), int(h), int(w)


def to_working_grid(voxels: hd.Volume, config: SegNetConfig) -> WorkingGrid:
    """Steps 1–3 of the module docstring for an HU volume in patient coordinates."""
    oriented = voxels.to_patient_orientation(config.orientation)
    spacing = tuple(float(s) for s in oriented.spacing)
    array, affine = _box_average(
        np.asarray(oriented.array, dtype=np.float32), oriented.affine, spacing, config.spacing_mm
    )
    tensor = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array))[None],
        affine=torch.from_numpy(LPS_TO_RAS @ affine),
    )
    out = Spacing(pixdim=config.spacing_mm, mode="bilinear", padding_mode="border")(tensor)
    if not isinstance(out, MetaTensor):  # Spacing keeps the MetaTensor; its affine is the grid
        raise TypeError(f"MONAI Spacing returned {type(out).__name__}, not a MetaTensor")
    out_affine = LPS_TO_RAS @ np.asarray(out.affine.numpy(), dtype=np.float64)
    hu = np.asarray(out[0].detach().cpu().numpy())
    channels = [
        np.asarray(
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(hu),
            dtype=np.float32,
        )
        for lo, hi in config.windows
    ]
    return WorkingGrid(image=np.ascontiguousarray(np.stack(channels)), affine=out_affine)


def _box_average(
    array: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Average ``k``×…-voxel boxes where the target is ``k`` ≥ 2 times coarser (anti-aliasing).

    The remainder voxels at the far end of an axis (fewer than ``k``) are dropped; they lie
    within one working voxel of the last box, and the way back clamps onto it.
    """
    kernel = tuple(max(1, int(t // s + 1e-6)) for s, t in zip(spacing, target, strict=True))
    if kernel == (1, 1, 1) or any(n < k for n, k in zip(array.shape, kernel, strict=True)):
        return array, affine
    pooled = F.avg_pool3d(torch.from_numpy(np.ascontiguousarray(array))[None, None], kernel)
    out_affine = affine.copy()
    k = np.array(kernel, dtype=float)
    out_affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((k - 1) / 2)
    out_affine[:3, :3] = affine[:3, :3] * k[None, :]
    return pooled[0, 0].numpy(), out_affine


def axis_positions(
    src_shape: Sequence[int], src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """For grids that differ only by axis order, flips, scale and shift (every axis-aligned
    series): ``(j, positions)`` — source axis ``a`` follows target axis ``j[a]``, and
    ``positions[a]`` is the fractional source index of each target index along it, clamped to
    the source's extent (the grids cover the same body, so a target voxel just beyond the last
    source voxel centre takes that voxel). None for oblique grids."""
    to_src = np.linalg.inv(np.asarray(src_affine, dtype=float)) @ np.asarray(affine, dtype=float)
    lin = to_src[:3, :3]
    nonzero = np.abs(lin) > 1e-6 * max(float(np.abs(lin).max()), 1e-12)
    if not ((nonzero.sum(axis=0) == 1).all() and (nonzero.sum(axis=1) == 1).all()):
        return None
    j = nonzero.argmax(axis=1)
    positions = [
        np.clip(lin[a, j[a]] * np.arange(int(shape[j[a]])) + to_src[a, 3], 0, int(src_shape[a]) - 1)
        for a in range(3)
    ]
    return j, positions


def sample_nearest(
    src: np.ndarray, src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> np.ndarray:
    """``src`` sampled at every voxel centre of the grid (``shape``, ``affine``): nearest voxel,
    indices clamped to ``src``'s extent.

    Axis-aligned grids (:func:`axis_positions`) take a separable index look-up; others
    (oblique) are sampled one plane at a time.
    """
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    aligned = axis_positions(src.shape[:3], src_affine, shp, affine)
    if aligned is not None:
        j, positions = aligned
        idx = [np.rint(p).astype(np.int64) for p in positions]
        gathered = src[np.ix_(idx[0], idx[1], idx[2])]
        return np.ascontiguousarray(gathered.transpose(tuple(np.argsort(j))))
    to_src = np.linalg.inv(np.asarray(src_affine, dtype=float)) @ np.asarray(affine, dtype=float)
    limits = np.array(src.shape[:3])
    out = np.zeros(shp, dtype=src.dtype)
    rr, cc = np.meshgrid(np.arange(shp[1]), np.arange(shp[2]), indexing="ij")
    plane = np.stack([np.zeros(rr.size), rr.ravel(), cc.ravel(), np.ones(rr.size)])
    for k in range(shp[0]):
        plane[0] = k
        pos = np.rint((to_src @ plane)[:3]).astype(np.int64)
        pos = np.clip(pos, 0, (limits - 1).reshape(3, 1))
        out[k] = src[pos[0], pos[1], pos[2]].reshape(shp[1], shp[2])
    return out


def sample_linear_argmax(
    probabilities: np.ndarray,
    src_affine: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
    slab: int = UPSAMPLE_SLAB,
) -> np.ndarray:
    """Labels (uint8) at every voxel centre of the grid (``shape``, ``affine``): the argmax of
    the per-class ``probabilities`` (C, slice, row, column on ``src_affine``'s grid) interpolated
    trilinearly there. Oblique grids fall back to :func:`sample_nearest` of the source argmax.

    Only voxels in a source cell whose eight corners disagree are interpolated: where all eight
    have the same argmax, every convex combination of them has it too. That is the few percent
    of a CT along the anatomy edges — all C channels at every voxel of a 512² CT took 5 s on one
    core — done ``slab`` planes at a time.
    """
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    aligned = axis_positions(labels.shape, src_affine, shp, affine)
    if aligned is None:
        return sample_nearest(labels, src_affine, shp, affine)
    j, positions = aligned
    n = labels.shape
    lo = [np.minimum(np.floor(p).astype(np.int64), max(m - 2, 0)) for p, m in zip(positions, n)]
    hi = [np.minimum(low + 1, m - 1) for low, m in zip(lo, n)]
    frac = [(p - low).astype(np.float32) for p, low in zip(positions, lo)]
    cells = tuple(max(m - 1, 1) for m in n)  # cell c spans source voxels c and min(c + 1, m - 1)

    def corner(offsets: tuple[int, int, int]) -> np.ndarray:
        return labels[
            tuple(slice(min(o, m - 1), min(o, m - 1) + c) for o, m, c in zip(offsets, n, cells))
        ]

    first = corner((0, 0, 0))
    coded = first.copy()  # a cell's one label, or EDGE where its corners differ
    for offsets in np.ndindex(2, 2, 2):
        coded[corner(offsets) != first] = EDGE  # type: ignore[arg-type]
    flat = probabilities.reshape(probabilities.shape[0], -1)
    strides = (n[1] * n[2], n[2], 1)
    out = np.empty(tuple(len(p) for p in positions), dtype=np.uint8)
    for start in range(0, len(positions[0]), slab):
        rows = slice(start, start + slab)
        part = coded[np.ix_(lo[0][rows], lo[1], lo[2])]
        edge = np.nonzero(part == EDGE)
        if edge[0].size:
            # per axis, for each edge voxel: its two source neighbours and the far one's weight
            ends = [
                (low[i], high[i], f[i])
                for low, high, f, i in zip(
                    (lo[0][rows], lo[1], lo[2]),
                    (hi[0][rows], hi[1], hi[2]),
                    (frac[0][rows], frac[1], frac[2]),
                    edge,
                )
            ]
            mixed = np.zeros((flat.shape[0], edge[0].size), dtype=np.float32)
            for offsets in np.ndindex(2, 2, 2):
                index = sum(
                    (b if o else a) * st for (a, b, _), o, st in zip(ends, offsets, strides)
                )
                weight = np.prod([f if o else 1 - f for (_, _, f), o in zip(ends, offsets)], 0)
                mixed += np.take(flat, index, axis=1) * weight
            part[edge] = mixed.argmax(axis=0)
        out[rows] = part
    return np.ascontiguousarray(out.transpose(tuple(np.argsort(j))))


# -- the network on the working grid -----------------------------------------------------------
def working_probabilities(
    net: torch.nn.Module, image: np.ndarray, config: SegNetConfig, device: torch.device
) -> np.ndarray:
    """Softmax over background + K anatomies on the working grid, (K + 1, slice, row, column),
    for ``image`` [C, slice, row, column] (:attr:`WorkingGrid.image`)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=config.roi,
            sw_batch_size=2,
            predictor=net,
            overlap=0.25,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
        )
    assert isinstance(logits, torch.Tensor)
    return np.asarray(torch.softmax(logits[0].float(), dim=0).cpu().numpy(), dtype=np.float32)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a bool mask: (ids 0 = background, 1..n), n
    (``scipy.ndimage.label`` with a full 3 × 3 × 3 structure)."""
    ids, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return ids, int(n)


def drop_small_components(labels: np.ndarray, n_labels: int, fraction: float) -> np.ndarray:
    """Per label 1..n, remove components smaller than ``fraction`` × its largest component."""
    if fraction <= 0:
        return labels
    out = labels.copy()
    for label in range(1, n_labels + 1):
        ids, n = connected_components(labels == label)
        if n <= 1:
            continue
        sizes = np.bincount(ids.ravel())[1:]
        small = np.flatnonzero(sizes < fraction * sizes.max()) + 1
        if small.size:
            out[np.isin(ids, small)] = 0
    return out


def segment_voxels(loaded: LoadedSegNet, voxels: hd.Volume) -> np.ndarray:
    """Labels 0..K (``config.anatomies`` order) on ``voxels``' own grid: steps 1–6."""
    config = loaded.config
    grid = to_working_grid(voxels, config)
    probabilities = working_probabilities(loaded.net, grid.image, config, loaded.device)
    return to_ct_grid(probabilities, grid, voxels, config)


def to_ct_grid(
    probabilities: np.ndarray,
    grid: WorkingGrid,
    voxels: hd.Volume,
    config: SegNetConfig,
    *,
    clean: bool = True,
    upsampling: str | None = None,
) -> np.ndarray:
    """Steps 5–6: the working grid's argmax cleaned (``clean``), then on ``voxels``' grid by
    ``upsampling`` (default the config's). ``probabilities`` is changed in place where the
    clean-up drops a voxel (it becomes background with certainty)."""
    raw = probabilities.argmax(axis=0).astype(np.uint8)
    work = (
        drop_small_components(raw, len(config.anatomies), config.min_component_fraction)
        if clean
        else raw
    )
    if (upsampling or config.upsampling) == "nearest":
        return sample_nearest(work, grid.affine, voxels.spatial_shape, voxels.affine)
    dropped = work != raw
    probabilities[:, dropped] = 0.0
    probabilities[0, dropped] = 1.0
    return sample_linear_argmax(probabilities, grid.affine, voxels.spatial_shape, voxels.affine)


class BuiltinSegmenter:
    """Anatomy label map from the package's own network (see the module docstring).

    ``model_dir`` defaults to :func:`default_model_dir`; ``device`` to CUDA when available. The
    weights are loaded once, on the first :meth:`check` or :meth:`segment`, and shared by all
    worker threads (inference only, no state changes). Anatomies are matched by name: a table
    anatomy the network does not know stays absent ("not assessable").
    """

    name = "builtin"

    def __init__(
        self,
        table: AnatomyTable,
        model_dir: Path | str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.table = table
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.device = device
        self._loaded: LoadedSegNet | None = None
        self._lock = threading.Lock()

    def check(self) -> LoadedSegNet:
        """Load (once) and return the network; :class:`SegmentationUnavailable` when it cannot.

        The service calls it at start, so missing weights stop the service naming the setting
        instead of failing every study.
        """
        with self._lock:
            if self._loaded is None:
                loaded = load_segnet(self.model_dir, self.device)
                if not set(loaded.config.anatomies) & set(self.table.names):
                    raise _unavailable(
                        self.model_dir,
                        f"network anatomies {list(loaded.config.anatomies)} share none with "
                        f"profile {self.table.profile}",
                    )
                self._loaded = loaded
            return self._loaded

    def segment(self, volume: Volume, study_paths: Sequence[Path]) -> LabelMap:
        loaded = self.check()
        raw = segment_voxels(loaded, volume.voxels)
        dtype = np.uint8 if len(self.table.anatomies) < 256 else np.uint16
        lut = np.zeros(len(loaded.config.anatomies) + 1, dtype=dtype)
        names = set(self.table.names)
        for i, anatomy in enumerate(loaded.config.anatomies, start=1):
            if anatomy in names:
                lut[i] = self.table.label_of(anatomy)
        return LabelMap(
            array=lut[raw],
            anatomies=self.table.names,
            source=self.name,
            provenance={
                "network": loaded.name,
                "version": loaded.version,
                "sha256": loaded.sha256,
            },
        )
