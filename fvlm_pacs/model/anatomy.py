"""Anatomy pooling: label map -> per-anatomy token selector -> one pooled, projected embedding.

fVLM's point is that a sentence about the lung should be compared with lung tokens only. For each
anatomy, its binary mask is max-pooled with kernel = stride = patch size (computed as an any()
over each patch of the label map), so a token is selected when any voxel of its patch belongs to
the anatomy. The selected tokens of all four ViT levels are
concatenated along the token axis; a learned query token per anatomy attends to them through one
shared multi-head attention (no residual), a per-anatomy Linear projects to the joint space, and
the result is L2-normalised. An anatomy with no selected token gets a NaN row, so a missing organ
becomes "not assessable" downstream instead of a silent score.

Parameter names follow the released checkpoint: ``query_tokens`` (K, C), ``attention.*`` (packed
``nn.MultiheadAttention``), ``vision_projs.{k}.*``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def token_selector(
    labelmap: torch.Tensor, num_anatomies: int, patch_size: tuple[int, int, int]
) -> torch.Tensor:
    """Bool [B, K, N]: token n covers at least one voxel of anatomy k (label k + 1).

    ``labelmap`` is int [B, D, H, W] (0 = background) with D, H, W multiples of ``patch_size``;
    tokens are ordered like the ViT's (D-major, then H, then W).
    """
    if labelmap.ndim != 4:
        raise ValueError(f"labelmap must be [B, D, H, W], got {tuple(labelmap.shape)}")
    for size, patch, axis in zip(labelmap.shape[1:], patch_size, "DHW", strict=True):
        if size % patch:
            raise ValueError(
                f"labelmap size along {axis} ({size}) must be a multiple of the patch size ({patch})"
            )
    b, d, h, w = labelmap.shape
    pd, ph, pw = patch_size
    # A patch-blocked view: "any voxel of the patch" is an any() over the three in-patch axes,
    # with no float copy of the volume (3x faster than max-pooling a float mask on CPU).
    blocks = labelmap.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw)
    selectors = []
    for k in range(num_anatomies):
        # One anatomy at a time keeps peak memory at one bool volume, not K of them.
        hit = (blocks == k + 1).any(dim=6).any(dim=4).any(dim=2)
        selectors.append(hit.flatten(1))
    return torch.stack(selectors, dim=1)


def pool_anatomies(
    levels: list[torch.Tensor],
    selector: torch.Tensor,
    query_tokens: torch.Tensor,
    attention: nn.MultiheadAttention,
    vision_projs: nn.ModuleList,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``levels`` (L tensors [B, N, C]) per anatomy under ``selector`` (bool [B, K, N]).

    Returns [B, K, embed_dim], L2-normalised, with NaN rows where an anatomy has no token.
    ``extra`` [B, K, embed_dim] is added to the projections before they are normalised (the
    anatomy histograms of :mod:`~fvlm_pacs.model.histogram`).
    All anatomies go through one attention call: query row k gets its own key mask, which is the
    same as K separate calls with the shared weights, in one kernel launch. A free function (not
    only a module) so that :class:`~fvlm_pacs.model.fvlm.FvlmModel` can own ``query_tokens``,
    ``attention`` and ``vision_projs`` at the top level, where the released checkpoint has them.
    """
    b, k, n = selector.shape
    if k != query_tokens.shape[0] or k != len(vision_projs):
        raise ValueError(f"selector has {k} anatomies, the model {query_tokens.shape[0]}")
    keys = torch.cat(levels, dim=1)  # [B, L*N, C]
    if keys.shape[1] != n * len(levels):
        raise ValueError(
            f"selector covers {n} tokens but the levels hold {keys.shape[1] // len(levels)}"
        )
    allowed = selector.repeat(1, 1, len(levels))  # [B, K, L*N]
    present = selector.any(dim=-1)  # [B, K]
    # A fully masked row would make the softmax NaN inside the kernel (and its gradient):
    # let it see every token and overwrite its output with NaN below.
    allowed = allowed | ~present.unsqueeze(-1)
    blocked = (~allowed).repeat_interleave(attention.num_heads, dim=0)  # [B*heads, K, L*N]
    queries = query_tokens.unsqueeze(0).expand(b, -1, -1).to(keys.dtype)
    pooled, _ = attention(queries, keys, keys, attn_mask=blocked, need_weights=False)
    emb = torch.stack([proj(pooled[:, i]) for i, proj in enumerate(vision_projs)], dim=1)
    if extra is not None:
        emb = emb + extra.to(emb.dtype)
    emb = F.normalize(emb, dim=-1)
    return torch.where(present.unsqueeze(-1), emb, torch.full_like(emb, float("nan")))


class AnatomyPooling(nn.Module):
    """Stand-alone module around :func:`pool_anatomies` (same parameter names)."""

    def __init__(
        self, num_anatomies: int, hidden: int, embed_dim: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(num_anatomies, hidden))
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.vision_projs = nn.ModuleList(
            nn.Linear(hidden, embed_dim) for _ in range(num_anatomies)
        )

    def forward(self, levels: list[torch.Tensor], selector: torch.Tensor) -> torch.Tensor:
        return pool_anatomies(
            levels, selector, self.query_tokens, self.attention, self.vision_projs
        )
