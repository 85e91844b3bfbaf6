"""Provider ``totalsegmentator``: TotalSegmentator v2, task ``total``, with local weights only.

TotalSegmentator is an optional dependency (``pip install fvlm_pacs[totalseg]``; it brings
nnU-Net, nibabel and PyTorch). Its weights are never downloaded here: a hospital server has no
internet, and silently fetching ~1 GB at the first study is not acceptable. The site copies the
nnU-Net result folders into one directory and points the ``totalsegmentator_weights`` setting at it:

    <totalsegmentator_weights>/
        Dataset291_TotalSegmentator_part1_organs_1559subj/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
            plans.json, dataset.json, fold_0/checkpoint_final.pth
        Dataset292_TotalSegmentator_part2_vertebrae_1532subj/...   (same trainer folder)
        Dataset293_TotalSegmentator_part3_cardiac_1559subj/...
        Dataset294_TotalSegmentator_part4_muscles_1559subj/...
        Dataset295_TotalSegmentator_part5_ribs_1559subj/...
    (``fast``: Dataset297_TotalSegmentator_total_3mm_1559subj/
     nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/... instead)

which is the layout of ``~/.totalsegmentator/nnunet/results`` after ``totalseg_download_weights
-t total`` on a connected machine. The names are checked exactly (:data:`TASK_MODELS`):
TotalSegmentator downloads any task whose exact folder it does not find, and deletes folders
with names of older releases (e.g. ``..._1559subj_v204``) from its weights directory. So a run
never sees the site's folder itself: it gets a private weights directory holding links to the
exact task folders only, and nothing TotalSegmentator deletes or writes there touches the site's
copy.

Flow: CT :class:`~fvlm_pacs.domain.Volume` → NIfTI array and RAS affine
(:func:`volume_to_nifti`) → runner → ``total`` label map and its affine → back onto the CT grid
(:func:`labels_to_volume` + :func:`~fvlm_pacs.segmentation.grid.place_on_grid`) →
:meth:`~fvlm_pacs.codes.AnatomyTable.group_totalsegmentator`. The runner is injectable, so the
conversions are tested without TotalSegmentator; the real call lives in :func:`run_totalsegmentator`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np

from fvlm_pacs.codes import AnatomyTable
from fvlm_pacs.domain import LabelMap, Volume
from fvlm_pacs.geometry import LPS_TO_RAS
from fvlm_pacs.model.checkpoint import sha256_file
from fvlm_pacs.segmentation.base import SegmentationUnavailable
from fvlm_pacs.segmentation.grid import place_on_grid

logger = logging.getLogger(__name__)

WEIGHTS_SETTING = "totalsegmentator_weights"
EXTRA = "totalseg"

TOTAL_TASK_IDS = (291, 292, 293, 294, 295)
"""nnU-Net datasets of the full-resolution ``total`` task (TotalSegmentator v2)."""
FAST_TASK_IDS = (297,)
"""The 3 mm ``total --fast`` model."""

TASK_MODELS: dict[int, tuple[str, str]] = {
    291: ("Dataset291_TotalSegmentator_part1_organs_1559subj", "nnUNetTrainerNoMirroring"),
    292: ("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", "nnUNetTrainerNoMirroring"),
    293: ("Dataset293_TotalSegmentator_part3_cardiac_1559subj", "nnUNetTrainerNoMirroring"),
    294: ("Dataset294_TotalSegmentator_part4_muscles_1559subj", "nnUNetTrainerNoMirroring"),
    295: ("Dataset295_TotalSegmentator_part5_ribs_1559subj", "nnUNetTrainerNoMirroring"),
    297: ("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring"),
}
"""Task id → (nnU-Net dataset folder, trainer) exactly as TotalSegmentator 2.x looks them up
(``map_tasks_config.py``: weights folder names; ``total`` / ``fast`` trainers)."""
MODEL_FILES = ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")
"""What nnU-Net reads from a task's model folder."""

Runner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``runner(image, affine_ras) -> (labels, labels_affine_ras)``.

``image`` is the HU volume as a NIfTI-ordered array (x = column, y = row, z = slice) and
``affine_ras`` its 4×4 NIfTI affine (RAS, mm); the result is TotalSegmentator's ``total``
multi-label map (v2 class ids) with its own affine, usually the input's.
"""

# NIfTI index (i, j, k) = (column, row, slice) → our index (slice, row, column)
_IJK_TO_SRC = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def volume_to_nifti(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The CT as a NIfTI array (column, row, slice) with its RAS affine, as dcm2niix lays it out."""
    array = np.ascontiguousarray(np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0))
    affine = LPS_TO_RAS @ np.asarray(volume.affine, dtype=float) @ _IJK_TO_SRC
    return array, affine


def labels_to_volume(
    labels: np.ndarray, affine_ras: np.ndarray, frame_of_reference_uid: str | None = None
) -> hd.Volume:
    """A NIfTI-style label array and RAS affine as a highdicom volume in LPS (any index order)."""
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"TotalSegmentator label map must be 3-D, got shape {arr.shape}")
    return hd.Volume(
        arr,
        LPS_TO_RAS @ np.asarray(affine_ras, dtype=float),
        "PATIENT",
        frame_of_reference_uid=frame_of_reference_uid,
    )


def total_on_grid(labels: np.ndarray, affine_ras: np.ndarray, volume: Volume) -> np.ndarray:
    """The ``total`` label map on the CT grid (int ids; 0 outside its extent)."""
    src = labels_to_volume(labels, affine_ras)
    arr = np.asarray(src.array)
    if arr.dtype.kind == "f":  # NIfTI readers often hand labels back as floats
        if not np.array_equal(arr, np.rint(arr)):
            raise ValueError("TotalSegmentator label map holds non-integer values")
    ids = hd.Volume(arr.astype(np.int32), src.affine, "PATIENT")
    return place_on_grid(ids, volume)


def task_model_dir(weights_dir: Path, task_id: int) -> Path:
    """``<weights_dir>/<dataset folder>/<trainer>__nnUNetPlans__3d_fullres`` of one task."""
    folder, trainer = TASK_MODELS[task_id]
    return weights_dir / folder / f"{trainer}__nnUNetPlans__3d_fullres"


def missing_weights(weights_dir: Path, task_ids: Sequence[int]) -> list[int]:
    """Task ids whose model folder lacks one of :data:`MODEL_FILES` under its exact name."""
    return [
        t
        for t in task_ids
        if not all((task_model_dir(weights_dir, t) / f).is_file() for f in MODEL_FILES)
    ]


class TotalSegmentatorProvider:
    """Anatomy label map from TotalSegmentator v2 ``total`` run on the CT volume."""

    name = "totalsegmentator"

    def __init__(
        self,
        table: AnatomyTable,
        weights_dir: Path | str | None = None,
        *,
        device: str = "gpu",
        fast: bool = False,
        runner: Runner | None = None,
    ) -> None:
        self.table = table
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.device = device
        self.fast = fast
        self._runner = runner
        self._identity: dict[str, Any] | None = None

    @property
    def task_ids(self) -> tuple[int, ...]:
        return FAST_TASK_IDS if self.fast else TOTAL_TASK_IDS

    def check(self) -> Path:
        """Raise :class:`SegmentationUnavailable` unless the package and weights are in place.

        Cheap (no import of TotalSegmentator), so the service can call it at start-up.
        Returns the weights directory.
        """
        if self._runner is None and importlib.util.find_spec("totalsegmentator") is None:
            raise SegmentationUnavailable(
                "totalsegmentator: the TotalSegmentator package is not installed; "
                f"install the '{EXTRA}' extra (pip install 'fvlm_pacs[{EXTRA}]')"
            )
        layout = "; ".join(
            f"{task_model_dir(Path(), t)}/{{{','.join(MODEL_FILES)}}}" for t in self.task_ids
        )
        if self.weights_dir is None:
            raise SegmentationUnavailable(
                f"totalsegmentator: setting {WEIGHTS_SETTING} is not set; point it at a folder "
                f"holding the nnU-Net results of TotalSegmentator v2 ({layout}); "
                "weights are never downloaded"
            )
        if not self.weights_dir.is_dir():
            raise SegmentationUnavailable(
                f"totalsegmentator: setting {WEIGHTS_SETTING}: {self.weights_dir} is not a "
                f"directory (expected {layout})"
            )
        lacking = missing_weights(self.weights_dir, self.task_ids)
        if lacking:
            raise SegmentationUnavailable(
                f"totalsegmentator: setting {WEIGHTS_SETTING}: {self.weights_dir} lacks the "
                f"weights of task(s) {', '.join(map(str, lacking))} (expected {layout}); "
                "weights are never downloaded"
            )
        return self.weights_dir

    def identity(self, weights: Path) -> dict[str, Any]:
        """What a result records about this segmenter: tasks, package version and the sha256
        of each task's weights file (hashed once per process: the files are large)."""
        if self._identity is None:
            try:
                version: str | None = importlib.metadata.version("TotalSegmentator")
            except importlib.metadata.PackageNotFoundError:
                version = None
            hashes = {
                str(t): sha256_file(task_model_dir(weights, t) / "fold_0" / "checkpoint_final.pth")
                for t in self.task_ids
            }
            self._identity = {
                "task": "total",
                "fast": self.fast,
                "tasks": list(self.task_ids),
                "version": version,
                "weights_sha256": hashes,
            }
        return self._identity

    def segment(self, volume: Volume, study_paths: Sequence[Path]) -> LabelMap:
        weights = self.check()
        image, affine = volume_to_nifti(volume)
        if self._runner is not None:
            labels, labels_affine = self._runner(image, affine)
        else:
            labels, labels_affine = run_totalsegmentator(
                image, affine, weights, device=self.device, fast=self.fast, tasks=self.task_ids
            )
        total = total_on_grid(labels, labels_affine, volume)
        grouped = self.table.group_totalsegmentator(total)
        return LabelMap(
            array=grouped,
            anatomies=self.table.names,
            source=self.name,
            provenance=self.identity(weights),
        )


@contextlib.contextmanager
def _offline_environment(weights_dir: Path, task_ids: Sequence[int]) -> Iterator[None]:
    """A private home and weights directory for one TotalSegmentator run.

    TotalSegmentator keeps ``config.json`` in ``TOTALSEG_HOME_DIR``; a fresh one would enable
    usage statistics sent over HTTP, so the temporary home has ``send_usage_stats: false``. Its
    weights directory holds only links to the site's exact task folders (see the module
    docstring: TotalSegmentator deletes folders of older releases in the directory it is
    given). The variables are process-wide: restored afterwards (one run per worker process at
    a time).
    """
    with tempfile.TemporaryDirectory(prefix="fvlm-totalseg-") as home:
        (Path(home) / "config.json").write_text(
            json.dumps(
                {
                    "totalseg_id": "totalseg_offline",
                    "send_usage_stats": False,
                    "statistics_disclaimer_shown": True,
                    "prediction_counter": 0,
                }
            ),
            encoding="utf-8",
        )
        private = Path(home) / "weights"
        private.mkdir()
        for t in task_ids:
            folder = TASK_MODELS[t][0]
            (private / folder).symlink_to((weights_dir / folder).resolve(), True)
        env = {
            "TOTALSEG_HOME_DIR": home,
            "TOTALSEG_WEIGHTS_PATH": str(private),
            "nnUNet_results": str(private),
            "nnUNet_raw": str(private),
            "nnUNet_preprocessed": str(private),
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def run_totalsegmentator(
    image: np.ndarray,
    affine_ras: np.ndarray,
    weights_dir: Path,
    *,
    device: str,
    fast: bool,
    tasks: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Run TotalSegmentator v2 ``total`` (multi-label output) in this process; the only call site.

    Written against TotalSegmentator 2.x ``totalsegmentator.python_api.totalsegmentator``, which
    accepts and returns ``nibabel.Nifti1Image`` when ``output`` is None. Weights must already be
    present (:meth:`TotalSegmentatorProvider.check`) for ``tasks``; TotalSegmentator only
    downloads a task whose folder is missing. One process writes the result (``nr_thr_saving``
    1; its default starts six, each importing torch, for one volume).
    """
    try:
        import nibabel as nib
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as exc:
        raise SegmentationUnavailable(
            f"totalsegmentator: cannot import TotalSegmentator ({exc}); "
            f"install the '{EXTRA}' extra (pip install 'fvlm_pacs[{EXTRA}]')"
        ) from exc
    img: Any = nib.Nifti1Image(image, affine_ras)
    with _offline_environment(weights_dir, tasks):
        result = totalsegmentator(
            img,
            None,
            ml=True,
            task="total",
            fast=fast,
            device=device,
            quiet=True,
            nr_thr_saving=1,
        )
    return np.asarray(result.dataobj), np.asarray(result.affine, dtype=float)
