"""Plain ViT backbone parts with timm's parameter names (so timm weights load as they are and
:func:`dtop_kernels.pruned_stage` accepts the blocks).

Pre-norm blocks, LayerNorm eps 1e-6, GELU MLP, no class token in the blocks, no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. img [B, 3, H, W] -> x [B, Hg*Wg, C] (row-major grid)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (timm ``Attention`` names: ``qkv``, ``proj``, ``num_heads``,
    ``scale``). x [B, N, C] -> [B, N, C], dense, through SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(
            2, 0, 3, 1, 4)  # each [B, H, N, D]
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. No dropout and no
    drop-path, so the same module runs dense, per image, or packed via ``pruned_stage``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Position embedding of a ``dst_grid`` token grid, without the class-token slot.

    pos_embed: [1, 1 + gh*gw, C] with the class-token slot first (``src_grid = (gh, gw)``).
    Returns [1, Hg*Wg, C]: the grid part, resized bicubically (align_corners=False, no
    antialias: mmseg's ``resize_pos_embed``) when the grids differ, unchanged otherwise.
    """
    grid = pos_embed[:, 1:]
    # a symbolic grid (an image size left dynamic in torch.export) is always resized: comparing
    # it would bake a guard on the size into the graph. Bicubic resampling to the same size is
    # the identity (every output sample falls on an input sample).
    if all(type(d) is int for d in dst_grid) and tuple(src_grid) == tuple(dst_grid):
        return grid
    gh, gw = src_grid
    c = pos_embed.shape[-1]
    img = grid.reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=tuple(dst_grid), mode="bicubic", align_corners=False)
    return img.flatten(2).transpose(1, 2)


def resize_pos_embed_with_cls(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Like :func:`resize_pos_embed` but keeps the class-token slot: [1, 1 + Hg*Wg, C]."""
    return torch.cat([pos_embed[:, :1], resize_pos_embed(pos_embed, src_grid, dst_grid)], dim=1)


def init_backbone_(module: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) Linear weights, zero biases, unit
    LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
