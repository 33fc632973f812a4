"""The compiled CUDA launchers (dtop_kernels/cuda/): LayerNorm, DToP selection, attention.

Argument checks run before any CUDA call, so they are tested everywhere with CPU tensors. The
kernels themselves are compared with the PyTorch references (float64 where the rule needs an
exact value: err(kernel) <= 2 * err(PyTorch in the same dtype) + floor) and with the Triton
launchers; they need a GPU and the built ``dtop_kernels._C`` and skip cleanly otherwise.
Outputs are poisoned with NaN before the kernels run, so a row that is never written shows.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dtop_kernels import TokenSet
from dtop_kernels.cuda import attention as cuda_attn
from dtop_kernels.cuda import layernorm as cuda_ln
from dtop_kernels.cuda import select as cuda_select
from dtop_kernels.cuda import unavailable_reasons
from dtop_kernels.reference import attention as ref_attn
from dtop_kernels.reference import select as ref_select

NAN = float("nan")
HAS_CUDA = torch.cuda.is_available()
CUDA_REASON = "; ".join(unavailable_reasons()) if HAS_CUDA else "needs a CUDA GPU"


def gpu_test(fn):
    """Marks a test ``gpu`` and skips it without a GPU or without the built ``_C``."""
    fn = pytest.mark.skipif(not HAS_CUDA or bool(unavailable_reasons()), reason=CUDA_REASON)(fn)
    return pytest.mark.gpu(fn)


def _tokens(counts: list[int], n: int, device, extra_capacity: int = 0, seed: int = 0) -> TokenSet:
    """``counts[b]`` random active tokens in image b of N; capacity T + extra_capacity."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        keep[b, torch.randperm(n, generator=g)[:c]] = True
    cap = min(sum(counts) + extra_capacity, len(counts) * n)
    return TokenSet.from_mask(keep.to(device), capacity=cap)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _assert_err_rule(got, same_dtype, exact, floor: float, what: str) -> None:
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, base = _max_err(got, exact), _max_err(same_dtype, exact)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 * {base:.3g} + {floor:g}"


# ---------------------------------------------------------------------------- argument checks
# CPU tensors: each launcher must raise ValueError before touching CUDA or the compiled module.

def _cpu_tokens() -> TokenSet:
    return TokenSet.from_lists([[0, 2], [1]], seq_len=4)


def test_layer_norm_checks_cpu():
    t = _cpu_tokens()
    x = torch.randn(8, 16)
    w, b = torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ln.layer_norm_fwd(x, w, b, t, 1e-6, gather=True)
    with pytest.raises(ValueError, match="rows"):
        cuda_ln.layer_norm_fwd(x, w, b, t, 1e-6, gather=False)  # 8 rows, capacity 3
    with pytest.raises(ValueError, match="weight"):
        cuda_ln.layer_norm_fwd(x.half(), w.bfloat16(), b.bfloat16(), t, 1e-6, gather=True)
    with pytest.raises(ValueError, match="shape"):
        cuda_ln.layer_norm_fwd(x, torch.ones(15), b, t, 1e-6, gather=True)
    with pytest.raises(ValueError, match="eps"):
        cuda_ln.layer_norm_fwd(x, w, b, t, -1.0, gather=True)
    with pytest.raises(ValueError, match="float64"):
        cuda_ln.layer_norm_fwd(x.double(), w, b, t, 1e-6, gather=True)
    with pytest.raises(TypeError, match="TokenSet"):
        cuda_ln.layer_norm_fwd(x, w, b, None, 1e-6, gather=True)
    stats = torch.zeros(t.capacity)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ln.layer_norm_bwd(torch.randn(3, 16), x, w, stats, stats, t, gather=True)
    with pytest.raises(ValueError, match="dy"):
        cuda_ln.layer_norm_bwd(torch.randn(4, 16), x, w, stats, stats, t, gather=True)
    with pytest.raises(ValueError, match="dtype"):
        cuda_ln.layer_norm_bwd(torch.randn(3, 16).half(), x, w, stats, stats, t, gather=True)


def test_select_checks_cpu():
    t = _cpu_tokens()
    cls, mask = torch.randn(2, 5, 2), torch.randn(5, t.capacity)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_select.dtop_select(cls, mask, t, 0.5, 5)
    with pytest.raises(ValueError, match="mask_logits"):
        cuda_select.dtop_select(cls, torch.randn(4, t.capacity), t, 0.5, 5)
    with pytest.raises(ValueError, match="class_logits"):
        cuda_select.dtop_select(torch.randn(2, 5, 3), mask, t, 0.5, 5)
    with pytest.raises(ValueError, match="NaN"):
        cuda_select.dtop_select(cls, mask, t, NAN, 5)
    with pytest.raises(ValueError, match="top_k"):
        cuda_select.dtop_select(cls, mask, t, 0.5, -1)
    with pytest.raises(ValueError, match="classes"):
        cuda_select.dtop_select(torch.randn(2, 0, 2), torch.randn(0, t.capacity), t, 0.5, 5)


def test_attention_checks_cpu():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    q = torch.randn(5, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_attn.attention_fwd(q, q, q, cu, cu, 3, 0.125)
    with pytest.raises(ValueError, match="triton"):  # float32: no tensor-core path
        cuda_attn.attention_fwd(q.float(), q.float(), q.float(), cu, cu, 3, 0.125)
    q48 = torch.randn(5, 2, 48, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 48"):
        cuda_attn.attention_fwd(q48, q48, q48, cu, cu, 3, 0.125)
    with pytest.raises(ValueError, match="v must have"):
        cuda_attn.attention_fwd(q, q, q[..., :32], cu, cu, 3, 0.125)
    with pytest.raises(ValueError, match="int32"):
        cuda_attn.attention_fwd(q, q, q, cu.long(), cu, 3, 0.125)
    with pytest.raises(ValueError, match="entries"):
        cuda_attn.attention_fwd(q, q, q, cu[:2], cu, 3, 0.125)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        cuda_attn.attention_fwd(q, q, q, cu, cu, -1, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        cuda_attn.attention_fwd(q, q.bfloat16(), q, cu, cu, 3, 0.125)
    lse = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_attn.attention_bwd(q, q, q, q, q, lse, cu, cu, 3, 3, 0.125)
    with pytest.raises(ValueError, match="lse"):
        cuda_attn.attention_bwd(q, q, q, q, q, lse.t(), cu, cu, 3, 3, 0.125)
    with pytest.raises(ValueError, match="queries"):  # Tq = 5 is not B * num_q = 2 * 3
        cuda_attn.head_mean_logits(q, q, cu, 3, 3, 0.125)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_attn.head_mean_logits(q[:4], q, cu, 2, 3, 0.125)


# ---------------------------------------------------------------------------- LayerNorm
LN_CASES = [
    pytest.param([0, 5, 17], 19, 13, 4, id="C13-zero-count-padded"),
    pytest.param([1], 7, 77, 0, id="C77-one-token"),
    pytest.param([30, 2, 11], 31, 768, 6, id="C768"),
    pytest.param([9, 16], 16, 1024, 3, id="C1024-full-image"),
    pytest.param([5, 3], 8, 1280, 2, id="C1280-looped"),
    pytest.param([0, 0], 6, 64, 4, id="all-empty"),
]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
          (torch.float32, torch.float16, torch.bfloat16)]


def _ln_reference(x2d, w, b, tokens, eps, gather, dtype):
    """F.layer_norm on the valid rows (in ``dtype``), zero padding rows; and T."""
    t = int(tokens.cu_seqlens[-1])
    rows = x2d[tokens.indices[:t].long()] if gather else x2d[:t]
    y = torch.zeros(tokens.capacity, x2d.shape[1], dtype=dtype, device=x2d.device)
    y[:t] = F.layer_norm(rows.to(dtype), (x2d.shape[1],), w.to(dtype), b.to(dtype), eps)
    return y, rows, t


@pytest.mark.parametrize("counts,n,c,extra", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "packed"])
@pytest.mark.parametrize("fp32_params", [False, True], ids=["params-as-x", "params-fp32"])
@gpu_test
def test_layer_norm_fwd(counts, n, c, extra, dtype, gather, fp32_params):
    torch.manual_seed(0)
    dev = "cuda"
    tokens = _tokens(counts, n, dev, extra)
    rows = len(counts) * n if gather else tokens.capacity
    x2d = (torch.randn(rows, c, device=dev) * 2 + 0.5).to(dtype)
    pdt = torch.float32 if fp32_params else dtype
    w = (1 + 0.1 * torch.randn(c, device=dev)).to(pdt)
    b = (0.1 * torch.randn(c, device=dev)).to(pdt)
    out = torch.full((tokens.capacity, c), NAN, device=dev, dtype=dtype)
    xo = torch.full_like(out, NAN)
    y, xp, mean, rstd = cuda_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-6, gather, True, out=out,
                                               x_out=xo)
    assert y is out and xp is xo
    exact, raw, t = _ln_reference(x2d.double(), w.double(), b.double(), tokens, 1e-6, gather,
                                  torch.float64)
    same, _, _ = _ln_reference(x2d, w, b, tokens, 1e-6, gather, dtype)
    _assert_err_rule(y, same, exact, 1e-5, "y")
    assert torch.equal(xp[:t], raw) and torch.all(xp[t:] == 0) and torch.all(y[t:] == 0)
    xr = raw.double()
    torch.testing.assert_close(mean[:t].double(), xr.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd[:t].double(), 1 / (xr.var(1, unbiased=False) + 1e-6).sqrt(),
                               rtol=1e-4, atol=1e-5)
    assert torch.all(mean[t:] == 0) and torch.all(rstd[t:] == 0)
    triton_ln = pytest.importorskip("dtop_kernels.triton.layernorm")
    y_tr, _, _, _ = triton_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-6, gather=gather)
    _assert_err_rule(y, y_tr, exact, 1e-5, "y vs triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@gpu_test
def test_layer_norm_strided_rows(dtype, offset):
    """Rows with a row stride > C, from a base that is (or is not) 16-byte aligned."""
    dev, c = "cuda", 96
    tokens = _tokens([7, 12], 16, dev, 3)
    wide = torch.randn(2 * 16, c + 40, device=dev).to(dtype)
    x2d = wide[:, offset:offset + c]
    w, b = torch.randn(c, device=dev), torch.randn(c, device=dev)
    y, _, mean, rstd = cuda_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-5, gather=True)
    exact, _, _ = _ln_reference(x2d.double(), w.double(), b.double(), tokens, 1e-5, True,
                                torch.float64)
    same, _, _ = _ln_reference(x2d, w, b, tokens, 1e-5, True, dtype)
    _assert_err_rule(y, same, exact, 1e-5, "y")
    dy = torch.randn(tokens.capacity, c, device=dev).to(dtype)
    dx, _, _ = cuda_ln.layer_norm_bwd(dy, x2d, w, mean, rstd, tokens, gather=True)
    dx_c, _, _ = cuda_ln.layer_norm_bwd(dy, x2d.contiguous(), w, mean, rstd, tokens, gather=True)
    torch.testing.assert_close(dx, dx_c, rtol=0, atol=0)


@pytest.mark.parametrize("counts,n,c,extra", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "packed"])
@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "dx_add"])
@gpu_test
def test_layer_norm_bwd(counts, n, c, extra, dtype, gather, with_add):
    torch.manual_seed(1)
    dev = "cuda"
    tokens = _tokens(counts, n, dev, extra)
    cap = tokens.capacity
    rows = len(counts) * n if gather else cap
    x2d = torch.randn(rows, c, device=dev).to(dtype)
    w = (1 + 0.1 * torch.randn(c, device=dev)).to(dtype)
    b = (0.1 * torch.randn(c, device=dev)).to(dtype)
    dy = torch.randn(cap, c, device=dev).to(dtype)
    add = torch.randn(cap, c, device=dev).to(dtype) if with_add else None
    _, _, mean, rstd = cuda_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-6, gather)
    dx, dw, db = cuda_ln.layer_norm_bwd(dy, x2d, w, mean, rstd, tokens, gather, dx_add=add)
    t = int(tokens.cu_seqlens[-1])
    src = tokens.indices[:t].long() if gather else torch.arange(t, device=dev)

    def grads(prec):
        xr = x2d[src].to(prec).requires_grad_()
        wr, br = w.to(prec).requires_grad_(), b.to(prec).requires_grad_()
        y = F.layer_norm(xr, (c,), wr, br, 1e-6)
        gx, gw, gb = torch.autograd.grad(y, (xr, wr, br), dy[:t].to(prec))
        if add is not None:
            gx = gx + add[:t].to(prec)
        return gx, gw, gb

    exact, same = grads(torch.float64), grads(dtype)
    for name, got, s, e in zip(("dx", "dweight", "dbias"), (dx[:t], dw, db), same, exact):
        assert got.dtype == dtype
        _assert_err_rule(got, s, e, 1e-4 * max(1, t) ** 0.5, name)
    pad = add[t:] if add is not None else torch.zeros_like(dx[t:])
    assert torch.equal(dx[t:], pad), "padding rows of dx must be dx_add (or zero)"


# ---------------------------------------------------------------------------- selection
SELECT_CASES = [
    pytest.param([40, 0, 1, 25], 48, 7, 0, id="B4-zero-one"),
    pytest.param([300], 320, 150, 9, id="B1-many-classes-padded"),
    pytest.param([600, 513], 700, 20, 3, id="B2-multi-tile"),
    pytest.param([0, 0], 8, 3, 4, id="all-empty"),
]


def _check_selection(got, want, tokens):
    (nxt, exited), (nxt_ref, exited_ref) = got, want
    assert torch.equal(exited, exited_ref)
    assert torch.equal(nxt.cu_seqlens, nxt_ref.cu_seqlens)
    assert torch.equal(nxt.indices, nxt_ref.indices)  # kept slots in order, -1 after
    assert nxt.capacity == tokens.capacity and nxt.max_seqlen == tokens.max_seqlen


@pytest.mark.parametrize("counts,n,k,extra", SELECT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [0, 1, 5])
@gpu_test
def test_select_matches_reference(counts, n, k, extra, dtype, top_k):
    g = torch.Generator().manual_seed(2)
    dev = "cuda"
    tokens = _tokens(counts, n, dev, extra)
    # Logits on two disjoint grids (class: odd quarters, mask: halves; exact in every dtype):
    # distinct scores differ by >= 1.4e-4 relative and sit >= 3e-3 from the threshold, so the
    # comparison is exact whatever the sigmoid / softmax rounding; equal scores (many) are ties.
    cls = torch.zeros(len(counts), k, 2)
    cls[..., 0] = (2 * torch.randint(-6, 6, (len(counts), k), generator=g) + 1) / 4
    mask = torch.randint(-6, 17, (k, tokens.capacity), generator=g) / 2
    cls, mask = cls.to(dev, dtype), mask.to(dev, dtype)
    t = int(tokens.cu_seqlens[-1])
    mask[:, t:] = NAN  # padding columns must never be read
    got = cuda_select.dtop_select(cls, mask, tokens, 0.5, top_k)
    _check_selection(got, ref_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)
    triton_select = pytest.importorskip("dtop_kernels.triton.select")
    _check_selection(got, triton_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)


@gpu_test
def test_select_ties_and_all_exit():
    dev = "cuda"
    tokens = _tokens([12, 9], 16, dev, 2)
    cls = torch.tensor([[[4.0, -4.0]] * 3] * 2, device=dev)
    # Every class and token has the same score: label 0 (lowest class), rank = slot order.
    mask = torch.full((3, tokens.capacity), 6.0, device=dev)
    for top_k in (0, 3, 50):
        got = cuda_select.dtop_select(cls, mask, tokens, 0.5, top_k)
        _check_selection(got, ref_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)
    nxt, exited = cuda_select.dtop_select(cls, mask, tokens, 0.5, 0)
    assert int(nxt.cu_seqlens[-1]) == 0 and int(exited.sum()) == 21
    assert torch.all(nxt.indices == -1)


# ---------------------------------------------------------------------------- attention
ATTN_CASES = [
    pytest.param([0, 1, 17, 70], 0, id="B4-zero-one-17-70"),
    pytest.param([1], 3, id="B1-one-padded"),
    pytest.param([0, 0], 2, id="all-empty"),
    pytest.param([130, 65], 5, id="B2-multi-tile"),
]
HEAD_DIMS = [pytest.param(d, id=f"D{d}") for d in (32, 64, 80, 96, 128)]
HALF = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
        (torch.float16, torch.bfloat16)]


def _qkv(counts, pad, h, d, dtype, n_tensors=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    out = []
    for _ in range(n_tensors):
        x = torch.randn(t + pad, h, d, generator=g, dtype=torch.float64)
        x[t:] = NAN  # padding rows must never be read
        out.append(x.to("cuda", dtype))
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    return out, cu, t


def _ref_attention(q, k, v, cu, m, scale, t, prec):
    out = ref_attn.varlen_attention(q[:t].to(prec), k[:t].to(prec), v[:t].to(prec), cu, cu, m,
                                    m, scale)
    return out


@pytest.mark.parametrize("counts,pad", ATTN_CASES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@gpu_test
def test_attention_fwd(counts, pad, d, dtype):
    h = 3
    (q, k, v), cu, t = _qkv(counts, pad, h, d, dtype)
    m, scale = max(counts), d ** -0.5
    out = torch.full_like(q, NAN)
    lse = torch.full((h, t + pad), NAN, device="cuda")
    got, got_lse = cuda_attn.attention_fwd(q, k, v, cu, cu, m, scale, out=out, lse=lse)
    assert got is out and got_lse is lse
    exact = _ref_attention(q, k, v, cu, m, scale, t, torch.float64)
    same = _ref_attention(q, k, v, cu, m, scale, t, dtype)
    _assert_err_rule(got[:t], same, exact, 1e-3, "out")
    assert torch.isnan(got[t:]).all() and torch.isnan(got_lse[:, t:]).all(), \
        "padding rows must be left untouched"
    fresh, _ = cuda_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    assert torch.equal(fresh[:t], got[:t]) and torch.all(fresh[t:] == 0)
    # lse, base 2, against the float64 scores (-inf for an image with no keys: none here)
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if hi > lo:
            s = torch.einsum("ihd,jhd->hij", q[lo:hi].double(), k[lo:hi].double()) * scale
            want = torch.logsumexp(s, dim=-1) / math.log(2)
            torch.testing.assert_close(got_lse[:, lo:hi].double(), want, rtol=0, atol=2e-2)
    triton_attn = pytest.importorskip("dtop_kernels.triton.attention")
    out_tr, lse_tr = triton_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    _assert_err_rule(got[:t], out_tr[:t], exact, 1e-3, "out vs triton")
    torch.testing.assert_close(got_lse[:, :t], lse_tr[:, :t], rtol=0, atol=2e-2)


@gpu_test
def test_attention_fwd_no_keys_and_cross():
    """Cross attention with different query / key counts, one image without keys."""
    h, d, dtype = 2, 64, torch.float16
    cq = torch.tensor([0, 5, 9, 30], dtype=torch.int32, device="cuda")
    ck = torch.tensor([0, 0, 66, 70], dtype=torch.int32, device="cuda")
    q = torch.randn(30, h, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(70, h, d, device="cuda", dtype=dtype) for _ in range(2))
    out, lse = cuda_attn.attention_fwd(q, k, v, cq, ck, 21, 0.125)
    want = ref_attn.varlen_attention(q.double(), k.double(), v.double(), cq, ck, 21, 66, 0.125)
    same = ref_attn.varlen_attention(q, k, v, cq, ck, 21, 66, 0.125)
    _assert_err_rule(out, same, want, 1e-3, "out")
    assert torch.all(out[:5] == 0) and torch.all(lse[:, :5] == -math.inf)


@pytest.mark.parametrize("counts,pad", ATTN_CASES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@gpu_test
def test_attention_bwd(counts, pad, d, dtype):
    h = 2
    (q, k, v, do), cu, t = _qkv(counts, pad, h, d, dtype, n_tensors=4)
    m, scale = max(counts), d ** -0.5
    out, lse = cuda_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    dq, dk, dv = cuda_attn.attention_bwd(do, q, k, v, out, lse, cu, cu, m, m, scale)

    def grads(prec):
        ins = [x[:t].to(prec).requires_grad_() for x in (q, k, v)]
        o = ref_attn.varlen_attention(*ins, cu, cu, m, m, scale)
        return torch.autograd.grad(o, ins, do[:t].to(prec)) if t else [x[:0] for x in ins]

    exact, same = grads(torch.float64), grads(dtype)
    for name, got, s, e in zip(("dq", "dk", "dv"), (dq, dk, dv), same, exact):
        _assert_err_rule(got[:t], s, e, 2e-3, name)
        assert torch.all(got[t:] == 0), f"{name}: padding rows must be zero"
    # Shared backward: the CUDA backward on the Triton forward's outputs, and the reverse.
    triton_attn = pytest.importorskip("dtop_kernels.triton.attention")
    out_tr, lse_tr = triton_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    mixed = cuda_attn.attention_bwd(do, q, k, v, out_tr, lse_tr, cu, cu, m, m, scale)
    tr = triton_attn.attention_bwd(do, q, k, v, out, lse, cu, cu, m, m, scale)
    for name, a, b_, e in zip(("dq", "dk", "dv"), mixed, tr, exact):
        _assert_err_rule(a[:t], b_[:t], e, 2e-3, f"{name} (triton forward)")


LOGIT_CASES = [
    pytest.param([0, 1, 70], 150, id="ADE-150-classes"),
    pytest.param([33], 7, id="B1-7-queries"),
    pytest.param([130, 5], 64, id="multi-tile"),
]


@pytest.mark.parametrize("counts,num_q", LOGIT_CASES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@gpu_test
def test_head_mean_logits(counts, num_q, d, dtype):
    h, pad, b = 3, 4, len(counts)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(b * num_q, h, d, generator=g).to("cuda", dtype)
    (k,), cu, t = _qkv(counts, pad, h, d, dtype, n_tensors=1)
    scale = d ** -0.5
    out = torch.full((num_q, t + pad), NAN, device="cuda", dtype=dtype)
    got = cuda_attn.head_mean_logits(q, k, cu, num_q, max(counts), scale, out=out)
    assert got is out
    cq = torch.arange(b + 1, dtype=torch.int32, device="cuda") * num_q

    def logits(prec):
        kk = torch.cat([k[:t], torch.zeros_like(k[t:])]).to(prec)
        return ref_attn.varlen_attention(q.to(prec), kk, kk, cq, cu, num_q, max(counts), scale,
                                         return_logits=True)[1]

    _assert_err_rule(got[:, :t], logits(dtype)[:, :t], logits(torch.float64)[:, :t], 1e-3,
                     "logits")
    assert torch.isnan(got[:, t:]).all(), "padding columns must be left untouched"
    triton_attn = pytest.importorskip("dtop_kernels.triton.attention")
    tr = triton_attn.head_mean_logits(q, k, cu, num_q, max(counts), scale)
    _assert_err_rule(got[:, :t], tr[:, :t], logits(torch.float64)[:, :t], 1e-3,
                     "logits vs triton")


@gpu_test
def test_attention_rejects_float32_on_gpu():
    q = torch.randn(4, 1, 64, device="cuda")
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="backend='triton'"):
        cuda_attn.attention_fwd(q, q, q, cu, cu, 4, 0.125)


def test_sanitize_driver_needs_a_gpu():
    """tests/sanitize_cuda.py (the compute-sanitizer workload) says what it needs and exits 2
    where it cannot run."""
    if HAS_CUDA and not unavailable_reasons():
        pytest.skip("a GPU is here: the driver runs (see pytest -m gpu and compute-sanitizer)")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("sanitize_cuda.py")
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 2


@pytest.mark.parametrize("group", ["gather", "layernorm", "attention", "linear", "select"])
def test_sanitize_driver_harness(group):
    """The driver's own comparisons hold with the Triton kernels in place of the CUDA ones (under
    the CPU interpreter here), so a failure under compute-sanitizer points at the CUDA kernel.
    ("stage" composes the same ops: too slow for the interpreter, covered by test_block.)"""
    pytest.importorskip("triton")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "sanitize_cuda", Path(__file__).with_name("sanitize_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.check(group, torch.float16, "cuda" if HAS_CUDA else "cpu", kernel="triton")
