"""Analytic FLOP count of a ViT-DToP forward at given per-image, per-stage token counts.

Counted (multiply-adds, MACs; n = tokens a stage runs on, C = backbone width, K = classes,
d = head width, N = all tokens of the image):

- patch embedding: ``N * in_chans * patch^2 * C``;
- each block: qkv ``3 n C^2``, attention ``q·k`` and ``p·v`` ``n^2 C`` each, output projection
  ``n C^2``, MLP ``n`` times its Linear layers' ``in * out`` (``2 n C * hidden`` for
  fc1 -> fc2, ``3 n C * hidden`` for a gated / SwiGLU MLP); a backbone's P prefix tokens
  (class, registers) run in every block: there ``n`` is the stage's patch tokens plus P;
- each head (on its stage's n tokens): input projection ``n C d``; per decoder layer the query
  self-attention (``4 K d^2 + 2 K^2 d``), the cross-attention (q and output projections
  ``2 K d^2``, k and v projections ``2 n d^2``, ``q·k`` and ``p·v`` ``2 K n d``) and the FFN
  (``2 K d * ffn``); class logits ``2 K d``.

Not counted: LayerNorm, softmax, GELU/ReLU, biases, residual adds, layer scale, rotary
embeddings, the position-embedding resize,
the canvas and the final upsampling (``torch.utils.flop_counter.FlopCounterMode`` counts none of
them either; fvcore would add ~0.1 GFLOPs of LayerNorm and ~0.2 GFLOPs of upsampling for ViT-B
at 512). Two conventions are reported: ``macs`` (1 multiply-add = 1 FLOP, the papers' "GFLOPs")
and ``flops`` = 2 * macs (FlopCounterMode's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dtop_kernels.layers import family_of


@dataclass
class FlopCount:
    """Per-image multiply-add counts (float64 tensors [B])."""

    macs: torch.Tensor  # [B] at the given token counts
    dense_macs: float  # one image with every token active at every stage
    breakdown: dict[str, torch.Tensor]  # term -> [B] MACs; the terms add up to ``macs``

    @property
    def flops(self) -> torch.Tensor:
        """[B], 2 FLOPs per multiply-add."""
        return 2 * self.macs

    @property
    def dense_flops(self) -> float:
        return 2 * self.dense_macs

    @property
    def saving(self) -> torch.Tensor:
        """[B] fraction of the dense MACs saved by pruning."""
        return 1 - self.macs / self.dense_macs

    def summary(self) -> str:
        """Per-image counts in one convention, stated in the first line: GFLOPs as the papers
        count them (1 multiply-add = 1 FLOP), the convention of every table in this package."""

        def g(x: float) -> str:
            return f"{x / 1e9:.4g} GFLOPs"

        convention = ("GFLOPs with 1 multiply-add = 1 FLOP (the papers' convention; "
                      "FlopCounterMode's 2 FLOPs per multiply-add doubles them)")
        lines = [convention,
                 f"dense: {g(self.dense_macs)} per image"]
        for b, (m, s) in enumerate(zip(self.macs.tolist(), self.saving.tolist())):
            lines.append(f"image {b}: {g(m)}, saving {100 * s:.1f}%")
        for k, v in self.breakdown.items():
            lines.append(f"  {k}: {g(v.mean().item())} (batch mean)")
        return "\n".join(lines)


def _block_macs(block: nn.Module, n: torch.Tensor, c: int) -> dict[str, torch.Tensor]:
    mlp = getattr(block, family_of(block).mlp)
    per_token = sum(m.in_features * m.out_features for m in mlp.modules()
                    if isinstance(m, nn.Linear))
    return {"attn_qkv": 3 * n * c * c, "attn_qk": n * n * c, "attn_pv": n * n * c,
            "attn_proj": n * c * c, "mlp": n * per_token}


def _head_macs(head: nn.Module, n: torch.Tensor, c: int) -> torch.Tensor:
    d = head.input_proj.out_features
    k = head.q.num_embeddings
    total = n * c * d + 2 * k * d
    for layer in head.decoder.layers:
        ffn = layer.linear1.out_features
        self_attn = 4 * k * d * d + 2 * k * k * d
        cross = 2 * k * d * d + 2 * n * d * d + 2 * k * n * d
        total = total + self_attn + cross + 2 * k * d * ffn
    return total


def count_flops(
    model: nn.Module,
    active_counts: torch.Tensor | Sequence[Sequence[int]] | None,
    img_size: int | tuple[int, int],
    *,
    aux_heads: bool = True,
) -> FlopCount:
    """FLOPs of ``model`` (a :class:`ViTDToP`) on ``img_size`` images whose stages ran on
    ``active_counts`` tokens (int [S, B], e.g. ``DToPOutput.active_counts``; None = dense, one
    image). ``aux_heads=False`` leaves the auxiliary heads out (a forward with
    ``aux_heads=False``; the published SegViT GFLOPs count no auxiliary head). Returns a
    :class:`FlopCount` (module docstring for the terms); ``dense_macs`` uses the same heads."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = model.patch_size
    if h % p or w % p:
        raise ValueError(f"img_size {h} x {w} is not a multiple of the patch size {p}")
    n_all = (h // p) * (w // p)
    s_num = model.num_stages
    if active_counts is None:
        counts = torch.full((s_num, 1), float(n_all), dtype=torch.float64)
    else:
        counts = torch.as_tensor(active_counts).detach().to("cpu", torch.float64)
        if counts.dim() != 2 or counts.shape[0] != s_num:
            raise ValueError(f"active_counts must be [num_stages={s_num}, B]; got "
                             f"{tuple(counts.shape)}")
        if bool((counts < 0).any()) or bool((counts > n_all).any()):
            raise ValueError(f"active_counts must lie in [0, {n_all}] for {h} x {w} images")
    macs = _count(model, counts, n_all, aux_heads)
    dense = _count(model, torch.full((s_num, 1), float(n_all), dtype=torch.float64), n_all,
                   aux_heads)
    total = sum(macs.values())
    return FlopCount(total, float(sum(dense.values())[0]), macs)


def _count(model: nn.Module, counts: torch.Tensor, n_all: int, aux_heads: bool
           ) -> dict[str, torch.Tensor]:
    c = model.embed_dim
    conv = model.patch_embed.proj
    per_patch = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    out = {"patch_embed": torch.full_like(counts[0], float(n_all * per_patch * c))}
    for s, head in enumerate(model.heads):
        n = counts[s]
        for blk in model.stage_blocks(s):
            for k, v in _block_macs(blk, n + model.num_prefix_tokens, c).items():
                out[k] = out.get(k, 0) + v
        if aux_heads or s == model.num_stages - 1:
            out[f"head_{s}"] = _head_macs(head, n, c)
    return out
