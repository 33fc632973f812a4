"""Triton DToP exit rule: per-token confidence/label, then the per-class top-k rank.

Both kernels use grid ``(cdiv(max_seqlen, BLOCK), B)`` and read each image's slot range from
``cu_seqlens`` on the device. The rank of a candidate is the number of candidates of the same
image and label that beat it (higher confidence, or equal confidence at a lower position); it
exits when that rank is ``>= top_k``. This is O(n^2) per image in comparisons but a single pass
of plain loads, deterministic, and small next to one transformer layer (n <= a few thousand).
Compaction to the next TokenSet is a device prefix sum (torch.cumsum) and a scatter: no host
sync anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dtop_kernels.tokens import TokenSet
from dtop_kernels.triton import interpret
from dtop_kernels.triton._utils import interpret_blocks, wrapped

TINY = 2.0**-126  # scores below the smallest normal float32 count as 0 (every backend)


@triton.jit
def _sigmoid(x, LIBDEVICE: tl.constexpr):
    # No overflow for large |x| (the naive 1 / (1 + exp(-x)) overflows exp below x = -88.7);
    # sigmoid(+inf) = 1, sigmoid(-inf) = 0, NaN stays NaN. Values below about -87.3 are
    # subnormal or flushed depending on the hardware; the score flushes them (TINY).
    # Accurate on a GPU too: libdevice's expf (range-reduced, within 2 ulp; tl.exp there is an
    # ex2.approx of x * log2(e), whose error grows with |x|) and correctly rounded division
    # (``/`` is div.full, 2 ulp). The CPU interpreter has no libdevice: numpy's exp there.
    if LIBDEVICE:
        e = libdevice.exp(-tl.abs(x))
    else:
        e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, tl.math.div_rn(1.0, 1.0 + e), tl.math.div_rn(e, 1.0 + e))


@triton.jit
def _score_kernel(CLS, MASK, CU, CONF, LABEL, cap, K, s_cls_b, s_cls_k, s_mask_k, tiny,
                  BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.minimum(tl.load(CU + b), cap)
    n = tl.minimum(tl.load(CU + b + 1), cap) - start
    if pid * BLOCK >= n:
        return
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    slots = (start + offs).to(tl.int64)
    best = tl.full([BLOCK], -1.0, dtype=tl.float32)
    label = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(K):
        l_present = tl.load(CLS + b * s_cls_b + c * s_cls_k).to(tl.float32)
        l_none = tl.load(CLS + b * s_cls_b + c * s_cls_k + 1).to(tl.float32)
        present = _sigmoid(l_present - l_none, LIBDEVICE)  # softmax over the 2 logits
        ml = tl.load(MASK + c * s_mask_k + slots, mask=m, other=0.0).to(tl.float32)
        s = present * _sigmoid(ml, LIBDEVICE)
        s = tl.where(s < tiny, 0.0, s)  # NaN stays NaN
        # strict: the lowest class wins ties; a NaN wins and stays (torch.max): never a candidate
        better = ((s > best) | (s != s)) & (best == best)  # noqa: PLR0124 (NaN tests)
        best = tl.where(better, s, best)
        label = tl.where(better, c, label)
    tl.store(CONF + slots, best, mask=m)
    tl.store(LABEL + slots, label, mask=m)


@triton.jit
def _rank_kernel(CONF, LABEL, CU, EXIT, cap, threshold, top_k,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.minimum(tl.load(CU + b), cap)
    n = tl.minimum(tl.load(CU + b + 1), cap) - start
    if pid * BLOCK_I >= n:
        return
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < n
    conf_i = tl.load(CONF + start + offs_i, mask=mi, other=0.0)
    lab_i = tl.load(LABEL + start + offs_i, mask=mi, other=-1)
    cand_i = mi & (conf_i > threshold)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < n
        conf_j = tl.load(CONF + start + offs_j, mask=mj, other=0.0)
        lab_j = tl.load(LABEL + start + offs_j, mask=mj, other=-2)
        cand_j = mj & (conf_j > threshold)
        beats = (conf_j[None, :] > conf_i[:, None]) | (
            (conf_j[None, :] == conf_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        same = cand_j[None, :] & (lab_j[None, :] == lab_i[:, None]) & beats
        rank += tl.sum(same.to(tl.int32), axis=1)
    tl.store(EXIT + start + offs_i, (cand_i & (rank >= top_k)).to(tl.int8), mask=mi)


def exit_slots(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, tokens: TokenSet, threshold: float,
    top_k: int,
) -> torch.Tensor:
    """Bool [capacity]: the slots that exit (False on padding)."""
    cap, b = tokens.capacity, tokens.batch_size
    k = class_logits.shape[1]
    dev = mask_logits.device
    conf = torch.zeros(cap, device=dev, dtype=torch.float32)
    label = torch.zeros(cap, device=dev, dtype=torch.int32)
    exits = torch.zeros(cap, device=dev, dtype=torch.int8)
    if cap == 0 or b == 0 or tokens.max_seqlen == 0:
        return exits.bool()
    small = interpret_blocks()
    block = small or 128
    cls = class_logits if class_logits.stride(-1) == 1 else class_logits.contiguous()
    ml = mask_logits if mask_logits.stride(-1) == 1 else mask_logits.contiguous()
    max_seqlen = min(tokens.max_seqlen, cap)
    grid = (triton.cdiv(max_seqlen, block), b)
    wrapped(_score_kernel)[grid](cls, ml, tokens.cu_seqlens, conf, label, cap, k, cls.stride(0),
                        cls.stride(1), ml.stride(0), TINY, BLOCK=block,
                        LIBDEVICE=not interpret())
    bi, bj = (small, small) if small else (64, 128)
    wrapped(_rank_kernel)[(triton.cdiv(max_seqlen, bi), b)](
        conf, label, tokens.cu_seqlens, exits, cap, float(threshold), int(top_k),
        BLOCK_I=bi, BLOCK_J=bj)
    return exits.bool()


@torch.no_grad()
def dtop_select(class_logits, mask_logits, tokens: TokenSet, threshold: float, top_k: int):
    """Triton backend of :func:`dtop_kernels.dtop_select` (inputs already checked)."""
    exits = exit_slots(class_logits, mask_logits, tokens, threshold, top_k)
    return tokens.compact(~exits), tokens.dense_mask(exits)
