"""varlen_attention against per-image SDPA (self and cross attention), every backend."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    assert_err_rule,
    backend_params,
    cu_from_counts,
    skip_interpreter_bf16_dot,
)
from naive import naive_attention, naive_logits

from dtop_kernels import BackendError, varlen_attention

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
