"""The op library: ``libdtop_ops.so``, the ``dtop::`` ops defined and implemented in C++.

The library (``csrc/oplib/``) is built by ``pip install .`` against PyTorch's stable ABI only
and links to nothing of PyTorch's C++ API (only to the C functions of its shim): it loads into
any PyTorch that keeps that ABI, from Python (``torch.ops.load_library``) and from C++ (an
AOTInductor package loaded by ``AOTIModelPackageLoader``). It defines one schema per op (gather,
scatter, layer_norm, varlen_attention, packed_linear, select) and registers their CPU
implementations (built with the host C++ compiler) and, when the package is built with nvcc
against a CUDA build of torch, their CUDA implementations over the kernels of ``csrc/`` (built by
CMake). This module registers each op's fake (meta) implementation, which export and
``torch.compile`` trace with, and the autograd formulas of the differentiable ones (written with
these ops and PyTorch operators, so a differentiated graph holds no Python op either).

A package exported by :func:`dtop_kernels.export` calls these ops; to run it, load this library
first (:func:`ops_library_path` says where it is; a process without ``dtop_kernels`` can copy it).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

#: The ops the library defines (``torch.ops.dtop.<name>``).
OPS = ("gather", "scatter", "layer_norm", "varlen_attention", "packed_linear", "select")
LIBRARY_NAME = "libdtop_ops.so"
_loaded: str | None = None


class OpsLibraryError(RuntimeError):
    """The op library is missing or cannot be loaded; the message says why and what to do."""


def _build_reason() -> str:
    info = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        reason = json.loads(info.read_text()).get("ops_library_reason", "")
    except (OSError, ValueError):
        reason = ""
    return reason or "the package was installed without it"


def ops_library_path() -> str:
    """Absolute path of the op library (``libdtop_ops.so``) to ship beside an exported model
    package; ``DTOP_OPS_LIBRARY`` overrides it. Raises :class:`OpsLibraryError` (with the build's
    reason) when the install has none."""
    env = os.environ.get("DTOP_OPS_LIBRARY", "").strip()
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "lib" / LIBRARY_NAME
    if not path.is_file():
        what = f"DTOP_OPS_LIBRARY={env} is not a file" if env else \
            f"no op library at {path}: {_build_reason()}"
        raise OpsLibraryError(f"{what}. Reinstall with a C++ compiler on PATH (pip install .) "
                              "to build it; exporting models needs it.")
    return str(path)


def library_version(path: str | None = None) -> str:
    """The version string the library was built with (read without loading its ops)."""
    lib = ctypes.CDLL(path or ops_library_path())
    fn = lib.dtop_ops_library_version
    fn.restype = ctypes.c_char_p
    return fn().decode()


def loaded() -> bool:
    return _loaded is not None


def load() -> str:
    """Load the op library once and register the fake implementations; returns its path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = ops_library_path()
    if not _defined():  # not loaded by this process yet (by us or by someone else)
        try:
            torch.ops.load_library(path)
        except OSError as e:
            raise OpsLibraryError(f"cannot load the op library {path}: {e.__cause__ or e}. It "
                                  f"needs PyTorch >= 2.10 (this is {torch.__version__}); "
                                  "reinstall the package to rebuild it.") from e
    _register_fakes()
    _register_autograd()
    _loaded = path
    return path


def has_cuda_kernels() -> bool:
    """Whether the loaded op library registers the ops' CUDA implementations."""
    load()
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dtop::{op}", "CUDA")
               for op in OPS)


def _defined() -> bool:
    try:
        torch.ops.dtop.gather.default  # noqa: B018 - raises when the schema is absent
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_fakes() -> None:
    def fake(name):
        return torch.library.register_fake(f"dtop::{name}", lib=_FAKE_LIB)

    @fake("gather")
    def _(x2d, indices, cu_seqlens, seq_len):
        return x2d.new_empty(indices.shape[0], x2d.shape[1])

    @fake("scatter")
    def _(packed, indices, cu_seqlens, base, seq_len, add):
        return packed.new_empty((cu_seqlens.shape[0] - 1) * seq_len, packed.shape[1])

    @fake("layer_norm")
    def _(x2d, weight, bias, indices, cu_seqlens, seq_len, eps, gather_rows):
        cap, c = indices.shape[0], x2d.shape[1]
        xp = x2d.new_empty(cap, c) if gather_rows else x2d.new_empty(0)
        stat = x2d.new_empty(cap, dtype=torch.promote_types(x2d.dtype, torch.float32))
        return x2d.new_empty(cap, c), xp, stat, stat.clone()

    @fake("varlen_attention")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
          return_logits):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        logits = q.new_empty(max_seqlen_q, k.shape[0]) if return_logits else q.new_empty(0)
        return out, q.new_empty(0, dtype=torch.float32), logits

    @fake("packed_linear")
    def _(x2d, weight, bias, residual, base, indices, cu_seqlens, seq_len, act, gather_rows,
          save_pre):
        cap, n = indices.shape[0], weight.shape[0]
        y = x2d.new_empty(cap, n) if base is None else torch.empty_like(base)
        return y, (x2d.new_empty(cap, n) if save_pre else x2d.new_empty(0))

    @fake("select")
    def _(class_logits, mask_logits, indices, cu_seqlens, seq_len, max_seqlen, threshold,
          top_k):
        b = cu_seqlens.shape[0] - 1
        return (torch.empty_like(indices), torch.empty_like(cu_seqlens),
                indices.new_empty(b, seq_len, dtype=torch.bool))


# ---------------------------------------------------------------------- autograd
# The backward of each differentiable op, written with the op library's own ops and PyTorch
# operators (the formulas of the package's reference), so that a graph differentiated through
# them still holds no Python op. select is not differentiable.
def _tokens(indices, cu_seqlens, seq_len):
    from dtop_kernels.ops.library import _tokens as tokens

    return tokens(indices, cu_seqlens, seq_len)


def _register_autograd() -> None:
    D = torch.ops.dtop

    def register(name, backward, setup):
        torch.library.register_autograd(f"dtop::{name}", backward, setup_context=setup,
                                        lib=_FAKE_LIB)

    # gather / scatter
    def gather_setup(ctx, inputs, output):
        _, indices, cu_seqlens, seq_len = inputs
        ctx.save_for_backward(indices, cu_seqlens)
        ctx.seq_len = seq_len

    def gather_backward(ctx, grad):
        indices, cu_seqlens = ctx.saved_tensors
        return D.scatter(grad.contiguous(), indices, cu_seqlens, None, ctx.seq_len, False), \
            None, None, None

    def scatter_setup(ctx, inputs, output):
        _, indices, cu_seqlens, base, seq_len, add = inputs
        ctx.save_for_backward(indices, cu_seqlens)
        ctx.seq_len, ctx.add, ctx.has_base = seq_len, add, base is not None

    def scatter_backward(ctx, grad):
        indices, cu_seqlens = ctx.saved_tensors
        grad = grad.contiguous()
        dpacked = D.gather(grad, indices, cu_seqlens, ctx.seq_len)
        dbase = None
        if ctx.has_base:  # overwritten rows do not reach the old values
            dbase = grad if ctx.add else D.scatter(torch.zeros_like(dpacked), indices,
                                                   cu_seqlens, grad, ctx.seq_len, False)
        return dpacked, None, None, dbase, None, None

    register("gather", gather_backward, gather_setup)
    register("scatter", scatter_backward, scatter_setup)

    # LayerNorm
    def ln_setup(ctx, inputs, output):
        x2d, weight, _, indices, cu_seqlens, seq_len, _, gather_rows = inputs
        _, xp, mean, rstd = output
        ctx.save_for_backward(xp if gather_rows else x2d, weight, mean, rstd, indices,
                              cu_seqlens)
        ctx.seq_len, ctx.gather_rows = seq_len, gather_rows

    def ln_backward(ctx, dy, dxp, dmean, drstd):
        from dtop_kernels.reference import layernorm as ref

        rows, weight, mean, rstd, indices, cu_seqlens = ctx.saved_tensors
        tokens = _tokens(indices, cu_seqlens, ctx.seq_len)
        add = dxp if ctx.gather_rows and dxp is not None and dxp.numel() else None
        if dy is None:
            dy = torch.zeros(mean.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
        dx, dw, db = ref.layer_norm_bwd(dy, rows, weight, mean, rstd, tokens, add, False)
        if ctx.gather_rows:  # packed rows back to their dense places
            dx = D.scatter(dx.contiguous(), indices, cu_seqlens, None, ctx.seq_len, False)
        return dx, dw, db, None, None, None, None, None

    register("layer_norm", ln_backward, ln_setup)

    # attention
    def attn_setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, _ = inputs
        ctx.save_for_backward(q, k, v, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale

    def attn_backward(ctx, dout, dlse, dlogits):
        from dtop_kernels.reference import attention as ref

        q, k, v, cu_q, cu_k = ctx.saved_tensors
        dq = dk = dv = None
        if dout is not None:
            dq, dk, dv = ref.attention_backward(dout, q, k, v, cu_q, cu_k, ctx.max_q,
                                                ctx.max_k, ctx.scale)
        if dlogits is not None and dlogits.numel():
            dq2, dk2 = ref.head_mean_logits_backward(dlogits, q, k, cu_k, ctx.max_q, ctx.max_k,
                                                     ctx.scale)
            dq = dq2 if dq is None else dq + dq2
            dk = dk2 if dk is None else dk + dk2
        return dq, dk, dv, None, None, None, None, None, None

    register("varlen_attention", attn_backward, attn_setup)

    # packed linear
    def linear_setup(ctx, inputs, output):
        x2d, weight, bias, residual, base, indices, cu_seqlens, seq_len, act, gather_rows, \
            _ = inputs
        ctx.save_for_backward(x2d, weight, bias, indices, cu_seqlens)
        ctx.seq_len, ctx.act, ctx.gather_rows = seq_len, act, gather_rows
        ctx.has_bias, ctx.has_res, ctx.scatter = bias is not None, residual is not None, \
            base is not None

    def linear_backward(ctx, dy, dpre):
        x2d, weight, bias, indices, cu_seqlens = ctx.saved_tensors
        n = ctx.seq_len
        valid = _tokens(indices, cu_seqlens, n).valid_slots()[:, None]
        rows = D.gather(x2d, indices, cu_seqlens, n) if ctx.gather_rows else x2d
        dy = dy.contiguous()
        dy_dense = None
        if ctx.scatter:  # the dense gradient's token rows are this layer's
            dy_dense = dy
            dy = D.gather(dy, indices, cu_seqlens, n)
        acc = torch.promote_types(x2d.dtype, torch.float32)
        dyf = torch.where(valid, dy.to(acc), 0.0)
        dz = dyf
        if dpre is not None and dpre.numel():
            dz = dz + torch.where(valid, dpre.to(acc), 0.0)
        if ctx.act == 1:  # exact GELU: recompute the pre-activation
            z = rows.to(acc) @ weight.to(acc).t()
            if bias is not None:
                z = z + bias.to(acc)
            cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
            pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
            dz = dyf * (cdf + z * pdf) + (dz - dyf)
        dz = torch.where(valid, dz, 0.0)
        dx = (dz @ weight.to(acc)).to(x2d.dtype)
        if ctx.gather_rows:
            dx = D.scatter(dx.contiguous(), indices, cu_seqlens, None, n, False)
        dw = (dz.t() @ torch.where(valid, rows.to(acc), 0.0)).to(weight.dtype)
        db = dz.sum(0).to(weight.dtype) if ctx.has_bias else None
        dres = torch.where(valid, dy, 0.0).to(dy.dtype) if ctx.has_res else None
        dbase = None
        if ctx.scatter:  # rows overwritten by the layer do not reach the old values
            dbase = D.scatter(torch.zeros_like(dy), indices, cu_seqlens, dy_dense, n, False)
        return dx, dw, db, dres, dbase, None, None, None, None, None, None

    register("packed_linear", linear_backward, linear_setup)


# the registrations live as long as the process (a Library object keeps them)
_FAKE_LIB = torch.library.Library("dtop", "FRAGMENT")
