"""The independent per-image references every op is tested against, written without dtop_kernels.

They follow the official DToP code's semantics: one image at a time, a boolean keep mask per
image, boolean-mask indexing and a per-image ``F.scaled_dot_product_attention``; LayerNorm is
``F.layer_norm`` on ``naive_gather``'s rows; ``exits_allowed`` is the exit rule with near ties
(within float32 rounding) going either way. Nothing here imports ``dtop_kernels`` (package
references included): the tests compare both the kernels and the package references with these.
"""

from __future__ import annotations

import itertools
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


def _scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, keep: torch.Tensor
            ) -> list[dict[int, list[float]]]:
    """Per image, {position: [s_c for every class]} of its active tokens, in float64:
    s[c, n] = sigmoid(l_present - l_none) * sigmoid(mask_logit), 0 below TINY."""
    cls = class_logits.double().tolist()
    ml = mask_logits.double().tolist()
    out = []
    for b, kb in enumerate(keep.tolist()):
        present = [_sigmoid(p - q) for p, q in cls[b]]
        out.append({n: [0.0 if s < TINY else s
                        for s in (present[c] * _sigmoid(ml[b][c][n]) for c in range(len(cls[b])))]
                    for n, k in enumerate(kb) if k})
    return out


def _conf_label(scores: list[float]) -> tuple[float, int]:
    """max and argmax: the lowest class on ties; a NaN score wins."""
    conf, label = -1.0, -1
    for c, s in enumerate(scores):
        if math.isnan(s):
            return s, c
        if s > conf:  # strict: the lowest class keeps a tie
            conf, label = s, c
    return conf, label


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
    bsz, _, n_tok = mask_logits.shape
    exits = [[False] * n_tok for _ in range(bsz)]
    for b, image in enumerate(_scores(class_logits, mask_logits, keep)):
        by_class: dict[int, list[tuple[float, int]]] = {}
        for n, scores in image.items():
            conf, label = _conf_label(scores)
            if conf > threshold:
                by_class.setdefault(label, []).append((conf, n))
        for cands in by_class.values():
            ranked = sorted(cands, key=lambda t: (-t[0], t[1]))
            for _, n in ranked[min(top_k, len(ranked)):]:
                exits[b][n] = True
    return torch.tensor(exits, dtype=torch.bool).reshape(bsz, n_tok)


NEAR_ULPS = 8  # float32 ulps: a GPU's score (two sigmoids, a product) is within a few


def exits_allowed(
    exited: torch.Tensor,
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    keep: torch.Tensor,
    threshold: float,
    top_k: int,
    ulps: int = NEAR_ULPS,
) -> list[str]:
    """Why ``exited`` (bool [B, N]) is no outcome the exit rule allows when near ties may go
    either way (empty: it is one); arguments as for :func:`naive_select`.

    A float32 implementation rounds each score: confidences within ``ulps`` float32 ulps of each
    other, or of the threshold, and class scores within them of the confidence, are near ties,
    which either outcome may resolve. Exact ties (equal float64 scores, from equal inputs) keep
    the rule's order: lowest class, then lowest position. Allowed means: some confidences within
    ``ulps`` of the float64 ones, and labels among the near-tied classes, give ``exited`` under
    the rule. Near ties across classes are enumerated (at most 4096 combinations per image).
    """
    reasons = []
    ex = exited.cpu().tolist()
    for b, image in enumerate(_scores(class_logits, mask_logits, keep)):
        exits = {n for n, e in enumerate(ex[b]) if e}
        if exits - image.keys():
            reasons.append(f"image {b}: inactive tokens {sorted(exits - image.keys())} exit")
        tokens = {}  # position -> (conf, lo, hi, possible labels)
        for n, scores in image.items():
            conf, label = _conf_label(scores)
            if math.isnan(conf):
                if n in exits:
                    reasons.append(f"image {b}: token {n} (NaN confidence) exits")
                continue
            tol = ulps * 2.0**-24 * abs(conf)
            near = [c for c, s in enumerate(scores) if conf - 2 * tol <= s < conf]
            tokens[n] = conf, conf - tol, conf + tol, sorted([label, *near])
        for n in exits & tokens.keys():
            if tokens[n][2] <= threshold:
                reasons.append(f"image {b}: token {n} exits with confidence {tokens[n][0]!r} "
                               f"<= threshold {threshold}")
        choices = [(n, t[3]) for n, t in tokens.items() if len(t[3]) > 1 and t[2] > threshold]
        if math.prod(len(c) for _, c in choices) > 4096:
            reasons.append(f"image {b}: too many near ties across classes to check")
            continue
        why = ""
        for pick in itertools.product(*(c for _, c in choices)):
            labels = {n: t[3][0] for n, t in tokens.items()} | dict(zip([n for n, _ in choices],
                                                                         pick))
            why = _groups_allowed(tokens, labels, exits, threshold, top_k)
            if not why:
                break
        if why:
            reasons.append(f"image {b}: {why}")
    return reasons


def _groups_allowed(tokens: dict, labels: dict[int, int], exits: set[int], threshold: float,
                    top_k: int) -> str:
    """'' when every class's exits are its candidates past the top_k (near ties either way),
    else why not; ``tokens``: position -> (conf, lo, hi, labels)."""
    for g in set(labels.values()):
        group = [n for n in tokens if labels[n] == g and tokens[n][2] > threshold]
        out = [n for n in group if n in exits]
        sure = [n for n in group if n not in exits and tokens[n][1] > threshold]
        maybe = sorted((n for n in group if n not in exits and tokens[n][1] <= threshold),
                       key=lambda n: -tokens[n][2])
        if not out:
            if len(sure) > top_k:
                return f"class {g}: {len(sure)} sure candidates stay, top_k {top_k}"
            continue
        if not len(sure) <= top_k <= len(sure) + len(maybe):
            return f"class {g}: {len(out)} exit but {len(sure)} sure candidates stay"
        for a in sure + maybe[:top_k - len(sure)]:
            for x in out:
                (ca, _, ha, _), (cx, lx, _, _) = tokens[a], tokens[x]
                if not (ca > cx or (ca == cx and a < x) or (ca != cx and ha >= lx)):
                    return f"class {g}: token {x} exits but {a} stays ({cx!r} > {ca!r})"
    return ""
