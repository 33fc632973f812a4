"""A minimal timm-compatible pre-norm ViT block, written here so the tests do not depend on
timm or on the package's own model code. Its forward is the dense computation (SDPA)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Far from 1 (and not timm's 1e-5) so a wrong layer scale shows in the outputs.
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``, timm attribute names."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: bool = False,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, drop)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def randomize_(block: nn.Module, gen: torch.Generator | None = None) -> nn.Module:
    """Non-trivial LayerNorm affines and biases, so every parameter matters in the outputs."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return block


def import_timm():
    """The timm module, or skip the test when it cannot be imported. Under
    ``DTOP_REQUIRE_TIMM=1`` (CI's timm environment) a missing timm fails the test instead, so the
    timm tests cannot pass there by skipping. (timm imports torchvision, which fails beside some
    torch builds with errors other than ImportError.)"""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - any import failure means: no timm here
        if os.environ.get("DTOP_REQUIRE_TIMM") == "1":
            pytest.fail(f"DTOP_REQUIRE_TIMM=1 but timm is not importable: {e!r}")
        pytest.skip(f"timm is not importable: {e!r}")
    return timm


def import_transformers():
    """The transformers module, or skip the test when it cannot be imported; under
    ``DTOP_REQUIRE_TIMM=1`` (CI's timm environment, which installs transformers too) a missing
    transformers fails the test instead."""
    try:
        import transformers
    except Exception as e:  # noqa: BLE001 - any import failure means: no transformers here
        if os.environ.get("DTOP_REQUIRE_TIMM") == "1":
            pytest.fail(f"DTOP_REQUIRE_TIMM=1 but transformers is not importable: {e!r}")
        pytest.skip(f"transformers is not importable: {e!r}")
    return transformers


def timm_block_class() -> type[nn.Module]:
    """timm's ``Block`` (see :func:`import_timm`)."""
    return import_timm().models.vision_transformer.Block
