"""``torch.library.opcheck`` on every ``dtop_py::`` custom op and backend that runs here: the
schema, the fake (meta) kernel against the real one, the autograd registration, and tracing
through AOTAutograd with dynamic shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, backend_params, emulated_cuda_params, random_keep

from dtop_kernels import TokenSet
from dtop_kernels.ops import library as L


def _gpu_marked(params: list) -> list:
    """The cuda cases also carry the ``gpu`` marker, so the GPU check (``pytest -m gpu``)
    opchecks the CUDA ops; torch and Triton (interpreter) run in the CPU suite."""
    return [p._replace(marks=(*p.marks, pytest.mark.gpu)) if p.id == "cuda" else p
            for p in params]


# ... and the CUDA ops on the emulator (pytest -m emulated)
BACKENDS = _gpu_marked(backend_params("torch", "triton", "cuda")) + emulated_cuda_params()
KERNEL_BACKENDS = _gpu_marked(backend_params("triton", "cuda")) + emulated_cuda_params()


def _dtype(backend: str) -> torch.dtype:
    return torch.float16 if backend == "cuda" else torch.float32


def _case(gen, b=3, n=12, counts=(12, 5, 0), capacity=24):
    keep = random_keep(b, n, list(counts), gen)
    return TokenSet.from_mask(keep.to(DEVICE), capacity=capacity)


def _rand(gen, *shape, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def _check(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter(backend, gen):
    ts, dt = _case(gen), _dtype(backend)
    x = _rand(gen, 36, 16, dtype=dt)
    _check(L.gather, (x, ts.indices, ts.cu_seqlens, 12, backend))
    p = _rand(gen, ts.capacity, 16, dtype=dt)
    for base in (None, _rand(gen, 36, 16, dtype=dt)):
        for add in (False, True):
            _check(L.scatter, (p, ts.indices, ts.cu_seqlens, base, 12, add, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [False, True])
def test_layer_norm(backend, gather, gen):
    ts, dt = _case(gen), _dtype(backend)
    x = _rand(gen, 36 if gather else ts.capacity, 32, dtype=dt)
    w, b = _rand(gen, 32, dtype=dt), _rand(gen, 32, dtype=dt)
    args = (x, w, b, ts.indices, ts.cu_seqlens, 12, 1e-6, gather, backend)
    _check(L.layer_norm, args)
    with torch.no_grad():
        y, xp, mean, rstd = L.layer_norm(*args)
    dy = _rand(gen, *y.shape, dtype=dt, grad=False)
    dxp = _rand(gen, *xp.shape, dtype=dt, grad=False)
    _check(L.layer_norm_backward, (dy, dxp, x.detach(), w.detach(), mean, rstd, ts.indices,
                                   ts.cu_seqlens, 12, gather, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits", [False, True])
def test_varlen_attention(backend, logits, gen):
    dt = _dtype(backend)
    if logits:  # uniform queries (the DToP heads' class queries): 4 per image
        cu_q = torch.arange(4, dtype=torch.int32, device=DEVICE) * 4
        mq = 4
    else:
        cu_q = torch.tensor([0, 9, 14, 14], dtype=torch.int32, device=DEVICE)
        mq = 9
    cu_k = torch.tensor([0, 11, 16, 16], dtype=torch.int32, device=DEVICE)
    q = _rand(gen, 12 if logits else 18, 2, 32, dtype=dt)
    k, v = _rand(gen, 20, 2, 32, dtype=dt), _rand(gen, 20, 2, 32, dtype=dt)
    args = (q, k, v, cu_q, cu_k, mq, 11, 32 ** -0.5, logits, backend)
    _check(L.varlen_attention, args)
    with torch.no_grad():
        out, lse, _ = L.varlen_attention(*args)
    dout = _rand(gen, *out.shape, dtype=dt, grad=False)
    _check(L.varlen_attention_backward, (dout, q.detach(), k.detach(), v.detach(),
                                         out, lse, cu_q, cu_k, mq, 11, 32 ** -0.5,
                                         backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_packed_linear(backend, gather, scatter, gen):
    ts, dt = _case(gen), _dtype(backend)
    x = _rand(gen, 36 if gather else ts.capacity, 16, dtype=dt)
    w, b = _rand(gen, 24, 16, dtype=dt), _rand(gen, 24, dtype=dt)
    res = _rand(gen, ts.capacity, 24, dtype=dt)
    base = _rand(gen, 36, 24, dtype=dt) if scatter else None
    _check(L.packed_linear, (x, w, b, res, base, ts.indices, ts.cu_seqlens, 12, L.ACT_GELU,
                             gather, True, backend))
    _check(L.packed_linear, (x, w, None, None, base, ts.indices, ts.cu_seqlens, 12, L.ACT_NONE,
                             gather, False, backend))
    dz = _rand(gen, ts.capacity, 24, dtype=dt, grad=False)
    _check(L.linear_backward_input, (dz, w.detach(), ts.indices, ts.cu_seqlens, 12, backend))
    _check(L.linear_backward_weight, (dz, x.detach(), ts.indices, ts.cu_seqlens, 12, gather,
                                      backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_select(backend, gen):
    ts = _case(gen)
    cls = torch.randn(3, 4, 2, generator=gen).mul(4).to(DEVICE)
    mask = torch.randn(4, ts.capacity, generator=gen).mul(6).to(DEVICE)
    _check(L.select, (cls, mask, ts.indices, ts.cu_seqlens, 12, ts.max_seqlen, 0.6, 1, backend))


def test_every_op_is_checked():
    """A new op in the library gets an opcheck test here."""
    tested = {"gather", "scatter", "layer_norm", "layer_norm_backward", "varlen_attention",
              "varlen_attention_backward", "packed_linear", "linear_backward_input",
              "linear_backward_weight", "select"}
    assert {op._name for op in L.OPS} == tested
