"""Every kernel entry point as a Python ``torch.library`` custom op (namespace ``dtop_py``).

The ops take tensors and host scalars only: a :class:`~dtop_kernels.TokenSet` flattens into
``indices, cu_seqlens, seq_len`` (and ``max_seqlen`` where a kernel needs the bound), and the
backend that runs the call is a string argument (``"torch"``, ``"triton"`` or ``"cuda"``),
chosen once by the public op's dispatcher. Each op has a fake (meta) implementation, so
``torch.compile`` traces through it without a graph break and without running it, and the
differentiable ones register their backward (itself made of these ops), so the compiled
backward graph holds them too. Outputs never alias inputs: an op that writes rows into a dense
tensor returns a new tensor (``base`` is copied first).

Inside an op a backend may read the offsets back to the host where that costs nothing (the
torch backend on CPU tensors, which loops over images there); that read is invisible to
``torch.compile``. On CUDA no op reads device memory on the host.

The public functions (``gather_tokens``, ``varlen_attention``, ...) check their arguments,
dispatch, and call these ops; ``pruned_stage`` dispatches once and calls them directly.
``torch.library.opcheck`` is run on every op in the test suite.

These ops run Python (the torch reference, the Triton launchers, the CUDA launchers through
pybind11), so they can never be part of a model package. The op library (``dtop::`` ops defined
in C++, :mod:`.native`) is what an exported graph holds: the call sites go through :data:`call`,
which sends the calls to ``dtop::`` while :func:`native_ops` is active (``dtop_kernels.export``
traces under it), and to the ops below otherwise.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from dtop_kernels.tokens import TokenSet

NS = "dtop_py"
ACT_NONE, ACT_GELU = 0, 1  # activation codes of every linear kernel
ACTIVATIONS = {"none": ACT_NONE, "gelu": ACT_GELU}


def _tokens(indices: Tensor, cu_seqlens: Tensor, seq_len: int, max_seqlen: int | None = None
            ) -> TokenSet:
    """The TokenSet view of the flattened arguments (host metadata checks only)."""
    return TokenSet(indices, cu_seqlens, cu_seqlens.shape[0] - 1, seq_len,
                    seq_len if max_seqlen is None else min(max_seqlen, seq_len))


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _row_kernels(backend: str):
    """``(gather_rows(x2d, tokens) -> packed, scatter_rows(packed, tokens, out2d, add))`` of a
    kernel backend: one calling convention for both."""
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


def _module(backend: str, name: str):
    """The launcher module ``name`` (attention, layernorm, linear, select) of a kernel backend;
    the Triton and CUDA modules take the same arguments."""
    if backend == "triton":
        from dtop_kernels import triton as pkg
    elif backend == "cuda":
        from dtop_kernels import cuda as pkg
    else:
        raise ValueError(f"no {backend!r} kernel module (kernel backends: triton, cuda)")
    import importlib

    return importlib.import_module(f"{pkg.__name__}.{name}")


# ---------------------------------------------------------------------- gather / scatter
@torch.library.custom_op(f"{NS}::gather", mutates_args=())
def gather(x2d: Tensor, indices: Tensor, cu_seqlens: Tensor, seq_len: int, backend: str
           ) -> Tensor:
    """Packed rows ``x2d[indices[i]]`` [capacity, C] of dense rows x2d [B*N, C]; zero past T."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    if backend == "torch":
        from dtop_kernels.reference import gather as ref

        return ref.gather_tokens(x2d.view(tokens.batch_size, seq_len, x2d.shape[1]), tokens)
    return _row_kernels(backend)[0](x2d.contiguous(), tokens)


@gather.register_fake
def _(x2d, indices, cu_seqlens, seq_len, backend):
    return x2d.new_empty(indices.shape[0], x2d.shape[1])


@torch.library.custom_op(f"{NS}::scatter", mutates_args=())
def scatter(packed: Tensor, indices: Tensor, cu_seqlens: Tensor, base: Tensor | None,
            seq_len: int, add: bool, backend: str) -> Tensor:
    """Dense rows [B*N, C]: ``base`` (zeros when None) with row ``indices[i]`` replaced by (or,
    with ``add``, increased by) ``packed[i]`` for i < T; a new tensor."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    rows, c = tokens.batch_size * seq_len, packed.shape[1]
    if backend == "torch":
        from dtop_kernels.reference import gather as ref

        dense = packed.new_zeros(tokens.batch_size, seq_len, c) if base is None \
            else base.view(tokens.batch_size, seq_len, c)
        return ref.scatter_tokens(packed, tokens, dense, add=add).reshape(rows, c)
    out = packed.new_zeros(rows, c) if base is None else base.clone(
        memory_format=torch.contiguous_format)
    _row_kernels(backend)[1](packed.contiguous(), tokens, out, add)
    return out


@scatter.register_fake
def _(packed, indices, cu_seqlens, base, seq_len, add, backend):
    return packed.new_empty((cu_seqlens.shape[0] - 1) * seq_len, packed.shape[1])


def _gather_setup(ctx, inputs, output):
    _, indices, cu_seqlens, seq_len, backend = inputs
    ctx.save_for_backward(indices, cu_seqlens)
    ctx.seq_len, ctx.backend = seq_len, backend


def _gather_backward(ctx, grad):
    indices, cu_seqlens = ctx.saved_tensors
    dx = scatter(grad.contiguous(), indices, cu_seqlens, None, ctx.seq_len, False, ctx.backend)
    return dx, None, None, None, None


def _scatter_setup(ctx, inputs, output):
    _, indices, cu_seqlens, base, seq_len, add, backend = inputs
    ctx.save_for_backward(indices, cu_seqlens)
    ctx.seq_len, ctx.add, ctx.backend = seq_len, add, backend
    ctx.has_base = base is not None


def _scatter_backward(ctx, grad):
    indices, cu_seqlens = ctx.saved_tensors
    grad = grad.contiguous()
    dpacked = gather(grad, indices, cu_seqlens, ctx.seq_len, ctx.backend)
    dbase = None
    if ctx.has_base:  # rows that were overwritten do not reach the old values
        dbase = grad if ctx.add else scatter(torch.zeros_like(dpacked), indices, cu_seqlens,
                                             grad, ctx.seq_len, False, ctx.backend)
    return dpacked, None, None, dbase, None, None, None


gather.register_autograd(_gather_backward, setup_context=_gather_setup)
scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------------- LayerNorm
@torch.library.custom_op(f"{NS}::layer_norm", mutates_args=())
def layer_norm(x2d: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, cu_seqlens: Tensor,
               seq_len: int, eps: float, gather_rows: bool, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, x_packed, mean, rstd)``: LayerNorm of the token rows, [capacity, C], zero past T.

    x2d: dense rows [B*N, C] with ``gather_rows`` (row i is ``x2d[indices[i]]``; x_packed is
    then the gathered input, else empty), or packed [capacity, C]. mean, rstd: float32
    [capacity] (float64 for float64 x; zero past T), for the backward.
    """
    tokens = _tokens(indices, cu_seqlens, seq_len)
    if backend == "torch":
        from dtop_kernels.reference import layernorm as ref

        return ref.layer_norm_fwd(x2d, weight, bias, tokens, eps, gather_rows)
    y, xp, mean, rstd = _module(backend, "layernorm").layer_norm_fwd(
        x2d, weight, bias, tokens, eps, gather_rows, gather_rows)
    return y, (xp if xp is not None else _empty(x2d)), mean, rstd


@layer_norm.register_fake
def _(x2d, weight, bias, indices, cu_seqlens, seq_len, eps, gather_rows, backend):
    cap, c = indices.shape[0], x2d.shape[1]
    y = x2d.new_empty(cap, c)
    xp = x2d.new_empty(cap, c) if gather_rows else _empty(x2d)
    stat = x2d.new_empty(cap, dtype=torch.promote_types(x2d.dtype, torch.float32))
    return y, xp, stat, stat.clone()


@torch.library.custom_op(f"{NS}::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: Tensor, dxp: Tensor, x2d: Tensor, weight: Tensor, mean: Tensor,
                        rstd: Tensor, indices: Tensor, cu_seqlens: Tensor, seq_len: int,
                        gather_rows: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; dx has x2d's shape (dense rows scattered back with
    ``gather_rows``). ``dxp``: the gradient of x_packed (empty when it has none)."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    add = dxp if dxp.numel() else None
    if backend == "torch":
        from dtop_kernels.reference import layernorm as ref

        dx, dw, db = ref.layer_norm_bwd(dy, x2d, weight, mean, rstd, tokens, add, gather_rows)
    else:
        dx, dw, db = _module(backend, "layernorm").layer_norm_bwd(
            dy.contiguous(), x2d, weight, mean, rstd, tokens, gather_rows, add)
    if gather_rows:  # packed rows back to their dense places
        dx = scatter(dx.contiguous(), indices, cu_seqlens, None, seq_len, False, backend)
    return dx, dw, db


@layer_norm_backward.register_fake
def _(dy, dxp, x2d, weight, mean, rstd, indices, cu_seqlens, seq_len, gather_rows, backend):
    return torch.empty_like(x2d), torch.empty_like(weight), torch.empty_like(weight)


def _ln_setup(ctx, inputs, output):
    x2d, weight, _, indices, cu_seqlens, seq_len, _, gather_rows, backend = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x2d, weight, mean, rstd, indices, cu_seqlens)
    ctx.seq_len, ctx.gather_rows, ctx.backend = seq_len, gather_rows, backend


def _ln_backward(ctx, dy, dxp, dmean, drstd):
    x2d, weight, mean, rstd, indices, cu_seqlens = ctx.saved_tensors
    dxp = _empty(dy) if dxp is None or not ctx.gather_rows else dxp.contiguous()
    dx, dw, db = layer_norm_backward(dy.contiguous(), dxp, x2d, weight, mean, rstd, indices,
                                     cu_seqlens, ctx.seq_len, ctx.gather_rows, ctx.backend)
    return dx, dw, db, None, None, None, None, None, None


layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


# ---------------------------------------------------------------------- attention
@torch.library.custom_op(f"{NS}::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, scale: float, return_logits: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [Tq, H, Dv], lse, logits)``; see :func:`dtop_kernels.varlen_attention`.

    lse: the kernels' fp32 [H, Tq] log-sum-exp (base 2), empty on the torch backend. logits:
    the head-mean logits [max_seqlen_q, Tk] with ``return_logits``, else empty. No dropout.
    """
    if backend == "torch":
        from dtop_kernels.reference import attention as ref

        res = ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, return_logits)
        out, logits = res if return_logits else (res, _empty(q))
        return out, _empty(q, torch.float32), logits
    kern = _module(backend, "attention")
    out, lse = kern.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale)
    if backend == "cuda":  # the Triton kernel applies the non-finite rule itself
        kern.nonfinite_rows(q, k, v, out, cu_seqlens_q, cu_seqlens_k)
    logits = kern.head_mean_logits(q, k, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale) \
        if return_logits else _empty(q)
    return out, lse, logits


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, return_logits,
      backend):
    tq, h = q.shape[:2]
    out = q.new_empty(tq, h, v.shape[-1])
    lse = q.new_empty(0 if backend == "torch" else (h, tq), dtype=torch.float32)
    logits = q.new_empty(max_seqlen_q, k.shape[0]) if return_logits else _empty(q)
    return out, lse, logits


@torch.library.custom_op(f"{NS}::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                              max_seqlen_q: int, max_seqlen_k: int, scale: float, backend: str
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the attention output (zero on padding rows); the torch backend
    recomputes the softmax in float32 on the padded layout."""
    if backend == "torch":
        from dtop_kernels.reference import attention as ref

        return ref.attention_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale)
    return _module(backend, "attention").attention_bwd(
        dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, scale)


@varlen_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, _, backend = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale, ctx.backend = max_q, max_k, scale, backend


def _attn_backward(ctx, dout, dlse, dlogits):
    from dtop_kernels.reference import attention as ref

    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_attention_backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                           ctx.max_q, ctx.max_k, ctx.scale, ctx.backend)
    if dlogits is not None and dlogits.numel():
        dq2, dk2 = ref.head_mean_logits_backward(dlogits, q, k, cu_k, ctx.max_q, ctx.max_k,
                                                 ctx.scale)
        dq, dk = dq + dq2, dk + dk2
    return dq, dk, dv, None, None, None, None, None, None, None


varlen_attention.register_autograd(_attn_backward, setup_context=_attn_setup)


# ---------------------------------------------------------------------- packed linear
@torch.library.custom_op(f"{NS}::packed_linear", mutates_args=())
def packed_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                  base: Tensor | None, indices: Tensor, cu_seqlens: Tensor, seq_len: int,
                  act: int, gather_rows: bool, save_pre: bool, backend: str
                  ) -> tuple[Tensor, Tensor]:
    """``(y, pre)`` on a kernel backend: ``y = act(x_i @ weight^T + bias) + residual_i`` for
    the token rows, packed [capacity, N_out] (zero past T), or, given ``base`` (dense rows
    [B*N, N_out]), a copy of ``base`` with each token's row replaced (the scatter in the
    epilogue). x2d: packed [capacity, K], or dense rows [B*N, K] with ``gather_rows`` (the
    gather in the operand load). pre: the pre-activation [capacity, N_out] with ``save_pre``,
    else empty."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    out2d = None if base is None else base.clone(memory_format=torch.contiguous_format)
    y, pre = _module(backend, "linear").linear_fwd(
        x2d.contiguous(), weight, bias, tokens, act, residual, out2d, save_pre=save_pre,
        gather=gather_rows)
    return y, (pre if pre is not None else _empty(x2d))


@packed_linear.register_fake
def _(x2d, weight, bias, residual, base, indices, cu_seqlens, seq_len, act, gather_rows,
      save_pre, backend):
    cap, n = indices.shape[0], weight.shape[0]
    y = x2d.new_empty(cap, n) if base is None else torch.empty_like(base)
    return y, (x2d.new_empty(cap, n) if save_pre else _empty(x2d))


@torch.library.custom_op(f"{NS}::linear_backward_input", mutates_args=())
def linear_backward_input(dz: Tensor, weight: Tensor, indices: Tensor, cu_seqlens: Tensor,
                          seq_len: int, backend: str) -> Tensor:
    """``dz @ weight`` on the token rows [capacity, K], zero past T (kernel backends)."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    return _module(backend, "linear").linear_bwd_input(dz, weight, tokens)


@linear_backward_input.register_fake
def _(dz, weight, indices, cu_seqlens, seq_len, backend):
    return dz.new_empty(dz.shape[0], weight.shape[1])


@torch.library.custom_op(f"{NS}::linear_backward_weight", mutates_args=())
def linear_backward_weight(dz: Tensor, x2d: Tensor, indices: Tensor, cu_seqlens: Tensor,
                           seq_len: int, gather_rows: bool, backend: str
                           ) -> tuple[Tensor, Tensor]:
    """``(dW = dz^T @ x, db = sum dz)`` over the token rows i < T only (the Triton kernel stops
    at T on the device; x's rows gathered in its operand load with ``gather_rows``)."""
    tokens = _tokens(indices, cu_seqlens, seq_len)
    if backend == "triton":
        return _module(backend, "linear").linear_bwd_weight(
            dz, x2d.contiguous(), tokens, gather=gather_rows, need_dw=True, need_db=True)
    # cuBLAS over the full capacity: padding rows of dz are zero
    rows = gather(x2d, indices, cu_seqlens, seq_len, backend) if gather_rows else x2d
    return dz.t() @ rows, dz.sum(0)


@linear_backward_weight.register_fake
def _(dz, x2d, indices, cu_seqlens, seq_len, gather_rows, backend):
    return dz.new_empty(dz.shape[1], x2d.shape[1]), dz.new_empty(dz.shape[1])


def _linear_setup(ctx, inputs, output):
    x2d, weight, bias, residual, base, indices, cu_seqlens, seq_len, act, gather_rows, _, \
        backend = inputs
    _, pre = output
    ctx.save_for_backward(x2d, weight, pre, indices, cu_seqlens)
    ctx.seq_len, ctx.act, ctx.gather_rows, ctx.backend = seq_len, act, gather_rows, backend
    ctx.has_bias, ctx.has_res, ctx.scatter = bias is not None, residual is not None, \
        base is not None


def _linear_backward(ctx, dy, dpre):
    x2d, weight, pre, indices, cu_seqlens = ctx.saved_tensors
    n = ctx.seq_len
    # the rule of TokenSet.valid_slots, written on the tensors: this formula is traced with
    # symbolic shapes, where a TokenSet (host ints) cannot be built
    valid = (torch.arange(indices.shape[0], device=indices.device, dtype=torch.int32)
             < cu_seqlens[-1])[:, None]
    dy = dy.contiguous()
    dy_dense = None
    if ctx.scatter:  # the dense gradient's token rows are this layer's
        dy_dense = dy
        dy = gather(dy, indices, cu_seqlens, n, ctx.backend)
    dy = torch.where(valid, dy, dy.new_zeros(()))
    dz = dy
    if ctx.act == ACT_GELU:
        zf = pre.float()
        cdf = 0.5 * (1.0 + torch.erf(zf * 0.7071067811865476))
        pdf = torch.exp(-0.5 * zf * zf) * 0.3989422804014327
        dz = torch.where(valid, dy.float() * (cdf + zf * pdf), 0.0).to(dy.dtype)
    dx = linear_backward_input(dz, weight, indices, cu_seqlens, n, ctx.backend)
    if ctx.gather_rows:  # packed rows back to their dense places
        dx = scatter(dx, indices, cu_seqlens, None, n, False, ctx.backend)
    dw, db = linear_backward_weight(dz, x2d, indices, cu_seqlens, n, ctx.gather_rows,
                                    ctx.backend)
    dres = dy if ctx.has_res else None
    dbase = None
    if ctx.scatter:  # rows overwritten by the layer do not reach the old values
        dbase = scatter(torch.zeros_like(dy), indices, cu_seqlens, dy_dense, n, False,
                        ctx.backend)
    return (dx, dw, db if ctx.has_bias else None, dres, dbase, None, None, None, None, None,
            None, None)


packed_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------------- DToP selection
@torch.library.custom_op(f"{NS}::select", mutates_args=())
def select(class_logits: Tensor, mask_logits: Tensor, indices: Tensor, cu_seqlens: Tensor,
           seq_len: int, max_seqlen: int, threshold: float, top_k: int, backend: str
           ) -> tuple[Tensor, Tensor, Tensor]:
    """The DToP exit rule: ``(indices, cu_seqlens)`` of the tokens that stay (same capacity)
    and the bool [B, N] exit mask; see :func:`dtop_kernels.dtop_select`. Not differentiable."""
    tokens = _tokens(indices, cu_seqlens, seq_len, max_seqlen)
    if backend == "torch":
        from dtop_kernels.reference import select as ref

        new, exited = ref.dtop_select(class_logits, mask_logits, tokens, threshold, top_k)
    else:
        new, exited = _module(backend, "select").dtop_select(class_logits, mask_logits, tokens,
                                                            threshold, top_k)
    return new.indices, new.cu_seqlens, exited


@select.register_fake
def _(class_logits, mask_logits, indices, cu_seqlens, seq_len, max_seqlen, threshold, top_k,
      backend):
    b = cu_seqlens.shape[0] - 1
    return (torch.empty_like(indices), torch.empty_like(cu_seqlens),
            indices.new_empty(b, seq_len, dtype=torch.bool))


OPS = (gather, scatter, layer_norm, layer_norm_backward, varlen_attention,
       varlen_attention_backward, packed_linear, linear_backward_input, linear_backward_weight,
       select)


# ---------------------------------------------------------------------- routing to dtop::
# The backends whose calls the op library's ``dtop::`` ops take over under native_ops(): the
# torch reference (its CPU implementation in C++) and, on CUDA, the CUDA kernels.
NATIVE_BACKENDS = ("torch", "cuda")
_native_depth = 0


@contextlib.contextmanager
def native_ops():
    """While active, :data:`call` runs the op library's ``dtop::`` ops (loaded on entry) for the
    torch and CUDA backends, and the ``dtop_triton::`` triton_ops for the Triton backend: what
    ``dtop_kernels.export`` traces under. Not thread-safe (export is not either)."""
    global _native_depth
    from dtop_kernels.ops import native

    native.load()
    _native_depth += 1
    try:
        yield
    finally:
        _native_depth -= 1


def _routed(py_op, name: str):
    def run(*args):
        if _native_depth and args[-1] in NATIVE_BACKENDS:
            return getattr(torch.ops.dtop, name)(*args[:-1])
        if _native_depth and args[-1] == "triton":
            from dtop_kernels.ops import triton_ops

            return triton_ops.op(name)(*args[:-1])
        return py_op(*args)

    run.__name__ = name
    run.__doc__ = f"``{NS}::{name}`` (last argument: the backend), or under :func:`native_ops` " \
        f"``dtop::{name}`` (torch, cuda) / ``dtop_triton::{name}`` (triton), the same " \
        "arguments without it."
    return run


class _Calls:
    """The ops as the public functions call them: ``call.gather(..., backend)``."""

    def __init__(self) -> None:
        for op in (gather, scatter, layer_norm, varlen_attention, packed_linear, select):
            name = op._name.split("::")[-1]
            setattr(self, name, _routed(op, name))


call = _Calls()
