"""The independent per-image references every op is tested against, written without dtop_kernels.

They follow the official DToP code's semantics: one image at a time, a boolean keep mask per
image, boolean-mask indexing and a per-image ``F.scaled_dot_product_attention``; LayerNorm is
``F.layer_norm`` on ``naive_gather``'s rows. Nothing here imports ``dtop_kernels`` (package
references included): the tests compare both the kernels and the package references with these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def naive_gather(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], keep bool [B, N] -> the active rows [T, C], image after image."""
    rows = [x[b][keep[b]] for b in range(x.shape[0])]
    return torch.cat(rows) if rows else x.new_zeros(0, x.shape[-1])


def naive_scatter(
    rows: torch.Tensor, keep: torch.Tensor, base: torch.Tensor, add: bool = False
) -> torch.Tensor:
    """A new [B, N, C]: ``base`` with the active tokens replaced by (add: increased by) ``rows``
    [T, C] (image after image, position order)."""
    out = base.clone()
    off = 0
    for b in range(base.shape[0]):
        pos = keep[b].nonzero().squeeze(1)
        n = pos.numel()
        if n:
            out[b, pos] = out[b, pos] + rows[off:off + n] if add else rows[off:off + n]
        off += n
    return out


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts_q: list[int],
    counts_k: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Per image b: SDPA of its ``counts_q[b]`` query rows against its ``counts_k[b]`` key rows.

    q [>=Tq, H, D], k [>=Tk, H, D], v [>=Tk, H, Dv], packed image after image (rows past the
    totals are ignored). An image with no keys gets zeros. Returns [Tq, H, Dv].
    """
    outs = []
    oq = ok = 0
    for nq, nk in zip(counts_q, counts_k):
        qb, kb, vb = q[oq:oq + nq], k[ok:ok + nk], v[ok:ok + nk]
        if nk == 0:
            outs.append(q.new_zeros(nq, q.shape[1], v.shape[2]))
        else:
            o = F.scaled_dot_product_attention(
                qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                scale=scale,
            )
            outs.append(o[0].transpose(0, 1))
        oq, ok = oq + nq, ok + nk
    return torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[2])


def naive_logits(
    q: torch.Tensor, k: torch.Tensor, num_q: int, counts_k: list[int], scale: float
) -> torch.Tensor:
    """Head-averaged pre-softmax logits for ``num_q`` queries per image: [num_q, Tk], column j
    for key row j against the queries of its image (the DToP head's mask logits)."""
    cols = []
    ok = 0
    for b, nk in enumerate(counts_k):
        qb = q[b * num_q:(b + 1) * num_q]  # [Kq, H, D]
        kb = k[ok:ok + nk]  # [nk, H, D]
        per_head = torch.einsum("qhd,khd->hqk", qb, kb)
        cols.append(per_head.mean(dim=0) * scale)
        ok += nk
    return torch.cat(cols, dim=1)


def naive_block(x: torch.Tensor, keep: torch.Tensor, blocks: nn.Module | list[nn.Module]):
    """Per image: the block's own dense forward on that image's active tokens only; inactive
    tokens come back unchanged. x [B, N, C] -> [B, N, C]."""
    if isinstance(blocks, nn.Module):
        blocks = [blocks]
    out = x.clone()
    for b in range(x.shape[0]):
        m = keep[b]
        if not bool(m.any()):
            continue
        xb = x[b, m][None]
        for blk in blocks:
            xb = blk(xb)
        out[b, m] = xb[0]
    return out


TINY = 2.0**-126  # scores below the smallest normal float32 count as 0


def _sigmoid(x: float) -> float:
    if math.isnan(x):
        return x
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def naive_select(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    keep: torch.Tensor,
    threshold: float,
    top_k: int,
) -> torch.Tensor:
    """The DToP exit rule, literally, with Python loops.

    class_logits [B, K, 2]; mask_logits [B, K, N] (dense per token; only active tokens read);
    keep bool [B, N] (active tokens). Returns the bool [B, N] mask of the tokens that exit.

    Per image: s[c, n] = softmax(class_logits[b, c])[0] * sigmoid(mask_logits[b, c, n]), as
    sigmoid(l_present - l_none) (the limit for infinite logits), 0 below TINY;
    conf = max_c s, label = argmax_c s (lowest c on ties; a NaN score wins and is never a
    candidate); candidates: active with conf > p0;
    per class with candidates the min(k, count) most confident candidates (lower position on
    ties) stay; every other candidate exits.
    """
    cls = class_logits.double().tolist()
    ml = mask_logits.double().tolist()
    kp = keep.tolist()
    bsz, ncls, n_tok = mask_logits.shape
    exits = [[False] * n_tok for _ in range(bsz)]
    for b in range(bsz):
        present = [_sigmoid(cls[b][c][0] - cls[b][c][1]) for c in range(ncls)]
        by_class: dict[int, list[tuple[float, int]]] = {}
        for n in range(n_tok):
            if not kp[b][n]:
                continue
            conf, label = -1.0, -1
            for c in range(ncls):
                s = present[c] * _sigmoid(ml[b][c][n])
                s = 0.0 if s < TINY else s
                if math.isnan(s):  # NaN wins (torch.max): never a candidate
                    conf, label = s, c
                    break
                if s > conf:  # strict: the lowest class keeps a tie
                    conf, label = s, c
            if conf > threshold:
                by_class.setdefault(label, []).append((conf, n))
        for cands in by_class.values():
            ranked = sorted(cands, key=lambda t: (-t[0], t[1]))
            for _, n in ranked[min(top_k, len(ranked)):]:
                exits[b][n] = True
    return torch.tensor(exits, dtype=torch.bool).reshape(bsz, n_tok)
