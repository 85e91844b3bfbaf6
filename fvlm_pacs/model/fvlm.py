"""The fVLM network: image encoder + anatomy pooling + text encoder in one module.

Parameters sit at the top level under the released checkpoint's prefixes (``visual_encoder.*``,
``text_encoder.*``, ``text_proj.*``, ``vision_projs.{k}.*``, ``query_tokens``, ``attention.*``,
``temp``), so the released state dict and ours are the same mapping and one strict loader serves
both formats (see :mod:`fvlm_pacs.model.checkpoint`). Only our own models with
``histogram_edges`` add ``histogram.mlps.{k}.*`` (:mod:`~fvlm_pacs.model.histogram`).

The text tower (``text_encoder`` + ``text_proj``, BERT-base: ~0.4 GiB) is only needed to embed
prompts, and a warm prompt bank (:mod:`fvlm_pacs.model.prompts`) already holds every prompt the
findings table uses. So the model can be built without it (``with_text=False``) or lose it after
use (:meth:`FvlmModel.drop_text`): a serving process then never holds BERT's weights.

Image axes: ``image`` is [B, 1, D, H, W] with D = slices (z), H = rows, W = columns, values in
scaled HU (−1150 → 0, 350 → 1, not clipped above; the ViT clips to the config's HU windows,
:mod:`fvlm_pacs.model.intensity`); the patch (16, 16, 32) applies to (D, H, W).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel, PreTrainedTokenizerBase

from ..errors import ConfigError
from .anatomy import pool_anatomies, token_selector
from .config import ModelConfig
from .histogram import HistogramEncoder, anatomy_histograms, feature_count
from .lesions import anatomy_lesions, lesion_feature_count
from .preprocess import MODEL_SPACING_MM
from .text import build_text_encoder, embed_texts
from .vit import VisionTransformer3D

log = logging.getLogger(__name__)


#: State-dict prefixes of the text tower: what ``with_text=False`` leaves out.
TEXT_PREFIXES: tuple[str, ...] = ("text_encoder.", "text_proj.")


def is_text_key(key: str) -> bool:
    """Whether a state-dict key belongs to the text tower (see :data:`TEXT_PREFIXES`)."""
    return key.startswith(TEXT_PREFIXES)


def release_freed_heap() -> None:
    """Ask the C allocator to return freed heap pages to the OS (glibc ``malloc_trim``).

    Why: BERT-base's weights are ~2–9 MiB tensors; once glibc has raised its mmap threshold
    they live on the heap, and freeing them leaves the pages mapped — measured: a Predictor that
    dropped the tower kept ~130 MiB more RSS than one that never loaded it, and this call gives
    them back (bench/predictor_load.py). A no-op where the C library has no ``malloc_trim``.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


class FvlmModel(nn.Module):
    """fVLM for inference (and later training). Build with :meth:`from_checkpoint`.

    ``with_text=False`` builds the image path only: ``text_encoder`` and ``text_proj`` are None,
    their weights are never allocated, the state dict has no text keys, and :meth:`encode_text`
    raises :class:`ConfigError`. For serving from a warm prompt bank (see
    :class:`~fvlm_pacs.model.predictor.Predictor`).
    """

    text_encoder: BertModel | None
    text_proj: nn.Linear | None

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        with_text: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        #: Identity of the loaded weights, stamped into outputs (``ModelInfo``); set by loaders.
        self.name: str = ""
        self.version: str = ""
        self.sha256: str = ""
        v, t = config.vision, config.text
        k = len(config.anatomies)
        self.visual_encoder = VisionTransformer3D(v)
        if with_text:
            self.text_encoder = build_text_encoder(t)
            self.text_proj = nn.Linear(t.hidden_size, config.embed_dim)
        else:
            self.text_encoder = None
            self.text_proj = None
        self.vision_projs = nn.ModuleList(
            nn.Linear(v.hidden_size, config.embed_dim) for _ in range(k)
        )
        self.query_tokens = nn.Parameter(torch.zeros(k, v.hidden_size))
        self.attention = nn.MultiheadAttention(
            v.hidden_size, config.pool_heads, dropout=config.pool_dropout, batch_first=True
        )
        self.temp = nn.Parameter(torch.tensor(config.temperature_init))
        self.histogram: HistogramEncoder | None = None
        if config.histogram_edges:
            bins = feature_count(
                config.histogram_edges, config.histogram_shell, config.histogram_volume
            ) + (lesion_feature_count() if config.histogram_lesions else 0)
            self.histogram = HistogramEncoder(k, bins, config.histogram_hidden, config.embed_dim)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        text_model_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        *,
        anatomies: tuple[str, ...] | None = None,
        config: ModelConfig | None = None,
        with_text: bool = True,
    ) -> FvlmModel:
        """Load our format (a directory) or the authors' ``torch.save`` file; see
        :func:`fvlm_pacs.model.checkpoint.load_model`. Returns the model in eval mode."""
        from .checkpoint import load_model

        return load_model(
            path,
            text_model_dir=text_model_dir,
            device=device,
            anatomies=anatomies,
            config=config,
            with_text=with_text,
        )

    # -- properties ------------------------------------------------------------------------
    @property
    def anatomies(self) -> tuple[str, ...]:
        """Anatomy names in index order (label k in the label map is ``anatomies[k - 1]``)."""
        return self.config.anatomies

    @property
    def temperature(self) -> float:
        """The learned temperature clamped to [temperature_min, temperature_max], as the release."""
        c = self.config
        return float(self.temp.detach().clamp(c.temperature_min, c.temperature_max))

    @property
    def device(self) -> torch.device:
        return self.temp.device

    @property
    def has_text(self) -> bool:
        """Whether the text tower is present (``encode_text`` works)."""
        return self.text_encoder is not None and self.text_proj is not None

    def drop_text(self) -> None:
        """Release the text tower (BERT + ``text_proj``) once it is no longer needed.

        Why: after the prompt bank holds every prompt, BERT's weights are dead memory in a
        serving process. The modules are removed from the model (the state dict loses the text
        keys) and collected, so their tensors are freed as soon as nothing else refers to them.
        Idempotent.
        """
        if self.text_encoder is None and self.text_proj is None:
            return
        self.text_encoder = None
        self.text_proj = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back, not just to torch's cache
        else:
            release_freed_heap()
        log.info("fVLM %s %s: text tower dropped", self.name, self.version)

    # -- encoders --------------------------------------------------------------------------
    def encode_tokens(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The ViT's token levels for scaled-HU ``image`` [B, 1, D, H, W] (see
        :mod:`~fvlm_pacs.model.intensity`) on this model's device and dtype."""
        param = self.temp
        image = image.to(device=param.device, dtype=self.visual_encoder.norm.weight.dtype)
        levels, _grid = self.visual_encoder(image)
        return levels

    def encode_anatomies(self, image: torch.Tensor, labelmap: torch.Tensor) -> torch.Tensor:
        """[B, K, embed_dim] L2-normalised anatomy embeddings; a NaN row where anatomy k is absent.

        ``image`` float [B, 1, D, H, W], scaled HU (:func:`~fvlm_pacs.model.intensity.scale_hu`);
        ``labelmap`` int [B, D, H, W] on the same grid (0 background, k = the k-th anatomy,
        1-based). D, H, W must be multiples of the patch. A model with ``histogram_edges`` adds
        each anatomy's HU histogram (:mod:`~fvlm_pacs.model.histogram`) before normalising, with
        ``histogram_lesions`` also its blob counts (:mod:`~fvlm_pacs.model.lesions`) on the
        model's grid (``MODEL_SPACING_MM``, where every caller resamples to).
        """
        if labelmap.shape != image.shape[:1] + image.shape[2:]:
            raise ValueError(
                f"labelmap {tuple(labelmap.shape)} must match image {tuple(image.shape)} "
                "without the channel axis"
            )
        param = self.temp
        levels = self.encode_tokens(image)
        labelmap = labelmap.to(param.device)
        selector = token_selector(labelmap, len(self.anatomies), self.config.vision.patch_size)
        extra = None
        if self.histogram is not None:
            cfg = self.config
            features = anatomy_histograms(
                image.to(param.device),
                labelmap,
                len(self.anatomies),
                cfg.histogram_edges,
                shell=cfg.histogram_shell,
                volume=cfg.histogram_volume,
            )
            if cfg.histogram_lesions:
                lesions = anatomy_lesions(image, labelmap, len(self.anatomies), MODEL_SPACING_MM)
                features = torch.cat([features, lesions.to(features.device)], dim=-1)
            extra = self.histogram(features.to(self.histogram.dtype))
        return pool_anatomies(
            levels, selector, self.query_tokens, self.attention, self.vision_projs, extra
        ).float()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[N, embed_dim] L2-normalised prompt/report embeddings (pooled -> text_proj)."""
        if self.text_encoder is None or self.text_proj is None:
            raise ConfigError(
                "encode_text: this model was loaded without its text tower (with_text=False, or "
                "dropped after the prompt bank was filled); load it with the text tower to embed "
                "text: load_model(path) / FvlmModel.from_checkpoint(path) (with_text=True, the "
                "default)"
            )
        if self.tokenizer is None:
            raise ConfigError("text_model_dir: this model was built without a tokenizer")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        return embed_texts(
            self.text_encoder,
            self.text_proj,
            self.tokenizer,
            list(texts),
            self.config.text.max_tokens,
            self.device,
            self.config.text.pooling,
        ).float()
