"""varlen_attention against per-image SDPA (self and cross attention, the head-mean logits),
every backend, forward and backward; the reference's two paths (host loop, padded device path);
the torch backend's CUDA path through PyTorch's varlen attention (a CPU stand-in); GPU-sized
shapes; the compiled CUDA launchers (argument checks on CPU tensors, the kernels on a GPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    assert_err_rule,
    backend_params,
    compiled_asm,
    cu_from_counts,
    cuda_kernel_test,
    mixed_tokens,
    run_or_skip,
    skip_interpreter_bf16_dot,
    triton_cross_check,
)
from naive import naive_attention, naive_logits

from dtop_kernels import BackendError, varlen_attention
from dtop_kernels.cuda import attention as cuda_attn
from dtop_kernels.reference import attention as ref_attn
from dtop_kernels.reference import torch_varlen

BACKENDS = backend_params("torch", "triton")
NAN = float("nan")

SELF_CASES = [
    pytest.param([0, 1, 17, 5], 0, id="B4-zero-one-17-5"),
    pytest.param([1], 0, id="B1-one"),
    pytest.param([0, 0], 3, id="all-empty-padded"),
    pytest.param([33, 2], 4, id="B2-33-2-padded"),
    pytest.param([20], 0, id="B1-20"),
]
HEADS = [
    pytest.param(h, d, id=f"H{h}-D{d}") for h in (1, 3) for d in (32, 64, 80, 128)
]


def _packed(rows: int, pad: int, h: int, d: int, dtype, gen) -> torch.Tensor:
    """[rows + pad, H, D] random rows with NaN padding (padding must never be read)."""
    t = torch.randn(rows + pad, h, d, generator=gen, dtype=torch.float64)
    t[rows:] = NAN
    return t.to(DEVICE, dtype)


def _run_self(counts, pad, h, d, dtype, backend, gen, bound_slack=0):
    t = sum(counts)
    q, k, v = (_packed(t, pad, h, d, dtype, gen) for _ in range(3))
    cu = cu_from_counts(counts)
    m = max(counts) + bound_slack
    out = varlen_attention(q, k, v, cu, cu, m, m, backend=backend)
    return q, k, v, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,pad", SELF_CASES)
def test_self_attention(counts, pad, backend, gen):
    h, d = 2, 24
    t = sum(counts)
    q, k, v, out = _run_self(counts, pad, h, d, torch.float32, backend, gen)
    assert out.shape == (t + pad, h, d) and out.dtype == torch.float32
    exact = naive_attention(q[:t].double(), k[:t].double(), v[:t].double(), counts, counts)
    same = naive_attention(q[:t], k[:t], v[:t], counts, counts)
    assert_err_rule(out[:t], same, exact, 1e-5, "out")
    assert torch.all(out[t:] == 0), "padding rows must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,d", HEADS)
def test_head_dims(h, d, backend, gen):
    counts = [0, 1, 19, 6]
    t = sum(counts)
    q, k, v, out = _run_self(counts, 2, h, d, torch.float32, backend, gen, bound_slack=3)
    exact = naive_attention(q[:t].double(), k[:t].double(), v[:t].double(), counts, counts)
    same = naive_attention(q[:t], k[:t], v[:t], counts, counts)
    assert_err_rule(out[:t], same, exact, 1e-5, "out")
    assert torch.all(out[t:] == 0)


def test_torch_backend_float64_exact(gen):
    counts = [3, 0, 11]
    t = sum(counts)
    q, k, v, out = _run_self(counts, 2, 3, 16, torch.float64, "torch", gen)
    torch.testing.assert_close(out[:t], naive_attention(q[:t], k[:t], v[:t], counts, counts),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_value_dim(backend, gen):
    counts = [4, 9]
    t = sum(counts)
    q, k = (_packed(t, 0, 2, 16, torch.float32, gen) for _ in range(2))
    v = _packed(t, 0, 2, 16, torch.float32, gen)
    cu = cu_from_counts(counts)
    out = varlen_attention(q, k, v, cu, cu, 9, 9, scale=0.37, backend=backend)
    exact = naive_attention(q.double(), k.double(), v.double(), counts, counts, scale=0.37)
    same = naive_attention(q, k, v, counts, counts, scale=0.37)
    assert_err_rule(out, same, exact, 1e-5)


def test_value_dim_differs_torch(gen):
    counts = [4, 9]
    q, k = (_packed(13, 0, 2, 16, torch.float64, gen) for _ in range(2))
    v = _packed(13, 0, 2, 8, torch.float64, gen)
    cu = cu_from_counts(counts)
    out = varlen_attention(q, k, v, cu, cu, 9, 9, backend="torch")
    torch.testing.assert_close(out, naive_attention(q, k, v, counts, counts))


CROSS_CASES = [
    pytest.param(7, [0, 1, 20, 5], 3, id="Kq7-B4-zero-one-20-5-padded"),
    pytest.param(3, [12], 0, id="Kq3-B1"),
    pytest.param(1, [2, 0], 0, id="Kq1-B2"),
    pytest.param(18, [17, 33], 2, id="Kq18-B2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kq,counts,pad", CROSS_CASES)
@pytest.mark.parametrize("h,d", [pytest.param(1, 32, id="H1-D32"),
                                 pytest.param(3, 80, id="H3-D80")])
def test_cross_attention_with_logits(kq, counts, pad, h, d, backend, gen):
    """K class queries per image attend to that image's keys; the head-averaged logits are
    the DToP head's mask logits."""
    b, tk = len(counts), sum(counts)
    q = _packed(b * kq, 0, h, d, torch.float32, gen)
    k, v = (_packed(tk, pad, h, d, torch.float32, gen) for _ in range(2))
    cu_q = cu_from_counts([kq] * b)
    cu_k = cu_from_counts(counts)
    scale = d**-0.5
    out, logits = varlen_attention(q, k, v, cu_q, cu_k, kq, max(counts), return_logits=True,
                                   backend=backend)
    assert out.shape == (b * kq, h, d)
    assert logits.shape == (kq, tk + pad) and logits.dtype == torch.float32
    qd, kd, vd = q.double(), k[:tk].double(), v[:tk].double()
    exact = naive_attention(qd, kd, vd, [kq] * b, counts)
    same = naive_attention(q, k[:tk], v[:tk], [kq] * b, counts)
    assert_err_rule(out, same, exact, 1e-5, "out")
    lg_exact = naive_logits(qd, kd, kq, counts, scale)
    lg_same = naive_logits(q, k[:tk], kq, counts, scale)
    assert_err_rule(logits[:, :tk], lg_same, lg_exact, 1e-5, "logits")
    assert torch.all(logits[:, tk:] == 0), "padding columns must be zero"
    # Images with no keys: zero output.
    for i, c in enumerate(counts):
        if c == 0:
            assert torch.all(out[i * kq:(i + 1) * kq] == 0)


@pytest.mark.parametrize("cross", [pytest.param(False, id="self"), pytest.param(True, id="cross")])
def test_reference_device_path(cross, gen):
    """The reference's padded, no-sync path (used on CUDA) against per-image SDPA."""
    from dtop_kernels.reference.attention import attention_padded

    counts, pad, h, d, kq = [0, 1, 17, 5], 3, 2, 16, 4
    b, tk = len(counts), sum(counts)
    k, v = (_packed(tk, pad, h, d, torch.float64, gen) for _ in range(2))
    counts_q = [kq] * b if cross else counts
    q = _packed(sum(counts_q), 0 if cross else pad, h, d, torch.float64, gen)
    cu_q, cu_k = cu_from_counts(counts_q), cu_from_counts(counts)
    res = attention_padded(q, k, v, cu_q, cu_k, max(counts_q), max(counts), 0.3, cross)
    out, lg = res if cross else (res, None)
    tq = sum(counts_q)
    torch.testing.assert_close(out[:tq], naive_attention(q[:tq], k[:tk], v[:tk], counts_q, counts,
                                                         scale=0.3))
    assert torch.all(out[tq:] == 0)
    if cross:
        torch.testing.assert_close(lg[:, :tk], naive_logits(q, k[:tk], kq, counts, 0.3))
        assert torch.all(lg[:, tk:] == 0)


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_reference_paths_agree(padded, cross):
    """The reference's device path (T stays on the device: padded ops, used on CUDA) and its host
    path (a loop over images, used on the CPU) agree, forward and backward, on CPU tensors."""
    t = mixed_tokens(padded)
    h, d = 2, 16
    k = torch.randn(t.capacity, h, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    if cross:
        kq = 5
        q = torch.randn(3 * kq, h, d, dtype=torch.float64, requires_grad=True)
        cu_q, mq = torch.arange(4, dtype=torch.int32) * kq, kq
    else:
        q = torch.randn_like(k, requires_grad=True)
        cu_q, mq = t.cu_seqlens, t.max_seqlen
    args = (q, k, v, cu_q, t.cu_seqlens, mq, t.max_seqlen, 0.3, cross)
    a, b = ref_attn.attention_looped(*args), ref_attn.attention_padded(*args)
    if not cross:
        a, b = (a,), (b,)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, rtol=1e-12, atol=1e-12)
    loss_a = sum((u * (i + 1)).sum() for i, u in enumerate(a))
    loss_b = sum((u * (i + 1)).sum() for i, u in enumerate(b))
    for u, w in zip(torch.autograd.grad(loss_a, (q, k, v)), torch.autograd.grad(loss_b, (q, k, v))):
        torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_low_precision(dtype, backend, gen):
    skip_interpreter_bf16_dot(backend, dtype)
    counts = [0, 1, 23, 9]
    t = sum(counts)
    q, k, v, out = _run_self(counts, 2, 3, 64, dtype, backend, gen)
    assert out.dtype == dtype
    exact = naive_attention(q[:t].double(), k[:t].double(), v[:t].double(), counts, counts)
    same = naive_attention(q[:t], k[:t], v[:t], counts, counts)
    assert_err_rule(out[:t], same, exact, 1e-3, "out")
    assert torch.all(out[t:] == 0)


# ---------------------------------------------------------------------- gradients
def test_gradcheck_torch_self():
    counts = [3, 0, 1, 4]
    cu = cu_from_counts(counts)
    q, k, v = (torch.randn(10, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
               for _ in range(3))  # 8 real rows + 2 padding rows

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 4, 4, backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_torch_logits():
    counts = [3, 0, 2]
    cu_q, cu_k = cu_from_counts([2] * 3), cu_from_counts(counts)
    q = torch.randn(6, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(6, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
            for _ in range(2))

    def f(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, 2, 3, return_logits=True, backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits", [pytest.param(False, id="out"),
                                    pytest.param(True, id="out+logits")])
def test_backward_vs_naive(logits, backend, gen):
    h, d, kq = 2, 40, 5
    counts = [0, 1, 21, 6]
    b, tk, pad = len(counts), sum(counts), 2
    if logits:
        q = _packed(b * kq, 0, h, d, torch.float32, gen)
        cu_q, counts_q, mq = cu_from_counts([kq] * b), [kq] * b, kq
    else:
        q = _packed(tk, pad, h, d, torch.float32, gen)
        cu_q, counts_q, mq = cu_from_counts(counts), counts, max(counts)
    k, v = (_packed(tk, pad, h, d, torch.float32, gen) for _ in range(2))
    cu_k = cu_from_counts(counts)
    tq = sum(counts_q)
    g = torch.randn(q.shape[0], h, d, generator=gen).to(DEVICE)
    gl = torch.randn(kq, k.shape[0], generator=gen).to(DEVICE)

    def grads(fn, dtype):
        ins = [t[:n].to(dtype).requires_grad_(True) for t, n in ((q, tq), (k, tk), (v, tk))]
        loss = fn(*ins)
        return torch.autograd.grad(loss, ins)

    def op(qq, kk, vv):
        # Padding rows appended again (NaN) so the op sees them; their grads are not compared.
        qp = torch.cat([qq, q[tq:].to(qq.dtype)])
        kp, vp = torch.cat([kk, k[tk:]]), torch.cat([vv, v[tk:]])
        res = varlen_attention(qp, kp, vp, cu_q, cu_k, mq, max(counts), return_logits=logits,
                               backend=backend)
        if logits:
            o, lg = res
            return (o * g).sum() + (lg[:, :tk] * gl[:, :tk]).sum()
        return (res[:tq] * g[:tq]).sum()

    def naive(qq, kk, vv):
        loss = (naive_attention(qq, kk, vv, counts_q, counts) * g[:tq].to(qq.dtype)).sum()
        if logits:
            lg = naive_logits(qq, kk, kq, counts, d**-0.5)
            loss = loss + (lg * gl[:, :tk].to(qq.dtype)).sum()
        return loss

    got = grads(op, torch.float32)
    exact = grads(naive, torch.float64)
    same = grads(naive, torch.float32)
    for name, a, s, e in zip("qkv", got, same, exact):
        assert_err_rule(a, s, e, 1e-5, f"d{name}")


# ---------------------------------------------------------------------- errors
def _qkv(t=6, h=2, d=8, dtype=torch.float32):
    return [torch.zeros(t, h, d, dtype=dtype, device=DEVICE) for _ in range(3)]


def _cu(vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype, device=DEVICE)


def test_error_head_mismatch():
    q, k, v = _qkv()
    cu = _cu([0, 6])
    with pytest.raises(ValueError, match="H and D"):
        varlen_attention(q, k[:, :1], v, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="H and D"):
        varlen_attention(q, k[..., :4], v, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="Tk and H"):
        varlen_attention(q, k, v[:, :1], cu, cu, 6, 6)


def test_error_int64_cu_seqlens():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="int32"):
        varlen_attention(q, k, v, _cu([0, 6], torch.int64), _cu([0, 6]), 6, 6)


def test_error_return_logits_non_uniform():
    q, k, v = _qkv()
    cu_q, cu_k = _cu([0, 2, 6]), _cu([0, 3, 6])  # 2 and 4 queries: not uniform
    with pytest.raises(ValueError, match="return_logits"):
        varlen_attention(q, k, v, cu_q, cu_k, 4, 3, return_logits=True)


@pytest.mark.parametrize(
    "kwargs,err",
    [
        pytest.param({"dtype_k": torch.float16}, TypeError, id="dtype-mismatch"),
        pytest.param({"cu_q": [0, 3, 6], "cu_k": [0, 6]}, ValueError, id="cu-shape-mismatch"),
        pytest.param({"dropout_p": 1.0}, ValueError, id="dropout-1"),
        pytest.param({"max_q": -1}, ValueError, id="negative-max"),
        pytest.param({"max_q": 5}, ValueError, id="max-below-count"),
        pytest.param({"int_q": True}, TypeError, id="int-q"),
        pytest.param({"q2d": True}, ValueError, id="2d-q"),
    ],
)
def test_errors(kwargs, err):
    q, k, v = _qkv()
    if "dtype_k" in kwargs:
        k = k.to(kwargs["dtype_k"])
    if kwargs.get("int_q"):
        q = q.long()
    if kwargs.get("q2d"):
        q = q[:, 0]
    cu_q, cu_k = _cu(kwargs.get("cu_q", [0, 6])), _cu(kwargs.get("cu_k", [0, 6]))
    with pytest.raises(err):
        varlen_attention(q, k, v, cu_q, cu_k, kwargs.get("max_q", 6), 6,
                         dropout_p=kwargs.get("dropout_p", 0.0))


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_kernel_backends_refuse_float64(backend):
    q, k, v = _qkv(dtype=torch.float64)
    cu = _cu([0, 6])
    with pytest.raises(BackendError):
        varlen_attention(q, k, v, cu, cu, 6, 6, backend=backend)


# ---------------------------------------------------------------------- torch backend on CUDA
# The torch backend's CUDA path (PyTorch's varlen attention), its plumbing checked on the CPU
# with a stand-in that behaves like the flash kernel: padding rows of the output and of
# dq / dk / dv left unwritten (NaN here), per-image attention on the valid rows.
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


def test_torch_varlen_reasons_on_this_machine():
    q = torch.zeros(4, 2, 20)
    r = torch_varlen.reasons(q, q, q, dropout_p=0.1)
    if torch_varlen.varlen_fn() is None:
        assert "torch >= 2.9" in r[0]
        return
    text = "; ".join(r)
    assert "CUDA only" in text and "float16 / bfloat16" in text and "multiples of 8" in text
    assert "dropout" in text


def test_torch_varlen_reasons_when_torch_lacks_it(monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_fn", lambda: None)
    q = torch.zeros(4, 2, 32, dtype=torch.float16)
    assert "has no torch.nn.attention.varlen.varlen_attn" in torch_varlen.reasons(q, q, q)[0]


def test_torch_varlen_forward_backward(stand_in, gen):
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


def test_torch_varlen_logits_beside(stand_in, gen):
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


def test_torch_varlen_no_keys_anywhere(stand_in):
    q = torch.randn(3, 1, 8, dtype=torch.float64)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out = varlen_attention(q, q, q, cu, cu, 0, 0, backend="torch")
    assert out.shape == (3, 1, 8) and torch.all(out == 0)


# ---------------------------------------------------------------------- compiled Triton forward
def _first_loop_body(ir: str) -> str:
    """The body of the first ``scf.for`` loop in MLIR text ``ir`` (braces matched)."""
    start = ir.index("{", ir.index("scf.for"))
    depth = 0
    for i in range(start, len(ir)):
        depth += {"{": 1, "}": -1}.get(ir[i], 0)
        if depth == 0:
            return ir[start:i + 1]
    raise ValueError("unbalanced braces")


def test_triton_fwd_loop_reduces_only_for_the_softmax():
    """The forward's K/V loop holds only the online softmax's reductions (row max, row sum): the
    non-finite rule accumulates K and V element-wise there and reduces once after the loop. Its
    former per-tile reductions cost barriers, shared-memory round trips and registers in every
    iteration on sm_90 (fp16, ViT-B launch)."""
    reductions = _first_loop_body(compiled_asm("_fwd_kernel")["ttir"]).count('"tt.reduce"')
    assert 1 <= reductions <= 2, f"{reductions} reductions in the K/V loop"


# ---------------------------------------------------------------------- GPU-sized shapes
GPU_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype,floor", GPU_DTYPES)
@pytest.mark.parametrize("h,d", [pytest.param(12, 64, id="H12-D64"),
                                 pytest.param(3, 80, id="H3-D80"),
                                 pytest.param(2, 128, id="H2-D128")])
def test_attention_gpu_shapes(h, d, dtype, floor, backend, gen):
    """Up to 1024 tokens per image, ViT head dims, forward and backward, every backend the
    dispatcher allows for the dtype."""
    counts = [0, 1, 1024, 333, 64]
    t, pad = sum(counts), 7
    q, k, v = (torch.randn(t + pad, h, d, generator=gen).to(DEVICE, dtype) for _ in range(3))
    for tns in (q, k, v):
        tns[t:] = NAN
    cu = cu_from_counts(counts)
    leaves = [tns[:t].detach().clone().requires_grad_(True) for tns in (q, k, v)]
    g = torch.randn(t, h, d, generator=gen).to(DEVICE, dtype)

    def op():
        qq, kk, vv = (torch.cat([leaf, tns[t:]]) for leaf, tns in zip(leaves, (q, k, v)))
        out = varlen_attention(qq, kk, vv, cu, cu, max(counts), max(counts), backend=backend)
        return out, torch.autograd.grad((out[:t] * g).sum(), leaves)

    out, grads = run_or_skip(op, backend)
    assert torch.all(out[t:] == 0)

    def naive(dt):
        ins = [tns[:t].detach().to(dt).requires_grad_(True) for tns in (q, k, v)]
        o = naive_attention(*ins, counts, counts)
        return o, torch.autograd.grad((o * g.to(dt)).sum(), ins)

    exact, exact_g = naive(torch.float64)
    same, same_g = naive(dtype)
    assert_err_rule(out[:t], same, exact, floor, "out")
    for name, a, s, e in zip("qkv", grads, same_g, exact_g):
        assert_err_rule(a, s, e, floor, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype,floor", GPU_DTYPES)
def test_cross_logits_gpu_shapes(dtype, floor, backend, gen):
    """ADE20K's 150 class queries against up to 1024 keys per image, with the logits."""
    h, d, kq = 8, 64, 150
    counts = [0, 1024, 77, 1]
    b, tk = len(counts), sum(counts)
    q = torch.randn(b * kq, h, d, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(tk + 5, h, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    cu_q, cu_k = cu_from_counts([kq] * b), cu_from_counts(counts)
    out, lg = run_or_skip(lambda: varlen_attention(q, k, v, cu_q, cu_k, kq, max(counts),
                                                   return_logits=True, backend=backend), backend)
    qd, kd, vd = q.double(), k[:tk].double(), v[:tk].double()
    assert_err_rule(out, naive_attention(q, k[:tk], v[:tk], [kq] * b, counts),
                    naive_attention(qd, kd, vd, [kq] * b, counts), floor, "out")
    assert_err_rule(lg[:, :tk], naive_logits(q, k[:tk], kq, counts, d**-0.5),
                    naive_logits(qd, kd, kq, counts, d**-0.5), floor, "logits")
    assert torch.all(lg[:, tk:] == 0)


# ---------------------------------------------------------------------- CUDA launchers
# Argument checks run before any CUDA call, so they are tested everywhere with CPU tensors.
def test_cuda_launcher_checks_cpu():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    q = torch.randn(5, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_attn.attention_fwd(q, q, q, cu, cu, 3, 0.125)
    with pytest.raises(ValueError, match="triton"):  # float32: no tensor-core path
        cuda_attn.attention_fwd(q.float(), q.float(), q.float(), cu, cu, 3, 0.125)
    q48 = torch.randn(5, 2, 48, dtype=torch.float16)
    # the compiled module reports its head dims; without it the device check speaks first
    from dtop_kernels.cuda import head_dims

    with pytest.raises(ValueError, match="head dim 48" if head_dims() else "CUDA tensors"):
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


# The kernels against the reference in float64 (err <= 2 * err(PyTorch in the same dtype) +
# floor) and against the Triton launchers; outputs poisoned with NaN so unwritten rows show.
CUDA_CASES = [
    pytest.param([0, 1, 17, 70], 0, id="B4-zero-one-17-70"),
    pytest.param([1], 3, id="B1-one-padded"),
    pytest.param([0, 0], 2, id="all-empty"),
    pytest.param([130, 65], 5, id="B2-multi-tile"),
]
CUDA_HEAD_DIMS = [pytest.param(d, id=f"D{d}") for d in (32, 64, 80, 96, 128)]
HALF = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
        (torch.float16, torch.bfloat16)]


def _cuda_qkv(counts, pad, h, d, dtype, dev, n_tensors=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    out = []
    for _ in range(n_tensors):
        x = torch.randn(t + pad, h, d, generator=g, dtype=torch.float64)
        x[t:] = NAN  # padding rows must never be read
        out.append(x.to(dev, dtype))
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                      device=dev)
    return out, cu, t


def _ref_attention(q, k, v, cu, m, scale, t, prec):
    return ref_attn.varlen_attention(q[:t].to(prec), k[:t].to(prec), v[:t].to(prec), cu, cu, m,
                                     m, scale)


@pytest.mark.parametrize("counts,pad", CUDA_CASES)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@cuda_kernel_test
def test_cuda_attention_fwd(counts, pad, d, dtype, kernel_device):
    h = 3
    (q, k, v), cu, t = _cuda_qkv(counts, pad, h, d, dtype, kernel_device)
    m, scale = max(counts), d ** -0.5
    out = torch.full_like(q, NAN)
    lse = torch.full((h, t + pad), NAN, device=kernel_device)
    got, got_lse = cuda_attn.attention_fwd(q, k, v, cu, cu, m, scale, out=out, lse=lse)
    assert got is out and got_lse is lse
    exact = _ref_attention(q, k, v, cu, m, scale, t, torch.float64)
    same = _ref_attention(q, k, v, cu, m, scale, t, dtype)
    assert_err_rule(got[:t], same, exact, 1e-3, "out")
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
    triton_attn = triton_cross_check("attention", kernel_device)
    if triton_attn is None:
        return
    out_tr, lse_tr = triton_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    assert_err_rule(got[:t], out_tr[:t], exact, 1e-3, "out vs triton")
    torch.testing.assert_close(got_lse[:, :t], lse_tr[:, :t], rtol=0, atol=2e-2)


@cuda_kernel_test
def test_cuda_attention_fwd_no_keys_and_cross(kernel_device):
    """Cross attention with different query / key counts, one image without keys."""
    h, d, dtype, dev = 2, 64, torch.float16, kernel_device
    cq = torch.tensor([0, 5, 9, 30], dtype=torch.int32, device=dev)
    ck = torch.tensor([0, 0, 66, 70], dtype=torch.int32, device=dev)
    q = torch.randn(30, h, d, device=dev, dtype=dtype)
    k, v = (torch.randn(70, h, d, device=dev, dtype=dtype) for _ in range(2))
    out, lse = cuda_attn.attention_fwd(q, k, v, cq, ck, 21, 0.125)
    want = ref_attn.varlen_attention(q.double(), k.double(), v.double(), cq, ck, 21, 66, 0.125)
    same = ref_attn.varlen_attention(q, k, v, cq, ck, 21, 66, 0.125)
    assert_err_rule(out, same, want, 1e-3, "out")
    assert torch.all(out[:5] == 0) and torch.all(lse[:, :5] == -math.inf)


@pytest.mark.parametrize("counts,pad", CUDA_CASES)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@cuda_kernel_test
def test_cuda_attention_bwd(counts, pad, d, dtype, kernel_device):
    h = 2
    (q, k, v, do), cu, t = _cuda_qkv(counts, pad, h, d, dtype, kernel_device, n_tensors=4)
    m, scale = max(counts), d ** -0.5
    out, lse = cuda_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    dq, dk, dv = cuda_attn.attention_bwd(do, q, k, v, out, lse, cu, cu, m, m, scale)

    def grads(prec):
        ins = [x[:t].to(prec).requires_grad_() for x in (q, k, v)]
        o = ref_attn.varlen_attention(*ins, cu, cu, m, m, scale)
        return torch.autograd.grad(o, ins, do[:t].to(prec)) if t else [x[:0] for x in ins]

    exact, same = grads(torch.float64), grads(dtype)
    for name, got, s, e in zip(("dq", "dk", "dv"), (dq, dk, dv), same, exact):
        assert_err_rule(got[:t], s, e, 2e-3, name)
        assert torch.all(got[t:] == 0), f"{name}: padding rows must be zero"
    # Shared backward: the CUDA backward on the Triton forward's outputs, and the reverse.
    triton_attn = triton_cross_check("attention", kernel_device)
    if triton_attn is None:
        return
    out_tr, lse_tr = triton_attn.attention_fwd(q, k, v, cu, cu, m, scale)
    mixed = cuda_attn.attention_bwd(do, q, k, v, out_tr, lse_tr, cu, cu, m, m, scale)
    tr = triton_attn.attention_bwd(do, q, k, v, out, lse, cu, cu, m, m, scale)
    for name, a, b_, e in zip(("dq", "dk", "dv"), mixed, tr, exact):
        assert_err_rule(a[:t], b_[:t], e, 2e-3, f"{name} (triton forward)")


LOGIT_CASES = [
    pytest.param([0, 1, 70], 150, id="ADE-150-classes"),
    pytest.param([33], 7, id="B1-7-queries"),
    pytest.param([130, 5], 64, id="multi-tile"),
]


@pytest.mark.parametrize("counts,num_q", LOGIT_CASES)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF)
@cuda_kernel_test
def test_cuda_head_mean_logits(counts, num_q, d, dtype, kernel_device):
    h, pad, b = 3, 4, len(counts)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(b * num_q, h, d, generator=g).to(kernel_device, dtype)
    (k,), cu, t = _cuda_qkv(counts, pad, h, d, dtype, kernel_device, n_tensors=1)
    scale = d ** -0.5
    out = torch.full((num_q, t + pad), NAN, device=kernel_device, dtype=dtype)
    got = cuda_attn.head_mean_logits(q, k, cu, num_q, max(counts), scale, out=out)
    assert got is out
    cq = torch.arange(b + 1, dtype=torch.int32, device=kernel_device) * num_q

    def logits(prec):
        kk = torch.cat([k[:t], torch.zeros_like(k[t:])]).to(prec)
        return ref_attn.varlen_attention(q.to(prec), kk, kk, cq, cu, num_q, max(counts), scale,
                                         return_logits=True)[1]

    assert_err_rule(got[:, :t], logits(dtype)[:, :t], logits(torch.float64)[:, :t], 1e-3,
                    "logits")
    assert torch.isnan(got[:, t:]).all(), "padding columns must be left untouched"
    triton_attn = triton_cross_check("attention", kernel_device)
    if triton_attn is None:
        return
    tr = triton_attn.head_mean_logits(q, k, cu, num_q, max(counts), scale)
    assert_err_rule(got[:, :t], tr[:, :t], logits(torch.float64)[:, :t], 1e-3,
                    "logits vs triton")


@cuda_kernel_test
def test_cuda_attention_rejects_float32_on_gpu(kernel_device):
    q = torch.randn(4, 1, 64, device=kernel_device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=kernel_device)
    with pytest.raises(ValueError, match="backend='triton'"):
        cuda_attn.attention_fwd(q, q, q, cu, cu, 4, 0.125)
