"""``gather_tokens`` / ``scatter_tokens``: dense ``[B, N, C]`` <-> packed ``[capacity, C]``."""

from __future__ import annotations

import torch

from dtop_kernels import _checks
from dtop_kernels.backends import (
    Dispatcher,
    device_reasons_cuda,
    not_implemented,
)
from dtop_kernels.reference import gather as ref
from dtop_kernels.tokens import TokenSet

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _why_not_cuda(x: torch.Tensor, tokens: TokenSet, *rest) -> list[str]:
    r = device_reasons_cuda([x, tokens.indices])
    if x.dtype not in KERNEL_DTYPES:
        r.append(f"dtype {x.dtype} not supported (float32, float16, bfloat16)")
    return r


def _why_not_torch(*args) -> list[str]:
    return []


_gather = Dispatcher(
    "gather_tokens",
    {"torch": _why_not_torch, "triton": not_implemented("gather_tokens", "triton"),
     "cuda": _why_not_cuda},
    auto_order=("cuda", "torch"),
    unverified=("cuda",),
)
_scatter = Dispatcher(
    "scatter_tokens",
    {"torch": _why_not_torch, "triton": not_implemented("scatter_tokens", "triton"),
     "cuda": _why_not_cuda},
    auto_order=("cuda", "torch"),
    unverified=("cuda",),
)


class _GatherCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
        from dtop_kernels.cuda.gather import gather_rows

        ctx.tokens = tokens
        ctx.dense_shape = x.shape
        return gather_rows(x, tokens.indices, tokens.cu_seqlens)

    @staticmethod
    def backward(ctx, grad_packed: torch.Tensor):
        from dtop_kernels.cuda.gather import scatter_rows

        t = ctx.tokens
        grad_x = grad_packed.new_zeros(ctx.dense_shape)
        scatter_rows(grad_packed.contiguous(), t.indices, t.cu_seqlens, grad_x, add=False)
        return grad_x, None  # d/dx: packed rows back to their places; tokens: none


class _ScatterCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed: torch.Tensor, tokens: TokenSet, out: torch.Tensor, add: bool):
        from dtop_kernels.cuda.gather import scatter_rows

        ctx.tokens, ctx.add = tokens, add
        scatter_rows(packed, tokens.indices, tokens.cu_seqlens, out, add=add)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from dtop_kernels.cuda.gather import gather_rows, scatter_rows

        t = ctx.tokens
        grad_out = grad_out.contiguous()
        grad_packed = gather_rows(grad_out, t.indices, t.cu_seqlens)
        if ctx.add:
            grad_base = grad_out
        else:  # overwritten rows do not reach the old values
            grad_base = grad_out.clone()
            zeros = grad_packed.new_zeros(grad_packed.shape)
            scatter_rows(zeros, t.indices, t.cu_seqlens, grad_base, add=False)
        return grad_packed, None, grad_base, None  # packed, tokens, out, add


def gather_tokens(x: torch.Tensor, tokens: TokenSet, *, backend: str = "auto") -> torch.Tensor:
    """Pack the active tokens: ``packed[i] = x[b, n]`` for the i-th active token.

    x: [B, N, C]. Returns packed [tokens.capacity, C]; padding rows (i >= T) are zero.

    Equivalent PyTorch (exact tokens, no padding)::

        packed = x[tokens.keep_mask()]
    """
    _checks.token_set(tokens)
    _checks.float_tensor("x", x, dim=3)
    _checks.dense_matches("x", x, tokens)
    _checks.same_device(x=x, indices=tokens.indices)
    x = _checks.last_dim_contiguous(x)
    be = _gather.select(backend, x, tokens)
    if be == "cuda":
        return _GatherCuda.apply(x, tokens)
    return ref.gather_tokens(x, tokens)


def scatter_tokens(
    packed: torch.Tensor,
    tokens: TokenSet,
    out: torch.Tensor | None = None,
    *,
    add: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Write the packed rows back to their dense places, in place in ``out``.

    packed: [capacity, C]; out: [B, N, C] (zeros when None). Rows of inactive tokens are left
    untouched; ``add=True`` adds instead of overwriting (the residual form). Padding rows of
    ``packed`` are ignored. Returns ``out``. Differentiable with respect to ``packed`` and
    ``out`` (as in-place PyTorch ops are).

    Equivalent PyTorch (exact tokens)::

        out[tokens.keep_mask()] = packed          # add=False
        out[tokens.keep_mask()] += packed         # add=True
    """
    _checks.token_set(tokens)
    _checks.float_tensor("packed", packed, dim=2)
    _checks.packed_matches("packed", packed, tokens)
    if out is None:
        out = packed.new_zeros(tokens.batch_size, tokens.seq_len, packed.shape[1])
    _checks.float_tensor("out", out, dim=3)
    _checks.dense_matches("out", out, tokens)
    if out.shape[2] != packed.shape[1]:
        raise ValueError(f"packed has C={packed.shape[1]} but out has C={out.shape[2]}")
    _checks.same_dtype(packed=packed, out=out)
    _checks.same_device(packed=packed, out=out, indices=tokens.indices)
    packed = _checks.last_dim_contiguous(packed)
    be = _scatter.select(backend, packed, tokens)
    if be == "cuda":
        if not out.is_contiguous():
            raise ValueError("the cuda backend of scatter_tokens needs a contiguous `out`")
        return _ScatterCuda.apply(packed, tokens, out, add)
    return out.copy_(ref.scatter_tokens(packed, tokens, out, add=add))
