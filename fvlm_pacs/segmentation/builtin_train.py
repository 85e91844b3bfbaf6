"""Train and evaluate the ``builtin`` segmentation network on synthetic phantoms.

:func:`train_builtin` reads phantom cases (``case.npz``: ``hu``, ``labels``, ``affine`` as
:func:`fvlm_pacs.phantoms.write_case` stores them), puts each on the network's working grid once
(:func:`~fvlm_pacs.segmentation.builtin.to_working_grid`, labels by nearest neighbour), and
trains the MONAI U-Net with Dice + cross-entropy (MONAI ``DiceCELoss``) and Adam on random crops
of :attr:`~fvlm_pacs.segmentation.builtin.SegNetConfig.roi` with MONAI augmentations (left–right
flips, small intensity scale/shift, Gaussian noise). Held-out cases are then segmented with
exactly the inference path the provider uses (working grid → network → clean-up → original grid)
and scored by Dice per anatomy against their exact phantom labels, so the numbers in the model
card measure what a study would get, resampling losses included.

Deterministic per ``seed`` on CPU (at a fixed thread count, one by default): network
initialisation runs under a forked torch RNG, the crops and augmentations use MONAI's
per-transform random state, and the case order a NumPy generator; nothing global is reseeded.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

from fvlm_pacs.segmentation.builtin import (
    METRICS_FILE,
    LoadedSegNet,
    SegNetConfig,
    build_network,
    load_segnet,
    sample_nearest,
    save_segnet,
    to_ct_grid,
    to_working_grid,
    working_probabilities,
)

logger = logging.getLogger(__name__)

NAME = "fvlm-builtin-seg"

Cases = Path | Sequence[Path]
"""A ``manifest.csv`` (its ``npz`` column, relative to the manifest), a folder holding one, or a
sequence of case folders / ``case.npz`` files."""


@dataclass(frozen=True)
class SegTrainResult:
    """Where the network was written and what was measured (the content of ``metrics.json``)."""

    out_dir: Path
    metrics: dict[str, Any]


def case_files(cases: Cases) -> list[Path]:
    """The ``case.npz`` files of ``cases`` (see :data:`Cases`), in the given order."""
    if isinstance(cases, (str, Path)):
        path = Path(cases)
        if path.is_dir() and (path / "manifest.csv").is_file():
            path = path / "manifest.csv"
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                return [path.parent / row["npz"] for row in csv.DictReader(fh) if row.get("npz")]
        cases = [path]
    out = []
    for item in cases:
        p = Path(item)
        out.append(p / "case.npz" if p.is_dir() else p)
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cases: no case.npz at {', '.join(missing[:3])}")
    return out


def load_case_volume(npz: Path) -> tuple[hd.Volume, np.ndarray]:
    """HU volume (patient coordinates) and exact label map of one stored phantom."""
    with np.load(npz) as data:
        hu = data["hu"].astype(np.float32)
        labels = np.asarray(data["labels"])
        affine = np.asarray(data["affine"], dtype=float)
    return hd.Volume(hu, affine, "PATIENT"), labels


def working_pair(npz: Path, config: SegNetConfig) -> tuple[np.ndarray, np.ndarray]:
    """Image [C, D, H, W] and labels [D, H, W] of one case on the working grid (labels by
    nearest neighbour)."""
    voxels, labels = load_case_volume(npz)
    grid = to_working_grid(voxels, config)
    lab = sample_nearest(labels, voxels.affine, grid.shape, grid.affine)
    lab[lab > len(config.anatomies)] = 0
    return grid.image, lab.astype(np.int64)


def augmentations(
    config: SegNetConfig, flip_prob: float, seed: int, affine_prob: float = 0.5
) -> Compose:
    """Pad with air, random crop, small rotations/scaling, flips and intensity changes (MONAI,
    seeded).

    The air margin (a quarter of the crop on each side) moves the body around inside the crop:
    without it every crop of a phantom narrower than the crop showed the body at one place, and
    the network learnt positions instead of anatomy — measured: trained so, it found the
    esophagus (Dice 0.71) on 320 mm wide phantoms and lost it (0.12) on 336 mm wide ones.
    """
    keys = ["image", "label"]
    padded = tuple(r + 2 * (r // 4) for r in config.roi)
    aug = Compose(
        [
            SpatialPadd(keys=keys, spatial_size=padded, mode="constant"),
            RandSpatialCropd(keys=keys, roi_size=config.roi, random_size=False),
            RandAffined(
                keys=keys,
                prob=affine_prob,
                rotate_range=(0.15, 0.0, 0.0),  # radians, in the axial plane
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
            RandGaussianNoised(keys="image", prob=0.3, std=0.02),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


def dice_scores(pred: np.ndarray, truth: np.ndarray, n_labels: int) -> list[float | None]:
    """Dice of labels 1..n; None where the label is absent from both."""
    out: list[float | None] = []
    for label in range(1, n_labels + 1):
        a, b = pred == label, truth == label
        total = int(a.sum()) + int(b.sum())
        out.append(None if total == 0 else 2.0 * int((a & b).sum()) / total)
    return out


def evaluate_segnet(loaded: LoadedSegNet, cases: Cases) -> dict[str, Any]:
    """Mean Dice per anatomy over ``cases``, each segmented on its own (original) grid.

    ``dice`` is what the provider returns (configured clean-up and upsampling), ``dice_raw``
    the same without the clean-up and ``dice_nearest`` with nearest-neighbour labels instead of
    interpolated probabilities, so whether each step helps stays measured. ``seconds_per_case``
    times the provider's path alone.
    """
    config = loaded.config
    k = len(config.anatomies)
    per: dict[str, list[list[float | None]]] = {"clean": [], "raw": [], "nearest": []}
    seconds = []
    for npz in case_files(cases):
        voxels, truth = load_case_volume(npz)
        t0 = time.perf_counter()
        grid = to_working_grid(voxels, config)
        probabilities = working_probabilities(loaded.net, grid.image, config, loaded.device)
        served = to_ct_grid(probabilities.copy(), grid, voxels, config)
        seconds.append(time.perf_counter() - t0)
        raw = to_ct_grid(probabilities.copy(), grid, voxels, config, clean=False)
        nearest = to_ct_grid(probabilities, grid, voxels, config, upsampling="nearest")
        for kind, labels in (("clean", served), ("raw", raw), ("nearest", nearest)):
            per[kind].append(dice_scores(labels, truth, k))

    def means(rows: list[list[float | None]]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for i, name in enumerate(config.anatomies):
            vals = [v for r in rows if (v := r[i]) is not None]
            out[name] = round(float(np.mean(vals)), 4) if vals else None
        return out

    result: dict[str, Any] = {
        "cases": len(seconds),
        "dice": means(per["clean"]),
        "dice_raw": means(per["raw"]),
        "dice_nearest": means(per["nearest"]),
    }
    present = [v for v in result["dice"].values() if v is not None]
    result["mean_dice"] = round(float(np.mean(present)), 4) if present else None
    result["seconds_per_case"] = round(float(np.mean(seconds)), 3) if seconds else None
    return result


def train_builtin(
    cases: Cases,
    out_dir: Path,
    *,
    steps: int = 600,
    seed: int = 0,
    test_cases: Cases | None = None,
    config: SegNetConfig | None = None,
    batch_size: int = 2,
    lr: float = 2e-3,
    min_lr: float | None = None,
    flip_prob: float = 0.5,
    device: str = "cpu",
    threads: int | None = 1,
    name: str = NAME,
    version: str = "1",
    log_every: int = 50,
) -> SegTrainResult:
    """Train the builtin network on ``cases`` and write it (plus ``metrics.json``) to ``out_dir``.

    ``test_cases`` (held out: never trained on) are scored with :func:`evaluate_segnet`; the
    metrics also hold seconds per training step and the loss at the start and the end.
    ``min_lr``: cosine decay from ``lr`` to it over the steps (None: constant ``lr``).

    ``threads`` caps torch's intra-op threads for the call (restored after; None: leave them).
    One by default: the weights are then the same on any core count (CPU reductions split by
    thread differ in the last bits), and these small 3-D convolutions gain little from more
    threads — on the shared 2-vCPU development VM, 2 threads made a step 18× slower (OpenMP
    barriers waiting for a busy core), 0.28 s against 5.0 s.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            cases,
            out_dir,
            steps=steps,
            seed=seed,
            test_cases=test_cases,
            config=config or SegNetConfig(),
            batch_size=batch_size,
            lr=lr,
            min_lr=min_lr,
            flip_prob=flip_prob,
            device=device,
            name=name,
            version=version,
            log_every=log_every,
        )
    finally:
        torch.set_num_threads(before)


def _train(
    cases: Cases,
    out_dir: Path,
    *,
    steps: int,
    seed: int,
    test_cases: Cases | None,
    config: SegNetConfig,
    batch_size: int,
    lr: float,
    min_lr: float | None,
    flip_prob: float,
    device: str,
    name: str,
    version: str,
    log_every: int,
) -> SegTrainResult:
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    files = case_files(cases)
    if not files:
        raise ValueError("cases: no training cases")
    dev = torch.device(device)
    t0 = time.perf_counter()
    pairs = [working_pair(f, config) for f in files]
    prep_s = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(config)
    net.to(dev).train()
    aug = augmentations(config, flip_prob, seed)
    rng = np.random.default_rng(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=min_lr)
        if min_lr is not None
        else None
    )
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        images, targets = [], []
        for i in rng.integers(0, len(pairs), size=batch_size):
            image, lab = pairs[int(i)]
            sample = aug({"image": image, "label": lab[None]})
            images.append(torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32))
            targets.append(torch.as_tensor(np.asarray(sample["label"]), dtype=torch.int64))
        x, y = torch.stack(images).to(dev), torch.stack(targets).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            logger.info("segnet step %d/%d loss %.4f", step + 1, steps, losses[-1])
    train_s = time.perf_counter() - t0
    net.eval()
    training = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "min_lr": min_lr,
        "optimizer": "Adam",
        "loss": "monai.losses.DiceCELoss",
        "flip_prob": flip_prob,
        "train_cases": len(files),
        "threads": torch.get_num_threads(),
    }
    out = save_segnet(net, config, out_dir, name=name, version=version, training=training)
    metrics: dict[str, Any] = {
        **training,
        "prep_s": round(prep_s, 2),
        "train_s": round(train_s, 2),
        "seconds_per_step": round(train_s / steps, 4) if steps else None,
        "loss_first": round(float(np.mean(losses[:10])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "network": config.to_dict(),
    }
    if test_cases is not None:
        loaded = load_segnet(out, device=dev)
        metrics["test"] = evaluate_segnet(loaded, test_cases)
        logger.info("segnet held-out Dice %s", metrics["test"]["dice"])
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return SegTrainResult(out_dir=out, metrics=metrics)
