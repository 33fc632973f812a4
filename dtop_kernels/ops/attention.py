"""``varlen_attention``: per-image attention over packed, ragged queries and keys."""

from __future__ import annotations

import torch

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register
from dtop_kernels.ops import library
from dtop_kernels.reference import attention as ref
from dtop_kernels.tokens import _is_int


def _why_not_triton(q, k, v, dropout_p=0.0) -> list[str]:
    r = triton.device_reasons([q, k, v]) + triton.dtype_reasons(q.dtype)
    r += triton.head_dim_reasons(q.shape[-1], v.shape[-1])
    if dropout_p:
        r.append("attention dropout is not implemented in the kernel")
    return r


def _why_not_cuda(q, k, v, dropout_p=0.0) -> list[str]:
    r = cuda.tensor_reasons([q, k, v]) + cuda.mma_reasons(q.dtype)
    r += cuda.head_dim_reasons(q.shape[-1], v.shape[-1])
    if dropout_p:
        r.append("attention dropout is not implemented in the kernel")
    return r


_dispatch = register(Dispatcher(
    "varlen_attention",
    {"torch": lambda *a, **k: [], "triton": _why_not_triton, "cuda": _why_not_cuda},
    auto_order=("triton", "cuda", "torch"),
))


def _check_cu(name: str, cu: torch.Tensor, rows: int, max_seqlen: int) -> None:
    _checks.tensor(name, cu, dim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32; got {cu.dtype} (use .int())")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries")
    if not _is_int(max_seqlen) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be a non-negative int; got {max_seqlen!r}")


def _eager_autograd(backend: str, *inputs: torch.Tensor) -> bool:
    """Whether the torch backend runs as plain PyTorch ops under autograd instead of through
    ``dtop_py::varlen_attention``: in eager mode with a gradient to compute, where PyTorch's own
    backward is the faster one (flash attention's on CUDA through its varlen attention, SDPA's
    on the CPU) than the custom op's float32 reference backward. Inside ``torch.compile``, and
    without gradients, the custom op runs."""
    return backend == "torch" and not torch.compiler.is_compiling() and \
        torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def attention_on(backend: str):
    """``attention(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> out`` on an already chosen
    backend, without the public op's checks: for callers that made them (``pruned_stage``)."""

    def attention(q, k, v, cu_q, cu_k, mq, mk, scale):
        if _eager_autograd(backend, q, k, v):
            return ref.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, scale)
        return library.call.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, float(scale), False,
                                             backend)[0]

    return attention


def _with_grad_path(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``out`` connected to ``inputs`` in autograd (zero gradient) when it is not already, so
    that a result that is all zeros (no image has keys, B = 0) still supports backward()."""
    if out.grad_fn is not None or not torch.is_grad_enabled() or \
            not any(t.requires_grad for t in inputs):
        return out
    anchor = sum(t.sum() for t in inputs)
    return out + torch.where(torch.zeros((), dtype=torch.bool, device=out.device), anchor,
                             anchor.new_zeros(())).to(out.dtype)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_logits: bool = False,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where each image's queries see only that image's keys.

    q: [Tq, H, D], k: [Tk, H, D], v: [Tk, H, Dv], packed image after image; image b owns query
    rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    (int32, [B + 1]). Rows past ``cu_seqlens[-1]`` are padding: ignored as keys, zero as output.
    ``max_seqlen_q/k`` are host-side upper bounds on any image's count (any bound >= the true
    maximum is valid). ``scale`` defaults to ``D ** -0.5``. ``dropout_p`` drops attention
    probabilities (training only; the torch backend only). An image with no keys gets zero
    output. Non-finite inputs: a query row with a NaN or Inf gives a NaN output row; a NaN or
    Inf in a key or value row of image b (head h) gives NaN in every output row of image b
    (head h); other images are unaffected; on every backend.

    ``check``: verify the offsets (start at 0, non-decreasing, ``cu_seqlens[-1]`` at most the
    rows, every count at most its ``max_seqlen``) with one host sync; always done for CPU
    tensors; None follows ``DTOP_CHECK``. Unchecked, a violated contract gives unspecified
    values but no out-of-bounds access.

    Returns out [Tq, H, Dv]. With ``return_logits=True`` also the head-averaged pre-softmax
    logits ``mean_h(q·k) * scale`` as [Kq, Tk] for a uniform query layout of Kq =
    ``max_seqlen_q`` queries per image (``cu_seqlens_q = arange(B + 1) * Kq``, the DToP heads'
    class queries): column j holds the logits of key row j against the Kq queries of its image;
    padding columns are zero.

    Equivalent PyTorch, per image b::

        out_b = F.scaled_dot_product_attention(q_b.transpose(0, 1), k_b.transpose(0, 1),
                                               v_b.transpose(0, 1), scale=scale).transpose(0, 1)
    """
    q = _checks.float_tensor("q", q, dim=3)
    k = _checks.float_tensor("k", k, dim=3)
    v = _checks.float_tensor("v", v, dim=3)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q [Tq, H, D] and k [Tk, H, D] must agree on H and D; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v [Tk, H, Dv] must match k [Tk, H, D] on Tk and H; got "
                         f"{tuple(v.shape)} and {tuple(k.shape)}")
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1]; got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    _checks.cu_contract(_checks.check_flag(check),
                        cu_seqlens_q=(cu_seqlens_q, q.shape[0], max_seqlen_q),
                        cu_seqlens_k=(cu_seqlens_k, k.shape[0], max_seqlen_k))
    b = cu_seqlens_q.shape[0] - 1
    if return_logits and q.shape[0] != b * max_seqlen_q:
        raise ValueError(
            f"return_logits needs max_seqlen_q queries in every image (Tq = B * max_seqlen_q = "
            f"{b * max_seqlen_q}); got Tq = {q.shape[0]}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = (_checks.last_dim_contiguous(t) for t in (q, k, v))
    be = _dispatch.select(backend, q, k, v, dropout_p=dropout_p)
    if b == 0:  # no images: every row is padding
        res = q.new_zeros(*q.shape[:2], v.shape[-1])
        if return_logits:
            res = res, q.new_zeros(max_seqlen_q, k.shape[0])
    elif dropout_p:  # the torch backend's SDPA drops; its autograd is PyTorch's
        res = ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, return_logits, dropout_p)
    elif _eager_autograd(be, q, k, v):
        res = ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, return_logits)
    else:  # the custom op: its outputs always have a gradient path to q, k, v
        out, _, logits = library.call.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k, float(scale),
                                                       return_logits, be)
        return (out, logits) if return_logits else out
    if return_logits:
        return _with_grad_path(res[0], q, k, v), _with_grad_path(res[1], q, k)
    return _with_grad_path(res, q, k, v)
