"""Property-based tests: every public op, random ragged batches, against per-image references.

Hypothesis draws batch sizes (0 included), tokens per image (0, 1, all, or a random subset),
capacities at and above the total, head dims (powers of two or not), dtypes (float32,
float16; bfloat16 is wrong under the Triton CPU interpreter) and cross-attention with different
query and key sets. References are the naive per-image loops of tests/naive.py in float64;
forward and backward are compared.

Profiles: ``DTOP_HYPOTHESIS=ci`` (the default: 1620 examples in total, sized for CPU CI)
and ``DTOP_HYPOTHESIS=gpu`` (ten times as many, for a GPU check). The examples are derandomized,
so a CI run is reproducible; no example database is written.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from blocks import Block, randomize_
from helpers import DEVICE, backend_marks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import (
    exits_allowed,
    naive_attention,
    naive_block,
    naive_gather,
    naive_scatter,
    naive_select,
)

from dtop_kernels import (
    TokenSet,
    dtop_select,
    gather_tokens,
    packed_linear,
    pruned_block,
    scatter_tokens,
    varlen_attention,
)

_COMMON = {"deadline": None, "derandomize": True, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("dtop-ci", max_examples=1, **_COMMON)  # counts: EXAMPLES below
settings.register_profile("dtop-gpu", max_examples=1, **_COMMON)
PROFILE = os.environ.get("DTOP_HYPOTHESIS", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"DTOP_HYPOTHESIS must be 'ci' or 'gpu'; got {PROFILE!r}")
SCALE = 10 if PROFILE == "gpu" else 1

# Examples per (op, backend) in the CI profile: 1620 in total (about 60 s on one CPU core).
EXAMPLES = {
    ("gather", "torch"): 200, ("gather", "triton"): 100,
    ("scatter", "torch"): 200, ("scatter", "triton"): 100,
    ("attention", "torch"): 200, ("attention", "triton"): 80,
    ("linear", "torch"): 200, ("linear", "triton"): 100,
    ("select", "torch"): 200, ("select", "triton"): 100,
    ("block", "torch"): 100, ("block", "triton"): 40,
}
BACKENDS = ("torch", "triton")


def _examples(op: str, backend: str) -> settings:
    return settings(max_examples=EXAMPLES[(op, backend)] * SCALE, **_COMMON)


def _backend_params(op: str) -> list:
    return [pytest.param(b, id=b, marks=backend_marks(b)) for b in BACKENDS]


def _tol(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 2e-2


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
           scale: float = 1.0) -> None:
    tol = _tol(dtype) * scale
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), atol=tol, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def _grad(t: torch.Tensor) -> torch.Tensor:
    """``t.grad``, or zeros where backward never reached ``t`` (empty inputs)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


# ---------------------------------------------------------------------- strategies
@st.composite
def keep_masks(draw, b: int, n: int) -> torch.Tensor:
    """Bool [B, N]: per image none, one, all, or a random subset of the tokens."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keep = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        kind = draw(st.sampled_from(["none", "one", "all", "some"]))
        count = {"none": 0, "one": 1, "all": n}.get(kind)
        if count is None:
            count = draw(st.integers(0, n))
        keep[i, torch.randperm(n, generator=gen)[:count]] = True
    return keep


@st.composite
def token_sets(draw, keep: torch.Tensor) -> TokenSet:
    """The set of ``keep`` with an exact capacity, a capacity above the total, or B * N."""
    b, n = keep.shape
    total = int(keep.sum())
    layout = draw(st.sampled_from(["exact", "above", "full"]))
    if layout == "exact":
        return TokenSet.from_mask(keep.to(DEVICE))
    cap = b * n if layout == "full" else min(b * n, total + draw(st.integers(1, 6)))
    return TokenSet.from_mask(keep.to(DEVICE), capacity=cap)


@st.composite
def ragged(draw, max_b: int = 4, max_n: int = 10, min_b: int = 0):
    b = draw(st.integers(min_b, max_b))
    n = draw(st.integers(1, max_n))
    keep = draw(keep_masks(b, n))
    return keep, draw(token_sets(keep))


dtypes = st.sampled_from([torch.float32, torch.float16])


def _seed(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


# ---------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("backend", _backend_params("gather"))
def test_gather(backend):
    @_examples("gather", backend)
    @given(data=st.data())
    def run(data):
        keep, ts = data.draw(ragged())
        dtype = data.draw(dtypes)
        c = data.draw(st.integers(1, 40))
        gen = _seed(data.draw)
        x = _randn(gen, *keep.shape, c, dtype=dtype).requires_grad_()
        packed = gather_tokens(x, ts, backend=backend)
        t = int(keep.sum())
        assert packed.shape == (ts.capacity, c)
        assert torch.equal(packed[:t].detach().cpu(), naive_gather(x.detach().cpu(), keep))
        assert not packed[t:].any(), "padding rows must be zero"
        g = _randn(gen, ts.capacity, c, dtype=dtype)
        packed.backward(g)
        ref = naive_scatter(g[:t].cpu(), keep, torch.zeros(*keep.shape, c, dtype=dtype))
        assert torch.equal(x.grad.cpu(), ref)

    run()


@pytest.mark.parametrize("backend", _backend_params("scatter"))
def test_scatter(backend):
    @_examples("scatter", backend)
    @given(data=st.data())
    def run(data):
        keep, ts = data.draw(ragged())
        dtype = data.draw(dtypes)
        add = data.draw(st.booleans())
        c = data.draw(st.integers(1, 40))
        gen = _seed(data.draw)
        packed = _randn(gen, ts.capacity, c, dtype=dtype).requires_grad_()
        base = _randn(gen, *keep.shape, c, dtype=dtype).requires_grad_()
        out = scatter_tokens(packed, ts, base.clone(), add=add, backend=backend)
        t = int(keep.sum())
        ref = naive_scatter(packed[:t].detach().cpu().double(), keep,
                            base.detach().cpu().double(), add=add)
        _close(out.detach(), ref, dtype, "scatter", scale=0.1)
        g = _randn(gen, *keep.shape, c, dtype=dtype)
        out.backward(g)
        gp = naive_gather(g.cpu(), keep)
        assert torch.equal(packed.grad[:t].cpu(), gp)
        assert not packed.grad[t:].any(), "padding rows of packed get no gradient"
        gb = g.cpu().clone()
        if not add:
            gb[keep.cpu()] = 0
        assert torch.equal(base.grad.cpu(), gb)

    run()


# ---------------------------------------------------------------------- attention
def _attention_ref(q, k, v, keep_q, keep_k, scale):
    cq, ck = keep_q.sum(1).tolist(), keep_k.sum(1).tolist()
    return naive_attention(q.double(), k.double(), v.double(), cq, ck, scale)


@pytest.mark.parametrize("backend", _backend_params("attention"))
def test_attention(backend):
    @_examples("attention", backend)
    @given(data=st.data())
    def run(data):
        b = data.draw(st.integers(0, 4))
        nq = data.draw(st.integers(1, 10))
        cross = data.draw(st.booleans())
        nk = data.draw(st.integers(1, 10)) if cross else nq
        keep_q = data.draw(keep_masks(b, nq))
        keep_k = data.draw(keep_masks(b, nk)) if cross else keep_q
        ts_q = data.draw(token_sets(keep_q))
        ts_k = data.draw(token_sets(keep_k)) if cross else ts_q
        dtype = data.draw(dtypes)
        h = data.draw(st.integers(1, 3))
        d = data.draw(st.sampled_from([1, 3, 8, 16, 20, 33]))
        loose = data.draw(st.booleans())  # bounds above the true maxima are valid
        mq = nq if loose else ts_q.max_seqlen
        mk = nk if loose else ts_k.max_seqlen
        gen = _seed(data.draw)
        q = _randn(gen, ts_q.capacity, h, d, dtype=dtype).requires_grad_()
        k = _randn(gen, ts_k.capacity, h, d, dtype=dtype).requires_grad_()
        v = _randn(gen, ts_k.capacity, h, d, dtype=dtype).requires_grad_()
        out = varlen_attention(q, k, v, ts_q.cu_seqlens, ts_k.cu_seqlens, mq, mk,
                               backend=backend)
        tq = int(keep_q.sum())
        qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        ref = _attention_ref(qd, kd, vd, keep_q, keep_k, d**-0.5)
        assert out.shape == (ts_q.capacity, h, d)
        _close(out[:tq].detach(), ref, dtype, "out")
        assert not out[tq:].any(), "padding rows must be zero"
        g = _randn(gen, ts_q.capacity, h, d, dtype=dtype)
        out.backward(g)
        if ref.requires_grad:  # else no image has keys: every gradient is zero
            ref.backward(g[:tq].cpu().double())
        tk = int(keep_k.sum())
        for name, got, want, rows in (("dq", q.grad, qd.grad, tq), ("dk", k.grad, kd.grad, tk),
                                      ("dv", v.grad, vd.grad, tk)):
            want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
            _close(got[:rows], want[:rows], dtype, name, scale=2.0)

    run()


# ---------------------------------------------------------------------- packed linear
@pytest.mark.parametrize("backend", _backend_params("linear"))
def test_linear(backend):
    @_examples("linear", backend)
    @given(data=st.data())
    def run(data):
        keep, ts = data.draw(ragged())
        dtype = data.draw(dtypes)
        k_in = data.draw(st.integers(1, 24))
        n_out = data.draw(st.integers(1, 24))
        dense_in = data.draw(st.booleans())
        scatter = data.draw(st.booleans())
        act = data.draw(st.sampled_from(["none", "gelu"]))
        use_bias, use_res = data.draw(st.booleans()), data.draw(st.booleans())
        gen = _seed(data.draw)
        t = int(keep.sum())
        xd = _randn(gen, *keep.shape, k_in, dtype=dtype)
        x = (xd if dense_in else gather_tokens(xd, ts, backend="torch")).requires_grad_()
        w = _randn(gen, n_out, k_in, dtype=dtype, scale=k_in**-0.5).requires_grad_()
        bias = _randn(gen, n_out, dtype=dtype).requires_grad_() if use_bias else None
        res = _randn(gen, ts.capacity, n_out, dtype=dtype).requires_grad_() if use_res else None
        base = _randn(gen, *keep.shape, n_out, dtype=dtype) if scatter else None
        out = packed_linear(x, w, bias, ts, activation=act, residual=res,
                            out=None if base is None else base.clone(), backend=backend)
        # reference: the active rows, float64
        leaves = [t_.detach().cpu().double().requires_grad_() if t_ is not None else None
                  for t_ in (x, w, bias, res)]
        xr, wr, br, rr = leaves
        rows = naive_gather(xr, keep) if dense_in else xr[:t]
        y = F.linear(rows, wr, br)
        y = F.gelu(y) if act == "gelu" else y
        y = y + rr[:t] if rr is not None else y
        if scatter:
            ref = naive_scatter(y, keep, base.cpu().double())
            _close(out.detach(), ref, dtype, "out")
        else:
            _close(out[:t].detach(), y, dtype, "y")
            assert not out[t:].any(), "padding rows must be zero"
            ref = y
        g = _randn(gen, *out.shape, dtype=dtype)
        out.backward(g)
        if ref.requires_grad:  # else there are no rows at all
            ref.backward(g.cpu().double() if scatter else g[:t].cpu().double())
        _close(w.grad, _grad(wr), dtype, "dW", scale=4.0)
        if use_bias:
            _close(bias.grad, _grad(br), dtype, "db", scale=4.0)
        if dense_in:
            _close(x.grad, _grad(xr), dtype, "dx", scale=2.0)
        else:
            _close(x.grad[:t], _grad(xr)[:t], dtype, "dx", scale=2.0)
        if use_res:
            _close(res.grad[:t], _grad(rr)[:t], dtype, "dresidual")

    run()


# ---------------------------------------------------------------------- dtop_select
@pytest.mark.parametrize("backend", _backend_params("select"))
def test_select(backend):
    @_examples("select", backend)
    @given(data=st.data())
    def run(data):
        keep, ts = data.draw(ragged(max_n=14))
        b, n = keep.shape
        k = data.draw(st.integers(1, 5))
        dtype = data.draw(dtypes)
        threshold = data.draw(st.sampled_from([0.0, 0.3, 0.6, 0.9]))
        top_k = data.draw(st.integers(0, 4))
        gen = _seed(data.draw)
        # coarse logits: ties in confidence happen, and the tie rule is exercised
        cls = (torch.randint(-2, 3, (b, k, 2), generator=gen) * 1.5).to(dtype)
        ml_dense = (torch.randint(-2, 4, (b, k, n), generator=gen) * 1.5).to(dtype)
        ml = torch.zeros(k, ts.capacity, dtype=dtype)
        t = int(keep.sum())
        idx = ts.indices[:t].long().cpu()
        ml[:, :t] = ml_dense.permute(1, 0, 2).reshape(k, b * n)[:, idx]
        sel = dtop_select(cls.to(DEVICE), ml.to(DEVICE), ts, threshold, top_k, backend=backend)
        exited = sel.exited.cpu()
        logits = cls.float(), ml_dense.float()
        if not torch.equal(exited, naive_select(*logits, keep, threshold, top_k)):
            # equal products of swapped logits round apart: near ties go either way
            assert not exits_allowed(exited, *logits, keep, threshold, top_k)
        assert torch.equal(sel.tokens.keep_mask().cpu(), keep & ~exited)
        sel.tokens.validate()

    run()


# ---------------------------------------------------------------------- pruned_block
@pytest.mark.parametrize("backend", _backend_params("block"))
def test_block(backend):
    @_examples("block", backend)
    @given(data=st.data())
    def run(data):
        keep, ts = data.draw(ragged(max_b=3, max_n=8))
        h = data.draw(st.integers(1, 2))
        c = h * data.draw(st.sampled_from([4, 8, 12]))
        layer_scale = data.draw(st.booleans())
        gen = _seed(data.draw)
        torch.manual_seed(data.draw(st.integers(0, 2**16)))
        blk = randomize_(Block(c, h, mlp_ratio=2.0, layer_scale=layer_scale), gen).to(DEVICE)
        x = _randn(gen, *keep.shape, c).requires_grad_()
        out = pruned_block(x, ts, blk, backend=backend)
        xd = x.detach().cpu().double().requires_grad_()
        ref = naive_block(xd, keep, copy.deepcopy(blk).cpu().double())
        _close(out.detach(), ref, torch.float32, "block", scale=5.0)
        g = _randn(gen, *keep.shape, c)
        out.backward(g)
        ref.backward(g.cpu().double())
        _close(x.grad, xd.grad, torch.float32, "dx", scale=10.0)

    run()
