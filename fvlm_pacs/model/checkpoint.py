"""Checkpoint formats: ours (safetensors + config.json) and the authors' released ``torch.save``.

Both hold the same key layout (the released one, see :mod:`fvlm_pacs.model.fvlm`), so one strict
loader serves both:

* **ours** — a directory with ``model.safetensors``, ``config.json`` (format, name, version,
  anatomies, sha256 of the weights file, the full :class:`ModelConfig`) and the tokenizer files.
  Self-contained: no other folder is needed, and the sha256 identifies the weights in every output.
* **released** — a ``torch.save`` file holding ``{"model": state_dict, ...}`` or a bare state dict.
  It carries no configuration, so ViT dimensions are inferred from tensor shapes and the BERT
  configuration and tokenizer come from ``text_model_dir`` (a local CXR-BERT folder).

Loading is strict: apart from the three residue keys the release is known to carry
(:data:`IGNORED_RESIDUE`), any missing or unexpected key, or any shape mismatch, raises
:class:`CheckpointError` naming the keys — a silently half-loaded model would still produce
plausible-looking scores.

Loading without the text tower (``load_model(..., with_text=False)``, used by the
:class:`~fvlm_pacs.model.predictor.Predictor` when its prompt bank is warm) works for our format
only: the safetensors file is mapped and only the non-text tensors are read, one at a time,
straight into the model's parameters (no second copy of the weights; the text part of the file
is never touched, and BERT is never allocated). The key
set and every shape — text keys included — are still checked against the file's header, and the
file's sha256 against config.json, so a truncated or foreign file fails exactly as in a full
load. The released ``.pth`` is a pickle that can only be read whole, so it always loads fully
(``with_text`` is ignored, logged); convert it once with ``fvlm-pacs model import`` to serve
without BERT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, FvlmPacsError
from .config import RELEASED_ANATOMIES, ModelConfig, TextConfig, VisionConfig
from .fvlm import FvlmModel, is_text_key
from .text import load_tokenizer, text_config_from_dir

log = logging.getLogger(__name__)

FORMAT = "fvlm_pacs.fvlm"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: Keys of the released file that the model does not use (position-id buffer, MLM head).
IGNORED_RESIDUE: frozenset[str] = frozenset(
    {
        "text_encoder.embeddings.position_ids",
        "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.decoder.bias",
    }
)

_NOMINAL = VisionConfig()


class CheckpointError(FvlmPacsError):
    """A checkpoint cannot be read or does not fit the model; the message names the keys/file."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(module: torch.nn.Module, path: str | Path, fmt: str) -> str:
    """Write ``module``'s state dict (on CPU, contiguous) to the safetensors file ``path``; return
    the file's hex sha256.

    The header carries one metadata key only, ``{"format": fmt}``: safetensors writes the
    metadata map in no fixed order, so several keys would give identical weights a different
    sha256 on every save. Everything else (name, version, config) belongs in the ``config.json``
    next to the weights. Shared by :func:`save_model` and the builtin segmentation network.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": fmt})
    return sha256_file(path)


# -- the released format -------------------------------------------------------------------
def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a released ``torch.save`` file (``{"model": sd}`` or bare ``sd``).

    ``weights_only=True``: a checkpoint must never be able to run code on the PACS host.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad/unsafe file
        raise CheckpointError(f"official_path: cannot read {path}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"official_path: {path} holds neither a state dict nor a dict with 'model'"
        )
    return {str(k): v for k, v in obj.items()}


def infer_vision_config(state: Mapping[str, torch.Tensor]) -> VisionConfig:
    """ViT dimensions from tensor shapes under ``visual_encoder.``.

    Heads cannot be seen in the weights; ViT convention (head dim 64) gives 12 for ViT-B. The
    nominal grid can only be recovered when the position embedding has the released size
    (7·16·11 tokens for patch 16·16·32); otherwise pass ``config``.
    """
    p = "visual_encoder."
    try:
        conv = state[p + "patch_embedding.patch_embeddings.weight"]
        pos = state[p + "patch_embedding.position_embeddings"]
        linear1 = state[p + "blocks.0.mlp.linear1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks {exc.args[0]!r}; cannot infer the ViT") from exc
    hidden, in_ch = int(conv.shape[0]), int(conv.shape[1])
    patch = tuple(int(s) for s in conv.shape[2:])
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{p}blocks\.(\d+)\.", k))}
    layers = max(blocks) + 1
    n_tokens = int(pos.shape[1])
    if patch == _NOMINAL.patch_size and n_tokens == math.prod(_NOMINAL.grid):
        img_size = _NOMINAL.img_size
    else:
        raise CheckpointError(
            f"position embedding has {n_tokens} tokens for patch {patch}: cannot infer the "
            "nominal image size; pass config"
        )
    if in_ch != 1:
        raise CheckpointError(
            f"the patch embedding takes {in_ch} input channels: which HU window each one is "
            "cannot be inferred from the weights; pass a config with vision.hu_windows"
        )
    levels = _NOMINAL.level_blocks if layers == _NOMINAL.num_layers else _scaled_levels(layers)
    return VisionConfig(
        in_channels=in_ch,
        patch_size=(patch[0], patch[1], patch[2]),
        img_size=img_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        mlp_dim=int(linear1.shape[0]),
        qkv_bias=(p + "blocks.0.attn.qkv.bias") in state,
        level_blocks=levels,
    )


def _scaled_levels(layers: int) -> tuple[int, ...]:
    """Blocks 3, 6, 9 of 12 mapped onto a shallower net (only for non-standard checkpoints)."""
    return tuple(sorted({max(0, min(layers - 1, round(b * layers / 12))) for b in (3, 6, 9)}))


def config_for_official(
    state: Mapping[str, torch.Tensor],
    text: TextConfig,
    anatomies: tuple[str, ...] | None,
) -> ModelConfig:
    """The :class:`ModelConfig` of a released state dict plus its text-model config."""
    try:
        k = int(state["query_tokens"].shape[0])
        embed_dim = int(state["text_proj.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks {exc.args[0]!r}") from exc
    if anatomies is None:
        if k != len(RELEASED_ANATOMIES):
            raise ConfigError(
                f"anatomies: the checkpoint has {k} anatomy queries; name them in index order"
            )
        anatomies = RELEASED_ANATOMIES
    if len(anatomies) != k:
        raise ConfigError(
            f"anatomies: {len(anatomies)} names given but the checkpoint has {k} anatomy queries"
        )
    return ModelConfig(
        vision=infer_vision_config(state), text=text, embed_dim=embed_dim, anatomies=anatomies
    )


# -- strict loading --------------------------------------------------------------------------
Shapes = Mapping[str, tuple[int, ...]]


def _fit_problems(expected: Shapes, given: Shapes) -> list[str]:
    """Why a checkpoint's keys and shapes (``given``) do not fit a model's (``expected``):
    missing keys, unexpected keys, shape mismatches; empty when they fit exactly."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    shapes = [
        f"{k}: checkpoint {given[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(given))
        if given[k] != expected[k]
    ]
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    return problems


def load_state_strict(model: FvlmModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``: residue keys dropped, anything else must match exactly."""
    given = {k: v for k, v in state.items() if k not in IGNORED_RESIDUE}
    problems = _fit_problems(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in given.items()},
    )
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(problems))
    model.load_state_dict(given, strict=True)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the full model (text tower included) with its shape.

    Built on the meta device: no weights are allocated, so a text-less load can still check the
    text keys of a file it does not read.
    """
    with torch.device("meta"):
        full = FvlmModel(config, with_text=True)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def load_safetensors_strict(model: FvlmModel, weights: str | Path) -> int:
    """Fill ``model`` from our safetensors file, key by key; returns the number of tensors read.

    The whole file must fit the full model (every key, text included, with its shape: checked
    from the header, no data read); then only the keys ``model`` has are read — all of them, or
    the image path only for a model built with ``with_text=False``. Each tensor is copied into
    its parameter straight from the mapped file, so no second copy of the weights is built next
    to the model (mapped pages that were read count as page cache until the file is closed).
    """
    expected = expected_shapes(model.config)
    own = model.state_dict()
    wanted = {k for k in expected if model.has_text or not is_text_key(k)}
    if set(own) != wanted:  # a guard: only a change to FvlmModel could make them differ
        raise CheckpointError(
            f"{weights}: the model's keys differ from its config's: {sorted(set(own) ^ wanted)}"
        )
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            given = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
            problems = _fit_problems(expected, given)
            if problems:
                raise CheckpointError(f"{weights} does not fit the model; " + "; ".join(problems))
            with torch.no_grad():
                for key, target in own.items():
                    target.copy_(fh.get_tensor(key))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read the weights: {exc}") from exc
    return len(own)


# -- public entry points -------------------------------------------------------------------
DEMO_MODEL = "demo"
"""The name that stands for the demo model shipped in the package, wherever a model path goes
(``--model demo``, ``model_dir: demo``). A folder that happens to be called ``demo`` is given as
``./demo``."""


def demo_model_dir() -> Path:
    """Where the shipped demo model lives (package data, built by ``fvlm-pacs model build-demo``)."""
    return Path(__file__).resolve().parent.parent / "models" / "demo"


def resolve_model_path(path: str | Path) -> Path:
    """``path`` as given, or the shipped demo model for the name ``demo``.

    Raises :class:`CheckpointError` when the demo model is asked for but this install has none
    (a source checkout where it was deleted), naming the command that builds it.
    """
    if str(path) != DEMO_MODEL:
        return Path(path)
    folder = demo_model_dir()
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"model: the demo model is not in this install ({folder}); "
            "build it with `fvlm-pacs model build-demo`"
        )
    return folder


def load_model(
    path: str | Path,
    text_model_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    anatomies: tuple[str, ...] | None = None,
    config: ModelConfig | None = None,
    with_text: bool = True,
) -> FvlmModel:
    """Load our directory format or the released file; the model comes back in eval mode.

    ``text_model_dir`` is required for the released format (BERT config + tokenizer); for ours it
    is only a fallback when the directory has no tokenizer files. ``anatomies`` names the
    released file's anatomy queries (default: the CT-RATE four when it has four); ``config``
    overrides shape inference for a non-standard released file. ``with_text=False`` (our format
    only) neither allocates nor reads the text tower — for a process whose prompt bank is warm;
    the file is still checked in full (sha256, every key and shape). The released format always
    loads fully.
    """
    p = resolve_model_path(path)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if p.is_dir():
        model = _load_ours(p, text_model_dir, with_text)
    elif p.is_file():
        if not with_text:
            log.info(
                "%s: the released format is read whole, text tower included; convert it with "
                "`fvlm-pacs model import` to load without it",
                p.name,
            )
        model = _load_official(p, text_model_dir, anatomies, config)
    else:
        raise CheckpointError(f"path: {p} is neither a checkpoint directory nor a file")
    model.to(dev).eval()
    log.info(
        "loaded fVLM %s %s (sha256 %s, %d anatomies%s) on %s",
        model.name,
        model.version,
        model.sha256[:12],
        len(model.anatomies),
        "" if model.has_text else ", no text tower",
        dev,
    )
    return model


def _load_official(
    path: Path,
    text_model_dir: str | Path | None,
    anatomies: tuple[str, ...] | None,
    config: ModelConfig | None,
) -> FvlmModel:
    if text_model_dir is None:
        raise ConfigError(
            "text_model_dir is required for the released checkpoint format: it gives the BERT "
            "config.json and tokenizer files (e.g. a local CXR-BERT-specialized folder)"
        )
    state = read_official_state_dict(path)
    if config is None:
        config = config_for_official(state, text_config_from_dir(text_model_dir), anatomies)
    model = FvlmModel(config, tokenizer=load_tokenizer(text_model_dir))
    load_state_strict(model, state)
    model.name, model.version, model.sha256 = path.stem, "official", sha256_file(path)
    return model


def _load_ours(folder: Path, text_model_dir: str | Path | None, with_text: bool) -> FvlmModel:
    meta = read_meta(folder)
    config = ModelConfig.from_dict(meta["model"])
    if tuple(meta.get("anatomies", config.anatomies)) != config.anatomies:
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'anatomies' disagrees with 'model'")
    weights = folder / WEIGHTS_FILE
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest} does not match config.json ({meta.get('sha256')})"
        )
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    tok_dir = folder if has_tokenizer else text_model_dir
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    if tokenizer is None:
        log.warning("no tokenizer in %s and no text_model_dir: encode_text is unavailable", folder)
    model = FvlmModel(config, tokenizer=tokenizer, with_text=with_text)
    load_safetensors_strict(model, weights)
    model.name, model.version, model.sha256 = str(meta["name"]), str(meta["version"]), digest
    return model


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of our format, checked for format and required keys."""
    path = Path(folder) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"path: cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an fvlm_pacs model (format must be {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is newer")
    for key in ("name", "version", "sha256", "model"):
        if key not in meta:
            raise CheckpointError(f"{path}: lacks {key!r}")
    return meta


def save_model(model: FvlmModel, out_dir: str | Path, name: str, version: str) -> Path:
    """Write ``model`` in our format to ``out_dir`` (created); returns the directory.

    The sha256 in config.json is of the safetensors file, so a PACS output can name exactly the
    weights it came from; the tokenizer is saved alongside so the directory is self-contained.
    """
    if not name:
        raise ConfigError("name must not be empty")
    if not version:
        raise ConfigError("version must not be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Name and version live in config.json: the weights header keeps one metadata key, so
    # identical weights keep one sha256 from save to save (see save_weights).
    digest = save_weights(model, out / WEIGHTS_FILE, FORMAT)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "anatomies": list(model.anatomies),
        "weights": WEIGHTS_FILE,
        "sha256": digest,
        "model": model.config.to_dict(),
    }
    if model.tokenizer is not None:
        # Before config.json, so that nothing the tokenizer writes can shadow our file.
        model.tokenizer.save_pretrained(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    model.name, model.version, model.sha256 = name, version, digest
    log.info("saved fVLM %s %s to %s (sha256 %s)", name, version, out, digest[:12])
    return out


def import_official(
    official_path: str | Path,
    text_model_dir: str | Path,
    out_dir: str | Path,
    name: str,
    version: str,
    anatomies: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Convert a released checkpoint (+ local text-model folder) into our format.

    Used by ``fvlm-pacs model import``. Loads strictly (so a wrong file fails here, not at the
    first study) and writes ``out_dir``; returns it.
    """
    model = load_model(
        official_path,
        text_model_dir=text_model_dir,
        anatomies=tuple(anatomies) if anatomies is not None else None,
    )
    return save_model(model, out_dir, name, version)
