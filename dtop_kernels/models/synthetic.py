"""Synthetic inputs and synthesized pruning for tests and demos (no data, no trained weights).

A randomly initialized model is unsure about every token (present probability ~0.5, mask
logits ~0), so nothing would exit. :func:`make_heads_confident_` scales its heads so that some
tokens pass a threshold; :func:`synthetic_images` draws scenes of flat shapes, a gradient and
per-image noise, which then prune differently from image to image.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def make_heads_confident_(model: nn.Module, present_bias: float = 3.0,
                          logit_scale: float = 30.0) -> nn.Module:
    """In place: every head says "present" (class-logit bias ``[present_bias, 0]``) and its
    last cross-attention's query projection is scaled by ``logit_scale``, spreading the mask
    logits so that some tokens are confident. Returns the model."""
    for head in model.heads:
        head.class_embed.bias.copy_(torch.tensor([present_bias, 0.0]))
        head.decoder.layers[-1].multihead_attn.q.weight.mul_(logit_scale)
    return model


def synthetic_images(batch: int, height: int, width: int, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[batch, 3, height, width] normalized-looking images (values around [-2, 2]): a colour
    gradient, 2 to 4 flat rectangles and discs, and Gaussian noise whose strength grows with the
    image index, so images differ in difficulty."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    out = torch.empty(batch, 3, height, width)
    for b in range(batch):
        c0, c1 = torch.rand(3, 1, 1, generator=g) * 2 - 1, torch.rand(3, 1, 1, generator=g)
        img = c0 + c1 * (xs + ys)[None] / 2
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([2, 2, 0.6]) -
                         torch.tensor([1, 1, -0.2])).tolist()
            if torch.rand(1, generator=g) < 0.5:
                shape = ((ys - cy).abs() < r) & ((xs - cx).abs() < r * 1.3)
            else:
                shape = (ys - cy) ** 2 + (xs - cx) ** 2 < r * r
            img = torch.where(shape[None], torch.rand(3, 1, 1, generator=g) * 4 - 2, img)
        noise = 0.05 + 0.6 * b / max(batch - 1, 1)
        out[b] = img + noise * torch.randn(3, height, width, generator=g)
    return out.to(dtype)
