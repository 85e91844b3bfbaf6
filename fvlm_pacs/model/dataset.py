"""Training data for fVLM: CT volume + anatomy label map + anatomy-wise texts, with augmentation.

:class:`ManifestDataset` serves one dict per (case, augmentation draw):

========== ======================= ==========================================================
key        type / shape            meaning
========== ======================= ==========================================================
image      float32 [1, D, H, W]    scaled HU: -1150 -> 0, 350 -> 1 (``intensity.scale_hu``)
labels     int64 [D, H, W]         0 background, k = k-th anatomy (1-based), same crop/flips
texts      list of K str           anatomy-wise text, or the normal template when normal
normal     bool [K]                anatomy not mentioned as abnormal in the impression
inside     bool [K]                anatomy present and *wholly* inside the crop (FVLM.md)
findings   int64 [F]               the 16 CT-RATE finding labels (1/0; -1 = not given)
report     str                     findings + impression (the CLIP baseline's text)
case_id    str
crop_start int64 [3]               where the crop starts on the cached (context) grid
flips      bool [3]                which axes were flipped
========== ======================= ==========================================================

Grid and orientation (the same conventions as inference, :mod:`fvlm_pacs.model.preprocess`):
arrays are re-ordered (permuted / flipped, never resampled) from their affine to patient
orientation ``FPL`` (axis 0 head → feet, rows anterior → posterior, columns right → left), then
resampled to 3 × 1 × 1 mm with ``torch.nn.functional.interpolate`` (trilinear image, nearest
labels) and cropped to the union bounding box of the anatomies plus (5, 20, 20) voxels — steps
1–4 of inference without the final padding. Inference uses MONAI ``Spacing``; the two agree up to
sub-voxel grid alignment at the volume edges, which random cropping dwarfs. ``resample=False``
keeps the native spacing (the synthetic phantoms are stored at 3 × 1.5 × 1.5 mm; a cheap demo may
train on them as they are, at the cost of in-plane scale mismatch with inference).

Preprocessing (orientation, resampling, context crop) runs once per case and is
cached with ``cache_dir`` as ``.npz`` files keyed by case id and the grid settings, and in
memory, least recently used first out beyond ``memory_bytes`` (default: 2 GiB with a
``cache_dir``; without one memory is the only cache and is not bounded, with a warning once it
passes 2 GiB). The cache stores HU as int16 (rounded after resampling) and the labels as uint8;
the scaling is applied per item on the crop only; the model clips to its own windows. The bound
matters: 960 phantoms on the training grid are about 12 GB, CT-RATE's 50 000 volumes terabytes,
while an uncompressed ``.npz`` read back from the page cache costs milliseconds against a
training step's second.

Augmentation (``train=True``): a random crop of ``crop`` (uniform start; a dimension smaller than
the crop is end-padded with 0 = air/background, as inference pads), then a flip of each axis with
probability ``flip_p`` (0.2, FVLM.md), applied to image and labels together. ``inside`` is
computed on the crop: an anatomy counts only when every one of its voxels on the cached grid lies
in the crop. With ``train=False`` the crop is centred and nothing is flipped.

Text augmentation (``sentence_keep`` < 1, ``train=True`` only; off by default, so FVLM.md's
objective sees whole anatomy texts): each sentence of an *abnormal* anatomy's text is kept with
that probability, at least one always, in report order; normal templates are never touched.
Why: the phantoms' lungs carry several findings at once (159 of the 200 held-out phantoms of
``fvlm-demo 3`` have a lung finding, most of them several), and a model trained on whole texts
learns "abnormal lung" more than each finding — ``fvlm-demo 3`` scores atelectasis and
consolidation at 0.96–0.97 AUC in lungs with no other finding and 0.65–0.70 in the rest. An
image that must match any subset of its finding sentences is pushed towards each of them, which
is what a one-finding prompt asks at zero-shot time. The partial text is true but incomplete, so
another sample with the same finding and a different draw is a false negative of the batch —
the price of the augmentation, measured in bench/README.md rather than assumed.
``whole_text_anatomies`` keeps the texts of the anatomies it names whole, so a finding there is
never trained on a text that names only its neighbours: under subsets a heart with cardiomegaly
and a calcified coronary (37 of the 109 such training hearts of the demo build; others carry an
effusion or "No pericardial effusion.") often keeps only the other sentences, and cardiomegaly
fell 0.95 → 0.78; with the heart whole it scored 0.94 (bench/README.md).

Randomness is a pure function of ``(seed, draw, index)``: ``dataset[i]`` uses draw 0 and
``dataset[(i, draw)]`` a given draw, so a training run can replay exactly the samples of any step
(what makes resumed runs reproducible) and workers need no shared state.

Layouts:

* ``"synthetic"`` — ``manifest.csv`` of :func:`fvlm_pacs.phantoms.write_dataset`
  (``case_id``, one 0/1 column per finding, ``npz``, ``report``; paths relative to the manifest).
* ``"ct-rate"`` — see :func:`read_ct_rate`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..geometry import LPS_TO_RAS
from ..phantoms import FINDINGS
from ..reports import (
    CT_RATE_ANATOMIES,
    Decomposer,
    RuleBasedDecomposer,
    normal_text,
    split_report,
    split_sentences,
)
from .intensity import scale_hu
from .preprocess import CONTEXT_MARGIN, MODEL_SPACING_MM

log = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "CaseRecord",
    "ManifestDataset",
    "Prepared",
    "collate",
    "orient_fpl",
    "read_ct_rate",
    "read_nifti",
    "read_synthetic",
]

LAYOUTS = ("synthetic", "ct-rate")
_CACHE_VERSION = 2  # 2: label values follow the dataset's anatomy order


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseRecord:
    """One training case before preprocessing.

    ``volume`` is a ``case.npz`` (synthetic: ``hu``, ``labels``, ``affine`` in LPS) or a NIfTI
    file (CT-RATE, with ``mask`` a TotalSegmentator ``total`` label map on the same grid).
    ``descriptions`` are given anatomy-wise texts (anatomy → text; a missing or empty entry means
    normal); when None the report is decomposed. ``rescale`` is (slope, intercept) to HU.
    """

    case_id: str
    volume: Path
    findings_text: str
    impression_text: str
    findings: tuple[int, ...]
    mask: Path | None = None
    descriptions: Mapping[str, str] | None = None
    rescale: tuple[float, float] | None = None


def _finding_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def read_synthetic(manifest_csv: Path) -> list[CaseRecord]:
    """Records of a phantom ``manifest.csv`` (paths relative to its folder)."""
    root = manifest_csv.parent
    out: list[CaseRecord] = []
    with manifest_csv.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            report = (root / row["report"]).read_text(encoding="utf-8")
            findings_text, impression_text = split_report(report)
            out.append(
                CaseRecord(
                    case_id=row["case_id"],
                    volume=root / row["npz"],
                    findings_text=findings_text,
                    impression_text=impression_text,
                    findings=tuple(int(row.get(f, -1) or -1) for f in FINDINGS),
                )
            )
    return out


def _csv_rows(folder: Path) -> dict[str, dict[str, str]]:
    """All rows of all CSVs in ``folder`` keyed by ``VolumeName`` (empty if no folder)."""
    rows: dict[str, dict[str, str]] = {}
    if not folder.is_dir():
        return rows
    for path in sorted(folder.glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("VolumeName"):
                    rows[row["VolumeName"]] = row
    return rows


def _ct_rate_volume_path(dataset_dir: Path, name: str) -> Path:
    """``train_1_a_1.nii.gz`` → ``dataset/train/train_1/train_1_a/train_1_a_1.nii.gz``."""
    stem = name.split(".")[0]
    parts = stem.split("_")
    if len(parts) < 4:
        return dataset_dir / name
    split, patient, scan = parts[0], parts[1], parts[2]
    return dataset_dir / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


def read_ct_rate(
    reports_csv: Path,
    *,
    masks_dir: Path | None = None,
    descriptions_json: Path | None = None,
) -> list[CaseRecord]:
    """Records of a CT-RATE release (Hugging Face ``ibrahimhamamci/CT-RATE``), as laid out there::

        <root>/dataset/train/train_1/train_1_a/train_1_a_1.nii.gz      volumes (valid_… alike)
        <root>/dataset/radiology_text_reports/train_reports.csv         VolumeName, Findings_EN,
                                                                        Impressions_EN, …
        <root>/dataset/multi_abnormality_labels/*.csv                   VolumeName + 18 labels
        <root>/dataset/metadata/*.csv  (optional)                       VolumeName, RescaleSlope,
                                                                        RescaleIntercept, …
        <root>/masks/<VolumeName>                                       TotalSegmentator v2
                                                                        ``total`` (not in the
                                                                        release: run it yourself)
        <root>/anatomy_descriptions.json  (optional)                    {VolumeName: {anatomy:
                                                                        text}}

    ``reports_csv`` is the reports file; ``<root>`` is three levels up. The finding labels map by
    name onto our 16 (``Lung nodule`` → ``lung_nodule``; the two unscored ones are dropped).
    Without a description file the anatomy texts come from decomposing Findings_EN /
    Impressions_EN; with one, an anatomy listed with a non-empty text that is not the normal
    template is abnormal, every other anatomy is normal. HU: the NIfTI ``scl_slope/scl_inter``
    when set, else the metadata's ``RescaleSlope/RescaleIntercept`` when present (the first
    CT-RATE release stored raw values), else the stored values. Rows whose volume or mask is
    missing are skipped with a warning (tolerant when reading).
    """
    dataset_dir = reports_csv.parent.parent
    root = dataset_dir.parent
    masks_dir = masks_dir or root / "masks"
    if descriptions_json is None and (root / "anatomy_descriptions.json").is_file():
        descriptions_json = root / "anatomy_descriptions.json"
    descriptions: dict[str, dict[str, str]] = {}
    if descriptions_json is not None:
        descriptions = json.loads(descriptions_json.read_text(encoding="utf-8"))
    labels = _csv_rows(dataset_dir / "multi_abnormality_labels")
    meta = _csv_rows(dataset_dir / "metadata")
    out: list[CaseRecord] = []
    skipped = 0
    with reports_csv.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["VolumeName"]
            volume = _ct_rate_volume_path(dataset_dir, name)
            mask = masks_dir / name
            if not volume.is_file() or not mask.is_file():
                skipped += 1
                continue
            lab = {_finding_key(k): v for k, v in labels.get(name, {}).items()}
            findings = tuple(int(float(lab[f])) if lab.get(f, "") != "" else -1 for f in FINDINGS)
            m = meta.get(name, {})
            rescale = None
            if m.get("RescaleSlope") and m.get("RescaleIntercept"):
                rescale = (float(m["RescaleSlope"]), float(m["RescaleIntercept"]))
            out.append(
                CaseRecord(
                    case_id=name.split(".")[0],
                    volume=volume,
                    findings_text=row.get("Findings_EN", "") or "",
                    impression_text=row.get("Impressions_EN", "") or "",
                    findings=findings,
                    mask=mask,
                    descriptions=descriptions.get(name) if descriptions else None,
                    rescale=rescale,
                )
            )
    if skipped:
        log.warning(
            "ct-rate: %d row(s) of %s skipped (volume or mask missing)", skipped, reports_csv
        )
    return out


# ---------------------------------------------------------------------------------------------
# NIfTI (minimal reader: nibabel is not a dependency)
# ---------------------------------------------------------------------------------------------

_NIFTI_DTYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    64: np.float64,
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
}


def _quaternion_affine(h: bytes, endian: str, pixdim: tuple[float, ...]) -> np.ndarray:
    b, c, d, qx, qy, qz = struct.unpack(endian + "6f", h[256:280])
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    aff = np.eye(4)
    aff[:3, :3] = r * np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
    aff[:3, 3] = (qx, qy, qz)
    return aff


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """``(array [i, j, k], affine RAS, (scl_slope, scl_inter) or None)`` of a NIfTI-1 file.

    Uses nibabel when installed; otherwise a minimal reader of single-file NIfTI-1 (``.nii`` or
    ``.nii.gz``; sform, else qform, else pixdim), enough for CT-RATE volumes and masks.
    """
    try:
        import nibabel as nib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        nib = None
    if nib is not None:
        img = nib.load(str(path))
        slope, inter = img.dataobj.slope, img.dataobj.inter
        scale = None if (slope in (0, 1) and inter == 0) else (float(slope), float(inter))
        return np.asarray(img.dataobj.get_unscaled()), np.asarray(img.affine), scale
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    endian: Literal["<", ">"] = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", raw[:4])[0] != 348:
        raise ValueError(f"{path}: not a NIfTI-1 file")
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    pixdim = struct.unpack(endian + "8f", raw[76:108])
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    slope, inter = struct.unpack(endian + "2f", raw[112:120])
    qform_code, sform_code = struct.unpack(endian + "2h", raw[252:256])
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: NIfTI datatype {datatype} is not supported")
    shape = tuple(int(n) for n in dims[1 : 1 + dims[0]])
    dtype = np.dtype(_NIFTI_DTYPES[datatype]).newbyteorder(endian)
    count = int(np.prod(shape))
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset)
    arr = arr.reshape(shape, order="F").astype(dtype.newbyteorder("="))
    if sform_code > 0:
        aff = np.eye(4)
        aff[:3] = np.array(struct.unpack(endian + "12f", raw[280:328])).reshape(3, 4)
    elif qform_code > 0:
        aff = _quaternion_affine(raw, endian, pixdim)
    else:
        aff = np.diag([pixdim[1], pixdim[2], pixdim[3], 1.0])
    scale = None if (slope in (0.0, 1.0) and inter == 0.0) else (float(slope), float(inter))
    return arr, aff, scale


# ---------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------


def orient_fpl(
    arrays: Sequence[np.ndarray], affine_lps: np.ndarray
) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    """Permute / flip arrays (indexed like ``affine_lps``'s columns) to orientation ``FPL``.

    Axis 0 → feet (−z in LPS), axis 1 → posterior (+y), axis 2 → patient left (+x). Returns the
    re-ordered arrays and their spacing (mm) along the new axes. Oblique grids are snapped to the
    nearest axis (as :meth:`highdicom.Volume.to_patient_orientation` refuses to do; training data
    are axial).
    """
    cols = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
    world = [int(np.argmax(np.abs(cols[:, i]))) for i in range(3)]
    if sorted(world) != [0, 1, 2]:
        raise ValueError(f"affine: array axes do not map onto distinct patient axes: {world}")
    target_world, target_sign = (2, 1, 0), (-1.0, 1.0, 1.0)
    perm = [world.index(w) for w in target_world]
    out = [np.transpose(a, perm) for a in arrays]
    flips = [t for t in range(3) if np.sign(cols[target_world[t], perm[t]]) != target_sign[t]]
    if flips:
        out = [np.flip(a, axis=tuple(flips)) for a in out]
    spacing = tuple(float(np.linalg.norm(cols[:, perm[t]])) for t in range(3))
    return [np.ascontiguousarray(a) for a in out], (spacing[0], spacing[1], spacing[2])


@dataclass(frozen=True)
class Prepared:
    """One case on the training grid (context-cropped): int16 HU, uint8 labels, voxel counts."""

    hu: np.ndarray
    labels: np.ndarray
    voxels: np.ndarray  # int64 [K + 1], voxels per label on this grid

    @property
    def nbytes(self) -> int:
        """Memory of the volumes (what the dataset's in-memory bound counts)."""
        return self.hu.nbytes + self.labels.nbytes


def _resample(
    hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    size = tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(hu.shape, spacing, MODEL_SPACING_MM)
    )
    if size == hu.shape:
        return hu, labels
    img = torch.from_numpy(hu.astype(np.float32))[None, None]
    img = F.interpolate(img, size=size, mode="trilinear", align_corners=False)
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    lab = F.interpolate(lab, size=size, mode="nearest-exact")
    return img[0, 0].numpy(), lab[0, 0].numpy()


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.nonzero(mask)
    return (
        np.array([int(i.min()) for i in idx]),
        np.array([int(i.max()) + 1 for i in idx]),
    )


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[start : start + size]``, end-padded with zeros where the array is smaller."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    src = tuple(slice(a, min(a + s, n)) for a, s, n in zip(start, size, array.shape))
    out[tuple(slice(0, sl.stop - sl.start) for sl in src)] = array[src]
    return out


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class _Texts:
    texts: tuple[str, ...]
    normal: tuple[bool, ...]
    report: str


@dataclass
class _Memo:
    prepared: OrderedDict[int, Prepared] = field(default_factory=OrderedDict)
    prepared_bytes: int = 0
    texts: dict[int, _Texts] = field(default_factory=dict)


MEMORY_BYTES = 2 << 30
"""In-memory prepared volumes of a dataset with a ``cache_dir`` (2 GiB, about 160 phantoms on
the training grid); without one, the size past which a warning suggests one."""


NORMAL_WORDINGS = ("template", "report")
"""What a normal anatomy's training text is; see :class:`ManifestDataset`."""


class ManifestDataset(Dataset[dict[str, Any]]):
    """fVLM training samples from a manifest (see the module docstring for the item layout).

    ``crop`` (D, H, W) should be multiples of the ViT patch (16, 16, 32) for the model.
    ``anatomies`` name label 1..K in order (default the CT-RATE four); ``decomposer`` splits
    reports into anatomy texts (default :class:`~fvlm_pacs.reports.RuleBasedDecomposer`).
    ``resample=False`` keeps the native voxel spacing (cheap demos; see the module docstring).
    ``normal_wording``: ``template`` (FVLM.md) gives every normal anatomy the normal template;
    ``report`` keeps the report's own sentences about a normal anatomy where it has any ("The
    lungs are clear.") and the template only where the report is silent. With one template for
    all normals the normal-sample correction changes neither the loss nor its gradient (all
    normal texts share one embedding), so ``report`` is what lets an ablation measure it.
    Anatomy-wise descriptions given by the dataset (CT-RATE layout) are used as they are.
    ``memory_bytes`` bounds the prepared volumes kept in memory (see the module docstring).
    """

    def __init__(
        self,
        manifest_csv: str | Path,
        layout: str = "synthetic",
        crop: tuple[int, int, int] = (112, 256, 352),
        train: bool = True,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        decomposer: Decomposer | None = None,
        *,
        anatomies: Sequence[str] = CT_RATE_ANATOMIES,
        flip_p: float = 0.2,
        resample: bool = True,
        masks_dir: str | Path | None = None,
        descriptions_json: str | Path | None = None,
        normal_wording: str = "template",
        memory_bytes: int | None = None,
        sentence_keep: float = 1.0,
        whole_text_anatomies: Sequence[str] = (),
    ) -> None:
        if not 0.0 < sentence_keep <= 1.0:
            raise ValueError(f"sentence_keep: must lie in (0, 1], got {sentence_keep}")
        self.sentence_keep = float(sentence_keep)
        self.whole_text_anatomies = frozenset(whole_text_anatomies)
        if normal_wording not in NORMAL_WORDINGS:
            raise ValueError(
                f"normal_wording: must be one of {NORMAL_WORDINGS}, got {normal_wording!r}"
            )
        self.normal_wording = normal_wording
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
        if len(crop) != 3 or min(crop) <= 0:
            raise ValueError(f"crop: need three positive sizes, got {crop!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p: must lie in [0, 1], got {flip_p}")
        self.manifest = Path(manifest_csv)
        self.layout = layout
        self.crop = (int(crop[0]), int(crop[1]), int(crop[2]))
        self.train = train
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.resample = resample
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if memory_bytes is not None and memory_bytes < 0:
            raise ValueError(f"memory_bytes: must be >= 0, got {memory_bytes}")
        if memory_bytes is None and self.cache_dir is not None:
            memory_bytes = MEMORY_BYTES
        self.memory_bytes = memory_bytes
        self._warned_memory = False
        self._decomposer = decomposer
        self._own_decomposer = decomposer is None
        self._memo = _Memo()
        self.anatomies = tuple(anatomies)
        if layout == "synthetic":
            self.records = read_synthetic(self.manifest)
        else:
            self.records = read_ct_rate(
                self.manifest,
                masks_dir=Path(masks_dir) if masks_dir is not None else None,
                descriptions_json=Path(descriptions_json) if descriptions_json else None,
            )
        self._table: Any = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def anatomies(self) -> tuple[str, ...]:
        """Names of labels 1..K; the order of every item's ``texts`` and ``normal``."""
        return self._anatomies

    @anatomies.setter
    def anatomies(self, names: Sequence[str]) -> None:
        # Texts, normal flags, prepared volumes and our own decomposer were made for the old
        # list: drop them, or a trainer that adopts a checkpoint's anatomies trains on stale
        # texts in the old order.
        self._anatomies = tuple(names)
        self._memo = _Memo()
        if self._own_decomposer:
            self._decomposer = None

    @property
    def decomposer(self) -> Decomposer:
        if self._decomposer is None:
            self._decomposer = RuleBasedDecomposer(anatomies=self.anatomies)
        return self._decomposer

    # -- texts -----------------------------------------------------------------------------
    def texts(self, index: int) -> _Texts:
        """Anatomy texts, normal flags and the whole report of case ``index`` (memoised)."""
        memo = self._memo.texts.get(index)
        if memo is not None:
            return memo
        rec = self.records[index]
        report = f"Findings: {rec.findings_text}\n\nImpression: {rec.impression_text}".strip()
        texts: list[str] = []
        normal: list[bool] = []
        if rec.descriptions is not None:
            given = {k.lower(): v for k, v in rec.descriptions.items()}
            for a in self.anatomies:
                template = normal_text(a)
                text = (given.get(a) or "").strip()
                is_normal = not text or text.casefold() == template.casefold()
                texts.append(template if is_normal else text)
                normal.append(is_normal)
        else:
            parts = self.decomposer.decompose(rec.findings_text, rec.impression_text)
            for a in self.anatomies:
                part = parts[a]
                own_words = self.normal_wording == "report" and part.normal and part.sentences
                texts.append(" ".join(part.sentences) if own_words else part.text)
                normal.append(part.normal)
        memo = _Texts(tuple(texts), tuple(normal), report)
        self._memo.texts[index] = memo
        return memo

    # -- volumes ---------------------------------------------------------------------------
    def _cache_path(self, index: int) -> Path | None:
        if self.cache_dir is None:
            return None
        rec = self.records[index]
        key = json.dumps([_CACHE_VERSION, str(rec.volume.resolve()), self.resample, self.anatomies])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{rec.case_id}-{digest}.npz"

    def _load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(HU float32, anatomy labels uint8, LPS affine) on the source grid."""
        rec = self.records[index]
        if self.layout == "synthetic":
            with np.load(rec.volume) as z:
                return (
                    z["hu"].astype(np.float32),
                    z["labels"].astype(np.uint8),
                    np.asarray(z["affine"], dtype=np.float64),
                )
        arr, aff_ras, scale = read_nifti(rec.volume)
        hu = arr.astype(np.float32)
        scale = scale or rec.rescale
        if scale is not None:
            hu = hu * np.float32(scale[0]) + np.float32(scale[1])
        mask, _, _ = read_nifti(rec.mask) if rec.mask is not None else (None, None, None)
        if mask is None or mask.shape != arr.shape:
            raise ValueError(f"{rec.mask}: mask shape differs from the volume {arr.shape}")
        if self._table is None:
            from ..codes import load_anatomies

            self._table = load_anatomies("ct-rate")
        labels = np.asarray(self._table.group_totalsegmentator(mask)).astype(np.uint8)
        # NIfTI indexes (i, j, k) with a RAS affine; our helpers speak LPS (the flip is its own
        # inverse, so LPS_TO_RAS also maps RAS to LPS).
        return hu, labels, LPS_TO_RAS @ aff_ras

    def prepared(self, index: int) -> Prepared:
        """Case ``index`` on the training grid (kept in memory up to ``memory_bytes``; from
        ``cache_dir`` when present)."""
        memo = self._memo.prepared.get(index)
        if memo is not None:
            self._memo.prepared.move_to_end(index)
            return memo
        path = self._cache_path(index)
        if path is not None and path.is_file():
            with np.load(path) as z:
                prep = Prepared(z["hu"], z["labels"], z["voxels"])
        else:
            prep = self._prepare(index)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, hu=prep.hu, labels=prep.labels, voxels=prep.voxels)
                tmp.replace(path)
        self._remember(index, prep)
        return prep

    def _remember(self, index: int, prep: Prepared) -> None:
        """Keep ``prep`` in memory, dropping the least recently used cases beyond the bound."""
        memo = self._memo
        memo.prepared[index] = prep
        memo.prepared_bytes += prep.nbytes
        bound = self.memory_bytes
        if bound is None:
            if memo.prepared_bytes > MEMORY_BYTES and not self._warned_memory:
                self._warned_memory = True
                log.warning(
                    "%s: prepared volumes held in memory passed %d MiB and grow with every "
                    "case; give the dataset a cache_dir (train config: cache_dir) to bound them",
                    self.manifest.name,
                    MEMORY_BYTES >> 20,
                )
            return
        while memo.prepared_bytes > bound and memo.prepared:
            _, old = memo.prepared.popitem(last=False)
            memo.prepared_bytes -= old.nbytes

    def _prepare(self, index: int) -> Prepared:
        hu, labels, affine = self._load_raw(index)
        (hu, labels), spacing = orient_fpl([hu, labels], affine)
        if self.resample:
            hu, labels = _resample(hu, labels, spacing)
        lab = self._source_to_own_labels(np.rint(labels).astype(np.int64))
        if lab.any():
            lo, hi = _bbox(lab > 0)
            lo = np.maximum(lo - np.array(CONTEXT_MARGIN), 0)
            hi = np.minimum(hi + np.array(CONTEXT_MARGIN), np.array(lab.shape))
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            hu, lab = hu[box], lab[box]
        voxels = np.bincount(lab.ravel(), minlength=len(self.anatomies) + 1)
        return Prepared(
            hu=np.ascontiguousarray(np.clip(np.rint(hu), -32768, 32767).astype(np.int16)),
            labels=np.ascontiguousarray(lab.astype(np.uint8)),
            voxels=voxels[: len(self.anatomies) + 1].astype(np.int64),
        )

    def _source_to_own_labels(self, lab: np.ndarray) -> np.ndarray:
        """Source label values → this dataset's, by anatomy name.

        Both layouts number anatomies as the ``ct-rate`` profile does (phantoms write those
        values; CT-RATE masks are grouped with that table): label k is
        ``CT_RATE_ANATOMIES[k - 1]``. :attr:`anatomies` may order or choose them differently (a
        checkpoint's list), and the texts follow it, so the label values must follow it too.
        """
        lut = np.zeros(len(CT_RATE_ANATOMIES) + 1, dtype=np.int64)
        for k, name in enumerate(CT_RATE_ANATOMIES, start=1):
            if name in self.anatomies:
                lut[k] = self.anatomies.index(name) + 1
        out = np.zeros_like(lab)
        known = (lab > 0) & (lab < len(lut))
        out[known] = lut[lab[known]]
        return out

    # -- items -----------------------------------------------------------------------------
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} cases")
        prep = self.prepared(index)
        rng = np.random.default_rng([self.seed, draw, index])
        shape = prep.hu.shape
        if self.train:
            start = [int(rng.integers(0, max(0, n - c) + 1)) for n, c in zip(shape, self.crop)]
            flips = [bool(rng.random() < self.flip_p) for _ in range(3)]
        else:
            start = [max(0, (n - c) // 2) for n, c in zip(shape, self.crop)]
            flips = [False, False, False]
        hu = _crop(prep.hu, start, self.crop)
        pad = tuple(
            slice(min(n - a, c), c) for a, c, n in zip(start, self.crop, shape)
        )  # end padding is air
        lab = _crop(prep.labels, start, self.crop)
        in_crop = np.bincount(lab.ravel(), minlength=len(self.anatomies) + 1)
        inside = [
            bool(prep.voxels[k] > 0 and in_crop[k] == prep.voxels[k])
            for k in range(1, len(self.anatomies) + 1)
        ]
        image = scale_hu(hu)
        image[pad[0], :, :] = 0.0
        image[:, pad[1], :] = 0.0
        image[:, :, pad[2]] = 0.0
        axes = tuple(i for i, f in enumerate(flips) if f)
        if axes:
            image = np.flip(image, axis=axes)
            lab = np.flip(lab, axis=axes)
        t = self.texts(index)
        texts = list(t.texts)
        if self.train and self.sentence_keep < 1.0:
            # its own stream, so the crops and flips of a draw are those of the option off
            text_rng = np.random.default_rng([self.seed, draw, index, 1])
            texts = [
                text
                if normal or anatomy in self.whole_text_anatomies
                else keep_sentences(text, self.sentence_keep, text_rng)
                for text, normal, anatomy in zip(texts, t.normal, self.anatomies, strict=True)
            ]
        rec = self.records[index]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "labels": torch.from_numpy(np.ascontiguousarray(lab)),  # uint8: 8x less to move
            "texts": texts,
            "normal": torch.tensor(t.normal, dtype=torch.bool),
            "inside": torch.tensor(inside, dtype=torch.bool),
            "findings": torch.tensor(rec.findings, dtype=torch.int64),
            "report": t.report,
            "case_id": rec.case_id,
            "crop_start": torch.tensor(start, dtype=torch.int64),
            "flips": torch.tensor(flips, dtype=torch.bool),
        }


def keep_sentences(text: str, keep: float, rng: np.random.Generator) -> str:
    """``text`` with each of its sentences (:func:`~fvlm_pacs.reports.split_sentences`) kept
    with probability ``keep``, at least one, in their order (the module docstring says why)."""
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text
    kept = rng.random(len(sentences)) < keep
    if not kept.any():
        kept[int(rng.integers(len(sentences)))] = True
    return " ".join(s for s, k in zip(sentences, kept, strict=True) if k)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch axis; strings stay lists (``texts`` is B lists of K)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
