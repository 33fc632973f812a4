"""Reference LayerNorm over packed token rows (optionally gathered from dense rows), forward and
backward written out in float32: the torch backend of ``dtop::layer_norm`` and what the Triton
and CUDA LayerNorm kernels are tested against. Rows past T are zero in every output."""

from __future__ import annotations

import torch

from dtop_kernels.reference.gather import gather_tokens
from dtop_kernels.tokens import TokenSet


def _rows(x2d: torch.Tensor, tokens: TokenSet, gather: bool) -> torch.Tensor:
    if not gather:
        return x2d
    return gather_tokens(x2d.view(tokens.batch_size, tokens.seq_len, x2d.shape[1]), tokens)


def _acc(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _stats(xf: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = xf.mean(-1)
    var = (xf - mean[:, None]).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def layer_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tokens: TokenSet,
                   eps: float, gather: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, x_packed, mean, rstd)``: y [capacity, C] in x's dtype; x_packed the gathered rows
    with ``gather`` (else empty); mean, rstd [capacity] in float32 (float64 for float64 x). Zero past T."""
    rows = _rows(x2d, tokens, gather)
    valid = tokens.valid_slots()
    xf = rows.to(_acc(rows))
    mean, rstd = _stats(xf, eps)
    y = (xf - mean[:, None]) * rstd[:, None] * weight.to(xf.dtype) + bias.to(xf.dtype)
    zero = xf.new_zeros(())
    y = torch.where(valid[:, None], y, zero).to(x2d.dtype)
    xp = torch.where(valid[:, None], rows, rows.new_zeros(())) if gather else x2d.new_empty(0)
    return y, xp, torch.where(valid, mean, zero), torch.where(valid, rstd, zero)


def layer_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, tokens: TokenSet, dx_add: torch.Tensor | None = None,
                   gather: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx_packed [capacity, C], dweight, dbias)`` from the saved statistics; padding rows
    contribute nothing and their dx is ``dx_add`` (or 0)."""
    rows = _rows(x2d, tokens, gather)
    valid = tokens.valid_slots()[:, None]
    acc = _acc(rows)
    zero = dy.new_zeros((), dtype=acc)
    xhat = torch.where(valid, (rows.to(acc) - mean[:, None]) * rstd[:, None], zero)
    dyf = torch.where(valid, dy.to(acc), zero)
    g = dyf * weight.to(acc)
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dx = torch.where(valid, dx, zero).to(x2d.dtype)
    if dx_add is not None:
        dx = dx + dx_add
    dw = (dyf * xhat).sum(0).to(weight.dtype)
    db = dyf.sum(0).to(weight.dtype)
    return dx, dw, db
