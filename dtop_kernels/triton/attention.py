"""Triton varlen flash attention over packed, ragged images (forward and backward).

Grid ``(cdiv(max_seqlen, BLOCK), B, H)``: each program owns one tile of one image and head and
reads the image's offsets from ``cu_seqlens`` on the device; tiles past the image's length exit
at once, so the host only needs the upper bound. Online softmax in fp32 with base-2 exponentials;
the log-sum-exp (base 2) is kept for the backward, which recomputes the probabilities
(FlashAttention-2 scheme): one kernel for dK/dV (loop over query tiles) and one for dQ (loop over
key tiles), so no atomics and deterministic results.

The head-averaged pre-softmax logits (``return_logits``) are one per-image GEMM over all heads,
``mean_h(q_h · k_h) * scale = (Q_b K_b^T) * scale / H``, computed by its own kernel. Same
launcher signatures as dtop_kernels/cuda/attention.py; autograd is in dtop_kernels/ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtop_kernels.triton._utils import dot_precision, interpret_blocks, wrapped

LOG2E = 1.4426950408889634


@triton.jit
def _seg(cu_ptr, b, cap):
    """(start, length) of image b, clamped to the packed capacity."""
    start = tl.minimum(tl.load(cu_ptr + b), cap)
    end = tl.minimum(tl.load(cu_ptr + b + 1), cap)
    return start, end - start


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, cu_q, cu_k, cap_q, cap_k, qk_scale_log2,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, slse_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, len_q = _seg(cu_q, b, cap_q)
    k0, len_k = _seg(cu_k, b, cap_k)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < D
    rows_q = (q0 + offs_m).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * sq_t + h * sq_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Non-finite rule: x * 0 is 0 for finite x, NaN for NaN / Inf. A bad query row, or a bad
    # key / value row anywhere in the image, makes the output row NaN (when there are keys).
    # The K/V check accumulates element-wise in the loop and is reduced once after it.
    q_bad = tl.sum(q.to(tl.float32) * 0.0, axis=1)
    kv_bad = tl.zeros([BLOCK_N, BLOCK_D], dtype=K.dtype.element_ty)
    for n0 in range(0, len_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < len_k
        rows_k = (k0 + offs_n).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + rows_k[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + rows_k[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
        kv_bad += k * 0.0 + v * 0.0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an image with no keys: zero output
    kv_bad_all = tl.sum(tl.sum(kv_bad.to(tl.float32), axis=1), axis=0)
    poison = tl.where(len_k > 0, q_bad + kv_bad_all, 0.0)
    out = acc / l_safe[:, None] + poison[:, None]
    tl.store(O + rows_q[:, None] * so_t + h * so_h + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + h * slse_h + rows_q, m_i + tl.log2(l_safe), mask=m_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k, cap_q, cap_k, qk_scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, slse_h, sdk_t, sdk_h, sdv_t, sdv_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, len_q = _seg(cu_q, b, cap_q)
    k0, len_k = _seg(cu_k, b, cap_k)
    if pid_n * BLOCK_N >= len_k:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < len_k
    d_mask = offs_d < D
    rows_k = (k0 + offs_n).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + rows_k[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_k[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, len_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < len_q
        rows_q = (q0 + offs_m).to(tl.int64)
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + rows_q[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=qd_mask,
                    other=0.0)
        do = tl.load(DO + rows_q[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=qd_mask,
                     other=0.0)
        lse = tl.load(LSE + h * slse_h + rows_q, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + h * slse_h + rows_q, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + rows_k[:, None] * sdk_t + h * sdk_h + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows_k[:, None] * sdv_t + h * sdv_h + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_q, cu_k, cap_q, cap_k, qk_scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, slse_h, sdq_t, sdq_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, len_q = _seg(cu_q, b, cap_q)
    k0, len_k = _seg(cu_k, b, cap_k)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < D
    rows_q = (q0 + offs_m).to(tl.int64)
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + rows_q[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=qd_mask,
                 other=0.0)
    lse = tl.load(LSE + h * slse_h + rows_q, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + h * slse_h + rows_q, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, len_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < len_k
        rows_k = (k0 + offs_n).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + rows_k[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + rows_k[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + rows_q[:, None] * sdq_t + h * sdq_h + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _logits_kernel(
    Q, K, L, cu_k, cap_k, num_q, logit_scale,
    sq_t, sq_h, sk_t, sk_h, sl_c,
    H, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """L[c, k0 + j] = sum_h q[b*num_q + c, h] · k[k0 + j, h] * logit_scale for image b."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    k0, len_k = _seg(cu_k, b, cap_k)
    if pid_n * BLOCK_N >= len_k:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_q
    n_mask = offs_n < len_k
    d_mask = offs_d < D
    rows_q = (b * num_q + offs_m).to(tl.int64)
    rows_k = (k0 + offs_n).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(H):
        q = tl.load(Q + rows_q[:, None] * sq_t + h * sq_h + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        k = tl.load(K + rows_k[:, None] * sk_t + h * sk_h + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.dot(q, tl.trans(k), input_precision=PREC)
    tl.store(L + offs_m[:, None].to(tl.int64) * sl_c + rows_k[None, :],
             (acc * logit_scale).to(L.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _blocks(d: int, dtype: torch.dtype, kind: str = "bwd") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for ``kind`` "fwd" | "bwd" | "logits".

    The head dim is padded to a power of two. Chosen from ahead-of-time sm_90 compiles with the
    JIT's specialization at ViT-B shapes (tests/compile_kernels.py --resources): fp16 / bf16 at
    head dim 64 use wgmma + cp.async without spills (fwd 115 registers, bwd dK/dV 178, dQ 112,
    logits 44). fp32 (exact products, no tensor cores) gets small tiles; its dK/dV kernel spills
    (520 B of stack at head dim 64, 4.9 KB at 80 padded to 128) with every tile tried, which
    this correctness path accepts. Not yet tuned by timing on a GPU.
    """
    block_d = max(16, triton.next_power_of_2(d))
    small = interpret_blocks()
    if small:
        return small, small, block_d, 4
    if dtype == torch.float32:
        return 32, 32, block_d, 8
    if kind == "fwd":
        return (128, 64, block_d, 8) if block_d <= 64 else (128, 32, block_d, 8)
    return (64, 64, block_d, 8) if block_d <= 64 else (64, 32, block_d, 8)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [Tq, H, D] (zero on padding rows) and lse [H, Tq] (fp32, base 2)."""
    tq, h, d = q.shape
    b = cu_q.shape[0] - 1
    out = torch.zeros_like(q)
    lse = torch.zeros(h, tq, device=q.device, dtype=torch.float32)
    bm, bn, bd, warps = _blocks(d, q.dtype, "fwd")
    max_q = min(max_q, tq)  # a bound above the rows is valid; no program past them
    grid = (triton.cdiv(max_q, bm), b, h)
    if tq and b and max_q:
        wrapped(_fwd_kernel)[grid](
            q, k, v, out, lse, cu_q, cu_k, tq, k.shape[0], scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(q.dtype), num_warps=warps,
        )
    return out, lse


def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (zero on padding rows)."""
    tq, h, d = q.shape
    b = cu_q.shape[0] - 1
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = (out.float() * do.float()).sum(-1).t().contiguous()  # [H, Tq]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bm, bn, bd, warps = _blocks(d, q.dtype, "bwd")
    prec = dot_precision(q.dtype)
    max_q, max_k = min(max_q, tq), min(max_k, k.shape[0])
    common = (cu_q, cu_k, tq, k.shape[0], scale * LOG2E, scale,
              q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              do.stride(0), do.stride(1), lse.stride(0))
    if b and max_k and tq:
        wrapped(_bwd_dkdv_kernel)[(triton.cdiv(max_k, bn), b, h)](
            q, k, v, do, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, num_warps=warps,
        )
    if b and max_q and k.shape[0]:
        wrapped(_bwd_dq_kernel)[(triton.cdiv(max_q, bm), b, h)](
            q, k, v, do, lse, delta, dq, *common, dq.stride(0), dq.stride(1),
            D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, num_warps=warps,
        )
    return dq, dk, dv


def head_mean_logits(
    q: torch.Tensor, k: torch.Tensor, cu_k: torch.Tensor, num_q: int, max_k: int, scale: float
) -> torch.Tensor:
    """[num_q, Tk] fp32-accumulated ``mean_h(q·k) * scale`` for uniform queries, in q's dtype."""
    _, h, d = q.shape
    b = cu_k.shape[0] - 1
    out = torch.zeros(num_q, k.shape[0], device=q.device, dtype=q.dtype)
    bm, bn, bd, warps = _blocks(d, q.dtype, "logits")
    bm = min(bm, max(16, triton.next_power_of_2(num_q)))
    max_k = min(max_k, k.shape[0])
    if b and num_q and max_k:
        wrapped(_logits_kernel)[(triton.cdiv(num_q, bm), triton.cdiv(max_k, bn), b)](
            q, k, out, cu_k, k.shape[0], num_q, scale / h,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0),
            h, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(q.dtype),
            num_warps=warps,
        )
    return out
