"""Triton linear layer over packed token rows with fused epilogues (kernel caller, no autograd;
see dtop_kernels/ops/linear.py).

``y = act(x @ W^T + b) (+ residual)``, the rows of x optionally gathered from dense rows
(``x[indices[i]]``) in the operand load, the result optionally scattered straight into a dense
``[B*N, C]`` output (``out[indices[i]] = y[i]``). The grid covers ``capacity`` rows, but tiles
past ``T = cu_seqlens[B]`` (read on the device) skip the matmul and write zeros, so the pruned
rows cost no FLOPs and no host sync is needed to know how many rows there are. The input
gradient runs on the same kernel (on W^T), skipping the same tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtop_kernels.tokens import TokenSet
from dtop_kernels.triton._utils import dot_precision, interpret_blocks, wrapped

ACT_NONE, ACT_GELU = 0, 1


@triton.jit
def _linear_kernel(
    X, W, Bias, R, Y, Z, IDX, CU, B, cap, N, K, sx, sw, sr, sy, sz, dense_rows,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, I64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    # Grouped tile order: consecutive programs share a column tile of W (L2 reuse).
    pid = tl.program_id(0)
    num_m = tl.cdiv(cap, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    total = tl.minimum(tl.load(CU + B), cap)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < total
    n_ok = offs_n < N
    # Element offsets in int64 only when some tensor has 2**30 elements or more (I64): int32
    # offsets keep the 2-D pointer tiles of the epilogue out of spilled registers.
    rows = offs_m.to(tl.int64) if I64 else offs_m
    cols = offs_n.to(tl.int64) if I64 else offs_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Tiles past the valid rows run no iterations: no FLOPs for pruned rows.
    k_end = tl.where(pid_m * BLOCK_M < total, K, 0)
    offs_k = tl.arange(0, BLOCK_K)
    if GATHER or SCATTER:  # row i of the operand / result is dense row indices[i]
        idx = tl.load(IDX + offs_m, mask=row_ok, other=0)
        # an index outside the dense rows (checks off, broken contract) is never dereferenced
        idx_ok = row_ok & (idx >= 0) & (idx < dense_rows)
        idx = tl.where(idx_ok, idx, 0)
        idx = idx.to(tl.int64) if I64 else idx
    if GATHER:
        src = idx
        a_ok = idx_ok
    else:
        src = rows
        a_ok = row_ok
    a_ptrs = X + src[:, None] * sx + offs_k[None, :]
    w_ptrs = W + offs_k[:, None] + cols[None, :] * sw  # W^T tile [K, N]
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:  # zero on padding rows, like y
        tl.store(Z + rows[:, None] * sz + offs_n[None, :],
                 tl.where(row_ok[:, None], acc, 0.0).to(Z.dtype.element_ty),
                 mask=(offs_m < cap)[:, None] & n_ok[None, :])
    if ACT == 1:  # exact GELU
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if HAS_RES:
        acc += tl.load(R + rows[:, None] * sr + offs_n[None, :],
                       mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.where(row_ok[:, None], acc, 0.0)
    if SCATTER:
        tl.store(Y + idx[:, None] * sy + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=idx_ok[:, None] & n_ok[None, :])
    else:
        tl.store(Y + rows[:, None] * sy + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=(offs_m < cap)[:, None] & n_ok[None, :])


def _config(dtype: torch.dtype, n: int) -> dict:
    """Launch settings by dtype and output features N (tile by N; BK = 64 in the half dtypes).

    From sm_90 compiles with the JIT's specialization at ViT-B shapes (tests/compile_kernels.py
    --resources; the half dtypes use wgmma and cp.async; none spills):

    | dtype | N | tile M x N x K, warps, stages | regs | shared | CTAs / SM |
    |---|---|---|---|---|---|
    | fp16 / bf16 | <= 1024 | 128 x 64 x 64, 4, 3 | 128 (174 with GELU) | 72 KB | 3 (2) |
    | fp16 / bf16 | > 1024 | 128 x 128 x 64, 8, 3 | 110 (171 with GELU) | 96 KB | 2 (1) |
    | fp32 | any | 64 x 64 x 32, 4, 3 (FMA: exact products) | 162-164 | 32 KB | 3 |

    Why N <= 1024 gets half-width tiles: at N = 768 (proj, fc2) and M ~ 6000 rows, 128 x 128
    tiles make 47 x 6 = 282 tiles, one more than two per SM on 132 SMs, so the busiest SMs run 3
    tile-times against 2.14 for perfectly spread work; 128 x 64 tiles (564) bound that at 2.5.
    Not yet confirmed by timing on a GPU. The CUDA linear (csrc/linear.cu) splits by N at the
    same 1024 with the same block tiles (its 128 x 128 tile steps k by 32): keep the two rules
    together.
    """
    small = interpret_blocks()
    if small:
        return {"BLOCK_M": small, "BLOCK_N": small, "BLOCK_K": small, "GROUP_M": 4}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 3}
    if n <= 1024:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: TokenSet,
    act: int = ACT_NONE, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
    save_pre: bool = False, gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [capacity, K] packed rows, or [B*N, K] dense rows with ``gather``; weight [N, K].

    Returns y [capacity, N] (zero past T), or ``out`` [B*N, N] with the token rows written, and
    the pre-activation [capacity, N] when ``save_pre`` (else None).
    """
    cap, k = tokens.capacity, x.shape[1]
    n = weight.shape[0]
    scatter = out is not None
    y = out if scatter else torch.empty(cap, n, device=x.device, dtype=x.dtype)
    z = torch.empty(cap, n, device=x.device, dtype=x.dtype) if save_pre else y
    if cap == 0 or n == 0:
        return y, (z if save_pre else None)
    cfg = _config(x.dtype, n)
    grid = (triton.cdiv(cap, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    r = residual if residual is not None else x
    i64 = max(t.numel() for t in (x, weight, r, y, z)) >= 2**30  # margin for masked tiles
    wrapped(_linear_kernel)[grid](
        x, weight, bias if bias is not None else weight, r, y, z, tokens.indices,
        tokens.cu_seqlens, tokens.batch_size, cap, n, k, x.stride(0), weight.stride(0),
        r.stride(0), y.stride(0), z.stride(0), tokens.batch_size * tokens.seq_len,
        ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SAVE_PRE=save_pre,
        GATHER=gather, SCATTER=scatter, I64=i64, PREC=dot_precision(x.dtype), **cfg,
    )
    return y, (z if save_pre else None)


def linear_bwd_input(dz: torch.Tensor, weight: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """dx = dz @ W: dz [capacity, N], weight [N, K] -> dx [capacity, K], zero past T. The
    linear kernel on W^T (a copy of the weight, N * K elements): row tiles past T run no
    product, as in the forward."""
    return linear_fwd(dz, weight.t().contiguous(), None, tokens)[0]


@triton.jit
def _linear_dw_kernel(
    DZ, X, IDX, CU, DW, DB, B, cap, N, K, sdz, sx, sdw, dense_rows,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, GATHER: tl.constexpr,
    I64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    # One [BLOCK_N, BLOCK_K] tile of dW per program; the reduction runs over the packed rows and
    # stops at T = cu_seqlens[B], read here on the device: padding rows are never loaded.
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K) if COMPUTE_DW else 1
    pid_n = pid // num_k
    pid_k = pid % num_k
    total = tl.minimum(tl.load(CU + B), cap)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    k_ok = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, total, BLOCK_M):
        m = m0 + offs_m
        row_ok = m < total
        rows = m.to(tl.int64) if I64 else m
        dz = tl.load(DZ + rows[:, None] * sdz + offs_n[None, :],
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        if COMPUTE_DW:
            if GATHER:  # row i of the operand is dense row indices[i], as in the forward
                idx = tl.load(IDX + m, mask=row_ok, other=0)
                a_ok = row_ok & (idx >= 0) & (idx < dense_rows)
                src = tl.where(a_ok, idx, 0)
                src = src.to(tl.int64) if I64 else src
            else:
                a_ok = row_ok
                src = rows
            a = tl.load(X + src[:, None] * sx + offs_k[None, :],
                        mask=a_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            acc += tl.dot(tl.trans(dz), a, input_precision=PREC)
        if COMPUTE_DB:
            acc_b += tl.sum(dz.to(tl.float32), axis=0)
    if COMPUTE_DW:
        dn = offs_n.to(tl.int64) if I64 else offs_n
        tl.store(DW + dn[:, None] * sdw + offs_k[None, :], acc.to(DW.dtype.element_ty),
                 mask=n_ok[:, None] & k_ok[None, :])
    if COMPUTE_DB and pid_k == 0:  # the programs of the first column tile write db
        tl.store(DB + offs_n, acc_b.to(DB.dtype.element_ty), mask=n_ok)


def _dw_config(dtype: torch.dtype) -> dict:
    """Launch settings of the weight-gradient kernel: [64, 64] tiles of dW, 64 rows per step in
    the half dtypes (16 in fp32, whose products run on FMA: 32 needed 255 registers and a stack
    frame on sm_80), 4 warps, 3 stages. A sane default, not tuned by timing on a GPU. Compiled
    at ViT-B shapes (tests/compile_kernels.py --resources), no spills: fp16 / bf16 80-88
    registers on sm_90 (wgmma), 104-128 on sm_80 (mma.sync); fp32 94-100 (sm_90), 149-151
    (sm_80). One program per tile of dW, each reducing over all T rows: at ViT-B's 768 x 768
    (proj) that is 144 programs, about one wave on 132 SMs; splitting the rows across programs
    would fill the GPU better there."""
    small = interpret_blocks()
    if small:
        return {"BLOCK_M": small, "BLOCK_N": small, "BLOCK_K": small}
    block_m = 16 if dtype == torch.float32 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def linear_bwd_weight(
    dz: torch.Tensor, x: torch.Tensor, tokens: TokenSet, gather: bool = False,
    need_dw: bool = True, need_db: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dW = dz[:T]^T @ x_rows[:T] and db = dz[:T].sum(0), T = cu_seqlens[B] read on the device.

    dz: [capacity, N]; x: [capacity, K] packed rows, or [B*N, K] dense rows with ``gather``
    (row i is ``x[indices[i]]``, gathered in the operand load, never materialized). Products
    accumulate in fp32; dW [N, K] and db [N] come back in x's dtype. Rows past T are never read,
    so their contents do not matter and they cost no work. Returns (dW or None, db or None) as
    asked by ``need_dw`` / ``need_db``.
    """
    cap, n, k = tokens.capacity, dz.shape[1], x.shape[1]
    compute_dw = need_dw and k > 0
    launch = cap > 0 and n > 0 and (compute_dw or need_db)
    alloc = torch.empty if launch else torch.zeros  # the kernel writes every entry
    dw = alloc(n, k, device=x.device, dtype=x.dtype) if need_dw else None
    db = alloc(n, device=x.device, dtype=x.dtype) if need_db else None
    if not launch:
        return dw, db
    dz = dz if dz.stride(1) == 1 else dz.contiguous()
    cfg = _dw_config(x.dtype)
    num_k = triton.cdiv(k, cfg["BLOCK_K"]) if compute_dw else 1
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * num_k,)
    i64 = max(dz.numel(), x.numel(), n * k) >= 2**30  # margin for masked tiles
    out_w = dw if compute_dw else dz
    wrapped(_linear_dw_kernel)[grid](
        dz, x, tokens.indices, tokens.cu_seqlens, out_w, db if need_db else dz,
        tokens.batch_size, cap, n, k, dz.stride(0), x.stride(0), out_w.stride(0),
        tokens.batch_size * tokens.seq_len, COMPUTE_DW=compute_dw, COMPUTE_DB=need_db,
        GATHER=gather, I64=i64, PREC=dot_precision(x.dtype), **cfg,
    )
    return dw, db
