"""LayerNorm over packed token rows (optionally fused with the gather from dense), with
autograd, on the Triton or CUDA kernels. Used inside ``pruned_stage``; rows past T are zero."""

from __future__ import annotations

import torch

from dtop_kernels.tokens import TokenSet


def _kernels(backend: str):
    if backend == "triton":
        from dtop_kernels.triton import layernorm
    else:
        from dtop_kernels.cuda import layernorm
    return layernorm


class _LayerNormTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, tokens: TokenSet, eps: float, gather: bool,
                store_x: bool, backend: str):
        y, xp, mean, rstd = _kernels(backend).layer_norm_fwd(x2d, weight, bias, tokens, eps,
                                                             gather, store_x)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.tokens, ctx.gather, ctx.backend = tokens, gather, backend
        return y, xp

    @staticmethod
    def backward(ctx, dy, dxp):
        x2d, weight, mean, rstd = ctx.saved_tensors
        tokens = ctx.tokens
        dx, dw, db = _kernels(ctx.backend).layer_norm_bwd(dy, x2d, weight, mean, rstd, tokens,
                                                          ctx.gather, dxp)
        if ctx.gather:  # packed rows back to their dense places
            from dtop_kernels.ops.gather import _kernels as row_kernels

            _, scatter_rows = row_kernels(ctx.backend)
            dense = torch.zeros_like(x2d)
            scatter_rows(dx.contiguous(), tokens, dense, False)
            dx = dense
        # x2d, weight, bias, tokens, eps, gather, store_x, backend
        return dx, dw, db, None, None, None, None, None


def layer_norm_tokens(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tokens: TokenSet, eps: float,
    *, gather: bool = False, store_x: bool = False, backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(LayerNorm(rows), rows if store_x else None)``, both [capacity, C], zero past T.

    x2d: [B*N, C] dense rows with ``gather`` (row i is ``x2d[indices[i]]``), else packed
    [capacity, C]. ``backend``: "triton" or "cuda" (the caller has dispatched).
    """
    return _LayerNormTokens.apply(x2d, weight, bias, tokens, eps, gather, store_x, backend)
