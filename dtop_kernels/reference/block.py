"""Reference pre-norm ViT layer on packed tokens (any family :mod:`dtop_kernels.layers` reads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtop_kernels.layers import LayerParts, apply_rope
from dtop_kernels.reference.attention import varlen_attention
from dtop_kernels.tokens import TokenSet


def block_packed(
    packed: torch.Tensor,
    tokens: TokenSet,
    parts: LayerParts,
    attention: Callable[..., torch.Tensor] = varlen_attention,
    norm: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    normed1: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One layer on packed tokens [capacity, C] -> [capacity, C].

    ``x + ls1(proj(attn(norm1(x)) * sigmoid(gate(norm1(x)))))`` (no gate: factor 1) then
    ``x + ls2(mlp(norm2(x)))``; each token attends to the active tokens of its own image only.
    ``parts``: the layer read by :func:`dtop_kernels.layers.read_layer`. ``attention`` has the
    signature of :func:`dtop_kernels.reference.attention.varlen_attention`; ``norm(module, x)``
    applies a LayerNorm module (default: calling it); ``normed1`` is ``norm1(packed)`` when
    already computed (e.g. fused with the gather). ``rope``: per-slot (cos, sin) [capacity, D]
    for a layer with rotary embeddings (identity rows for prefix tokens).
    """
    if norm is None:
        norm = _call
    cap, c = packed.shape
    h = parts.num_heads
    d = c // h
    if normed1 is None:
        normed1 = norm(parts.norm1, packed)
    q, k, v = parts.qkv_rows(normed1).view(cap, 3, h, d).unbind(1)
    q, k = _apply(parts, "q_norm", q), _apply(parts, "k_norm", k)
    if parts.rope:
        if rope is None:
            raise ValueError(f"a {parts.family.name} layer applies rotary position embeddings: "
                             "pass the per-slot (cos, sin)")
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    cu, m = tokens.cu_seqlens, tokens.max_seqlen
    o = _apply(parts, "norm", attention(q, k, v, cu, cu, m, m, parts.scale).reshape(cap, c))
    gate = parts.extras.get("gate")
    if gate is not None:  # timm's gated attention: sigmoid(gate(norm1(x))) scales the heads
        o = o * gate(normed1).sigmoid()
    o = parts.proj(o)
    packed = packed + (o if parts.ls1 is None else parts.ls1(o))
    o = parts.mlp(norm(parts.norm2, packed))
    return packed + (o if parts.ls2 is None else parts.ls2(o))


def _call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mod(x)


def _apply(parts: LayerParts, name: str, x: torch.Tensor) -> torch.Tensor:
    sub = parts.extras.get(name)
    return x if sub is None else sub(x)
