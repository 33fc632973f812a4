"""Reference packed linear layer: ``act(x @ W^T + b) + residual`` on the token rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtop_kernels.reference.gather import gather_tokens, scatter_tokens
from dtop_kernels.tokens import TokenSet


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: TokenSet,
    activation: str = "none", residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: packed [capacity, K] or dense [B, N, K] (its token rows are taken); weight [N_out, K].

    Returns packed [capacity, N_out] with zero rows past T, or, given dense ``out``
    [B, N, N_out], a new tensor equal to ``out`` with the token rows replaced.
    """
    rows = gather_tokens(x, tokens) if x.dim() == 3 else x
    y = F.linear(rows, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual
    y = torch.where(tokens.valid_slots()[:, None], y, y.new_zeros(()))
    return y if out is None else scatter_tokens(y, tokens, out)
