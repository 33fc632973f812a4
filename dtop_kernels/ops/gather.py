"""``gather_tokens`` / ``scatter_tokens``: dense ``[B, N, C]`` <-> packed ``[capacity, C]``."""

from __future__ import annotations

import torch

from dtop_kernels import _checks
from dtop_kernels.backends import Dispatcher, device_reasons_cuda, device_reasons_triton
from dtop_kernels.reference import gather as ref
from dtop_kernels.tokens import TokenSet

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_reasons(t: torch.Tensor, out: torch.Tensor | None) -> list[str]:
    r = []
    if t.dtype not in KERNEL_DTYPES:
        r.append(f"dtype {t.dtype} not supported (float32, float16, bfloat16)")
    if out is not None and not out.is_contiguous():
        r.append("`out` is not contiguous")
    return r


def _why_not_cuda(t: torch.Tensor, tokens: TokenSet, out: torch.Tensor | None = None):
    return device_reasons_cuda([t, tokens.indices]) + _kernel_reasons(t, out)


def _why_not_triton(t: torch.Tensor, tokens: TokenSet, out: torch.Tensor | None = None):
    return device_reasons_triton([t, tokens.indices]) + _kernel_reasons(t, out)


def _why_not_torch(*args, **kwargs) -> list[str]:
    return []


_WHY_NOT = {"torch": _why_not_torch, "triton": _why_not_triton, "cuda": _why_not_cuda}
# Auto order: the Triton and CUDA kernels leave "auto" until they pass their GPU tests.
_gather = Dispatcher("gather_tokens", _WHY_NOT, auto_order=("cuda", "triton", "torch"),
                     unverified=("cuda", "triton"))
_scatter = Dispatcher("scatter_tokens", _WHY_NOT, auto_order=("cuda", "triton", "torch"),
                      unverified=("cuda", "triton"))


def _kernels(backend: str):
    """(gather_rows(x2d, tokens) -> packed, scatter_rows(packed, tokens, out2d, add)) of a
    kernel backend."""
    if backend == "triton":
        from dtop_kernels.triton import gather as tg

        return tg.gather_rows, tg.scatter_rows
    from dtop_kernels.cuda import gather as cg

    def dense(t2d, tokens):
        return t2d.view(tokens.batch_size, tokens.seq_len, t2d.shape[-1])

    def gather_rows(x2d, tokens):
        return cg.gather_rows(dense(x2d, tokens), tokens.indices, tokens.cu_seqlens)

    def scatter_rows(packed, tokens, out2d, add):
        cg.scatter_rows(packed, tokens.indices, tokens.cu_seqlens, dense(out2d, tokens), add=add)

    return gather_rows, scatter_rows


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tokens: TokenSet, backend: str) -> torch.Tensor:
        ctx.tokens, ctx.shape, ctx.backend = tokens, x.shape, backend
        gather_rows, _ = _kernels(backend)
        return gather_rows(x.reshape(-1, x.shape[-1]), tokens)

    @staticmethod
    def backward(ctx, grad_packed: torch.Tensor):
        _, scatter_rows = _kernels(ctx.backend)
        grad_x = grad_packed.new_zeros(ctx.shape)
        scatter_rows(grad_packed.contiguous(), ctx.tokens, grad_x.view(-1, ctx.shape[-1]), False)
        return grad_x, None, None  # x: packed grads back in place; tokens, backend: none


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, tokens: TokenSet, out: torch.Tensor, add: bool, backend: str):
        ctx.tokens, ctx.add, ctx.backend = tokens, add, backend
        _, scatter_rows = _kernels(backend)
        scatter_rows(packed, tokens, out.view(-1, out.shape[-1]), add)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gather_rows, scatter_rows = _kernels(ctx.backend)
        grad_out = grad_out.contiguous()
        grad_packed = gather_rows(grad_out.view(-1, grad_out.shape[-1]), ctx.tokens)
        if ctx.add:
            grad_base = grad_out
        else:  # overwritten rows do not reach the old values
            grad_base = grad_out.clone()
            scatter_rows(torch.zeros_like(grad_packed), ctx.tokens,
                         grad_base.view(-1, grad_base.shape[-1]), False)
        return grad_packed, None, grad_base, None, None  # packed, tokens, out, add, backend


def gather_tokens(x: torch.Tensor, tokens: TokenSet, *, backend: str = "auto",
                  check: bool | None = None) -> torch.Tensor:
    """Pack the active tokens: ``packed[i] = x[b, n]`` for the i-th active token.

    x: [B, N, C]. Returns packed [tokens.capacity, C]; padding rows (i >= T) are zero.
    ``check``: validate ``tokens`` first (one host sync; always for CPU tensors; None follows
    ``DTOP_CHECK``, see :meth:`TokenSet.validate`). Values are copied bit for bit (NaN too).

    Equivalent PyTorch (exact tokens, no padding)::

        packed = x[tokens.keep_mask()]
    """
    _checks.token_set(tokens)
    _checks.float_tensor("x", x, dim=3)
    _checks.dense_matches("x", x, tokens)
    _checks.same_device(x=x, indices=tokens.indices)
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    x = _checks.last_dim_contiguous(x)
    be = _gather.select(backend, x, tokens)
    if be != "torch":
        return _Gather.apply(x, tokens, be)
    return ref.gather_tokens(x, tokens)


def scatter_tokens(
    packed: torch.Tensor,
    tokens: TokenSet,
    out: torch.Tensor | None = None,
    *,
    add: bool = False,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """Write the packed rows back to their dense places, in place in ``out``.

    packed: [capacity, C]; out: [B, N, C] (zeros when None). Rows of inactive tokens are left
    untouched; ``add=True`` adds instead of overwriting (the residual form). Padding rows of
    ``packed`` are ignored. Returns ``out``. Differentiable with respect to ``packed`` and
    ``out`` (as in-place PyTorch ops are). ``check`` as in :func:`gather_tokens`.

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
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    packed = _checks.last_dim_contiguous(packed)
    be = _scatter.select(backend, packed, tokens, out)
    if be != "torch":
        return _Scatter.apply(packed, tokens, out, add, be)
    return out.copy_(ref.scatter_tokens(packed, tokens, out, add=add))
