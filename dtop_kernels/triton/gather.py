"""Triton row gather / scatter between dense ``[B*N, C]`` and packed ``[capacity, C]``.

The valid count ``T = cu_seqlens[B]`` is read on the device; the grid covers ``capacity`` rows
and programs past ``T`` write zeros (gather) or nothing (scatter). An index outside
``[0, B*N)`` (a broken contract with the checks off) is never dereferenced: its row reads as
zeros and is written nowhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtop_kernels.tokens import TokenSet
from dtop_kernels.triton._utils import wrapped


@triton.jit
def _gather_kernel(X, IDX, CU, OUT, B, cap, C, sx, so, dense_rows,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    total = tl.minimum(tl.load(CU + B), cap)
    in_cap = rows < cap
    src = tl.load(IDX + rows, mask=rows < total, other=0).to(tl.int64)
    valid = (rows < total) & (src >= 0) & (src < dense_rows)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cm = cols < C
        v = tl.load(X + src[:, None] * sx + cols[None, :], mask=valid[:, None] & cm[None, :],
                    other=0.0)
        tl.store(OUT + rows[:, None].to(tl.int64) * so + cols[None, :], v,
                 mask=in_cap[:, None] & cm[None, :])


@triton.jit
def _scatter_kernel(SRC, IDX, CU, OUT, B, cap, C, ss, so, dense_rows,
                    ADD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    total = tl.minimum(tl.load(CU + B), cap)
    dst = tl.load(IDX + rows, mask=rows < total, other=0).to(tl.int64)
    valid = (rows < total) & (dst >= 0) & (dst < dense_rows)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = valid[:, None] & (cols < C)[None, :]
        v = tl.load(SRC + rows[:, None].to(tl.int64) * ss + cols[None, :], mask=m, other=0.0)
        ptr = OUT + dst[:, None] * so + cols[None, :]
        if ADD:
            v = (tl.load(ptr, mask=m, other=0.0).to(tl.float32) + v.to(tl.float32))
        tl.store(ptr, v.to(OUT.dtype.element_ty), mask=m)


def _launch_cfg(c: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(c, 16)), 1024)
    rows = max(1, min(16, 4096 // block_c))
    return rows, block_c


def gather_rows(x2d: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """x2d: [B*N, C] (last dim contiguous) -> packed [capacity, C], zeros past T."""
    cap, c = tokens.capacity, x2d.shape[1]
    out = torch.empty(cap, c, device=x2d.device, dtype=x2d.dtype)
    if cap == 0 or c == 0:
        return out
    rows, block_c = _launch_cfg(c)
    wrapped(_gather_kernel)[(triton.cdiv(cap, rows),)](
        x2d, tokens.indices, tokens.cu_seqlens, out, tokens.batch_size, cap, c,
        x2d.stride(0), out.stride(0), x2d.shape[0], ROWS=rows, BLOCK_C=block_c,
    )
    return out


def scatter_rows(packed: torch.Tensor, tokens: TokenSet, out2d: torch.Tensor, add: bool) -> None:
    """In place: out2d[indices[i]] = (or +=) packed[i] for i < T. out2d: [B*N, C]."""
    cap, c = tokens.capacity, packed.shape[1]
    if cap == 0 or c == 0:
        return
    rows, block_c = _launch_cfg(c)
    wrapped(_scatter_kernel)[(triton.cdiv(cap, rows),)](
        packed, tokens.indices, tokens.cu_seqlens, out2d, tokens.batch_size, cap, c,
        packed.stride(0), out2d.stride(0), out2d.shape[0], ADD=add, ROWS=rows, BLOCK_C=block_c,
    )
