"""Reference pre-norm ViT block on packed tokens (timm ``Block`` attribute names)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtop_kernels.reference.attention import varlen_attention
from dtop_kernels.tokens import TokenSet


def block_packed(
    packed: torch.Tensor,
    tokens: TokenSet,
    block: nn.Module,
    attention: Callable[..., torch.Tensor] = varlen_attention,
    norm: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    normed1: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block on packed tokens [capacity, C] -> [capacity, C].

    ``x + ls1(proj(attn(norm1(x)) * sigmoid(gate(norm1(x)))))`` (no gate: factor 1) then ``x + ls2(mlp(norm2(x)))``; each token attends to the
    active tokens of its own image only. ``attention`` has the signature of
    :func:`dtop_kernels.reference.attention.varlen_attention`; ``norm(module, x)`` applies a
    LayerNorm module (default: calling it); ``normed1`` is ``norm1(packed)`` when already computed
    (e.g. fused with the gather).
    """
    if norm is None:
        norm = _call
    attn = block.attn
    cap, c = packed.shape
    h = attn.num_heads
    d = c // h
    if normed1 is None:
        normed1 = norm(block.norm1, packed)
    qkv = attn.qkv(normed1).view(cap, 3, h, d)
    q, k, v = qkv.unbind(1)
    q, k = _apply(attn, "q_norm", q), _apply(attn, "k_norm", k)
    cu, m = tokens.cu_seqlens, tokens.max_seqlen
    scale = getattr(attn, "scale", d**-0.5)
    o = _apply(attn, "norm", attention(q, k, v, cu, cu, m, m, scale).reshape(cap, c))
    gate = getattr(attn, "gate", None)
    if gate is not None:  # timm's gated attention: sigmoid(gate(norm1(x))) scales the heads
        o = o * gate(normed1).sigmoid()
    o = attn.proj(o)
    packed = packed + _apply(block, "ls1", o)
    return packed + _apply(block, "ls2", block.mlp(norm(block.norm2, packed)))


def _call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mod(x)


def _apply(mod: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    sub = getattr(mod, name, None)
    return x if sub is None else sub(x)
