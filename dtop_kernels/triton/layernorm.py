"""Triton LayerNorm over packed token rows, optionally fused with the gather from dense.

Forward: one program per row; ``GATHER`` reads row ``indices[i]`` of the dense ``[B*N, C]``
input (and can also write the raw gathered row, for the residual stream). Rows past
``T = cu_seqlens[B]`` are padding: written as zeros, never normalized. Mean and rstd are kept in
fp32 for the backward, which computes dx per row and accumulates per-program partial sums of
dweight / dbias that PyTorch then reduces (no atomics, deterministic); its grid is sized by the
GPU's SM count, so a single image's rows still spread over the whole GPU. Same launcher
signatures as dtop_kernels/cuda/layernorm.py; the autograd layer is dtop_kernels/ops/layernorm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtop_kernels import _gpu
from dtop_kernels.tokens import TokenSet
from dtop_kernels.triton import interpret
from dtop_kernels.triton._utils import wrapped

BWD_PROGRAMS_PER_SM = 4
BWD_MIN_ROWS = 4  # rows per backward program at least: bounds the partial dweight / dbias rows


@triton.jit
def _ln_fwd_kernel(X, IDX, CU, Y, XOUT, W, Bias, MEAN, RSTD, B, cap, C, sx, sy, eps, x_rows,
                   GATHER: tl.constexpr, STORE_X: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    total = tl.minimum(tl.load(CU + B), cap)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    out_ptr = Y + row.to(tl.int64) * sy + cols
    if row >= total:
        tl.store(out_ptr, tl.zeros([BLOCK_C], dtype=Y.dtype.element_ty), mask=cm)
        if STORE_X:
            tl.store(XOUT + row.to(tl.int64) * sy + cols,
                     tl.zeros([BLOCK_C], dtype=XOUT.dtype.element_ty), mask=cm)
        return
    if GATHER:
        src = tl.load(IDX + row).to(tl.int64)
    else:
        src = row.to(tl.int64)
    # an index outside x (checks off, broken contract) reads as a zero row, never out of bounds
    src_v = src + cols * 0  # the row index per column (a vector mask)
    x_raw = tl.load(X + src * sx + cols, mask=cm & (src_v >= 0) & (src_v < x_rows), other=0.0)
    if STORE_X:
        tl.store(XOUT + row.to(tl.int64) * sy + cols, x_raw, mask=cm)
    x = x_raw.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(cm, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(out_ptr, (xc * rstd * w + bias).to(Y.dtype.element_ty), mask=cm)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(DY, X, IDX, CU, W, MEAN, RSTD, DX, DW, DB, B, cap, C, sdy, sx, sdx,
                   rows_per_prog, x_rows, GATHER: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    total = tl.minimum(tl.load(CU + B), cap)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, total)
    for r in range(row0, row_end):
        row = tl.cast(r, tl.int64)
        if GATHER:
            src = tl.load(IDX + row).to(tl.int64)
        else:
            src = row
        src_v = src + cols * 0  # the row index per column (a vector mask)
        x = tl.load(X + src * sx + cols, mask=cm & (src_v >= 0) & (src_v < x_rows),
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sdy + cols, mask=cm, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(cm, (x - mean) * rstd, 0.0)
        g = dy * w
        c1 = tl.sum(xhat * g, axis=0) / C
        c2 = tl.sum(g, axis=0) / C
        dx = (g - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * sdx + cols, dx.to(DX.dtype.element_ty), mask=cm)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * C + cols, dw, mask=cm)
    tl.store(DB + pid * C + cols, db, mask=cm)


def _block_c(c: int) -> int:
    return triton.next_power_of_2(max(c, 16))


def _bwd_programs(rows: int, device: torch.device) -> int:
    """Programs of the backward, each with its partial dweight / dbias row: on a GPU
    ``BWD_PROGRAMS_PER_SM`` per SM, fewer when they would get under ``BWD_MIN_ROWS`` rows each
    (the CUDA backend's rule); under the CPU interpreter, 64 rows each (few programs)."""
    if interpret():
        return max(1, triton.cdiv(rows, 64))
    return max(1, min(triton.cdiv(rows, BWD_MIN_ROWS),
                      BWD_PROGRAMS_PER_SM * _gpu.sm_count(device)))


def layer_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   tokens: TokenSet, eps: float, gather: bool = False, store_x: bool = False):
    """(y [capacity, C], x_packed [capacity, C] or None, mean, rstd [capacity] fp32).

    x2d: [B*N, C] with ``gather`` (row i reads ``indices[i]``), else [capacity, C]. Rows past T
    are zero in y and x_packed.
    """
    cap, c = tokens.capacity, x2d.shape[1]
    dev = x2d.device
    y = torch.empty(cap, c, device=dev, dtype=x2d.dtype)
    xout = torch.empty_like(y) if store_x else y
    mean = torch.zeros(cap, device=dev, dtype=torch.float32)
    rstd = torch.zeros(cap, device=dev, dtype=torch.float32)
    if cap:
        wrapped(_ln_fwd_kernel)[(cap,)](
            x2d, tokens.indices, tokens.cu_seqlens, y, xout, weight, bias, mean, rstd,
            tokens.batch_size, cap, c, x2d.stride(0), y.stride(0), eps, x2d.shape[0],
            GATHER=gather, STORE_X=store_x, BLOCK_C=_block_c(c),
        )
    return y, (xout if store_x else None), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, tokens: TokenSet,
                   gather: bool = False, dx_add: torch.Tensor | None = None):
    """(dx_packed [capacity, C], dweight, dbias); padding rows of dx are ``dx_add`` (or 0)."""
    cap, c = tokens.capacity, x2d.shape[1]
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.zeros(cap, c, device=dy.device, dtype=x2d.dtype)
    rows_per_prog = max(1, triton.cdiv(cap, _bwd_programs(cap, dy.device)))
    progs = max(1, triton.cdiv(cap, rows_per_prog))  # none left without rows
    dw = torch.zeros(progs, c, device=dy.device, dtype=torch.float32)
    db = torch.zeros(progs, c, device=dy.device, dtype=torch.float32)
    if cap:
        wrapped(_ln_bwd_kernel)[(progs,)](
            dy, x2d, tokens.indices, tokens.cu_seqlens, weight, mean, rstd, dx, dw, db,
            tokens.batch_size, cap, c, dy.stride(0), x2d.stride(0), dx.stride(0),
            rows_per_prog, x2d.shape[0], GATHER=gather, BLOCK_C=_block_c(c),
        )
    if dx_add is not None:
        dx = dx + dx_add
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
