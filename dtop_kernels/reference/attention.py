"""Reference varlen attention: pad each image to the host bound, run SDPA, pack again."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtop_kernels.reference import torch_varlen
from dtop_kernels.tokens import slot_positions as _slots


def _in_pad(image: torch.Tensor, pos: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """Slots that have a place in the [B, m] padded layout (all valid slots when the offsets
    keep their contract; out-of-contract slots are dropped rather than indexed)."""
    return (image < b) & (pos >= 0) & (pos < m)


def _unpad(flat: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, b: int, m: int
           ) -> torch.Tensor:
    """The inverse of :func:`_pad`: rows [B * m, ...] of the padded layout -> [capacity, ...]
    packed slots, zero on slots without a place there (padding)."""
    ok = _in_pad(image, pos, b, m)
    rows = flat.index_select(0, torch.where(ok, image * m + pos, 0))
    return torch.where(ok.view(-1, *[1] * (rows.dim() - 1)), rows, rows.new_zeros(()))


def _pad(x: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """[capacity, H, D] packed -> [B, H, m, D] zero-padded (padding slots dropped)."""
    _, h, d = x.shape
    dest = torch.where(_in_pad(image, pos, b, m), image * m + pos, b * m)
    buf = x.new_zeros(b * m + 1, h, d).index_copy(0, dest, x)
    return buf[: b * m].view(b, m, h, d).transpose(1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    return_logits: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See :func:`dtop_kernels.varlen_attention`. Images with no keys give zero output; a
    non-finite query row gives a NaN row, a non-finite key or value row NaN rows for its whole
    image (:func:`nonfinite_rows`).

    CUDA tensors that PyTorch's varlen attention takes (``torch_varlen.reasons``): that, no
    padding, no host sync (the logits, when asked, padded). CPU tensors: a loop over images
    (reading the offsets is free there, and each image runs unmasked SDPA). Elsewhere, and
    under torch.compile (which cannot trace that read): pad to
    the host bounds with a key mask, no host sync.
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            return_logits, dropout_p)
    if not torch_varlen.reasons(q, k, v, dropout_p):
        out = torch_varlen.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale)
        if return_logits:
            out = out, head_mean_logits(q, k, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
        res = out
    elif q.device.type == "cpu" and not torch.compiler.is_compiling():
        res = attention_looped(*args)
    else:
        res = attention_padded(*args)
    poison = nonfinite_rows(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if return_logits:
        return res[0] + poison, res[1]
    return res + poison


def nonfinite_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """[Tq, H, 1]: 0, or NaN where the output row must be NaN, no host sync.

    The documented semantics (the same on every backend): the output row of a query with a NaN
    or Inf entry is NaN, and so are all rows of an image with a NaN or Inf in any of its key or
    value rows (per head); an image without keys gives zero rows whatever its queries hold, and
    padding rows stay zero. ``x * 0`` is 0 for finite x and NaN otherwise, so adding this to the
    output changes nothing else. Not differentiated.
    """
    b = cu_seqlens_q.shape[0] - 1
    cap_q, h = q.shape[:2]
    img_q, pos_q = _slots(cu_seqlens_q, cap_q)
    img_k, _ = _slots(cu_seqlens_k, k.shape[0])
    bad_q = (q.detach() * 0).sum(-1)  # [Tq, H]
    bad_kv = (k.detach() * 0).sum(-1) + (v.detach() * 0).sum(-1)  # [Tk, H]
    per_image = q.new_zeros(b + 1, h).index_add_(0, img_k.clamp(max=b), bad_kv)
    nk = torch.zeros(b + 1, dtype=torch.int64, device=q.device)
    nk[:b] = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    img = img_q.clamp(max=b)
    has_keys = (img_q < b) & (pos_q >= 0) & (nk[img] > 0)
    poison = torch.where(has_keys[:, None], bad_q + per_image[img], bad_q.new_zeros(()))
    return poison[..., None]


def attention_looped(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     return_logits=False, dropout_p=0.0):
    """:func:`varlen_attention` as a loop over images (reads the offsets on the host)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    b = len(cq) - 1
    cap_q, cap_k = q.shape[0], k.shape[0]
    outs, logits = [], []
    for i in range(b):
        q0, q1 = min(cq[i], cap_q), min(cq[i + 1], cap_q)
        k0, k1 = min(ck[i], cap_k), min(ck[i + 1], cap_k)
        qi = q[q0:q1].transpose(0, 1)  # [H, nq, D]
        ki, vi = k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        if k1 > k0:  # 4-D inputs: SDPA's fused CPU kernel takes [B, H, L, D] only
            o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None],
                                               dropout_p=dropout_p, scale=scale)[0]
        else:
            o = qi.new_zeros(qi.shape[0], q1 - q0, v.shape[-1])
        outs.append(o.transpose(0, 1))
        if return_logits:
            logits.append(torch.matmul(qi, ki.transpose(-1, -2)).mean(dim=0) * scale)
    done_q = min(cq[-1], cap_q)
    outs.append(q.new_zeros(cap_q - done_q, q.shape[1], v.shape[-1]))
    res = torch.cat(outs)
    if not return_logits:
        return res
    done_k = min(ck[-1], cap_k)
    logits.append(q.new_zeros(max_seqlen_q, cap_k - done_k))
    return res, torch.cat(logits, dim=1)


def attention_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     return_logits=False, dropout_p=0.0):
    """:func:`varlen_attention` padded to the host bounds (no host sync)."""
    b = cu_seqlens_q.shape[0] - 1
    # a bound above the rows is valid; padding past the rows would only cost memory
    mq, mk = max(min(max_seqlen_q, q.shape[0]), 1), max(min(max_seqlen_k, k.shape[0]), 1)
    img_q, pos_q = _slots(cu_seqlens_q, q.shape[0])
    img_k, pos_k = _slots(cu_seqlens_k, k.shape[0])
    qp = _pad(q, img_q, pos_q, b, mq)  # [B, H, mq, D]
    kp = _pad(k, img_k, pos_k, b, mk)
    vp = _pad(v, img_k, pos_k, b, mk)
    nk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().clamp(0, mk)  # [B]
    ar = torch.arange(mk, device=q.device)
    # Key padding mask. An image with no keys may see its first (all-zero) padded key, so its
    # softmax is finite and its output is exactly zero.
    allowed = (ar[None, :] < nk[:, None]) | ((ar[None, :] == 0) & (nk[:, None] == 0))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed[:, None, None, :],
                                         dropout_p=dropout_p, scale=scale)  # [B, H, mq, Dv]
    res = _unpad(out.transpose(1, 2).reshape(b * mq, *out.shape[1:2], out.shape[-1]), img_q,
                 pos_q, b, mq)
    if not return_logits:
        return res
    # Head-averaged pre-softmax logits, [Kq, capacity_k] with Kq = max_seqlen_q queries/image.
    logits = torch.matmul(qp, kp.transpose(-1, -2)).mean(dim=1) * scale  # [B, mq, mk]
    lg = _unpad(logits.transpose(1, 2).reshape(b * mk, mq), img_k, pos_k, b, mk)
    return res, lg[:, :max_seqlen_q].t()


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       max_seqlen_q: int, max_seqlen_k: int, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_attention` (no dropout) given the output's gradient,
    written out in float32 (float64 for float64 inputs) on the layout padded to the host bounds (no host sync): the softmax
    is recomputed, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO V^T * P))``, ``dQ = dS K *
    scale``, ``dK = dS^T Q * scale``. Padding rows get zero; an image without keys gets zero
    gradients."""
    b = cu_seqlens_q.shape[0] - 1
    mq, mk = max(min(max_seqlen_q, q.shape[0]), 1), max(min(max_seqlen_k, k.shape[0]), 1)
    img_q, pos_q = _slots(cu_seqlens_q, q.shape[0])
    img_k, pos_k = _slots(cu_seqlens_k, k.shape[0])
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64
    qp, dop = (_pad(t.to(acc), img_q, pos_q, b, mq) for t in (q, dout))  # [B, H, mq, D]
    kp, vp = (_pad(t.to(acc), img_k, pos_k, b, mk) for t in (k, v))
    nk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().clamp(0, mk)  # [B]
    allowed = torch.arange(mk, device=q.device)[None, :] < nk[:, None]  # [B, mk]
    s = torch.matmul(qp, kp.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(allowed[:, None, None, :], p, p.new_zeros(()))  # no keys: 0, not NaN
    dv = torch.matmul(p.transpose(-1, -2), dop)
    dp = torch.matmul(dop, vp.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kp) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qp) * scale

    def unpad(t: torch.Tensor, img: torch.Tensor, pos: torch.Tensor, m: int,
              like: torch.Tensor) -> torch.Tensor:
        flat = t.transpose(1, 2).reshape(b * m, t.shape[1], t.shape[-1])
        return _unpad(flat, img, pos, b, m).to(like.dtype)

    return (unpad(dq, img_q, pos_q, mq, q), unpad(dk, img_k, pos_k, mk, k),
            unpad(dv, img_k, pos_k, mk, v))


def head_mean_logits(q: torch.Tensor, k: torch.Tensor, cu_seqlens_k: torch.Tensor, num_q: int,
                     max_seqlen_k: int, scale: float) -> torch.Tensor:
    """Head-averaged pre-softmax logits [num_q, Tk] for uniform queries (``num_q`` rows per
    image, q [B * num_q, H, D]); padding columns zero. Padded batched GEMM, no host sync."""
    b = cu_seqlens_k.shape[0] - 1
    mk = max(max_seqlen_k, 1)
    h, d = q.shape[1:]
    img_k, pos_k = _slots(cu_seqlens_k, k.shape[0])
    kp = _pad(k, img_k, pos_k, b, mk)  # [B, H, mk, D]
    qp = q.reshape(b, num_q, h, d).transpose(1, 2)  # [B, H, num_q, D]
    logits = torch.matmul(qp, kp.transpose(-1, -2)).mean(dim=1) * scale  # [B, num_q, mk]
    cols = logits.transpose(1, 2).reshape(b * mk, num_q)
    src_k = torch.where(img_k < b, img_k * mk + pos_k, 0)
    lg = cols.index_select(0, src_k)
    return torch.where((img_k < b)[:, None], lg, lg.new_zeros(())).t()


def head_mean_logits_backward(
    dl: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cu_k: torch.Tensor, num_q: int,
    max_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the head-mean logits (``[num_q, Tk]``, uniform queries) w.r.t. q and k,
    given their gradient ``dl``: padded batched GEMMs, no host sync. Shared by the kernel
    backends, whose forward computes the logits in a kernel."""
    tq, h, d = q.shape
    b = cu_k.shape[0] - 1
    mk = max(min(max_k, k.shape[0]), 1)
    img, pos = _slots(cu_k, k.shape[0])
    kp = _pad(k, img, pos, b, mk).transpose(1, 2).reshape(b, mk, h * d)  # [B, mk, HD]
    dlp = _pad(dl.t()[:, None, :], img, pos, b, mk)[:, 0].transpose(1, 2)  # [B, num_q, mk]
    c = scale / h
    dq = torch.bmm(dlp.float(), kp.float()) * c  # [B, num_q, HD]
    qb = q.reshape(b, num_q, h * d).float()
    dkp = torch.bmm(dlp.float().transpose(1, 2), qb) * c  # [B, mk, HD]
    dk = _unpad(dkp.reshape(b * mk, h, d), img, pos, b, mk)
    return dq.reshape(tq, h, d).to(q.dtype), dk.to(k.dtype)
