"""``gather_tokens`` / ``scatter_tokens``: dense ``[B, N, C]`` <-> packed ``[capacity, C]``."""

from __future__ import annotations

import torch

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register
from dtop_kernels.ops import library
from dtop_kernels.tokens import TokenSet


def _why_not_cuda(t: torch.Tensor, tokens: TokenSet, out: torch.Tensor | None = None):
    r = cuda.tensor_reasons([t, tokens.indices])
    if t.dtype not in cuda.DTYPES:
        r.append(f"dtype {t.dtype} not supported (float32, float16, bfloat16)")
    return r


def _why_not_triton(t: torch.Tensor, tokens: TokenSet, out: torch.Tensor | None = None):
    return triton.device_reasons([t, tokens.indices]) + triton.dtype_reasons(t.dtype)


def _why_not_torch(*args, **kwargs) -> list[str]:
    return []


_WHY_NOT = {"torch": _why_not_torch, "triton": _why_not_triton, "cuda": _why_not_cuda}
_gather = register(Dispatcher("gather_tokens", _WHY_NOT,
                              auto_order=("cuda", "triton", "torch")))
_scatter = register(Dispatcher("scatter_tokens", _WHY_NOT,
                               auto_order=("cuda", "triton", "torch")))


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
    return library.call.gather(x.reshape(-1, x.shape[-1]), tokens.indices, tokens.cu_seqlens,
                               tokens.seq_len, be)


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
    given = out is not None
    if out is None:
        out = packed.new_empty(tokens.batch_size, tokens.seq_len, packed.shape[1])
    _checks.float_tensor("out", out, dim=3)
    _checks.dense_matches("out", out, tokens)
    if out.shape[2] != packed.shape[1]:
        raise ValueError(f"packed has C={packed.shape[1]} but out has C={out.shape[2]}")
    _checks.same_dtype(packed=packed, out=out)
    _checks.same_device(packed=packed, out=out, indices=tokens.indices)
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    packed = _checks.last_dim_contiguous(packed)
    be = _scatter.select(backend, packed, tokens, out)
    res = library.call.scatter(packed, tokens.indices, tokens.cu_seqlens,
                               out.reshape(-1, out.shape[-1]) if given else None,
                               tokens.seq_len, add, be).view(out.shape)
    return out.copy_(res) if given else res
