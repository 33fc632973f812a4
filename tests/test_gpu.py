"""Every op on CUDA tensors, for every backend the dispatcher says can run (skipped otherwise,
with its reasons), in fp32 / fp16 / bf16 against float64 references with the error-ratio rule,
forward and backward. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from blocks import Block, randomize_
from helpers import assert_err_rule, random_keep
from naive import (
    naive_attention,
    naive_block,
    naive_gather,
    naive_logits,
    naive_scatter,
    naive_select,
)

from dtop_kernels import (
    BackendError,
    TokenSet,
    dtop_select,
    gather_tokens,
    pruned_stage,
    scatter_tokens,
    varlen_attention,
)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
NAN = float("nan")
BACKENDS = [pytest.param(name, id=name) for name in ("torch", "triton", "cuda")]
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]


def _run(fn, backend: str):
    """Run ``fn``; skip (with the dispatcher's reasons) when ``backend`` cannot run it."""
    try:
        return fn()
    except BackendError as e:
        pytest.skip(f"backend {backend!r} cannot run this call here:\n{e}")


def _tokens(b, n, counts, gen, padded=True):
    keep = random_keep(b, n, counts, gen)
    ts = TokenSet.from_mask(keep.to(DEV), capacity=b * n if padded else None)
    return keep.to(DEV), ts


def _cu(counts):
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    return torch.tensor(cu, dtype=torch.int32, device=DEV)


# ---------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("padded", [pytest.param(False, id="exact"),
                                    pytest.param(True, id="padded")])
def test_gather_scatter(padded, dtype, floor, backend, gen):
    b, n, c = 4, 197, 77
    counts = [0, 197, 1, 60]
    t = sum(counts)
    keep, ts = _tokens(b, n, counts, gen, padded)
    x = torch.randn(b, n, c, generator=gen).to(DEV, dtype)
    x[~keep] = NAN
    packed = _run(lambda: gather_tokens(x, ts, backend=backend), backend)
    assert torch.equal(packed[:t], naive_gather(x, keep))
    assert torch.all(packed[t:] == 0)
    for add in (False, True):
        src = torch.randn(ts.capacity, c, generator=gen).to(DEV, dtype)
        src[t:] = NAN
        out = torch.randn(b, n, c, generator=gen).to(DEV, dtype)
        out[~keep] = NAN
        base = out.clone()
        res = _run(lambda s=src, o=out, a=add: scatter_tokens(s, ts, o, add=a, backend=backend),
                   backend)
        assert res is out
        torch.testing.assert_close(res, naive_scatter(src[:t], keep, base, add=add), rtol=0,
                                   atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter_backward(backend, gen):
    b, n, c = 3, 64, 40
    counts = [64, 0, 17]
    t = sum(counts)
    keep, ts = _tokens(b, n, counts, gen)
    x = torch.randn(b, n, c, generator=gen).to(DEV).requires_grad_(True)
    base = torch.randn(b, n, c, generator=gen).to(DEV).requires_grad_(True)
    g = torch.randn(b, n, c, generator=gen).to(DEV)

    def op():
        p = gather_tokens(x, ts, backend=backend)
        y = scatter_tokens(p * 2, ts, base.clone(), add=True, backend=backend)
        return torch.autograd.grad((y * g).sum(), (x, base))

    got = _run(op, backend)
    y = naive_scatter(naive_gather(x, keep) * 2, keep, base.clone(), add=True)
    want = torch.autograd.grad((y * g).sum(), (x, base))
    assert t > 0
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("h,d", [pytest.param(12, 64, id="H12-D64"),
                                 pytest.param(3, 80, id="H3-D80"),
                                 pytest.param(2, 128, id="H2-D128")])
def test_attention(h, d, dtype, floor, backend, gen):
    counts = [0, 1, 1024, 333, 64]
    t, pad = sum(counts), 7
    q, k, v = (torch.randn(t + pad, h, d, generator=gen).to(DEV, dtype) for _ in range(3))
    for tns in (q, k, v):
        tns[t:] = NAN
    cu = _cu(counts)
    leaves = [tns[:t].detach().clone().requires_grad_(True) for tns in (q, k, v)]
    g = torch.randn(t, h, d, generator=gen).to(DEV, dtype)

    def op():
        qq, kk, vv = (torch.cat([leaf, tns[t:]]) for leaf, tns in zip(leaves, (q, k, v)))
        out = varlen_attention(qq, kk, vv, cu, cu, max(counts), max(counts), backend=backend)
        return out, torch.autograd.grad((out[:t] * g).sum(), leaves)

    out, grads = _run(op, backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", DTYPES)
def test_attention_cross_logits(dtype, floor, backend, gen):
    h, d, kq = 8, 64, 150
    counts = [0, 1024, 77, 1]
    b, tk = len(counts), sum(counts)
    q = torch.randn(b * kq, h, d, generator=gen).to(DEV, dtype)
    k, v = (torch.randn(tk + 5, h, d, generator=gen).to(DEV, dtype) for _ in range(2))
    cu_q, cu_k = _cu([kq] * b), _cu(counts)
    out, lg = _run(lambda: varlen_attention(q, k, v, cu_q, cu_k, kq, max(counts),
                                            return_logits=True, backend=backend), backend)
    qd, kd, vd = q.double(), k[:tk].double(), v[:tk].double()
    assert_err_rule(out, naive_attention(q, k[:tk], v[:tk], [kq] * b, counts),
                    naive_attention(qd, kd, vd, [kq] * b, counts), floor, "out")
    assert_err_rule(lg[:, :tk], naive_logits(q, k[:tk], kq, counts, d**-0.5),
                    naive_logits(qd, kd, kq, counts, d**-0.5), floor, "logits")
    assert torch.all(lg[:, tk:] == 0)


# ---------------------------------------------------------------------- block / stage
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("layer_scale", [pytest.param(False, id="plain"),
                                         pytest.param(True, id="layerscale")])
def test_stage(layer_scale, dtype, floor, backend, gen):
    c, h = 192, 3
    blocks = [randomize_(Block(c, h, layer_scale=layer_scale), gen).to(DEV).eval()
              for _ in range(2)]
    keep, ts = _tokens(3, 256, [0, 256, 101], gen)
    x = torch.randn(3, 256, c, generator=gen).to(DEV)
    g = torch.randn(3, 256, c, generator=gen).to(DEV)

    def grads(fn, mods, dt):
        mods = [copy.deepcopy(m).to(dt) for m in mods]
        xx = x.to(dt).requires_grad_(True)
        y = fn(xx, mods)
        params = [p for m in mods for p in m.parameters()]
        return y, torch.autograd.grad((y * g.to(dt)).sum(), [xx] + params)

    y, got = _run(lambda: grads(lambda v, m: pruned_stage(v, ts, m, backend=backend), blocks,
                                dtype), backend)
    same_y, same = grads(lambda v, m: naive_block(v, keep, m), blocks, dtype)
    exact_y, exact = grads(lambda v, m: naive_block(v, keep, m), blocks, torch.float64)
    assert torch.equal(y[~keep], x.to(dtype)[~keep])
    assert_err_rule(y[keep], same_y[keep], exact_y[keep], floor, "out")
    # Parameter gradients are sums over every active token of the batch; how a backend orders
    # that low-precision reduction is its own business, so their floor scales with the size.
    rel = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 0.15}[dtype]
    for i, (a, s, e) in enumerate(zip(got, same, exact)):
        assert_err_rule(a, s, e, floor + rel * float(e.abs().max()), f"grad {i}")


# ---------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("gather", [False, True], ids=["packed", "gather"])
def test_layer_norm_broadcast_rows(gather, backend, gen):
    """Read-only rows may overlap: x and dy with row stride 0 (autograd hands ``y.sum(0)``'s
    gradient as an expanded row) give the gradients of the same rows made contiguous."""
    from dtop_kernels.cuda import tensor_reasons as device_reasons_cuda
    from dtop_kernels.ops.layernorm import layer_norm_tokens

    why_not = device_reasons_cuda([torch.empty(0, device=DEV)]) if backend == "cuda" else []
    if why_not:
        pytest.skip("; ".join(why_not))
    b, n, c = 2, 40, 96
    _, ts = _tokens(b, n, [33, 12], gen)
    w = torch.randn(c, generator=gen).to(DEV).requires_grad_()
    bias = torch.randn(c, generator=gen).to(DEV).requires_grad_()
    row = torch.randn(c, generator=gen).to(DEV).requires_grad_()
    rows = b * n if gather else ts.capacity
    x = row.expand(rows, c)  # stride (0, 1)
    y, _ = layer_norm_tokens(x, w, bias, ts, 1e-6, gather=gather, backend=backend)
    y.sum(0).pow(2).sum().backward()
    got = [t.grad.clone() for t in (row, w, bias)]
    for t in (row, w, bias):
        t.grad = None
    t_valid = int(ts.cu_seqlens[-1])
    ref = torch.nn.functional.layer_norm(row.double().expand(t_valid, c), (c,), w.double(),
                                         bias.double(), 1e-6)
    ref.sum(0).pow(2).sum().backward()
    for a, t in zip(got, (row, w, bias)):  # x, weight, bias (float32 grads of float64 math)
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5 * float(t.grad.abs().max()))


# ---------------------------------------------------------------------- select
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("top_k", [0, 5])
def test_select(top_k, dtype, backend, gen):
    b, k, n = 4, 150, 1024
    keep, ts = _tokens(b, n, [1024, 0, 500, 37], gen)
    cls = (torch.randn(b, k, 2, generator=gen) * 2).to(dtype)
    cls[..., 0] += 2
    ml = (torch.round(torch.randn(b, k, n, generator=gen) * 6) / 2).to(dtype)
    expected = naive_select(cls, ml, keep.cpu(), 0.9, top_k)
    bi, ni = keep.cpu().nonzero(as_tuple=True)
    slots = torch.full((k, ts.capacity), 30.0, dtype=dtype)
    slots[:, : bi.numel()] = ml[bi, :, ni].t()
    sel = _run(lambda: dtop_select(cls.to(DEV), slots.to(DEV), ts, 0.9, top_k,
                                   backend=backend), backend)
    assert torch.equal(sel.exited.cpu(), expected)
    assert torch.equal(sel.tokens.keep_mask().cpu(), keep.cpu() & ~expected)
    sel.tokens.validate()
