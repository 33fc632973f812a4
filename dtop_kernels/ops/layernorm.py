"""LayerNorm over packed token rows (optionally fused with the gather from dense rows), with
autograd, on any backend: ``dtop_py::layer_norm``. Used inside ``pruned_stage``; rows past T are
zero."""

from __future__ import annotations

import torch

from dtop_kernels.ops import library
from dtop_kernels.tokens import TokenSet


def layer_norm_tokens(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tokens: TokenSet, eps: float,
    *, gather: bool = False, store_x: bool = False, backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(LayerNorm(rows), rows if store_x else None)``, both [capacity, C], zero past T.

    x2d: [B*N, C] dense rows with ``gather`` (row i is ``x2d[indices[i]]``), else packed
    [capacity, C]. ``backend``: "torch" (the float32 reference), "triton" or "cuda" (the caller
    has dispatched). ``store_x`` needs ``gather`` (the packed input is then the gathered rows).
    """
    if store_x and not gather:
        raise ValueError("store_x=True returns the gathered rows: it needs gather=True")
    y, xp, _, _ = library.call.layer_norm(x2d, weight, bias, tokens.indices, tokens.cu_seqlens,
                                          tokens.seq_len, float(eps), gather, backend)
    return y, (xp if store_x else None)
