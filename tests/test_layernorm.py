"""LayerNorm over packed token rows (``layer_norm_tokens``, ``dtop_py::layer_norm``), every backend,
forward and backward, against ``F.layer_norm`` on the rows ``naive_gather`` picks.

The public op is checked per backend (torch: the float32 reference of
dtop_kernels/reference/layernorm.py; triton; cuda) with padding rows poisoned (NaN in the
inputs and upstream gradients past T, and in inactive dense rows): y and the stored rows must be
zero there and nothing may leak into the real rows or the weight gradients. The compiled CUDA
launchers are also called directly (argument checks on CPU tensors; the kernels on a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    assert_err_rule,
    backend_params,
    cuda_kernel_test,
    make_tokens,
    ragged_tokens,
    random_keep,
    triton_cross_check,
)
from naive import naive_gather

from dtop_kernels import TokenSet
from dtop_kernels.cuda import layernorm as cuda_ln
from dtop_kernels.ops.layernorm import layer_norm_tokens

BACKENDS = backend_params("torch", "triton", "cuda")
NAN = float("nan")

CASES = [
    pytest.param(3, 21, [0, 21, 7], True, id="padded-zero-full-partial"),
    pytest.param(1, 17, [1], False, id="B1-one-token"),
    pytest.param(2, 9, [0, 0], True, id="all-empty"),
]
# How the rows come in: packed [capacity, C]; or dense [B*N, C] gathered on the fly, with or
# without the gathered rows stored (the residual stream of a fused block).
MODES = [
    pytest.param(False, False, id="packed"),
    pytest.param(True, False, id="gather"),
    pytest.param(True, True, id="gather-store_x"),
]


def _tokens(b: int, n: int, counts: list[int], padded: bool) -> TokenSet:
    """Capacity B * N (padding slots) when ``padded``, else exactly T."""
    return ragged_tokens(counts, n, extra_capacity=b * n if padded else 0)


def _inputs(ts: TokenSet, c: int, gather: bool, dtype: torch.dtype, gen: torch.Generator,
            poison: bool = True):
    """x2d (dense [B*N, C] with ``gather``, else packed [capacity, C]), weight, bias, the upstream
    gradients of y and of the stored rows; NaN where nothing may be read when ``poison``."""
    b, n, cap = ts.batch_size, ts.seq_len, ts.capacity
    t = int(ts.cu_seqlens[-1])
    x = torch.randn(b * n if gather else cap, c, generator=gen, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    gy, gx = (torch.randn(cap, c, generator=gen, dtype=torch.float64) for _ in range(2))
    if poison:
        if gather:
            x[~ts.keep_mask().cpu().reshape(-1)] = NAN  # inactive tokens are never read
        else:
            x[t:] = NAN  # padding rows are never read
        gy[t:] = NAN  # nor is the gradient of padding rows
        gx[t:] = NAN
    return [z.to(DEVICE, dtype) for z in (x, w, bias, gy, gx)]


def _rows(x: torch.Tensor, ts: TokenSet, gather: bool) -> torch.Tensor:
    """The T rows the op normalizes: the naive per-image gather of the dense rows, or the first
    T packed rows."""
    if gather:
        return naive_gather(x.view(ts.batch_size, ts.seq_len, -1), ts.keep_mask())
    return x[: int(ts.cu_seqlens[-1])]


def _run(x, w, bias, gy, gx, ts, gather, store_x, dtype, op):
    """(y, stored rows or None, dx, dweight, dbias) of ``op(x, w, bias) -> (y, xo)`` in
    ``dtype``, differentiated with the upstream gradients gy (of y) and gx (of xo)."""
    x, w, bias = (z.detach().to(dtype).requires_grad_(True) for z in (x, w, bias))
    y, xo = op(x, w, bias)
    outs, grads = [y], [gy.to(dtype)[: y.shape[0]]]
    if store_x:
        outs.append(xo)
        grads.append(gx.to(dtype)[: xo.shape[0]])
    dx, dw, db = torch.autograd.grad(outs, (x, w, bias), grads)
    return y.detach(), (xo.detach() if store_x else xo), dx, dw, db


def _naive(ts, gather, store_x, eps):
    """``F.layer_norm`` on the rows the op normalizes (T rows, no padding)."""
    def op(x, w, bias):
        rows = _rows(x, ts, gather)
        return F.layer_norm(rows, (x.shape[1],), w, bias, eps), (rows if store_x else None)
    return op


def _kernel(ts, gather, store_x, eps, backend):
    def op(x, w, bias):
        return layer_norm_tokens(x, w, bias, ts, eps, gather=gather, store_x=store_x,
                                 backend=backend)
    return op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,n,counts,padded", CASES)
@pytest.mark.parametrize("c", [13, 64], ids=["C13", "C64"])
@pytest.mark.parametrize("gather,store_x", MODES)
def test_layer_norm_tokens(b, n, counts, padded, c, gather, store_x, backend, gen):
    """fp32 forward and backward (dx, dweight, dbias; through the gather and the stored rows)
    against F.layer_norm in fp32 and float64; padding rows zero and never read."""
    ts = _tokens(b, n, counts, padded)
    t = sum(counts)
    args = _inputs(ts, c, gather, torch.float32, gen)
    y, xo, dx, dw, db = _run(*args, ts, gather, store_x, torch.float32,
                             _kernel(ts, gather, store_x, 1e-6, backend))
    same = _run(*args, ts, gather, store_x, torch.float32, _naive(ts, gather, store_x, 1e-6))
    exact = _run(*args, ts, gather, store_x, torch.float64, _naive(ts, gather, store_x, 1e-6))

    assert y.shape == (ts.capacity, c) and y.dtype == torch.float32
    torch.testing.assert_close(y[:t], same[0], rtol=1e-5, atol=1e-5)
    assert_err_rule(y[:t], same[0], exact[0], 1e-6, "y")
    assert torch.all(y[t:] == 0), "padding rows of y must be zero"
    if store_x:
        torch.testing.assert_close(xo[:t], same[1], rtol=0, atol=0)
        assert torch.all(xo[t:] == 0), "padding rows of the stored rows must be zero"
    else:
        assert xo is None
    for name, got, s, e in zip(("dx", "dweight", "dbias"), (dx, dw, db), same[2:], exact[2:]):
        assert got.shape == e.shape and torch.isfinite(got).all(), f"{name}: NaN leaked"
        torch.testing.assert_close(got, s, rtol=1e-5, atol=1e-4)
        assert_err_rule(got, s, e, 1e-4 * max(1, t) ** 0.5, name)
    not_tokens = ~(ts.keep_mask().reshape(-1) if gather else ts.valid_slots())
    assert torch.all(dx[not_tokens] == 0), "rows that are not tokens get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("gather,store_x", [MODES[0], MODES[2]])
def test_low_precision(gather, store_x, dtype, backend, gen):
    """fp16 / bf16 rows and parameters: flash-attention's rule against float64; the baseline is
    PyTorch in float32 rounded once to the dtype (the best a kernel can do)."""
    ts = _tokens(2, 16, [9, 16], padded=True)
    t, c = 25, 48
    args = _inputs(ts, c, gather, dtype, gen)
    y, xo, *grads = _run(*args, ts, gather, store_x, dtype,
                         _kernel(ts, gather, store_x, 1e-6, backend))
    same = [None if z is None else z.to(dtype) for z in
            _run(*args, ts, gather, store_x, torch.float32, _naive(ts, gather, store_x, 1e-6))]
    exact = _run(*args, ts, gather, store_x, torch.float64, _naive(ts, gather, store_x, 1e-6))
    assert y.dtype == dtype
    assert_err_rule(y[:t], same[0], exact[0], 1e-3, "y")
    assert torch.all(y[t:] == 0)
    if store_x:
        assert torch.equal(xo[:t], same[1]) and torch.all(xo[t:] == 0)
    for name, got, s, e in zip(("dx", "dweight", "dbias"), grads, same[2:], exact[2:]):
        assert got.dtype == dtype
        assert_err_rule(got, s, e, 1e-3 * max(1, t) ** 0.5, name)


@pytest.mark.parametrize("gather,store_x", MODES)
def test_torch_backend_float64(gather, store_x, gen):
    """The reference (torch backend) in float64 equals F.layer_norm on the naively gathered rows,
    forward and backward, to rounding."""
    ts = _tokens(3, 21, [0, 21, 7], padded=True)
    args = _inputs(ts, 13, gather, torch.float64, gen)
    got = _run(*args, ts, gather, store_x, torch.float64,
               _kernel(ts, gather, store_x, 1e-5, "torch"))
    want = _run(*args, ts, gather, store_x, torch.float64, _naive(ts, gather, store_x, 1e-5))
    t = 28
    assert got[0].dtype == torch.float64
    torch.testing.assert_close(got[0][:t], want[0], rtol=1e-12, atol=1e-12)
    if store_x:
        assert torch.equal(got[1][:t], want[1])
    for a, e in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gather,store_x", MODES)
def test_gradcheck_torch(gather, store_x, gen):
    ts = _tokens(2, 5, [3, 0], padded=True)
    x, w, bias, _, _ = _inputs(ts, 4, gather, torch.float64, gen, poison=False)

    def f(x, w, bias):
        y, xo = layer_norm_tokens(x, w, bias, ts, 1e-5, gather=gather, store_x=store_x,
                                  backend="torch")
        return (y, xo) if store_x else y

    ins = [z.requires_grad_(True) for z in (x, w, bias)]
    assert torch.autograd.gradcheck(f, ins)


def test_store_x_needs_gather():
    ts = _tokens(1, 17, [1], padded=False)
    x, w = torch.zeros(ts.capacity, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="gather"):
        layer_norm_tokens(x, w, w, ts, 1e-6, gather=False, store_x=True, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("gather", [False, True], ids=["packed", "gather"])
def test_layer_norm_broadcast_rows(gather, backend, gen):
    """Read-only rows may overlap: x and dy with row stride 0 (autograd hands ``y.sum(0)``'s
    gradient as an expanded row) give the gradients of the same rows made contiguous."""
    from dtop_kernels.cuda import tensor_reasons as device_reasons_cuda

    why_not = device_reasons_cuda([torch.empty(0, device=DEVICE)]) if backend == "cuda" else []
    if why_not:
        pytest.skip("; ".join(why_not))
    b, n, c = 2, 40, 96
    ts = make_tokens(random_keep(b, n, [33, 12], gen), "full")
    w = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    row = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
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


# ---------------------------------------------------------------------- Triton launch grid
@pytest.mark.parametrize("sms", [132, 108], ids=["H100-132SM", "A100-108SM"])
def test_triton_bwd_grid_fills_the_gpu(monkeypatch, sms):
    """Batch 1 of ViT-B (1024 rows, C 768): the Triton backward, launched as on a GPU with
    ``sms`` SMs (kernel replaced by a recorder, device properties faked), runs at least one
    program per SM, covers every row, and writes one partial dweight / dbias row per program.
    The SM count is queried once per device."""
    pytest.importorskip("triton")
    from compile_kernels import _Recorder

    from dtop_kernels import _gpu
    from dtop_kernels.triton import layernorm as tln

    queries = []

    def properties(index):
        queries.append(index)
        return type("Props", (), {"multi_processor_count": sms})

    calls: list = []
    monkeypatch.setattr(tln, "_ln_bwd_kernel", _Recorder(tln._ln_bwd_kernel, calls))
    monkeypatch.setattr(tln, "interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _gpu._sm_count.cache_clear()
    try:
        rows, c = 1024, 768
        t = TokenSet.from_mask(torch.ones(1, rows, dtype=torch.bool))
        x, w, stat = torch.zeros(rows, c), torch.ones(c), torch.zeros(rows)
        for _ in range(2):
            tln.layer_norm_bwd(x, x, w, stat, stat, t)
    finally:
        _gpu._sm_count.cache_clear()
    _, grid, args, _ = calls[0]
    progs, rows_per_prog = grid[0], args[16]
    dw, db = args[8], args[9]
    assert progs >= sms, f"{progs} programs on {sms} SMs"
    assert (progs - 1) * rows_per_prog < rows <= progs * rows_per_prog
    assert dw.shape == db.shape == (progs, c)
    assert queries == [0]


# ---------------------------------------------------------------------- CUDA launchers
# Argument checks run before any CUDA call, so they are tested everywhere with CPU tensors.
def test_cuda_launcher_checks_cpu():
    t = TokenSet.from_lists([[0, 2], [1]], seq_len=4)
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


# The kernels: compared with PyTorch in float64 (err <= 2 * err(PyTorch in the same dtype) +
# floor) and with the Triton launchers; outputs poisoned with NaN so unwritten rows show.
LN_CASES = [
    pytest.param([0, 5, 17], 19, 13, 4, id="C13-zero-count-padded"),
    pytest.param([1], 7, 77, 0, id="C77-one-token"),
    pytest.param([30, 2, 11], 31, 768, 6, id="C768"),
    pytest.param([4, 9], 12, 512, 2, id="C512"),
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
@cuda_kernel_test
def test_cuda_layer_norm_fwd(counts, n, c, extra, dtype, gather, fp32_params, kernel_device):
    torch.manual_seed(0)
    dev = kernel_device
    tokens = ragged_tokens(counts, n, extra, device=dev)
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
    assert_err_rule(y, same, exact, 1e-5, "y")
    assert torch.equal(xp[:t], raw) and torch.all(xp[t:] == 0) and torch.all(y[t:] == 0)
    xr = raw.double()
    torch.testing.assert_close(mean[:t].double(), xr.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd[:t].double(), 1 / (xr.var(1, unbiased=False) + 1e-6).sqrt(),
                               rtol=1e-4, atol=1e-5)
    assert torch.all(mean[t:] == 0) and torch.all(rstd[t:] == 0)
    triton_ln = triton_cross_check("layernorm", dev)
    if triton_ln is None:
        return
    y_tr, _, _, _ = triton_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-6, gather=gather)
    assert_err_rule(y, y_tr, exact, 1e-5, "y vs triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@cuda_kernel_test
def test_cuda_layer_norm_strided_rows(dtype, offset, kernel_device):
    """Rows with a row stride > C, from a base that is (or is not) 16-byte aligned."""
    dev, c = kernel_device, 96
    tokens = ragged_tokens([7, 12], 16, 3, device=dev)
    wide = torch.randn(2 * 16, c + 40, device=dev).to(dtype)
    x2d = wide[:, offset:offset + c]
    w, b = torch.randn(c, device=dev), torch.randn(c, device=dev)
    y, _, mean, rstd = cuda_ln.layer_norm_fwd(x2d, w, b, tokens, 1e-5, gather=True)
    exact, _, _ = _ln_reference(x2d.double(), w.double(), b.double(), tokens, 1e-5, True,
                                torch.float64)
    same, _, _ = _ln_reference(x2d, w, b, tokens, 1e-5, True, dtype)
    assert_err_rule(y, same, exact, 1e-5, "y")
    dy = torch.randn(tokens.capacity, c, device=dev).to(dtype)
    dx, _, _ = cuda_ln.layer_norm_bwd(dy, x2d, w, mean, rstd, tokens, gather=True)
    if offset == 0:  # the vectorized path, as for a contiguous copy: bit for bit the same
        dx_c, _, _ = cuda_ln.layer_norm_bwd(dy, x2d.contiguous(), w, mean, rstd, tokens,
                                            gather=True)
        torch.testing.assert_close(dx, dx_c, rtol=0, atol=0)
        return
    # A misaligned base takes the scalar path, which sums in another order: against float64.
    t = int(tokens.cu_seqlens[-1])
    rows = x2d[tokens.indices[:t].long()]

    def grad(prec):
        xr = rows.to(prec).requires_grad_()
        y = F.layer_norm(xr, (c,), w.to(prec), b.to(prec), 1e-5)
        return torch.autograd.grad(y, xr, dy[:t].to(prec))[0]

    assert_err_rule(dx[:t], grad(dtype), grad(torch.float64), 1e-4 * t ** 0.5, "dx")


@pytest.mark.parametrize("counts,n,c,extra", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "packed"])
@pytest.mark.parametrize("with_add,fp32_params", [
    pytest.param(False, False, id="plain"), pytest.param(True, False, id="dx_add"),
    pytest.param(False, True, id="params-fp32")])
@cuda_kernel_test
def test_cuda_layer_norm_bwd(counts, n, c, extra, dtype, gather, with_add, fp32_params,
                             kernel_device):
    torch.manual_seed(1)
    dev = kernel_device
    tokens = ragged_tokens(counts, n, extra, device=dev)
    cap = tokens.capacity
    rows = len(counts) * n if gather else cap
    x2d = torch.randn(rows, c, device=dev).to(dtype)
    pdt = torch.float32 if fp32_params else dtype
    w = (1 + 0.1 * torch.randn(c, device=dev)).to(pdt)
    b = (0.1 * torch.randn(c, device=dev)).to(pdt)
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
        assert got.dtype == (dtype if name == "dx" else pdt)
        assert_err_rule(got, s, e, 1e-4 * max(1, t) ** 0.5, name)
    pad = add[t:] if add is not None else torch.zeros_like(dx[t:])
    assert torch.equal(dx[t:], pad), "padding rows of dx must be dx_add (or zero)"
