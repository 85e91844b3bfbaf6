"""fVLM pre-training loop (FVLM.md "Pre-training objective"): ``fvlm-pacs train --config F``.

What one run does:

1. Seeds Python, NumPy and torch with ``seed``; builds a :class:`ManifestDataset` (random crop,
   flips p = ``flip_p`` per axis).
2. Tokenizer: ``text_dir`` (a folder with ``vocab.txt`` / ``tokenizer.json``, e.g. CXR-BERT) or,
   when it is not given, a deterministic lower-case WordPiece vocabulary of the manifest's
   reports plus the normal templates (:func:`build_vocab`; BERT normalisation and
   pre-tokenisation from ``tokenizers``), written to ``out/tokenizer/vocab.txt`` (re-used on
   resume). The model's text ``vocab_size`` is
   then the vocabulary's size.
3. Model: preset ``"tiny"`` or ``"vit_b"`` (random init; ``vit_b`` reads BERT dimensions from
   ``text_dir/config.json`` when present) or a full :class:`ModelConfig` mapping; ``init_from``
   loads weights (our format or the released file) before training.
4. AdamW (lr, weight decay 0.01), linear warm-up for ``warmup_steps`` then cosine decay to
   ``min_lr`` at ``steps`` (``LambdaLR``). The schedule's horizon is always ``steps``, so an
   interrupted run that resumes follows the same curve.
5. Objectives: ``fvlm`` (anatomy-level loss with the normal-sample correction), ``fvlm-no-
   correction`` (only identical texts are extra positives), ``clip`` (the global baseline:
   mean-pooled final ViT tokens through its own projection ``clip_proj`` vs the whole report,
   same encoders and temperature). Texts identical within a batch are encoded once.
   Options off by default: ``text_queue`` N keeps the last N texts of each anatomy, embedded
   when seen, as extra image→text columns (:mod:`.text_queue`; not with co-teaching or
   ``clip``); ``sentence_keep`` p trains on random sentence subsets of abnormal anatomy texts,
   but for the anatomies in ``whole_text_anatomies`` (:class:`ManifestDataset`).
6. Logs every ``log_every`` steps to ``out/train_log.csv`` (step, loss, lr, seconds, one
   ``loss_<anatomy>`` column per anatomy; empty when skipped) and, when
   ``torch.utils.tensorboard`` imports, to ``out/tensorboard``; a tqdm bar shows progress.
7. Every ``checkpoint_every`` steps (and at the end, or when stopped with ``stop_after``) writes
   ``out/checkpoint.pt``: model, ``clip_proj``, optimizer, scheduler, step, the text queue and
   the RNG states (Python, NumPy, torch, CUDA), atomically. ``train`` resumes from it when it exists.
8. At the end saves the model with :func:`save_model` into ``out/model/`` (our format: the
   :class:`~fvlm_pacs.model.Predictor` loads it) with the cases it was trained on
   (:mod:`~fvlm_pacs.model.provenance`, which ``eval`` and ``calibrate`` refuse) and, for
   ``clip``, ``out/clip_proj.safetensors``.

Resume guarantee: the samples of step s are a pure function of (seed, s) — batches come from
seeded per-epoch permutations and each item's crop/flips from ``(seed, draw, index)`` — and the
checkpoint restores every RNG the step consumes (dropout uses torch's global generator; the
DataLoader gets its own generator so creating it consumes none). On CPU an interrupted and
resumed run therefore reproduces the uninterrupted run (tested to 1e-6); on GPU non-deterministic
kernels make it close, not identical.

Distributed: launched by ``torchrun``, ``WORLD_SIZE > 1`` initialises the process group (NCCL on
GPU, else gloo); each rank takes its own ``batch_size`` slice of the global sample stream, the
loss is computed on the all-gathered batch (:func:`gather_with_grad`), DDP averages gradients,
and only rank 0 writes logs, checkpoints and the model. Every rank pushes the gathered batch
to its text queue, so the queues agree.

AMP: on CUDA only (``amp: true``), bf16 autocast (no gradient scaler needed); CPU runs in fp32.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError
from ..reports import normal_text
from .checkpoint import load_model, save_model
from .config import ModelConfig, TextConfig, coerce_numbers, tiny, vit_b
from .dataset import LAYOUTS, NORMAL_WORDINGS, ManifestDataset, collate
from .fvlm import FvlmModel
from .losses import (
    clip_image_embedding,
    clip_loss,
    fvlm_loss,
    gather_objects,
    gather_with_grad,
    usable_rows,
)
from .provenance import write_training_cases
from .text import load_tokenizer, text_config_from_dir
from .text_queue import TextQueue

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "TrainConfig", "build_vocab", "lr_factor", "train"]

OBJECTIVES = ("fvlm", "fvlm-no-correction", "fvlm-coteach", "clip")
CHECKPOINT = "checkpoint.pt"
LOG_FILE = "train_log.csv"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; load with :meth:`from_yaml` (keys = field names).

    Relative paths in a YAML file are relative to that file's folder.
    """

    manifest: Path
    out_dir: Path
    layout: str = "synthetic"
    model: str | Mapping[str, Any] = "tiny"
    text_dir: Path | None = None
    vocab_size: int = 2000
    init_from: Path | None = None
    crop: tuple[int, int, int] = (112, 256, 352)
    flip_p: float = 0.2
    resample: bool = True
    cache_dir: Path | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 100
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float | None = None
    seed: int = 0
    objective: str = "fvlm"
    log_every: int = 10
    checkpoint_every: int = 100
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True
    name: str = "fvlm-trained"
    version: str = "1"
    coteach_alpha: float = 0.5
    patch_lr_scale: float = 1.0
    normal_wording: str = "template"
    sentence_keep: float = 1.0
    whole_text_anatomies: tuple[str, ...] = ()
    text_queue: int = 0

    def __post_init__(self) -> None:
        for key in ("manifest", "out_dir", "text_dir", "init_from", "cache_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, key, Path(value))
        crop = tuple(int(c) for c in self.crop)
        if len(crop) != 3 or min(crop) <= 0:
            raise ConfigError(f"crop: need three positive sizes, got {self.crop!r}")
        object.__setattr__(self, "crop", crop)
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout: must be one of {LAYOUTS}, got {self.layout!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if isinstance(self.model, str) and self.model not in ("tiny", "vit_b"):
            raise ConfigError(f"model: 'tiny', 'vit_b' or a model config, got {self.model!r}")
        for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("warmup_steps and num_workers must be >= 0")
        if self.normal_wording not in NORMAL_WORDINGS:
            raise ConfigError(
                f"normal_wording: must be one of {NORMAL_WORDINGS}, got {self.normal_wording!r}"
            )
        if self.text_queue < 0:
            raise ConfigError(f"text_queue: must be >= 0, got {self.text_queue}")
        if self.text_queue and self.objective not in ("fvlm", "fvlm-no-correction"):
            raise ConfigError(
                f"text_queue: only with the fvlm objectives without co-teaching, "
                f"not {self.objective!r}"
            )
        if not 0.0 < self.sentence_keep <= 1.0:
            raise ConfigError(f"sentence_keep: must be in (0, 1], got {self.sentence_keep}")
        if isinstance(self.whole_text_anatomies, str):
            raise ConfigError(
                f"whole_text_anatomies: a list of anatomy names, got {self.whole_text_anatomies!r}"
            )
        object.__setattr__(self, "whole_text_anatomies", tuple(self.whole_text_anatomies))
        if not 0.0 < self.patch_lr_scale <= 1.0:
            raise ConfigError(f"patch_lr_scale: must be in (0, 1], got {self.patch_lr_scale}")
        if not 0.0 <= self.coteach_alpha <= 1.0:
            raise ConfigError(f"coteach_alpha: must be in [0, 1], got {self.coteach_alpha}")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: must be in (0, lr={self.lr}], got {self.min_lr}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML mapping; unknown keys are an error naming the key."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"train config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"train config {path}: must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config {path}: unknown key {unknown[0]!r}")
        for key in ("manifest", "out_dir", "text_dir", "init_from", "cache_dir"):
            if data.get(key) is not None:
                p = Path(str(data[key])).expanduser()
                data[key] = p if p.is_absolute() else path.parent / p
        try:
            return cls(**coerce_numbers(cls, data, f"train config {path.name}"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"train config {path}: {exc}") from exc

    def dataset(self, *, train: bool = True) -> ManifestDataset:
        """The training cases as the trainer reads them (``train=False``: no augmentation, e.g.
        to read their texts after training, :mod:`~fvlm_pacs.model.prompt_selection`)."""
        return ManifestDataset(
            self.manifest,
            layout=self.layout,
            crop=self.crop,
            train=train,
            seed=self.seed,
            cache_dir=self.cache_dir,
            flip_p=self.flip_p,
            resample=self.resample,
            normal_wording=self.normal_wording,
            sentence_keep=self.sentence_keep,
            whole_text_anatomies=self.whole_text_anatomies,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings) for the checkpoint and logs."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        out["crop"] = list(self.crop)
        if isinstance(self.model, Mapping):
            out["model"] = dict(self.model)
        return out


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup`` steps, then cosine from 1 to ``min_ratio`` (= min_lr / lr) at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_vocab(texts: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A lower-case WordPiece vocabulary of ``texts``, written to ``out_dir/vocab.txt``.

    Normalisation and pre-tokenisation are BERT's (``tokenizers`` ``BertNormalizer`` with
    lower-casing, ``BertPreTokenizer``). The vocabulary is the five special tokens, every
    character alone and as ``##`` continuation (so any word still tokenizes), then whole words by
    frequency (ties alphabetical) up to ``vocab_size``. Not ``BertWordPieceTokenizer.train``:
    its merges break ties in hash-map order, so the same corpus gave different vocabularies from
    run to run, and a resumed or repeated run must see the same token ids.
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(lowercase=True)
    pre = BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    seen = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return out_dir


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, draw)`` keys for steps ``start`` … ``steps - 1`` of one rank.

    The global sample stream is a concatenation of per-epoch permutations seeded by
    ``(seed, epoch)``; sample number c of the stream is case ``perm_{c // n}[c % n]`` with
    augmentation draw c. Step s of rank r takes samples ``(s·world + r)·B`` … ``+ B``.
    """

    def __init__(
        self, n: int, batch: int, seed: int, start: int, steps: int, rank: int, world: int
    ) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.start, self.steps, self.rank, self.world = start, steps, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _case(self, c: int) -> int:
        epoch = c // self.n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms = {epoch: perm}
        return int(perm[c % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.steps):
            first = (s * self.world + self.rank) * self.batch
            yield [(self._case(c), c) for c in range(first, first + self.batch)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class _Objective(nn.Module):
    """The model plus the CLIP head, as one module so DDP sees every forward.

    The forward also returns the clamped temperature: every parameter the loss touches must be
    used inside the DDP-wrapped forward, or DDP (with ``find_unused_parameters``) marks it unused
    at the end of the forward and fails when its gradient then arrives in the backward.
    """

    def __init__(self, model: FvlmModel) -> None:
        super().__init__()
        self.model = model
        self.clip_proj = nn.Linear(model.config.vision.hidden_size, model.config.embed_dim)

    def _encode_unique(self, texts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(texts))
        emb = self.model.encode_text(unique)
        where = {t: i for i, t in enumerate(unique)}
        return emb[torch.tensor([where[t] for t in texts], device=emb.device)]

    def forward(
        self, image: torch.Tensor, labels: torch.Tensor, texts: list[str], clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        tau = self.model.temp.clamp(cfg.temperature_min, cfg.temperature_max)
        if clip:
            levels = self.model.encode_tokens(image)
            img = clip_image_embedding(levels[-1], self.clip_proj).float()
            return img, self._encode_unique(texts), tau
        img = self.model.encode_anatomies(image, labels)
        b, k, e = img.shape
        return img, self._encode_unique(texts).reshape(b, k, e), tau


PATCH_CONV = "patch_embedding.patch_embeddings."
"""Parameter-name fragment of the ViT's patchify convolution (kernel 16 x 16 x 32)."""


def param_groups(module: nn.Module, lr: float, patch_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: the patchify convolution at ``lr * patch_lr_scale``, the rest at ``lr``.

    Adam moves every weight by about ``lr`` per step whatever its gradient's size, so a layer's
    output moves by about ``lr x fan-in x |input|``. The patch convolution has a fan-in of
    16 x 16 x 32 = 8192 voxels against 64-768 for every other layer: trained from scratch at the
    same lr it rewrites the patch features within a few steps, and on phantoms that differ in
    a few voxels it maps every case to the same tokens — measured: pairwise cosine of the pooled
    anatomy embeddings 0.993 → 0.9999 in 5 steps at lr 1e-4..1e-3, loss stuck at log(batch) per
    anatomy; with the convolution slowed 100x the loss falls below it on the same batch. 1.0
    keeps FVLM.md's recipe (fine-tuning a pretrained encoder). A ViT with a hierarchical stem
    (``vision.stem_strides``) has no such layer: its stages' fan-ins are 32-512 and all of it
    trains at ``lr``.
    """
    patch = [p for n, p in module.named_parameters() if PATCH_CONV in n]
    rest = [p for n, p in module.named_parameters() if PATCH_CONV not in n]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr}]
    if patch:
        groups.append({"params": patch, "lr": lr * patch_lr_scale})
    return groups


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _build_model(cfg: TrainConfig, tokenizer: Any) -> FvlmModel:
    vocab = len(tokenizer)
    if cfg.init_from is not None:
        model = load_model(cfg.init_from, text_model_dir=cfg.text_dir)
        model.tokenizer = model.tokenizer or tokenizer
        return model
    if isinstance(cfg.model, Mapping):
        data = dict(cfg.model)
        text_data = dict(data.get("text") or {})
        # a config without a vocabulary size gets the tokenizer's (built by this run)
        text_data.setdefault("vocab_size", vocab)
        mc = ModelConfig.from_dict({**data, "text": text_data})
        if mc.text.vocab_size < vocab:
            raise ConfigError(
                f"model.text.vocab_size ({mc.text.vocab_size}) < tokenizer vocabulary ({vocab})"
            )
    elif cfg.model == "tiny":
        mc = tiny(vocab_size=vocab)
    else:
        mc = vit_b()
        has_config = cfg.text_dir is not None and (cfg.text_dir / "config.json").is_file()
        text = (
            text_config_from_dir(cfg.text_dir)
            if has_config and cfg.text_dir is not None
            else TextConfig(vocab_size=vocab)
        )
        mc = dataclasses.replace(mc, text=text)
    return FvlmModel(mc, tokenizer=tokenizer)


def _rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _tokenizer(cfg: TrainConfig, dataset: ManifestDataset, rank0: bool, dist_on: bool) -> Any:
    if cfg.text_dir is not None:
        return load_tokenizer(cfg.text_dir)
    folder = cfg.out_dir / "tokenizer"
    if not (folder / "vocab.txt").is_file() and rank0:
        corpus = [dataset.texts(i).report for i in range(len(dataset))]
        corpus += [normal_text(a) for a in dataset.anatomies]
        build_vocab(corpus, folder, cfg.vocab_size)
    if dist_on:
        torch.distributed.barrier()
    return load_tokenizer(folder)


def train(config: TrainConfig, *, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns ``out/model`` — or ``out/checkpoint.pt`` when
    ``stop_after`` stopped the run early (an interruption on purpose: used by the resume test
    and for time-sliced jobs)."""
    cfg = config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist_on = world > 1
    device = _device(cfg.device, local_rank)
    if dist_on:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank0 = rank == 0
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    dataset = cfg.dataset()
    if len(dataset) == 0:
        raise ConfigError(f"manifest: {cfg.manifest} lists no usable case")
    tokenizer = _tokenizer(cfg, dataset, rank0, dist_on)
    model = _build_model(cfg, tokenizer)
    if model.anatomies != dataset.anatomies:
        dataset.anatomies = model.anatomies
    unknown = sorted(set(cfg.whole_text_anatomies) - set(model.anatomies))
    if unknown:
        raise ConfigError(
            f"whole_text_anatomies: {unknown[0]!r} is not an anatomy of the model "
            f"({', '.join(model.anatomies)})"
        )
    module = _Objective(model).to(device)
    module.train()
    coteach = cfg.objective == "fvlm-coteach"
    # Co-teaching (FVLM.md): a second network of the same shape, initialised from its own random
    # stream, trained side by side; each softens the other's targets. Only the first is saved.
    peer: _Objective | None = None
    if coteach:
        torch.manual_seed(cfg.seed + 1)
        peer = _Objective(_build_model(cfg, tokenizer)).to(device)
        peer.train()
        torch.manual_seed(cfg.seed)
    trained = nn.ModuleDict({"model": module, **({"peer": peer} if peer is not None else {})})
    optimizer = torch.optim.AdamW(
        param_groups(trained, cfg.lr, cfg.patch_lr_scale), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    ratio = cfg.min_lr / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, ratio)
    )
    queue = (
        TextQueue(cfg.text_queue, len(model.anatomies), model.config.embed_dim)
        if cfg.text_queue
        else None
    )
    start = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["module"])
        if peer is not None:
            peer.load_state_dict(ckpt["peer"])
        if queue is not None:
            if "text_queue" not in ckpt:
                raise ConfigError(f"{ckpt_path}: saved without a text queue; text_queue is set")
            queue.load_state_dict(ckpt["text_queue"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["step"])
        _set_rng_state(ckpt["rng"])
        log.info("resuming from %s at step %d", ckpt_path, start)
    wrapped: nn.Module = module
    wrapped_peer: nn.Module | None = peer
    if dist_on:

        def ddp(m: nn.Module) -> nn.Module:
            return nn.parallel.DistributedDataParallel(
                m,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )

        wrapped = ddp(module)
        wrapped_peer = ddp(peer) if peer is not None else None

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    loader = DataLoader(
        dataset,
        batch_sampler=StepBatches(len(dataset), cfg.batch_size, cfg.seed, start, end, rank, world),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    anatomies = model.anatomies
    log_path = out / LOG_FILE
    writer: Any = None
    progress: Any = None
    if rank0:
        if not log_path.is_file() or start == 0:
            with log_path.open("w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(
                    ["step", "loss", "lr", "seconds", *(f"loss_{a}" for a in anatomies)]
                )
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # optional; the CSV log is always written
            writer = None
        from tqdm import tqdm

        progress = tqdm(total=end, initial=start, desc="train", disable=not sys.stderr.isatty())

    def checkpoint(step: int) -> None:
        if rank0:
            _save_checkpoint(
                ckpt_path,
                {
                    "module": module.state_dict(),
                    **({"peer": peer.state_dict()} if peer is not None else {}),
                    **({"text_queue": queue.state_dict()} if queue is not None else {}),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "rng": _rng_state(),
                    "config": {k: str(v) for k, v in cfg.to_dict().items()},
                },
            )

    clip = cfg.objective == "clip"
    t0 = time.monotonic()
    step = start
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        texts = batch["report"] if clip else [t for row in batch["texts"] for t in row]
        with autocast():
            v, t, tau = wrapped(image, labels, texts, clip)
            if wrapped_peer is not None:
                pv, pt, peer_tau = wrapped_peer(image, labels, texts, False)
        v, t = gather_with_grad(v.float()), gather_with_grad(t.float())
        tau = tau.float()
        per: dict[int, float] = {}
        if clip:
            loss = clip_loss(v, t, tau)
        else:
            # flags travel as uint8: not every backend all-gathers bool
            normal = gather_with_grad(batch["normal"].to(device, torch.uint8)).bool()
            inside = gather_with_grad(batch["inside"].to(device, torch.uint8)).bool()
            all_texts = gather_objects(batch["texts"])
            correction = cfg.objective != "fvlm-no-correction"
            if peer is None:
                loss, per = fvlm_loss(
                    v, t, normal, inside, all_texts, tau, normal_correction=correction,
                    queue=queue.queued(device) if queue is not None else None,
                )  # fmt: skip
                if queue is not None:  # after the loss: a batch is never its own queue
                    queue.push(t, normal, usable_rows(inside, v, t), all_texts)
            else:
                pv, pt = gather_with_grad(pv.float()), gather_with_grad(pt.float())
                peer_tau = peer_tau.float()
                loss, per = fvlm_loss(
                    v, t, normal, inside, all_texts, tau,
                    peer_image_emb=pv, peer_text_emb=pt, peer_tau=peer_tau,
                    alpha=cfg.coteach_alpha,
                )  # fmt: skip
                peer_loss, _ = fvlm_loss(
                    pv, pt, normal, inside, all_texts, peer_tau,
                    peer_image_emb=v, peer_text_emb=t, peer_tau=tau,
                    alpha=cfg.coteach_alpha,
                )  # fmt: skip
                loss = loss + peer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        if rank0:
            value = float(loss.detach())
            if step % cfg.log_every == 0 or step == end:
                row = [step, f"{value:.6f}", f"{lr:.3e}", f"{time.monotonic() - t0:.2f}"]
                row += [f"{per[k]:.6f}" if k in per else "" for k in range(len(anatomies))]
                with log_path.open("a", newline="", encoding="utf-8") as fh:
                    csv.writer(fh).writerow(row)
                if writer is not None:
                    writer.add_scalar("loss", value, step)
                    writer.add_scalar("lr", lr, step)
                    for k, val in per.items():
                        writer.add_scalar(f"loss/{anatomies[k]}", val, step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{value:.4f}")
        if step % cfg.checkpoint_every == 0 and step < end:
            checkpoint(step)
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    if step > start or not ckpt_path.is_file():
        checkpoint(step)
    result = ckpt_path
    if step >= cfg.steps and rank0:
        model.eval()
        result = save_model(model, out / "model", cfg.name, cfg.version)
        write_training_cases(result, cfg.manifest, [r.case_id for r in dataset.records])
        if clip:
            from safetensors.torch import save_file

            save_file(
                {
                    k: v.detach().cpu().contiguous()
                    for k, v in module.clip_proj.state_dict().items()
                },
                str(out / "clip_proj.safetensors"),
            )
    elif step >= cfg.steps:
        result = out / "model"
    if dist_on:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    log.info("training stopped at step %d of %d; %s", step, cfg.steps, result)
    return result
