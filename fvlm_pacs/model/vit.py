"""3D ViT image encoder with MONAI ``ViT`` parameter names and four exposed token levels.

Why not ``monai.networks.nets.ViT`` itself: its attention block needs ``einops``, its
``TransformerBlock`` (MONAI >= 1.4) always owns a ``norm_cross_attn`` LayerNorm that the released
checkpoint (trained with the MONAI 1.3 layout) does not contain, and it neither interpolates the
position embedding nor exposes the intermediate levels. This module keeps the exact parameter
names of MONAI 1.3's ViT (no CLS token, ``proj_type="conv"``, learnable position embedding)::

    patch_embedding.patch_embeddings.{weight,bias}   Conv3d, kernel = stride = patch
    patch_embedding.position_embeddings              (1, N, C) on the nominal grid
    blocks.N.norm1.{weight,bias}
    blocks.N.attn.qkv.weight (+ .bias if qkv_bias)   packed as (qkv, head, head_dim)
    blocks.N.attn.out_proj.{weight,bias}
    blocks.N.norm2.{weight,bias}
    blocks.N.mlp.linear1.{weight,bias}, blocks.N.mlp.linear2.{weight,bias}
    norm.{weight,bias}

(a config with ``stem_strides`` has ``patch_embedding.stem.stages.N.{linear,norm}.*`` instead of
the convolution: one of our own models, never the release) and computes the same function
(pre-norm blocks, exact GELU, LayerNorm eps 1e-5), using
``torch.nn.functional.scaled_dot_product_attention`` so GPUs get flash/memory-efficient kernels.

Input: one channel of scaled HU; the patch embedding clips it to the config's HU windows (one
Conv3d input channel each; the release has one, [−1150, 350], i.e. ``clip(x, 0, 1)``).
Axes: input ``[B, 1, D, H, W]`` with D = slices (z), H = rows, W = columns; the patch
(16, 16, 32) applies to (D, H, W). Tokens are ordered D-major, then H, then W (the order of
``Conv3d(...).flatten(2)``), which is also the order the anatomy selector uses.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .intensity import window_channels

log = logging.getLogger(__name__)


def _merge(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """Channels-last [B, D, H, W, C] → [B, D/sd, H/sh, W/sw, sd·sh·sw·C]: each output position
    holds its non-overlapping block of inputs, offsets major and channels minor."""
    b, d, h, w, c = x.shape
    sd, sh, sw = stride
    return (
        x.reshape(b, d // sd, sd, h // sh, sh, w // sw, sw, c)
        .permute(0, 1, 3, 5, 2, 4, 6, 7)
        .reshape(b, d // sd, h // sh, w // sw, sd * sh * sw * c)
    )


class StemStage(nn.Module):
    """One patchify stage of :class:`HierarchicalStem`: a linear map of each non-overlapping
    block, then (all stages but the last) LayerNorm over channels and GELU. The first stage
    also clips its blocks to the HU windows (after merging: one channel re-ordered, not one
    per window), channel-major within a block."""

    def __init__(
        self,
        inputs: int,
        width: int,
        stride: tuple[int, int, int],
        *,
        last: bool,
        windows: tuple[tuple[float, float], ...] | None = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.windows = windows
        self.linear = nn.Linear(inputs * math.prod(stride), width)
        self.norm = None if last else nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last [B, D, H, W, C] → [B, D/sd, H/sh, W/sw, width]."""
        blocks = _merge(x, self.stride)
        if self.windows is not None:
            blocks = window_channels(blocks.unsqueeze(-2), self.windows, dim=-2).flatten(-2)
        y = self.linear(blocks)
        return y if self.norm is None else F.gelu(self.norm(y))


class HierarchicalStem(nn.Module):
    """HU windows + a stack of small non-overlapping patchify stages with non-linearities in
    between (an "hMLP" stem), giving one token per ``patch_size`` block like the convolution.

    Why: the release's patchify convolution is linear over 16 × 16 × 32 voxels. A few calcified
    voxels of a coronary artery, or lung shifted from −850 to −950 HU in part of a lobe, move its
    output less than the block's anatomy does, and no linear map can threshold them; a stem that
    normalises and thresholds 2 × 4 × 4 blocks before merging can. Each stage's fan-in is tens to
    hundreds, so Adam trains it at the full learning rate, where the 8192-input convolution
    collapses (``TrainConfig.patch_lr_scale``). Not in the released checkpoint: a stem model is
    one of our own, its config says so.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        widths = (*cfg.stem_channels, cfg.hidden_size)
        inputs = (cfg.in_channels, *cfg.stem_channels)
        last = len(cfg.stem_strides) - 1
        self.stages = nn.ModuleList(
            StemStage(i, w, s, last=k == last, windows=cfg.hu_windows if k == 0 else None)
            for k, (i, w, s) in enumerate(zip(inputs, widths, cfg.stem_strides, strict=True))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled HU [B, 1, D, H, W] → tokens [B, D'·H'·W', hidden] in D-major order."""
        y = x.permute(0, 2, 3, 4, 1)
        for stage in self.stages:
            y = stage(y)
        return y.flatten(1, 3)


class PatchEmbedding(nn.Module):
    """HU windows + patchify + learned absolute position embedding (MONAI
    ``PatchEmbeddingBlock`` after :func:`~fvlm_pacs.model.intensity.window_channels`).

    Patchify is the release's convolution (``patch_embeddings``), or a :class:`HierarchicalStem`
    (``stem``) when the config names ``stem_strides``.
    """

    patch_embeddings: nn.Conv3d | None
    stem: HierarchicalStem | None

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.grid = cfg.grid
        self.patch_size = cfg.patch_size
        self.windows = cfg.hu_windows
        if cfg.stem_strides:
            self.patch_embeddings = None
            self.stem = HierarchicalStem(cfg)
        else:
            self.stem = None
            self.patch_embeddings = nn.Conv3d(
                cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
        n = self.grid[0] * self.grid[1] * self.grid[2]
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, cfg.hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def position_embedding_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position embedding on ``grid``: stored as is on the nominal grid, else resampled
        trilinearly, because crops differ in size from the training input."""
        pos = self.position_embeddings
        if tuple(grid) == tuple(self.grid):
            return pos
        c = pos.shape[-1]
        vol = pos.reshape(1, *self.grid, c).permute(0, 4, 1, 2, 3)
        vol = F.interpolate(vol.float(), size=grid, mode="trilinear", align_corners=False)
        return vol.permute(0, 2, 3, 4, 1).reshape(1, -1, c).to(pos.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Window and patchify scaled HU ``x`` [B, 1, D, H, W] as one matrix product with the
        Conv3d's own weights, which equals the Conv3d on ``window_channels(x)``.

        A convolution whose kernel equals its stride is a matrix product over non-overlapping
        patches; oneDNN's Conv3d with a 16 × 16 × 32 kernel is no faster than that product in
        fp32 and an order of magnitude slower in bf16 (0.8 s of a 1.6 s ViT-B crop under CPU
        autocast), so the layer keeps its parameters (the checkpoint's names) but not its kernel.
        The HU windows are applied after patchifying, so only the one input channel is
        re-ordered, not one copy per window.
        """
        b, _, size_d, size_h, size_w = x.shape
        pd, ph, pw = self.patch_size
        d, h, w = size_d // pd, size_h // ph, size_w // pw
        if self.stem is not None:
            return self.stem(x) + self.position_embedding_for((d, h, w)), (d, h, w)
        assert self.patch_embeddings is not None
        patches = (
            x.reshape(b, 1, d, pd, h, ph, w, pw)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)
            .reshape(b, d * h * w, 1, pd * ph * pw)
        )
        # [B, N, windows, voxels]: channel-major within a patch, as the Conv3d weight is laid out
        patches = window_channels(patches, self.windows, dim=2).reshape(b, d * h * w, -1)
        weight = self.patch_embeddings.weight
        tokens = F.linear(patches, weight.reshape(weight.shape[0], -1), self.patch_embeddings.bias)
        return tokens + self.position_embedding_for((d, h, w)), (d, h, w)


class SelfAttention(nn.Module):
    """Multi-head self-attention with MONAI ``SABlock`` names (``qkv``, ``out_proj``)."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # MONAI packs the qkv output as (qkv, head, head_dim): "b h (qkv l d) -> qkv b l h d".
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """MONAI ``MLPBlock``: linear1 -> exact GELU -> linear2."""

    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (MONAI ``TransformerBlock`` without cross-attention)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3D(nn.Module):
    """The fVLM image encoder. ``forward`` returns the token levels and the token grid."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
        """``image`` [B, 1, D, H, W], scaled HU (:func:`~fvlm_pacs.model.intensity.scale_hu`),
        with each of D, H, W a multiple of the patch size; the patch embedding clips it to the
        config's ``hu_windows``.

        Returns ``([after block l for l in level_blocks] + [final normed output], grid)``; every
        level is [B, N, hidden] with N = D'·H'·W'.
        """
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"image must be scaled HU [B, 1, D, H, W], got {tuple(image.shape)}")
        for size, patch, axis in zip(image.shape[2:], self.cfg.patch_size, "DHW", strict=True):
            if size % patch:
                raise ValueError(
                    f"image size along {axis} ({size}) must be a multiple of the patch size "
                    f"({patch}); pad the crop first"
                )
        x, grid = self.patch_embedding(image)
        levels: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.cfg.level_blocks:
                levels.append(x)
        levels.append(self.norm(x))
        return levels, grid
