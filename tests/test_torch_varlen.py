"""The torch backend's CUDA attention path (PyTorch's varlen attention), its plumbing checked
on the CPU with a stand-in that behaves like the flash kernel: padding rows of the output and
of dq / dk / dv left unwritten (NaN here), per-image attention on the valid rows."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from naive import naive_attention, naive_logits

from dtop_kernels import varlen_attention
from dtop_kernels.reference import torch_varlen

NAN = float("nan")


class _NanPadGrad(torch.autograd.Function):
    """Identity whose backward leaves the padding rows' gradient "unwritten" (NaN)."""

    @staticmethod
    def forward(ctx, t, valid):
        ctx.save_for_backward(valid)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        (valid,) = ctx.saved_tensors
        return torch.where(valid[:, None, None], g, NAN), None


def _stand_in(with_scale: bool):
    calls = []

    def body(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None):
        calls.append((max_q, max_k, scale))
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        assert max(b - a for a, b in itertools.pairwise(cq)) <= max_q
        vq = torch.arange(query.shape[0]) < cq[-1]
        vk = torch.arange(key.shape[0]) < ck[-1]
        query = _NanPadGrad.apply(query, vq)
        key, value = _NanPadGrad.apply(key, vk), _NanPadGrad.apply(value, vk)
        rows = []
        for i in range(len(cq) - 1):
            qi = query[cq[i]:cq[i + 1]].transpose(0, 1)[None]
            ki, vi = (t[ck[i]:ck[i + 1]].transpose(0, 1)[None] for t in (key, value))
            if ki.shape[2] == 0:
                rows.append(query.new_zeros(qi.shape[2], query.shape[1], value.shape[2]))
                continue
            rows.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0]
                        .transpose(0, 1))
        pad = query.new_full((query.shape[0] - cq[-1], query.shape[1], value.shape[2]), NAN)
        return torch.cat(rows + [pad])

    if with_scale:
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
               scale=None):
            return body(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)
    else:  # torch 2.9's signature: no scale, default D ** -0.5
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
               return_aux=None):
            return body(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    return fn, calls


@pytest.fixture(params=[True, False], ids=["scale-kwarg", "no-scale-kwarg"])
def stand_in(request, monkeypatch):
    fn, calls = _stand_in(request.param)
    monkeypatch.setattr(torch_varlen, "varlen_fn", lambda: fn)
    monkeypatch.setattr(torch_varlen, "reasons", lambda *a, **k: [])
    return calls


def test_reasons_on_this_machine():
    q = torch.zeros(4, 2, 20)
    r = torch_varlen.reasons(q, q, q, dropout_p=0.1)
    if torch_varlen.varlen_fn() is None:
        assert "torch >= 2.9" in r[0]
        return
    text = "; ".join(r)
    assert "CUDA only" in text and "float16 / bfloat16" in text and "multiples of 8" in text
    assert "dropout" in text


def test_reasons_when_torch_lacks_it(monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_fn", lambda: None)
    q = torch.zeros(4, 2, 32, dtype=torch.float16)
    assert "has no torch.nn.attention.varlen.varlen_attn" in torch_varlen.reasons(q, q, q)[0]


def test_forward_backward_through_varlen(stand_in, gen):
    counts, pad, h, d = [5, 0, 9, 3], 4, 2, 16
    t = sum(counts)
    cu = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32)
    q, k, v = (torch.randn(t + pad, h, d, generator=gen, dtype=torch.float64)
               .requires_grad_() for _ in range(3))
    scale = 0.3
    out = varlen_attention(q, k, v, cu, cu, max(counts) + 2, max(counts) + 2, scale=scale,
                           backend="torch")
    assert stand_in, "the varlen path was not taken"
    ref = naive_attention(q[:t], k[:t], v[:t], counts, counts, scale=scale)
    torch.testing.assert_close(out[:t], ref, rtol=1e-10, atol=1e-10)
    assert torch.all(out[t:] == 0), "padding rows must be zero"
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g[:t])
    for name, got, exp in zip("qkv", grads, want):
        assert torch.isfinite(got).all(), f"d{name}: the padding rows' gradient leaked"
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_logits_beside_varlen(stand_in, gen):
    counts, kq, h, d = [6, 0, 11], 3, 2, 8
    tk = sum(counts)
    cu_q = torch.arange(len(counts) + 1, dtype=torch.int32) * kq
    cu_k = torch.tensor([0, 6, 6, 17], dtype=torch.int32)
    q = torch.randn(kq * len(counts), h, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(tk + 2, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    out, logits = varlen_attention(q, k, v, cu_q, cu_k, kq, max(counts), return_logits=True,
                                   backend="torch")
    assert stand_in
    torch.testing.assert_close(out, naive_attention(q, k[:tk], v[:tk], [kq] * 3, counts),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[:, :tk], naive_logits(q, k, kq, counts, d ** -0.5),
                               rtol=1e-10, atol=1e-10)
    assert torch.all(logits[:, tk:] == 0)


def test_no_keys_anywhere(stand_in):
    q = torch.randn(3, 1, 8, dtype=torch.float64)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out = varlen_attention(q, q, q, cu, cu, 0, 0, backend="torch")
    assert out.shape == (3, 1, 8) and torch.all(out == 0)
