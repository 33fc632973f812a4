"""``packed_linear``: a linear layer on the active tokens only, with the gather, bias, GELU,
residual and scatter fused into the GEMM on the kernel backends."""

from __future__ import annotations

import torch

from dtop_kernels import _checks
from dtop_kernels.backends import Dispatcher, device_reasons_cuda, device_reasons_triton
from dtop_kernels.reference import linear as ref
from dtop_kernels.tokens import TokenSet

ACTIVATIONS = {"none": 0, "gelu": 1}  # codes of the kernels' ACT_NONE / ACT_GELU


def _why_not_triton(x, weight, tokens, out=None) -> list[str]:
    r = device_reasons_triton([x, tokens.indices])
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        r.append(f"dtype {x.dtype} not supported (float32, float16, bfloat16)")
    if out is not None and not out.is_contiguous():
        r.append("`out` is not contiguous")
    return r


def _why_not_cuda(x, weight, tokens, out=None) -> list[str]:
    r = device_reasons_cuda([x, tokens.indices])
    if x.dtype not in (torch.float16, torch.bfloat16):
        r.append(f"dtype {x.dtype} not supported by the CUDA linear kernel (float16, bfloat16)")
    n, k = weight.shape
    if n % 8 or k % 8:
        r.append(f"features {k} -> {n} are not multiples of 8 (16-byte rows)")
    if out is not None and not out.is_contiguous():
        r.append("`out` is not contiguous")
    return r


_dispatch = Dispatcher(
    "packed_linear",
    {"torch": lambda *a, **k: [], "triton": _why_not_triton, "cuda": _why_not_cuda},
    auto_order=("cuda", "triton", "torch"),
    unverified=("cuda", "triton"),
)


def _kernels(backend: str):
    if backend == "triton":
        from dtop_kernels.triton import linear
    else:
        from dtop_kernels.cuda import linear
    return linear


class _PackedLinear(torch.autograd.Function):
    """Kernel forward; backward: dx = dz @ W on the backend. dW = dz^T @ x and db: on the
    "triton" backend a Triton kernel whose reduction over the packed rows stops at T (read on the
    device), gathering x's rows in its operand load; on "cuda", cuBLAS over the full capacity
    (padding rows of dz are zero)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, tokens: TokenSet, act: int, out, backend: str):
        gather, scatter = x.dim() == 3, out is not None
        x2d = x.reshape(-1, x.shape[-1])
        out2d = out.view(-1, out.shape[-1]) if scatter else None
        save_pre = act != 0 and any(ctx.needs_input_grad[:4])
        y, pre = _kernels(backend).linear_fwd(x2d, weight, bias, tokens, act, residual, out2d,
                                              save_pre=save_pre, gather=gather)
        ctx.save_for_backward(x2d, weight, pre)
        ctx.tokens, ctx.act, ctx.backend = tokens, act, backend
        ctx.gather, ctx.scatter, ctx.x_shape = gather, scatter, x.shape
        ctx.has_bias, ctx.has_res = bias is not None, residual is not None
        if scatter:
            ctx.mark_dirty(out)
            return out
        return y

    @staticmethod
    def backward(ctx, dy):
        from dtop_kernels.ops.gather import _kernels as row_kernels

        x2d, weight, pre = ctx.saved_tensors
        tokens = ctx.tokens
        gather_rows, scatter_rows = row_kernels(ctx.backend)
        valid = tokens.valid_slots()[:, None]
        dy = dy.contiguous()
        dy_dense = None
        if ctx.scatter:  # the dense gradient's token rows are this layer's
            dy_dense = dy
            dy = gather_rows(dy.view(-1, dy.shape[-1]), tokens)
        dy = torch.where(valid, dy, dy.new_zeros(()))
        dz = dy
        if ctx.act == ACTIVATIONS["gelu"]:
            zf = pre.float()
            cdf = 0.5 * (1.0 + torch.erf(zf * 0.7071067811865476))
            pdf = torch.exp(-0.5 * zf * zf) * 0.3989422804014327
            dz = torch.where(valid, dy.float() * (cdf + zf * pdf), 0.0).to(dy.dtype)
        kern = _kernels(ctx.backend)
        dx = dw = db = dres = dout = None
        if ctx.needs_input_grad[0]:
            dx = kern.linear_bwd_input(dz, weight, tokens)
            if ctx.gather:  # packed rows back to their dense places
                dense = dx.new_zeros(x2d.shape)
                scatter_rows(dx, tokens, dense, False)
                dx = dense.view(ctx.x_shape)
        need_dw, need_db = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.backend == "triton" and (need_dw or need_db):  # stops at T, gathers in the load
            dw, db = kern.linear_bwd_weight(dz, x2d, tokens, gather=ctx.gather, need_dw=need_dw,
                                            need_db=need_db)
        else:
            if need_dw:
                rows = gather_rows(x2d, tokens) if ctx.gather else x2d
                dw = dz.t() @ rows
            if need_db:
                db = dz.sum(0)
        if ctx.has_res and ctx.needs_input_grad[3]:
            dres = dy
        if ctx.scatter:  # rows overwritten by the layer do not reach the old values
            dout = dy_dense.clone()
            scatter_rows(torch.zeros_like(dy), tokens, dout.view(-1, dout.shape[-1]), False)
        # x, weight, bias, residual, tokens, act, out, backend
        return dx, dw, db, dres, None, None, dout, None


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
    if be == "torch":
        y = ref.packed_linear(x, weight, bias, tokens, activation, residual, out)
        return y if out is None else out.copy_(y)
    x = _checks.last_dim_contiguous(x)
    return _PackedLinear.apply(x, weight, bias, residual, tokens, ACTIVATIONS[activation], out,
                               be)


def linear_tokens(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: TokenSet,
    backend: str, activation: str = "none", residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`packed_linear` on an already chosen kernel backend ("triton" or "cuda"), without
    the argument checks: for callers (``pruned_stage``) that have validated their inputs."""
    return _PackedLinear.apply(x, weight, bias, residual, tokens, ACTIVATIONS[activation], out,
                               backend)
