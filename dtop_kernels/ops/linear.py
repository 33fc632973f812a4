"""``packed_linear``: a linear layer on the active tokens only, with the gather, bias, GELU,
residual and scatter fused into the GEMM on the kernel backends."""

from __future__ import annotations

import torch

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register
from dtop_kernels.ops import library
from dtop_kernels.tokens import TokenSet

ACTIVATIONS = library.ACTIVATIONS


def _why_not_triton(x, weight, tokens, out=None) -> list[str]:
    return triton.device_reasons([x, tokens.indices]) + triton.dtype_reasons(x.dtype)


def _why_not_cuda(x, weight, tokens, out=None) -> list[str]:
    r = cuda.tensor_reasons([x, tokens.indices]) + cuda.mma_reasons(x.dtype)
    n, k = weight.shape
    if n % 8 or k % 8:
        r.append(f"features {k} -> {n} are not multiples of 8 (16-byte rows)")
    return r


_dispatch = register(Dispatcher(
    "packed_linear",
    {"torch": lambda *a, **k: [], "triton": _why_not_triton, "cuda": _why_not_cuda},
    auto_order=("cuda", "triton", "torch"),
))


def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: TokenSet,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """``activation(x @ weight^T + bias) + residual`` on the active tokens only.

    x: packed [capacity, K], or dense [B, N, K] whose token rows are gathered (inside the GEMM's
    operand load on the kernel backends). weight: [N_out, K]; bias: [N_out] or None;
    activation: "none" or "gelu" (exact, erf); residual: packed [capacity, N_out] or None.
    out: None -> returns packed [capacity, N_out], zero past T; or a contiguous dense
    [B, N, N_out] tensor whose token rows are overwritten in place (the scatter, inside the GEMM's
    epilogue on the kernel backends) and which is returned. Rows past T cost no FLOPs on the
    kernel backends. Differentiable in x, weight, bias, residual and out. ``check``: validate
    ``tokens`` (one host sync; always for CPU tensors; None follows ``DTOP_CHECK``). Non-finite
    values propagate as in IEEE arithmetic, row by row.

    Equivalent PyTorch, per image b with keep mask m_b::

        y = act(x[b, m_b] @ weight.T + bias) + residual_b;  out[b, m_b] = y
    """
    _checks.token_set(tokens)
    _checks.float_tensor("x", x)
    _checks.float_tensor("weight", weight, dim=2)
    if x.dim() == 3:
        _checks.dense_matches("x", x, tokens)
    elif x.dim() == 2:
        _checks.packed_matches("x", x, tokens)
    else:
        raise ValueError(f"x must be packed [capacity, K] or dense [B, N, K]; got "
                         f"{_checks.describe(x)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"weight [N_out, K] = {tuple(weight.shape)} does not match x's K = "
                         f"{x.shape[-1]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        tensors["bias"] = _checks.tensor("bias", bias, dim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have N_out = {n} entries; got {_checks.describe(bias)}")
    if residual is not None:
        tensors["residual"] = _checks.tensor("residual", residual, dim=2)
        if tuple(residual.shape) != (tokens.capacity, n):
            raise ValueError(f"residual must be packed [capacity, N_out] = "
                             f"{(tokens.capacity, n)}; got {_checks.describe(residual)}")
    if out is not None:
        tensors["out"] = _checks.tensor("out", out, dim=3)
        _checks.dense_matches("out", out, tokens)
        if out.shape[-1] != n:
            raise ValueError(f"out must be dense [B, N, N_out = {n}]; got {_checks.describe(out)}")
    _checks.same_dtype(**tensors)
    _checks.same_device(indices=tokens.indices, **tensors)
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    be = _dispatch.select(backend, x, weight, tokens, out)
    return linear_tokens(x, weight, bias, tokens, be, activation, residual, out)


def linear_tokens(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: TokenSet,
    backend: str, activation: str = "none", residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None, *, inplace: bool = True, zero_padding: bool = True,
) -> torch.Tensor:
    """:func:`packed_linear` on an already chosen backend, without the argument checks: for
    callers (``pruned_stage``) that have validated their inputs and dispatched once. With
    ``inplace=False`` a dense ``out`` is left as it is and the result is a new tensor. With
    ``zero_padding=False`` the torch backend leaves the packed rows past T as they come (no
    masking pass: for callers to whom padding rows carry no meaning; the scatter ignores them).

    The torch backend is PyTorch ops around the gather / scatter ops (cuBLAS on the packed rows
    on CUDA: ``addmm`` with the bias fused); the kernel backends run ``dtop::packed_linear``.
    """
    gather = x.dim() == 3
    x2d = x.reshape(-1, x.shape[-1])
    base = None if out is None else out.reshape(-1, out.shape[-1])
    idx, cu, n = tokens.indices, tokens.cu_seqlens, tokens.seq_len
    if backend == "torch":
        rows = library.call.gather(x2d, idx, cu, n, "torch") if gather else x2d
        y = torch.nn.functional.linear(rows, weight, bias)
        if activation == "gelu":
            y = torch.nn.functional.gelu(y)
        if residual is not None:
            y = y + residual
        if zero_padding:
            y = torch.where(tokens.valid_slots()[:, None], y, y.new_zeros(()))
        if base is not None:
            y = library.call.scatter(y, idx, cu, base, n, False, "torch")
    else:
        act = ACTIVATIONS[activation]
        save_pre = act != library.ACT_NONE and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual, out))
        y, _ = library.call.packed_linear(x2d, weight, bias, residual, base, idx, cu, n, act,
                                          gather, save_pre, backend)
    if out is None:
        return y
    y = y.view(out.shape)
    return out.copy_(y) if inplace else y
