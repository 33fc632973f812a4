"""The torch backend's attention on CUDA: PyTorch's own variable-length attention.

``torch.nn.attention.varlen.varlen_attn`` (flash-attention inside PyTorch, since torch 2.9)
runs directly on the packed rows and the int32 offsets, with host bounds only, so it needs no
padding and no host sync. It is used where the installed torch has it and the call fits it
(:func:`reasons`); otherwise the reference pads to the host bounds and runs SDPA.

Feature-detected, never assumed: the function itself, and whether it takes ``scale`` (added
after torch 2.9; without it the queries are pre-scaled so that its default ``D ** -0.5`` gives
the requested scale).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

HEAD_DIM_MAX = 256  # flash-attention's limit
DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def varlen_fn() -> Callable[..., torch.Tensor] | None:
    """``torch.nn.attention.varlen.varlen_attn`` when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _takes_scale(fn: Callable[..., torch.Tensor]) -> bool:
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
            ) -> list[str]:
    """Why PyTorch's varlen attention cannot run this call (empty: it can)."""
    if varlen_fn() is None:
        return [(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                 "(torch >= 2.9)")]
    r = []
    if q.device.type != "cuda":
        r.append(f"tensors on {q.device.type}: PyTorch's varlen attention runs on CUDA only")
    if q.dtype not in DTYPES:
        r.append(f"dtype {q.dtype}: PyTorch's varlen attention takes float16 / bfloat16")
    d = q.shape[-1]
    if v.shape[-1] != d or d % 8 or d > HEAD_DIM_MAX:
        r.append(f"head dims q/k {d}, v {v.shape[-1]}: flash attention needs equal head dims, "
                 f"multiples of 8, at most {HEAD_DIM_MAX}")
    if dropout_p:
        r.append("attention dropout: PyTorch's varlen attention has none")
    if not r and _capability(q.device) < (8, 0):
        r.append(f"compute capability {_capability(q.device)}: flash attention needs sm_80+")
    return r


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
) -> torch.Tensor:
    """``varlen_attention`` through PyTorch's varlen attention: out [Tq, H, D], zero past
    ``cu_seqlens_q[-1]`` (the flash kernel leaves those rows unwritten).

    With autograd, the padding rows of q, k and v are masked first: the flash backward leaves
    the padding rows of dq / dk / dv unwritten, and the mask keeps them out of the gradients.
    """
    fn = varlen_fn()
    valid_q = _valid(cu_seqlens_q, q.shape[0])
    if max_seqlen_q == 0 or max_seqlen_k == 0:  # no queries, or no image has keys
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        valid_k = _valid(cu_seqlens_k, k.shape[0])
        q = torch.where(valid_q[:, None, None], q, q.new_zeros(()))
        k = torch.where(valid_k[:, None, None], k, k.new_zeros(()))
        v = torch.where(valid_k[:, None, None], v, v.new_zeros(()))
    if _takes_scale(fn):
        out = fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale)
    else:  # its default scale is D ** -0.5
        out = fn(q * (scale * q.shape[-1] ** 0.5), k, v, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k)
    return torch.where(valid_q[:, None, None], out, out.new_zeros(()))


def _valid(cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
    """Bool [rows]: row < cu_seqlens[-1] (no host sync)."""
    return torch.arange(rows, device=cu_seqlens.device, dtype=torch.int32) < cu_seqlens[-1]
