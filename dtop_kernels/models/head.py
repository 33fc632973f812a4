"""The SegViT / DToP segmentation head (one per stage, the same type at every stage).

On one stage's active tokens of each image: ``Linear(C -> d)`` + LayerNorm, K learned class
queries, a 3-layer post-norm decoder (query self-attention, cross-attention to the image's
active tokens, ReLU FFN), class logits ``Linear(d -> 2)`` ([present, no object]) and mask
logits = the last cross-attention's pre-softmax logits ``q·k / sqrt(d_head)`` averaged over heads.

Parameter names follow the official PruneHead (``input_proj``, ``proj_norm``, ``q``,
``decoder.layers.{j}.{self_attn,multihead_attn,linear1,linear2,norm1,norm2,norm3}``,
``class_embed``; ``self_attn`` with ``nn.MultiheadAttention``'s names), so checkpoints map one to
one. The official decoder layer is a ``torch.nn.TransformerDecoderLayer`` whose residual, FFN and
self-attention dropouts (0.1) are not part of the DToP specification and are left out; the cross-attention's
attention dropout (0.1, training only) is kept.

Two layouts, same math: dense tokens ``x [B, N, C]`` (every token of every image; the per-image
loop passes ``B = 1``) or packed tokens ``[capacity, C]`` with a :class:`TokenSet`, whose
cross-attention runs through :func:`dtop_kernels.varlen_attention` with ``return_logits=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtop_kernels.ops.attention import varlen_attention
from dtop_kernels.tokens import TokenSet


class SelfAttention(nn.Module):
    """Multi-head self-attention of the K class queries; ``nn.MultiheadAttention``'s parameter
    names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``). x [B, K, d] -> [B, K, d]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, kk, v = qkv.view(b, k, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, kk, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, k, d))


class CrossAttention(nn.Module):
    """Class queries attend to an image's active tokens: separate ``q``, ``k``, ``v`` Linear
    (with bias), output ``proj``, attention dropout ``attn_drop`` in training.

    Also returns the mask logits: pre-softmax ``q·k * scale`` averaged over heads.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, return_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense: query [B, K, d], memory [B, N, d] -> (out [B, K, d], logits [B, K, N] or
        None)."""
        b, k, d = query.shape
        h = self.num_heads
        q = self.q(query).view(b, k, h, d // h).transpose(1, 2)  # [B, H, K, dh]
        kk = self.k(memory).view(b, -1, h, d // h).transpose(1, 2)  # [B, H, N, dh]
        v = self.v(memory).view(b, -1, h, d // h).transpose(1, 2)
        attn = torch.matmul(q, kk.transpose(-1, -2)) * self.scale  # [B, H, K, N]
        logits = attn.mean(dim=1) if return_logits else None
        p = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
        out = torch.matmul(p, v).transpose(1, 2).reshape(b, k, d)
        return self.proj(out), logits

    def forward_packed(
        self, query: torch.Tensor, memory: torch.Tensor, tokens: TokenSet, backend: str,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed: query [B, K, d], memory [capacity, d] -> (out [B, K, d], logits [K, capacity]
        (padding columns zero) or None)."""
        b, k, d = query.shape
        h = self.num_heads
        q = self.q(query).reshape(b * k, h, d // h)
        kk = self.k(memory).view(-1, h, d // h)
        v = self.v(memory).view(-1, h, d // h)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=query.device) * k
        res = varlen_attention(
            q, kk, v, cu_q, tokens.cu_seqlens, k, tokens.max_seqlen, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0, return_logits=return_logits,
            backend=backend)
        out, logits = res if return_logits else (res, None)
        return self.proj(out.reshape(b, k, d)), logits


class DecoderLayer(nn.Module):
    """Post-norm: ``norm1(q + self_attn(q))``, ``norm2(q + cross_attn(q, tokens))``,
    ``norm3(q + linear2(relu(linear1(q))))``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.multihead_attn = CrossAttention(dim, num_heads, attn_drop)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, tokens: TokenSet | None = None,
        backend: str = "auto", return_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tgt = self.norm1(tgt + self.self_attn(tgt))
        if tokens is None:
            o, logits = self.multihead_attn(tgt, memory, return_logits)
        else:
            o, logits = self.multihead_attn.forward_packed(tgt, memory, tokens, backend,
                                                           return_logits)
        tgt = self.norm2(tgt + o)
        tgt = self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        return tgt, logits


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer`; returns the queries and the last layer's mask logits."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, attn_drop: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, attn_drop) for _ in range(num_layers))

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, tokens: TokenSet | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        last = len(self.layers) - 1
        logits = None
        for j, layer in enumerate(self.layers):
            tgt, logits = layer(tgt, memory, tokens, backend, return_logits=j == last)
        return tgt, logits


class SegHead(nn.Module):
    """One DToP / SegViT head. See the module docstring."""

    def __init__(
        self, in_dim: int, dim: int, num_heads: int, num_classes: int, num_layers: int = 3,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_proj = nn.Linear(in_dim, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.q = nn.Embedding(num_classes, dim)
        self.decoder = Decoder(dim, num_heads, num_layers, attn_drop)
        self.class_embed = nn.Linear(dim, 2)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, tokens: TokenSet | None = None, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and mask logits of the K class queries.

        x: dense [B, N, C] (all tokens active) with ``tokens=None``, or packed [capacity, C]
        with ``tokens``. Returns (class_logits [B, K, 2], mask_logits): [B, K, N] dense, or
        [K, capacity] packed (column j = slot j of ``tokens``; padding columns zero).
        """
        b = x.shape[0] if tokens is None else tokens.batch_size
        memory = self.proj_norm(self.input_proj(x))
        query = self.q.weight.repeat(b, 1, 1)  # [B, K, d] (a copy: no view of a parameter)
        query, mask_logits = self.decoder(query, memory, tokens, backend)
        return self.class_embed(query), mask_logits
