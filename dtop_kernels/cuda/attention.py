"""Python side of the compiled varlen attention kernels (csrc/attention_*.cu): checks, launch.

No autograd here (see dtop_kernels/ops/). The three launchers mirror the Triton backend's
``attention_fwd`` / ``attention_bwd`` / ``head_mean_logits`` (dtop_kernels/triton/attention.py)
argument for argument, with the same lse convention (fp32 [H, Tq], base 2), so either backend's
backward accepts the other's forward outputs.

Layout: q [Tq, H, D], k / v [Tk, H, D] packed image after image; image b owns query rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``
(int32 [B + 1], read on the device; rows past ``cu_seqlens[B]`` are padding). ``max_seqlen_*``
are host-side upper bounds on any image's count. Tensor cores only: float16 / bfloat16, head
dim 32, 64, 80, 96 or 128, v's head dim equal to q's; anything else raises ValueError (use the
triton or torch backend). Inputs need a unit last stride and token / head strides that are
multiples of 8 elements (16-byte loads); others are copied first.
"""

from __future__ import annotations

import torch

from dtop_kernels.cuda import DTYPE_CODES, _args, head_dims, load_C


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        _args.tensor(op, name, t, dim=3)
    _args.same_dtype(op, **named)
    if q.dtype not in _args.HALF_DTYPES:
        raise ValueError(
            f"{op}: the CUDA attention kernels take float16 / bfloat16 (tensor cores); got "
            f"{q.dtype}: use backend='triton' or backend='torch' for it")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"{op}: q [Tq, H, D] and k [Tk, H, D] must agree on H and D; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)} (same head dim); got "
                         f"{tuple(v.shape)}")
    if head_dims() and q.shape[2] not in head_dims():
        raise ValueError(f"{op}: head dim {q.shape[2]} is not supported by the CUDA kernels "
                         f"{head_dims()}; use backend='triton' or backend='torch'")
    if not 1 <= q.shape[1] <= 65535:
        raise ValueError(f"{op}: the number of heads must be in [1, 65535]; got {q.shape[1]}")


def _check_cu(op: str, cu_q: torch.Tensor | None, cu_k: torch.Tensor) -> int:
    """B, after checking both offsets arrays (cu_q may be None)."""
    cu_k = _args.int32_vector(op, "cu_seqlens_k", cu_k)
    b = cu_k.shape[0] - 1
    if b < 0:
        raise ValueError(f"{op}: cu_seqlens_k must have B + 1 >= 1 entries")
    if cu_q is not None:
        _args.int32_vector(op, "cu_seqlens_q", cu_q, length=b + 1)
    if b > 65535:
        raise ValueError(f"{op}: batch size must be <= 65535; got {b} (split the batch)")
    return b


def _check_out(op: str, name: str, t: torch.Tensor | None, like: torch.Tensor,
               shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> None:
    if t is None:
        return
    _args.tensor(op, name, t)
    _args.shape(op, name, t, tuple(like.shape) if shape is None else shape)
    want = like.dtype if dtype is None else dtype
    if t.dtype != want:
        raise ValueError(f"{op}: {name} must be {want}; got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image softmax attention over packed rows.

    Returns ``(out, lse)``: out [Tq, H, D] in q's dtype, ``softmax(q k^T * scale) v`` per image
    and head (zero for an image with no keys); lse [H, Tq] float32, base 2:
    ``log2(sum_j exp2(s_j))`` of the scores ``s = q.k * scale * log2(e)`` (-inf without keys).
    Padding query rows are not written: fresh outputs are zero there (as the Triton backend's);
    given ``out`` [Tq, H, D] / ``lse`` [H, Tq] (contiguous) keep their padding rows.
    """
    op = "attention_fwd"
    _check_qkv(op, q, k, v)
    b = _check_cu(op, cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q = _args.non_negative_int(op, "max_seqlen_q", max_seqlen_q)
    tq, h, d = q.shape
    _check_out(op, "out", out, q)
    _check_out(op, "lse", lse, q, shape=(h, tq), dtype=torch.float32)
    dev = _args.on_cuda(op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k, out=out, lse=lse)
    out = torch.zeros_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.zeros(h, tq, device=dev, dtype=torch.float32) if lse is None else lse
    if b == 0 or tq == 0 or max_seqlen_q == 0:
        return out, lse
    q, k, v = _args.aligned16(q), _args.aligned16(k), _args.aligned16(v)
    with _args.device_guard(dev):
        load_C().attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), b, h, d, tq, k.shape[0],
            max_seqlen_q, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            float(scale), DTYPE_CODES[q.dtype], _args.stream(dev),
        )
    return out, lse


def nonfinite_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """The non-finite rule on :func:`attention_fwd`'s ``out``, in place (one kernel, no host
    sync): every row of an image and head becomes NaN when a key or value row of that image and
    head holds a NaN or Inf, and so does each query row holding one; images without keys keep
    their rows. The same rule as ``reference.attention.nonfinite_rows``. Returns ``out``."""
    op = "attention_nonfinite_rows"
    _check_qkv(op, q, k, v)
    b = _check_cu(op, cu_seqlens_q, cu_seqlens_k)
    _check_out(op, "out", out, q)
    tq, h, d = q.shape
    if b == 0 or tq == 0 or k.shape[0] == 0:
        return out
    dev = _args.on_cuda(op, q=q, k=k, v=v, out=out)
    with _args.device_guard(dev):
        load_C().attention_nonfinite_rows(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), cu_seqlens_q.data_ptr(),
            cu_seqlens_k.data_ptr(), b, h, d, tq, k.shape[0], *_strides(q), *_strides(k),
            *_strides(v), *_strides(out), DTYPE_CODES[q.dtype], _args.stream(dev),
        )
    return out


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_fwd` for the upstream gradient ``do`` [Tq, H, D].

    out, lse: the forward's outputs (from this backend or the Triton one). Returns
    ``(dq, dk, dv)`` shaped like q, k, v (contiguous), zero on padding rows, on the rows of an
    image with no keys (dq) or no queries (dk, dv). FlashAttention-2 scheme: a delta =
    rowsum(do * out) kernel, a dK/dV kernel looping over query tiles and a dQ kernel looping
    over key tiles; no atomics, deterministic.
    """
    op = "attention_bwd"
    _check_qkv(op, q, k, v)
    for name, t in (("do", do), ("out", out)):
        _args.tensor(op, name, t, dim=3)
        _args.shape(op, name, t, tuple(q.shape))
    _args.same_dtype(op, q=q, do=do, out=out)
    tq, h, d = q.shape
    _args.tensor(op, "lse", lse, dim=2, dtypes=(torch.float32,))
    _args.shape(op, "lse", lse, (h, tq))
    b = _check_cu(op, cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q = _args.non_negative_int(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _args.non_negative_int(op, "max_seqlen_k", max_seqlen_k)
    dev = _args.on_cuda(op, do=do, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k)
    dq = torch.zeros(q.shape, device=dev, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=dev, dtype=k.dtype)
    dv = torch.zeros(v.shape, device=dev, dtype=v.dtype)
    if b == 0 or tq == 0 or k.shape[0] == 0:
        return dq, dk, dv
    do, q, k, v, out = (_args.aligned16(t) for t in (do, q, k, v, out))
    lse = lse.contiguous()
    delta = torch.empty(h, tq, device=dev, dtype=torch.float32)
    with _args.device_guard(dev):
        load_C().attention_bwd(
            do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), b, h, d, tq, k.shape[0],
            max_seqlen_q, max_seqlen_k, *_strides(do), *_strides(q), *_strides(k),
            *_strides(v), *_strides(out), *_strides(dq), *_strides(dk), *_strides(dv),
            float(scale), DTYPE_CODES[q.dtype], _args.stream(dev),
        )
    return dq, dk, dv


def head_mean_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    num_q: int,
    max_seqlen_k: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged pre-softmax logits for a uniform query layout.

    q: [B * num_q, H, D] (image b's queries are rows ``b * num_q .. b * num_q + num_q - 1``),
    k: [Tk, H, D]. Returns [num_q, Tk] in q's dtype: for each key row j of image b,
    ``L[c, j] = sum_h q[b * num_q + c, h] . k[j, h] * scale / H`` accumulated in float32.
    Columns of padding keys are not written: a fresh output is zero there (as the Triton
    backend's); a given ``out`` (contiguous [num_q, Tk]) keeps them.
    """
    op = "head_mean_logits"
    _check_qkv(op, q, k)
    b = _check_cu(op, None, cu_seqlens_k)
    num_q = _args.non_negative_int(op, "num_q", num_q)
    max_seqlen_k = _args.non_negative_int(op, "max_seqlen_k", max_seqlen_k)
    if q.shape[0] != b * num_q:
        raise ValueError(f"{op}: q must hold num_q = {num_q} queries for each of the B = {b} "
                         f"images (Tq = {b * num_q}); got Tq = {q.shape[0]}")
    tk, h, d = k.shape
    _check_out(op, "out", out, q, shape=(num_q, tk))
    dev = _args.on_cuda(op, q=q, k=k, cu_seqlens_k=cu_seqlens_k, out=out)
    out = torch.zeros(num_q, tk, device=dev, dtype=q.dtype) if out is None else out
    if b == 0 or num_q == 0 or tk == 0 or max_seqlen_k == 0:
        return out
    q, k = _args.aligned16(q), _args.aligned16(k)
    with _args.device_guard(dev):
        load_C().attention_head_mean_logits(
            q.data_ptr(), k.data_ptr(), out.data_ptr(), cu_seqlens_k.data_ptr(), b, h, d, num_q,
            tk, max_seqlen_k, *_strides(q), *_strides(k), out.stride(0), float(scale),
            DTYPE_CODES[q.dtype], _args.stream(dev),
        )
    return out
