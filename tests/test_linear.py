"""packed_linear against a naive per-image loop, every backend, forward and backward.

The reference backend is checked against the naive loop in float64 (and gradcheck); the kernel
backends against the float64 reference with flash-attention's rule (error at most twice the
error of PyTorch in the same dtype, plus a floor). Inactive dense rows are NaN when the layer
gathers (never to be read); rows of ``out`` that are not tokens must come back unchanged and
packed padding rows zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    backend_params,
    cuda_kernel_test,
    emulated_cuda_params,
    make_tokens,
    max_err,
    random_keep,
    skip_interpreter_bf16_dot,
)

from dtop_kernels import BackendError, TokenSet, packed_linear
from dtop_kernels.cuda import linear as cuda_linear

BACKENDS = backend_params("torch", "triton", "cuda")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
CASES = [
    pytest.param(3, 21, [0, 21, 7], "padded", id="B3-empty-full-partial"),
    pytest.param(1, 17, [1], "exact", id="B1-one-token"),
    pytest.param(2, 9, [0, 0], "full", id="all-empty"),
    pytest.param(2, 80, [80, 61], "full", id="two-row-tiles"),
]
# (gather, scatter, activation, residual, bias)
VARIANTS = [
    pytest.param(False, False, "none", False, True, id="plain"),
    pytest.param(False, False, "gelu", False, True, id="gelu"),
    pytest.param(False, False, "none", True, False, id="residual-nobias"),
    pytest.param(True, False, "gelu", False, True, id="gather-gelu"),
    pytest.param(False, True, "none", True, True, id="scatter-residual"),
    pytest.param(True, True, "gelu", True, True, id="gather-scatter-gelu-residual"),
]
SIZES = [pytest.param(40, 48, id="K40-N48"), pytest.param(37, 45, id="K37-N45")]


def naive_linear(x, keep, weight, bias, activation, residual, out):
    """Per image: the rows of its active tokens through F.linear (the official semantics).
    x: dense [B, N, K] (token rows by mask) or packed [cap, K] (image after image)."""
    b = keep.shape[0]
    counts = keep.sum(1).tolist()
    rows, start = [], 0
    for i in range(b):
        xi = x[i][keep[i]] if x.dim() == 3 else x[start:start + counts[i]]
        yi = F.linear(xi, weight, bias)
        yi = F.gelu(yi) if activation == "gelu" else yi
        if residual is not None:
            yi = yi + residual[start:start + counts[i]]
        rows.append(yi)
        start += counts[i]
    y = torch.cat(rows)
    if out is None:
        return y
    res = out.clone()
    for i in range(b):
        s = sum(counts[:i])
        res[i][keep[i]] = y[s:s + counts[i]]
    return res


def _inputs(b, n, counts, layout, k, m, gather, scatter, residual, bias, dtype, gen):
    keep = random_keep(b, n, counts, gen)
    ts = make_tokens(keep, layout)
    t = sum(counts)
    if gather:
        x = torch.randn(b, n, k, generator=gen, dtype=torch.float64)
        x[~keep] = float("nan")
    else:
        x = torch.randn(ts.capacity, k, generator=gen, dtype=torch.float64)
        x[t:] = 1e3  # padding rows: must not reach the token rows
    w = torch.randn(m, k, generator=gen, dtype=torch.float64) / k**0.5
    bs = torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    r = torch.randn(ts.capacity, m, generator=gen, dtype=torch.float64) if residual else None
    o = torch.randn(b, n, m, generator=gen, dtype=torch.float64) if scatter else None
    move = lambda z: None if z is None else z.to(DEVICE, dtype)
    return keep.to(DEVICE), ts, [move(z) for z in (x, w, bs, r, o)]


def _run(args, ts, activation, backend):
    """Output and gradients (x, weight, bias, residual, out's base) for a fixed upstream grad."""
    x, w, bs, r, o = (None if z is None else z.clone().requires_grad_() for z in args)
    out = None if o is None else o.clone()
    y = packed_linear(x, w, bs, ts, activation=activation, residual=r, out=out, backend=backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g = g.to(y.device, y.dtype)
    ins = [z for z in (x, w, bs, r, o) if z is not None]
    grads = torch.autograd.grad(y, ins, g)
    return y.detach(), [gr.nan_to_num(0.0) if z is x else gr for z, gr in zip(ins, grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,m", SIZES)
@pytest.mark.parametrize("gather,scatter,activation,residual,bias", VARIANTS)
@pytest.mark.parametrize("b,n,counts,layout", CASES)
def test_packed_linear(b, n, counts, layout, gather, scatter, activation, residual, bias, k, m,
                       dtype, backend, gen):
    skip_interpreter_bf16_dot(backend, dtype)
    keep, ts, args = _inputs(b, n, counts, layout, k, m, gather, scatter, residual, bias,
                             dtype, gen)
    if backend == "cuda" and (dtype == torch.float32 or k % 8 or m % 8):
        with pytest.raises(BackendError):
            packed_linear(args[0], args[1], args[2], ts, backend="cuda")
        return
    got, got_grads = _run(args, ts, activation, backend)
    exact_args = [None if z is None else z.double() for z in args]
    exact, exact_grads = _run(exact_args, ts, activation, "torch")
    same, same_grads = _run(args, ts, activation, "torch")
    t = sum(counts)
    if scatter:
        base = args[4]
        assert torch.equal(got[~keep], base[~keep]), "rows that are not tokens must not change"
        got, exact, same = got[keep], exact[keep], same[keep]
    else:
        assert torch.all(got[t:] == 0), "padding rows must be zero"
        got, exact, same = got[:t], exact[:t], same[:t]
    _check(got, same, exact, dtype, "y")
    names = [n for n, z in zip(("dx", "dweight", "dbias", "dresidual", "dout"), args)
             if z is not None]
    for name, a, s, e in zip(names, got_grads, same_grads, exact_grads):
        _check(a, s, e, dtype, name)


# The CUDA kernel (csrc/linear.cu) on the emulator, through the op, its dispatch and autograd:
# both tile shapes (outputs of at most 1024 columns, and wider; for dx: inputs), every epilogue,
# a ragged batch with an empty image and a row tail that does not fill a tile.
def _emulated_linear_params() -> list:
    sizes = [pytest.param(40, 48, VARIANTS, id="K40-N48-narrow"),
             pytest.param(40, 1040, [VARIANTS[0], VARIANTS[5]], id="K40-N1040-wide"),
             pytest.param(1032, 48, [VARIANTS[0], VARIANTS[5]], id="K1032-N48-wide-dx")]
    out = []
    for size in sizes:
        k, m, variants = size.values
        for v in variants:
            for case in (CASES[0], CASES[3]):
                out.append(pytest.param(*case.values, *v.values, k, m,
                                        id=f"{case.id}-{v.id}-{size.id}"))
    return out


@pytest.mark.parametrize("backend", emulated_cuda_params())
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("b,n,counts,layout,gather,scatter,activation,residual,bias,k,m",
                         _emulated_linear_params())
def test_packed_linear_emulated(b, n, counts, layout, gather, scatter, activation, residual,
                                bias, k, m, dtype, backend, gen):
    test_packed_linear(b, n, counts, layout, gather, scatter, activation, residual, bias, k, m,
                       dtype, backend, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("gather,scatter,activation,residual,bias", VARIANTS[3:])
def test_packed_linear_vit_shapes(gather, scatter, activation, residual, bias, dtype, backend,
                                  gen):
    """Several row, column and k tiles (the pipeline's steady state): ViT-B's MLP, ragged."""
    if DEVICE.type != "cuda":
        pytest.skip("GPU-sized shapes")
    keep, ts, args = _inputs(4, 1024, [1024, 700, 33, 0], "padded", 768, 3072, gather, scatter,
                             residual, bias, dtype, gen)
    got, got_grads = _run(args, ts, activation, backend)
    exact, exact_grads = _run([None if z is None else z.double() for z in args], ts,
                              activation, "torch")
    same, same_grads = _run(args, ts, activation, "torch")
    sel = keep if scatter else slice(0, int(keep.sum()))
    _check(got[sel], same[sel], exact[sel], dtype, "y")
    for a, s_, e in zip(got_grads, same_grads, exact_grads):
        _check(a, s_, e, dtype, "grad")


def _check(got, same, exact, dtype, what):
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, float(exact.abs().max())) if exact.numel() else 1.0
    err, base = max_err(got, exact), max_err(same, exact)
    floor = FLOOR[dtype] * scale
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 * {base:.3g} + {floor:.3g}"


PAD_CASES = [
    pytest.param(3, 21, [0, 21, 7], id="T28-cap63"),
    pytest.param(2, 40, [3, 30], id="T33-cap80"),
    pytest.param(2, 9, [0, 0], id="T0-cap18"),
]


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("gather,bias", [pytest.param(False, True, id="packed-bias"),
                                         pytest.param(True, True, id="gather-bias"),
                                         pytest.param(False, False, id="packed-nobias")])
@pytest.mark.parametrize("k,m", [pytest.param(37, 45, id="K37-N45"),
                                 pytest.param(5, 70, id="K5-N70")])
@pytest.mark.parametrize("b,n,counts", PAD_CASES)
def test_weight_grad_skips_padding(b, n, counts, k, m, gather, bias, dtype, backend, gen):
    """dW and db with capacity B*N, well above T: the padding rows of x and of the upstream
    gradient are NaN in the kernel backend's run (ignored by contract), finite in the
    reference's; the kernel's gradients must be finite and as accurate as PyTorch's."""
    _, ts, args = _inputs(b, n, counts, "full", k, m, gather, False, False, bias, dtype, gen)
    t = sum(counts)
    clean = [None if z is None else z.clone() for z in args]
    if not gather:
        clean[0][t:] = 0.5  # the reference multiplies its padding rows by zero gradients
        args[0][t:] = float("nan")

    def grads(xs, be, dt, poison):
        x, w, bs = (None if z is None else z.to(dt).requires_grad_() for z in xs[:3])
        y = packed_linear(x, w, bs, ts, activation="gelu", backend=be)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        g = g.to(y.device, dt)
        if poison:
            g[t:] = float("nan")
        return torch.autograd.grad(y, [z for z in (w, bs) if z is not None], g)

    got = grads(args, backend, dtype, True)
    same = grads(clean, "torch", dtype, False)
    exact = grads(clean, "torch", torch.float64, False)
    for name, a, s_, e in zip(("dweight", "dbias"), got, same, exact):
        if t == 0:
            assert torch.equal(a, torch.zeros_like(a)), f"{name}: nonzero with no tokens"
        _check(a, s_, e, dtype, name)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("gather", [False, True], ids=["packed", "gather"])
@pytest.mark.parametrize("need_dw,need_db", [(True, True), (True, False), (False, True)],
                         ids=["dw-db", "dw", "db"])
@pytest.mark.parametrize("b,n,counts", PAD_CASES)
def test_weight_grad_kernel(b, n, counts, need_dw, need_db, gather, dtype, backend, gen):
    """The weight-gradient launcher alone: dz's and x's rows past T are NaN and must never be
    read; against dz[:T]^T @ rows[:T] and dz[:T].sum(0) in float64."""
    from dtop_kernels.triton import linear as tli

    keep = random_keep(b, n, counts, gen).to(DEVICE)
    ts = make_tokens(keep, "full")
    t, cap, k, m = sum(counts), b * n, 19, 33
    dz = torch.randn(cap, m, generator=gen, dtype=torch.float64)
    dz[t:] = float("nan")
    if gather:
        x = torch.randn(b * n, k, generator=gen, dtype=torch.float64)
        x[~keep.cpu().flatten()] = float("nan")
        rows = x[ts.indices[:t].long().cpu()]
    else:
        x = torch.randn(cap, k, generator=gen, dtype=torch.float64)
        x[t:] = float("nan")
        rows = x[:t]
    dz_d, x_d = dz.to(DEVICE, dtype), x.to(DEVICE, dtype)
    dw, db = tli.linear_bwd_weight(dz_d, x_d, ts, gather=gather, need_dw=need_dw,
                                   need_db=need_db)
    # the same products in the test dtype through PyTorch (its own rounding, the rule's base)
    dz_t, rows_t = dz_d[:t], rows.to(DEVICE, dtype)
    if need_dw:
        assert dw.dtype == dtype and dw.shape == (m, k)
        exact = dz[:t].t() @ rows
        same = (dz_t.t() @ rows_t) if dtype == torch.float32 else (dz_t.float().t()
                                                                    @ rows_t.float()).to(dtype)
        _check(dw, same, exact, dtype, "dW")
    else:
        assert dw is None
    if need_db:
        assert db.dtype == dtype and db.shape == (m,)
        _check(db, dz_t.float().sum(0).to(dtype), dz[:t].sum(0), dtype, "db")
    else:
        assert db is None


@pytest.mark.parametrize("gather,scatter,activation,residual,bias", VARIANTS)
def test_reference_matches_naive(gather, scatter, activation, residual, bias, gen):
    keep, ts, args = _inputs(3, 21, [0, 21, 7], "padded", 13, 11, gather, scatter, residual,
                             bias, torch.float64, gen)
    x, w, bs, r, o = args
    got = packed_linear(x, w, bs, ts, activation=activation, residual=r,
                        out=None if o is None else o.clone(), backend="torch")
    want = naive_linear(x, keep, w, bs, activation, r, o)
    if scatter:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(got[:28], want, rtol=0, atol=1e-12)


def test_reference_gradcheck(gen):
    _, ts, args = _inputs(2, 9, [3, 9], "padded", 5, 4, True, False, True, True,
                             torch.float64, gen)
    x, w, bs, r, _ = args
    x = x.nan_to_num(0.5).requires_grad_()
    fn = lambda x, w, bs, r: packed_linear(x, w, bs, ts, activation="gelu",
                                           residual=r, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, w.requires_grad_(), bs.requires_grad_(),
                                         r.requires_grad_()))


def test_bad_arguments():
    ts = make_tokens(torch.ones(2, 4, dtype=torch.bool), "exact")
    x = torch.randn(8, 16, device=DEVICE)
    w = torch.randn(24, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not match x's K"):
        packed_linear(x, torch.randn(24, 15, device=DEVICE), None, ts)
    with pytest.raises(ValueError, match="capacity"):
        packed_linear(x[:7], w, None, ts)
    with pytest.raises(ValueError, match="activation"):
        packed_linear(x, w, None, ts, activation="relu")
    with pytest.raises(ValueError, match="bias"):
        packed_linear(x, w, torch.zeros(23, device=DEVICE), ts)
    with pytest.raises(ValueError, match="residual"):
        packed_linear(x, w, None, ts, residual=torch.zeros(8, 23, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        packed_linear(x, w, None, ts, out=torch.zeros(2, 4, 23, device=DEVICE))
    with pytest.raises(TypeError, match="one dtype"):
        packed_linear(x, w.half(), None, ts)


def test_cuda_reasons_name_the_fix():
    ts = make_tokens(torch.ones(2, 4, dtype=torch.bool), "exact")
    x = torch.randn(8, 37, device=DEVICE, dtype=torch.float16)
    with pytest.raises(BackendError, match="not multiples of 8"):
        packed_linear(x, torch.randn(45, 37, device=DEVICE, dtype=torch.float16), None, ts,
                      backend="cuda")


def test_cuda_launcher_checks_cpu():
    """The CUDA launcher rejects bad arguments before any CUDA call (CPU tensors here)."""
    ts = make_tokens(torch.ones(2, 4, dtype=torch.bool), "exact").to("cpu")
    h = torch.float16
    x, w = torch.zeros(8, 16, dtype=h), torch.zeros(24, 16, dtype=h)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        cuda_linear.linear_fwd(x.float(), w.float(), None, ts)
    with pytest.raises(ValueError, match="multiples of 8"):
        cuda_linear.linear_fwd(torch.zeros(8, 12, dtype=h), torch.zeros(24, 12, dtype=h), None,
                               ts)
    with pytest.raises(ValueError, match="weight must have shape"):
        cuda_linear.linear_fwd(x, torch.zeros(24, 8, dtype=h), None, ts)
    with pytest.raises(ValueError, match="x must have shape"):
        cuda_linear.linear_fwd(torch.zeros(7, 16, dtype=h), w, None, ts, gather=True)
    with pytest.raises(ValueError, match="act"):
        cuda_linear.linear_fwd(x, w, None, ts, act=2)
    with pytest.raises(ValueError, match="one dtype"):
        cuda_linear.linear_fwd(x, w, torch.zeros(24, dtype=torch.bfloat16), ts)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_linear.linear_fwd(x, w, None, ts)
    with pytest.raises(ValueError, match="dz must have shape"):
        cuda_linear.linear_bwd_input(torch.zeros(8, 16, dtype=h), w, ts)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@cuda_kernel_test
def test_cuda_linear_without_inputs(dtype, kernel_device):
    """in_features 0: y = GELU(bias) + residual on the token rows, read from nothing else (the
    empty x and weight have no storage: null pointers)."""
    dev = kernel_device
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[0, :3] = keep[2, 2:7] = True
    ts = TokenSet.from_mask(keep.to(dev), capacity=10)
    t, n = 8, 16
    x = torch.empty(ts.capacity, 0, dtype=dtype, device=dev)
    w = torch.empty(n, 0, dtype=dtype, device=dev)
    bias = torch.randn(n).to(dev, dtype)
    residual = torch.randn(ts.capacity, n).to(dev, dtype)
    y, pre = cuda_linear.linear_fwd(x, w, bias, ts, act=cuda_linear.ACT_GELU, residual=residual,
                                    save_pre=True)
    want = F.gelu(bias.double()) + residual[:t].double()
    assert torch.allclose(y[:t].double(), want, rtol=1e-2, atol=1e-2)
    assert torch.equal(pre[:t], bias.expand(t, n)) and torch.all(pre[t:] == 0)
    assert torch.all(y[t:] == 0)
    dx = cuda_linear.linear_bwd_input(torch.randn(ts.capacity, n).to(dev, dtype), w, ts)
    assert dx.shape == (ts.capacity, 0)
