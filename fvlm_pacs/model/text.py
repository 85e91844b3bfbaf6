"""Text side: BERT without token-type embedding, [CLS] -> Linear -> L2 norm, local tokenizer.

The released model was trained with a BERT whose embeddings are word + position only (no
token-type term, no pooler). Hugging Face ``BertModel`` always adds ``token_type_embeddings``
(row 0 when no ids are given), which would shift every embedding. We replace that sub-module with
:class:`NoTokenType`, which has no parameters and returns zeros: the output is exactly that of a
BERT whose token-type table is zero, and the state dict has no ``token_type_embeddings`` key, as in
the released checkpoint.

Everything loads from local folders only (config.json, vocab.txt / tokenizer.json); nothing is
ever downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from ..errors import ConfigError
from .config import TextConfig

log = logging.getLogger(__name__)


class NoTokenType(nn.Module):
    """Stands in for ``BertEmbeddings.token_type_embeddings``: adds nothing, owns no weights."""

    zero: torch.Tensor

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        # Non-persistent: follows .to(device/dtype) with the model, never enters the state dict.
        self.register_buffer("zero", torch.zeros(1), persistent=False)

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.zero.expand(*token_type_ids.shape, self.hidden)


def bert_config(cfg: TextConfig) -> BertConfig:
    """A Hugging Face config for ``cfg`` (dropout acts in training only)."""
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        type_vocab_size=1,
    )


def build_text_encoder(cfg: TextConfig) -> BertModel:
    """BertModel without pooler and with the token-type embedding bypassed."""
    model = BertModel(bert_config(cfg), add_pooling_layer=False)
    model.embeddings.token_type_embeddings = NoTokenType(cfg.hidden_size)  # type: ignore[assignment]
    return model


def text_config_from_dir(text_model_dir: str | Path, max_tokens: int = 384) -> TextConfig:
    """Read the dimensions of a local BERT folder's ``config.json`` (e.g. CXR-BERT).

    Parsed by hand rather than via ``BertConfig.from_pretrained`` because CXR-BERT declares its
    own ``model_type`` and remote code, which we neither need nor allow.
    """
    path = Path(text_model_dir) / "config.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"text_model_dir: cannot read {path}: {exc}") from exc
    try:
        max_pos = int(data.get("max_position_embeddings", 512))
        return TextConfig(
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data.get("hidden_size", 768)),
            num_layers=int(data.get("num_hidden_layers", 12)),
            num_heads=int(data.get("num_attention_heads", 12)),
            intermediate_size=int(data.get("intermediate_size", 3072)),
            max_position_embeddings=max_pos,
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(data.get("pad_token_id", 0)),
            hidden_act=str(data.get("hidden_act", "gelu")),
            max_tokens=min(max_tokens, max_pos),
            dropout=float(data.get("hidden_dropout_prob", 0.1)),
        )
    except KeyError as exc:
        raise ConfigError(f"text_model_dir: {path} lacks {exc.args[0]!r}") from exc


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Lower-case WordPiece tokenizer from a local folder (tokenizer.json or vocab.txt)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise ConfigError(f"text_model_dir: {folder} has neither tokenizer.json nor vocab.txt")
    # BertTokenizerFast is an alias of BertTokenizer in transformers 5; looked up by name so
    # the code reads the same on 4.x and type checkers do not trip over the alias.
    fast = getattr(transformers, "BertTokenizerFast")  # noqa: B009
    tok: PreTrainedTokenizerBase = fast.from_pretrained(
        str(folder), local_files_only=True, do_lower_case=True
    )
    return tok


def embed_texts(
    encoder: BertModel,
    proj: nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_tokens: int,
    device: torch.device,
    pooling: str = "cls",
) -> torch.Tensor:
    """[N, embed_dim] L2-normalised embeddings of ``texts``: the last layer's [CLS], or with
    ``pooling="mean"`` its mean over the non-padding tokens (see ``TextConfig.pooling``)."""
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    mask = batch["attention_mask"].to(device)
    hidden = encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    else:
        pooled = hidden[:, 0]
    return nn.functional.normalize(proj(pooled), dim=-1)
