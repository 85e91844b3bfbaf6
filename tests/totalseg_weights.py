"""Fake TotalSegmentator v2 weights: tiny nnU-Net v2 result folders made on the spot.

Why
    The real TotalSegmentator weights (~1 GB, GitHub release assets) can never be downloaded
    here, yet the ``totalsegmentator`` segmentation provider should be tested through the real
    TotalSegmentator + nnU-Net v2 code (``totalsegmentator.python_api.totalsegmentator`` →
    nnU-Net preprocessing, sliding-window inference, export, resampling back) and not only with
    a fake runner. TotalSegmentator only needs a result folder where it looks for one; what the
    network inside computes is up to us. This module writes such folders with a tiny U-Net
    (two stages, 4 and 8 features) whose weights are *chosen*, not trained, so the label map it
    produces is known in advance and CPU inference of a 40×64×64 CT takes well under a second.

What it builds (the ``total --fast`` model, task id 297)
    ::

        <root>/Dataset297_TotalSegmentator_total_3mm_1559subj/
            nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
                dataset.json          channel_names {"0": "CT"}, labels background=0 plus the
                                      117 classes of TotalSegmentator's ``total`` class map
                                      (ids 1..117, names taken from the installed package)
                plans.json            nnU-Net v2 plans, one configuration "3d_fullres": 3 mm
                                      spacing, CTNormalization, PlainConvUNet (InstanceNorm3d
                                      and LeakyReLU as nnU-Net plans them, or no norm for the
                                      "threshold" network), SimpleITKIO
                fold_0/checkpoint_final.pth
                                      {"network_weights", "trainer_name", "init_args":
                                      {"configuration": "3d_fullres", ...},
                                      "inference_allowed_mirroring_axes": None}

    That is the layout of ``~/.totalsegmentator/nnunet/results`` (or ``TOTALSEG_WEIGHTS_PATH``)
    after ``totalseg_download_weights -t total --fast``. The folder, trainer and plans names are
    the ones TotalSegmentator's ``map_tasks_config.py`` asks for;
    ``libs.download_pretrained_weights`` downloads only when ``<weights>/<exact folder name>`` is
    missing, so the folder name must be exact. The network is built by nnU-Net itself
    (``nnUNetTrainer.build_network_architecture`` from these plans, which the trainer above
    inherits unchanged), as ``nnUNetPredictor.initialize_from_trained_model_folder`` rebuilds it
    at inference, so the state-dict keys always match.

The two networks
    ``constant``  every weight 0, the output bias of one class (default ``heart``, id 51) 10:
                  that class wins in every voxel nnU-Net predicts.
    ``threshold`` no normalisation layers; identity paths carry the normalised HU of the
                  centre voxel to the output layer, where class ``above`` gets +value and class
                  ``below`` −value: voxels brighter than ``threshold_hu`` become ``above``, the
                  others ``below``. This makes the label map depend on the image, so a flipped
                  or transposed axis anywhere between the CT and the label map shows.

Written against TotalSegmentator 2.18.0, nnunetv2 2.8.1, dynamic-network-architectures 0.4.4
and torch 2.13.0 (CPU). TotalSegmentator 2.x has used the Dataset297 folder and the
``nnUNetTrainer_4000epochs_NoMirroring`` trainer for ``total --fast`` since 2.0; a later release
that renames them makes the tests built on this module fail loudly (TotalSegmentator would try to
download), which is the point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TASK_ID = 297
DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
SPACING_MM = 3.0
PATCH = [32, 32, 32]  # in 3 mm voxels: larger than the test CTs, so one window covers them
FOLDER = f"{TRAINER}__{PLANS}__{CONFIGURATION}"

_ARCH_IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def total_classes() -> dict[int, str]:
    """TotalSegmentator v2 ``total`` class map (id → name) of the installed package."""
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map["total"])


def class_id(name: str) -> int:
    return {v: k for k, v in total_classes().items()}[name]


def dataset_json() -> dict[str, Any]:
    classes = total_classes()
    assert sorted(classes) == list(range(1, len(classes) + 1)), "nnU-Net needs ids 1..K"
    labels = {"background": 0, **{classes[i]: i for i in sorted(classes)}}
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": DATASET,
        "description": "fake weights for tests (tests/totalseg_weights.py), not a trained model",
    }


def plans_json(*, normalised: bool, hu_mean: float = 0.0, hu_std: float = 1.0) -> dict[str, Any]:
    """nnU-Net v2 plans with one 3-D full-resolution configuration and a tiny PlainConvUNet."""
    resampling = "resample_data_or_seg_to_shape"

    def kw(is_seg: bool, order: int) -> dict[str, Any]:
        return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}

    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d" if normalised else None,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True} if normalised else None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": list(_ARCH_IMPORTS),
    }
    return {
        "dataset_name": DATASET,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": [SPACING_MM] * 3,
        "original_median_shape_after_transp": [100, 100, 100],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH),
                "median_image_size_in_voxels": [100, 100, 100],
                "spacing": [SPACING_MM] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": resampling,
                "resampling_fn_seg": resampling,
                "resampling_fn_data_kwargs": kw(False, 3),
                "resampling_fn_seg_kwargs": kw(True, 1),
                "resampling_fn_probabilities": resampling,
                "resampling_fn_probabilities_kwargs": kw(False, 1),
                "architecture": arch,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        # CTNormalization: clip to [percentile_00_5, percentile_99_5], then (x - mean) / std
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3071.0,
                "mean": hu_mean,
                "median": hu_mean,
                "min": -1024.0,
                "percentile_00_5": -1024.0,
                "percentile_99_5": 3071.0,
                "std": hu_std,
            }
        },
    }


def _network(plans: dict[str, Any], dataset: dict[str, Any]) -> Any:
    """The network exactly as nnU-Net rebuilds it at inference (trainer class, plans)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    # TRAINER (nnUNetTrainer_4000epochs_NoMirroring) changes only the epochs and mirroring, not
    # build_network_architecture; the base class avoids nnU-Net's search through every trainer
    # module (which imports timm and torchvision, see test_totalsegmentator_run.py)
    return nnUNetTrainer.build_network_architecture(
        pm,
        cm,
        determine_num_input_channels(pm, cm, dataset),
        pm.get_label_manager(dataset).num_segmentation_heads,
        enable_deep_supervision=False,
    )


def build_fast_total(
    root: Path,
    *,
    mode: str = "constant",
    winner: str = "heart",
    above: str = "heart",
    below: str = "lung_upper_lobe_left",
    threshold_hu: float = 0.5,
) -> Path:
    """Write the fake ``total --fast`` result folder under ``root``; return ``root``.

    ``mode="constant"``: class ``winner`` everywhere. ``mode="threshold"``: ``above`` where the
    CT (resampled to 3 mm) is brighter than ``threshold_hu``, ``below`` elsewhere.
    """
    import torch

    if mode not in ("constant", "threshold"):
        raise ValueError(f"mode must be 'constant' or 'threshold', got {mode!r}")
    dataset = dataset_json()
    # threshold: normalised value = (HU - threshold) / 100, its sign decides the class
    plans = (
        plans_json(normalised=True)
        if mode == "constant"
        else plans_json(normalised=False, hu_mean=threshold_hu, hu_std=100.0)
    )
    net = _network(plans, dataset)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():  # InstanceNorm affine: scale 1 (nnU-Net's own init)
            if isinstance(m, torch.nn.InstanceNorm3d) and m.weight is not None:
                m.weight.fill_(1.0)
        seg = net.decoder.seg_layers[-1]
        if mode == "constant":
            seg.bias[class_id(winner)] = 10.0
        else:
            # encoder stage 0, feature 0 = the centre voxel (1×1×1 of the 3×3×3 kernel)
            net.encoder.stages[0][0].convs[0].conv.weight[0, 0, 1, 1, 1] = 1.0
            # decoder: input = [upsampled (4), skip from encoder stage 0 (4)]; take skip feature 0
            n_up = net.decoder.transpconvs[-1].out_channels
            net.decoder.stages[-1].convs[0].conv.weight[0, n_up, 1, 1, 1] = 1.0
            seg.weight[class_id(above), 0] = 1.0
            seg.weight[class_id(below), 0] = -1.0
    folder = Path(root) / DATASET / FOLDER
    (folder / "fold_0").mkdir(parents=True, exist_ok=False)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    checkpoint = {
        "network_weights": {k: v.clone() for k, v in net.state_dict().items()},
        "trainer_name": TRAINER,
        "init_args": {"configuration": CONFIGURATION, "fold": 0},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": 0,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return Path(root)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (to prove a run left it alone)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }
