"""Load once, predict many: HU volume + anatomy label map → one scored finding per (anatomy, disease).

Why a class: the weights, the findings table, the thresholds and the prompt embeddings are the
same for every study, and loading them (a BERT pass per prompt included) costs far more than one
study's ViT passes. :class:`Predictor` does all of it once at construction; :meth:`Predictor.run`
then only preprocesses, runs the image encoder and scores (FVLM.md "Zero-shot scoring"):

1. ``to_model_grid`` → ``anatomy_crops`` → ``group_by_shape`` (:mod:`.preprocess`);
2. one batched ``encode_anatomies`` per shape group, in chunks of at most ``max_batch`` crops so
   memory stays bounded whatever the number of anatomies;
3. for each crop only the embeddings of the anatomies it can assess (``crop.assessable``) are
   used; finding score = sigmoid((cos_pos − cos_neg) / τ) with cached prompt embeddings; when
   several crops assess an anatomy, their probabilities are averaged (as the release does);
4. status ``present`` (score ≥ threshold) / ``absent``, or ``not_assessable`` with score None
   when the anatomy is missing, no crop could assess it, or the score is not finite — never a
   silent 0.

Start-up and the text tower: the prompt bank is keyed by the weights' sha256, which our format
states in config.json, so the Predictor opens the bank *before* loading the model. With a warm
bank (every prompt of the findings table cached) it loads the model without the text tower —
BERT's weights (~0.4 GiB for BERT-base) are neither read nor allocated. With a cold bank it loads
the full model, fills the bank (which persists it for the next start) and then drops the text
tower, so a serving process never keeps BERT either way. The released single-file format has no
config.json to read the sha256 from and is always read whole; its tower is dropped after the
bank is filled too.

Results: :meth:`Predictor.run` returns a :class:`Prediction` (findings + per-stage timings + why
each unassessable anatomy was so); :meth:`Predictor.predict` returns just the findings.
:meth:`Predictor.run` is :meth:`Predictor.score` of :meth:`Predictor.encode`; the two halves are
public so that predictors of the same weights with other prompt tables can score one encoding.
Scoring runs on CPU in float32 whatever the device, so thresholds mean the same on GPU and CPU
up to the encoder's own (bf16) rounding.

Precision (:data:`InferencePrecision`): ``auto`` runs the image encoder under bf16 autocast on
CUDA and in float32 on CPU (exact, and what thresholds are calibrated with). ``bf16`` also uses
bf16 on a CPU: on one with native bf16 dot products (AVX512-BF16 or AMX) the encoder's matrix
products run about 4x faster than in float32 (a ViT-B study about 2x). With bf16 the weights
of the matrix products are cast once at load (not on every forward), which also halves their
memory. Scores then move by the bf16 rounding of the embeddings (bench/inference.py prints how
much); results are still deterministic per machine. ``fp32`` never uses autocast, on GPU
either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..codes import AnatomyTable, FindingDefinition, load_anatomy_profiles, load_findings
from ..domain import Finding, FindingStatus, LabelMap, ModelInfo, Volume
from ..errors import ConfigError
from .checkpoint import read_meta, resolve_model_path
from .config import ModelConfig
from .fvlm import FvlmModel
from .model_prompts import apply_model_prompts, default_prompts_path
from .preprocess import AnatomyCrop, anatomy_crops, context_crop, group_by_shape, to_model_grid
from .prompts import PromptBank

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"

InferenceMode = Literal["crops", "single"]
"""``crops``: one ViT pass per anatomy crop (the release's protocol, default); ``single``: one
pass over the whole context for all anatomies (faster, measured in bench/inference.py)."""

InferencePrecision = Literal["auto", "fp32", "bf16"]
"""Arithmetic of the image encoder; see the module docstring."""


@dataclass(frozen=True)
class Prediction:
    """The outcome of one :meth:`Predictor.run`.

    ``findings`` in findings-table order (one per finding of the model's anatomies);
    ``timings`` seconds per stage: ``preprocess`` (grid + crops), ``encode`` (image encoder,
    all crops), ``score`` (prompt scoring + statuses), ``total``; ``not_assessable`` maps each
    anatomy that could not be scored to the reason (for the job record; no PHI); ``crops`` is the
    number of ViT inputs. ``embeddings`` maps each assessed anatomy to the mean of its unit
    embeddings over the crops that assess it (float32 [embed_dim]): what the prompts were scored
    against, kept so that a site can fit a probe or audit a finding on the image side without a
    second encoder pass (not in :meth:`as_dict`; the job record has no use for it).
    """

    findings: tuple[Finding, ...]
    timings: dict[str, float]
    not_assessable: dict[str, str] = field(default_factory=dict)
    crops: int = 0
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.as_dict() for f in self.findings],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "not_assessable": dict(self.not_assessable),
            "crops": self.crops,
        }


@dataclass(frozen=True)
class EncodedSeries:
    """One series through the image encoder (:meth:`Predictor.encode`), ready to be scored
    against any prompt table of the same weights (:meth:`Predictor.score`).

    ``crops`` pairs each assessable crop with its [K, E] float32 anatomy embeddings;
    ``voxels`` counts each label's voxels on the model grid and ``source_labels`` is the label
    map as given (both only to say why an anatomy could not be assessed); ``timings`` has
    ``preprocess`` and ``encode`` seconds.
    """

    model_sha256: str
    crops: tuple[tuple[AnatomyCrop, torch.Tensor], ...]
    voxels: np.ndarray
    source_labels: np.ndarray
    timings: dict[str, float]


def native_bf16_cpu() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX); without them bf16 is
    emulated and slower than float32. ``torch.cpu`` exposes the probes only privately, so a
    torch without them counts as "no"."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """The arithmetic ``precision`` means on ``device`` (``auto``: bf16 on CUDA, else fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and device.type == "cpu" and not native_bf16_cpu():
        log.warning(
            "inference precision bf16 on a CPU without native bf16 (AVX512-BF16/AMX): it is "
            "emulated and slower than fp32"
        )
    return "bf16" if precision == "bf16" else "fp32"


def cast_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the weights of every matrix product (Linear, the patch projection, the pooling
    attention's packed projection) in ``dtype``; norms, position embeddings, query tokens and
    the temperature stay float32.

    Under autocast a float32 weight is cast again on every forward (for ViT-B about 86 M values
    per crop); a weight already in the autocast dtype is used as is.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            module.to(dtype)
        elif isinstance(module, torch.nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias"):
                param = getattr(module, name)
                if param is not None:
                    param.data = param.data.to(dtype)


def auto_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def anatomy_table_for(anatomies: Sequence[str], path: Path | None = None) -> AnatomyTable:
    """The profile of ``anatomies.yaml`` whose anatomies are exactly ``anatomies``, in order.

    The checkpoint's anatomy order is its weights' order, so the profile must match it exactly;
    a near match would score findings with the wrong query token.
    """
    wanted = tuple(anatomies)
    tables = load_anatomy_profiles(path)
    for table in tables.values():
        if table.names == wanted:
            return table
    have = "; ".join(f"{name}: {', '.join(t.names)}" for name, t in sorted(tables.items()))
    raise ConfigError(
        f"anatomies: no profile of anatomies.yaml lists the model's anatomies "
        f"({', '.join(wanted)}) in this order (profiles: {have})"
    )


def load_thresholds(
    path: str | Path, findings: Sequence[FindingDefinition], model_sha256: str = ""
) -> dict[str, float]:
    """Calibrated thresholds ``{finding name: threshold}`` from a JSON file.

    Also accepted: ``{"model_sha256": ..., "thresholds": {...}}`` — then the sha256 must be the
    model's, since a threshold calibrated on other weights is meaningless. An unknown finding
    name or a value outside [0, 1] is a :class:`ConfigError` naming it (a typo must not leave
    a finding on its uncalibrated default unnoticed).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"thresholds: cannot read {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds: {p} must hold a JSON object")
    if "thresholds" in data and isinstance(data["thresholds"], dict):
        sha = data.get("model_sha256")
        if sha and model_sha256 and sha != model_sha256:
            raise ConfigError(
                f"thresholds: {p} was calibrated for weights {str(sha)[:12]}, "
                f"not for this model ({model_sha256[:12]})"
            )
        _check_prompts(p, data.get("prompts"), findings)
        data = data["thresholds"]
    names = {f.name for f in findings}
    out: dict[str, float] = {}
    for name, value in data.items():
        if name not in names:
            raise ConfigError(
                f"thresholds: {p}: unknown finding {name!r} (model scores {', '.join(sorted(names))})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ConfigError(f"thresholds: {p}: {name} must be a number in [0, 1], got {value!r}")
        out[name] = float(value)
    return out


def _check_prompts(path: Path, recorded: Any, findings: Sequence[FindingDefinition]) -> None:
    """A threshold is a cut on one prompt pair's score: refuse it for another pair (the table's
    or the model's ``prompts.yaml`` edited after calibration)."""
    if not isinstance(recorded, dict):
        return  # written before thresholds recorded their prompts
    for f in findings:
        pair = recorded.get(f.name)
        if pair is not None and list(pair) != [f.positive, f.negative]:
            raise ConfigError(
                f"thresholds: {path}: {f.name} was calibrated with the prompts {list(pair)}, "
                f"not {[f.positive, f.negative]}; run `fvlm-pacs calibrate` again"
            )


def default_thresholds_path(model_path: str | Path) -> Path:
    """``thresholds.json`` in a model directory, ``<stem>.thresholds.json`` beside a file."""
    p = resolve_model_path(model_path)
    return p / THRESHOLDS_FILE if p.is_dir() else p.parent / f"{p.stem}.{THRESHOLDS_FILE}"


class Predictor:
    """fVLM zero-shot findings for one checkpoint, loaded once.

    ``model_path``: our model directory or a released file (then ``text_model_dir`` is needed by
    the loader). ``device``: default CUDA if available else CPU. ``max_batch``: at most this many
    crops per forward pass. ``cache_dir``: where the prompt bank goes if the model folder is
    read-only. ``thresholds_path``: calibrated thresholds (default ``thresholds.json`` next to
    the model, if present) overriding each finding's ``default_threshold``. ``anatomy_table`` /
    ``findings``: inject tables instead of reading ``mappings/`` (tests, site overrides).
    ``mode``: see :data:`InferenceMode`. ``precision``: see :data:`InferencePrecision`; the
    resolved value (``fp32`` or ``bf16``) is :attr:`precision`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | torch.device | None = None,
        max_batch: int = 2,
        text_model_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        thresholds_path: str | Path | None = None,
        anatomy_table: AnatomyTable | None = None,
        findings: Sequence[FindingDefinition] | None = None,
        mode: InferenceMode = "crops",
        precision: InferencePrecision = "auto",
    ) -> None:
        if mode not in ("crops", "single"):
            raise ConfigError(f"mode must be 'crops' or 'single', got {mode!r}")
        model_path = resolve_model_path(model_path)
        self.mode: InferenceMode = mode
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.device = auto_device(device)
        self.precision = resolve_precision(precision, self.device)
        t0 = time.perf_counter()
        self.model, self.prompt_bank, self.findings, emb = self._load(
            model_path, text_model_dir, cache_dir, anatomy_table, findings
        )
        self.info = ModelInfo(self.model.name, self.model.version, self.model.sha256)
        if self.precision == "bf16":
            cast_linear_weights(self.model, torch.bfloat16)
        self.anatomies: tuple[str, ...] = self.model.anatomies
        defs = self.findings

        tpath = Path(thresholds_path) if thresholds_path else default_thresholds_path(model_path)
        calibrated: dict[str, float] = {}
        if tpath.is_file():
            calibrated = load_thresholds(tpath, defs, self.info.sha256)
            log.info("thresholds: %d calibrated from %s", len(calibrated), tpath)
        elif thresholds_path is not None:
            raise ConfigError(f"thresholds_path: {tpath} does not exist")
        self.thresholds: dict[str, float] = {
            f.name: calibrated.get(f.name, f.default_threshold) for f in defs
        }

        n = len(defs)
        self._positives, self._negatives = emb[:n], emb[n:]
        self._anatomy_index = torch.tensor([self.anatomies.index(f.anatomy) for f in defs])
        log.info(
            "predictor ready: %s %s, %d findings, %s %s, %s mode, max_batch %d (%.2f s)",
            self.info.name,
            self.info.version,
            n,
            self.device,
            self.precision,
            self.mode,
            max_batch,
            time.perf_counter() - t0,
        )

    def _load(
        self,
        model_path: Path,
        text_model_dir: str | Path | None,
        cache_dir: str | Path | None,
        anatomy_table: AnatomyTable | None,
        findings: Sequence[FindingDefinition] | None,
    ) -> tuple[FvlmModel, PromptBank, tuple[FindingDefinition, ...], torch.Tensor]:
        """Model (without its text tower), prompt bank, findings and their prompt embeddings.

        Our format names the weights' sha256 and anatomies in config.json, so the bank is
        opened first: if it holds every prompt, the model is loaded with ``with_text=False``
        (BERT never read nor allocated). Otherwise (cold bank, or the released file whose
        sha256 is only known from reading it) the full model fills the bank, which persists
        the entries, and the text tower is dropped before serving. Either way the embeddings
        come from the bank as float32, so the findings are identical.
        """
        warm = False
        bank: PromptBank | None = None
        defs: tuple[FindingDefinition, ...] = ()
        prompts_file = default_prompts_path(model_path)
        if model_path.is_dir():
            meta = read_meta(model_path)
            anatomies = ModelConfig.from_dict(meta["model"]).anatomies
            defs = self._findings_for(anatomies, anatomy_table, findings, prompts_file)
            bank = PromptBank.for_model(model_path, str(meta["sha256"]), cache_dir)
            warm = not bank.missing(_prompts(defs))
        model = FvlmModel.from_checkpoint(
            model_path, text_model_dir=text_model_dir, device=self.device, with_text=not warm
        ).eval()
        if bank is None:  # the released file: its anatomies and sha256 are known only now
            defs = self._findings_for(model.anatomies, anatomy_table, findings, prompts_file)
            bank = PromptBank.for_model(model_path, model.sha256, cache_dir)
        prompts = _prompts(defs)
        if warm:
            log.info(
                "prompt bank warm (%d prompts): model loaded without its text tower",
                len(set(prompts)),
            )
            return model, bank, defs, bank.embeddings(prompts)
        log.info(
            "prompt bank cold (%d of %d prompts missing): text tower loaded to fill it, "
            "dropped before serving",
            len(bank.missing(prompts)),
            len(set(prompts)),
        )
        emb = bank.embeddings(prompts, encoder=self._text_encoder(model))
        model.drop_text()
        return model, bank, defs, emb

    @staticmethod
    def _findings_for(
        anatomies: tuple[str, ...],
        anatomy_table: AnatomyTable | None,
        findings: Sequence[FindingDefinition] | None,
        prompts_file: Path,
    ) -> tuple[FindingDefinition, ...]:
        """The findings of ``anatomies`` (the checkpoint's, in its order) from the tables, in the
        model's own prompt wording where ``prompts_file`` gives one."""
        table = anatomy_table or anatomy_table_for(anatomies)
        if table.names != anatomies:
            raise ConfigError(
                f"anatomy_table: profile {table.profile!r} lists {', '.join(table.names)}, "
                f"the model {', '.join(anatomies)}"
            )
        defs = tuple(findings) if findings is not None else load_findings(table)
        defs = tuple(f for f in defs if f.anatomy in anatomies)
        if not defs:
            raise ConfigError(f"findings: none for the model's anatomies {anatomies}")
        return apply_model_prompts(prompts_file, defs)

    @staticmethod
    def _text_encoder(model: FvlmModel) -> Callable[[list[str]], torch.Tensor]:
        """What the prompt bank calls for its misses only: a warm bank never runs BERT."""

        def encode(texts: list[str]) -> torch.Tensor:
            with torch.inference_mode():
                return model.encode_text(texts)

        return encode

    def anatomy_of(self) -> dict[str, str]:
        """{finding: anatomy} of the scored findings (what co-finding evaluation groups by)."""
        return {f.name: f.anatomy for f in self.findings}

    def prompt_pairs(self) -> dict[str, tuple[str, str]]:
        """{finding: (positive, negative)} as scored, which calibrated thresholds record."""
        return {f.name: (f.positive, f.negative) for f in self.findings}

    def arithmetic(self) -> dict[str, str]:
        """How this predictor computes scores (mode, resolved precision, device), recorded next
        to every result and evaluation that depends on it."""
        return {"mode": self.mode, "precision": self.precision, "device": self.device.type}

    # -- prediction -----------------------------------------------------------------------
    def predict(self, volume: Volume, labelmap: LabelMap) -> list[Finding]:
        """The findings of :meth:`run` (table order); see there."""
        return list(self.run(volume, labelmap).findings)

    def run(self, volume: Volume, labelmap: LabelMap) -> Prediction:
        """Score every finding of the model's anatomies on one volume: :meth:`score` of
        :meth:`encode`.

        ``labelmap`` must be on ``volume``'s grid and name exactly the model's anatomies in the
        model's order (label k = ``anatomies[k - 1]``); otherwise :class:`ValueError`.
        """
        return self.score(self.encode(volume, labelmap))

    def encode(self, volume: Volume, labelmap: LabelMap) -> EncodedSeries:
        """The image side of :meth:`run`: model grid, crops, the image encoder; no prompts.

        Separate so that several prompt tables can be scored on one encoding (prompt
        selection scores each candidate table on the same validation images): the encoder is
        nearly all of a study's time, the scoring a few milliseconds.
        """
        if tuple(labelmap.anatomies) != self.anatomies:
            raise ValueError(
                f"labelmap anatomies ({', '.join(labelmap.anatomies)}) differ from the model's "
                f"({', '.join(self.anatomies)}); label k must be the model's k-th anatomy"
            )
        t0 = time.perf_counter()
        grid = to_model_grid(volume, np.asarray(labelmap.array), len(self.anatomies))
        crops = [context_crop(grid)] if self.mode == "single" else anatomy_crops(grid)
        crops = [c for c in crops if c.assessable]
        groups = group_by_shape(crops)
        t1 = time.perf_counter()

        # [K, E] anatomy embeddings of every crop; scoring uses those of the anatomies it assesses
        embeddings: list[tuple[AnatomyCrop, torch.Tensor]] = []
        for group in groups:
            for chunk in _chunks(group, self.max_batch):
                emb = self._encode(chunk)
                embeddings.extend(zip(chunk, emb, strict=True))
        t2 = time.perf_counter()
        log.info(
            "series %s: %d crops in %d group(s); preprocess %.2f s, encode %.2f s",
            volume.series_instance_uid,
            len(crops),
            len(groups),
            t1 - t0,
            t2 - t1,
        )
        return EncodedSeries(
            model_sha256=self.info.sha256,
            crops=tuple(embeddings),
            voxels=grid.voxels,
            source_labels=np.asarray(labelmap.array),
            timings={"preprocess": t1 - t0, "encode": t2 - t1},
        )

    def score(self, encoded: EncodedSeries) -> Prediction:
        """The prompt side of :meth:`run` on an :meth:`encode` result of a predictor with the
        same weights (another prompt table is fine; other weights are a :class:`ValueError`).
        The image arithmetic (mode, precision, device) is the encoding predictor's."""
        if encoded.model_sha256 != self.info.sha256:
            raise ValueError(
                f"encoded by weights {encoded.model_sha256[:12]}, this predictor's are "
                f"{self.info.sha256[:12]}: embeddings of other weights cannot be scored"
            )
        t0 = time.perf_counter()
        embeddings = list(encoded.crops)
        findings, reasons = self._score(embeddings, encoded.voxels, encoded.source_labels)
        timings = {**encoded.timings, "score": time.perf_counter() - t0}
        timings["total"] = timings["preprocess"] + timings["encode"] + timings["score"]
        log.info(
            "%d/%d anatomies assessable; score %.3f s",
            len(self.anatomies) - len(reasons),
            len(self.anatomies),
            timings["score"],
        )
        return Prediction(
            findings=tuple(findings),
            timings=timings,
            not_assessable=reasons,
            crops=len(embeddings),
            embeddings=self._mean_embeddings(embeddings),
        )

    def _encode(self, chunk: list[AnatomyCrop]) -> torch.Tensor:
        """[B, K, E] float32 CPU anatomy embeddings of a chunk of equal-shape crops."""
        image = torch.from_numpy(np.stack([c.image for c in chunk]).astype(np.float32))[:, None]
        labels = torch.from_numpy(np.stack([c.labels for c in chunk]))  # int16: 4x less to move
        with torch.inference_mode(), self._autocast():
            out = self.model.encode_anatomies(
                image.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            )
        return out.float().cpu()

    def _mean_embeddings(
        self, embeddings: list[tuple[AnatomyCrop, torch.Tensor]]
    ) -> dict[str, np.ndarray]:
        """Per anatomy, the mean embedding over the crops that assess it (finite rows only)."""
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for crop, emb in embeddings:
            for label in crop.assessable:
                row = emb[label - 1]
                if bool(torch.isfinite(row).all()):
                    sums[label] = sums.get(label, torch.zeros_like(row)) + row
                    counts[label] = counts.get(label, 0) + 1
        return {
            self.anatomies[label - 1]: (sums[label] / counts[label]).numpy().astype(np.float32)
            for label in sorted(sums)
        }

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when :attr:`precision` is bf16, else plain float32."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _score(
        self,
        embeddings: list[tuple[AnatomyCrop, torch.Tensor]],
        voxels: np.ndarray,
        source_labels: np.ndarray,
    ) -> tuple[list[Finding], dict[str, str]]:
        k = len(self.anatomies)
        tau = self.model.temperature
        idx = self._anatomy_index
        # probability sums and counts per finding over the crops that assess its anatomy
        total = torch.zeros(len(self.findings), dtype=torch.float64)
        count = torch.zeros(len(self.findings), dtype=torch.int64)
        assessed: set[int] = set()
        for crop, emb in embeddings:  # emb [K, E]
            usable = torch.zeros(k, dtype=torch.bool)
            for label in crop.assessable:
                if bool(torch.isfinite(emb[label - 1]).all()):
                    usable[label - 1] = True
                    assessed.add(label)
            mask = usable[idx]
            if not mask.any():
                continue
            v = emb[idx[mask]]  # [F', E]
            cos_pos = (v * self._positives[mask]).sum(-1)
            cos_neg = (v * self._negatives[mask]).sum(-1)
            prob = torch.sigmoid((cos_pos - cos_neg) / tau).double()
            finite = torch.isfinite(prob)
            where = mask.nonzero().squeeze(1)[finite]
            total[where] += prob[finite]
            count[where] += 1

        reasons = self._reasons(assessed, voxels, source_labels)
        findings = []
        for i, f in enumerate(self.findings):
            threshold = self.thresholds[f.name]
            score: float | None = None
            status: FindingStatus = "not_assessable"
            if int(count[i]) > 0:
                score = float(total[i] / count[i])
                if math.isfinite(score):
                    status = "present" if score >= threshold else "absent"
                else:  # cannot happen with finite parts; kept so NaN can never pass as a score
                    score = None
            findings.append(
                Finding(
                    anatomy=f.anatomy,
                    finding=f.name,
                    code_value=f.code.value,
                    code_scheme=f.code.scheme,
                    code_meaning=f.code.meaning,
                    score=score,
                    threshold=threshold,
                    status=status,
                    model=self.info,
                )
            )
        return findings, reasons

    def _reasons(
        self, assessed: set[int], voxels: np.ndarray, source_labels: np.ndarray
    ) -> dict[str, str]:
        """Why each anatomy that no crop assessed is not assessable (for the job record)."""
        out: dict[str, str] = {}
        for label, name in enumerate(self.anatomies, start=1):
            if label in assessed:
                continue
            if voxels[label] > 0:
                out[name] = "no crop could assess it (non-finite embedding)"
            elif bool((source_labels == label).any()):
                out[name] = "lost when resampled to the model grid"
            else:
                out[name] = "absent from the label map"
        return out


def _prompts(defs: Sequence[FindingDefinition]) -> list[str]:
    """The prompt texts of ``defs``: all positives, then all negatives (the embedding order)."""
    return [f.positive for f in defs] + [f.negative for f in defs]


def _chunks(items: list[AnatomyCrop], size: int) -> Iterator[list[AnatomyCrop]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
