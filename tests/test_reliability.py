"""Contracts that hold on every backend: non-finite inputs, valid loose bounds, the checked mode,
autograd on empty results, repeatability and flat memory over many packed steps."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from blocks import Block, randomize_
from helpers import DEVICE, backend_params, emulated_cuda_params
from naive import naive_attention, naive_block, naive_select

from dtop_kernels import (
    TokenSet,
    _checks,
    dtop_select,
    gather_tokens,
    pruned_block,
    pruned_stage,
    scatter_tokens,
    varlen_attention,
)

BACKENDS = backend_params("torch", "triton")
# Deliberate NaN / Inf inputs: Triton's CPU interpreter computes with numpy, which warns about
# the IEEE arithmetic these tests check (NaN - NaN, Inf * 0); the results are asserted instead.
IEEE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")


def _cu(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", BACKENDS)
@IEEE_WARNINGS
def test_attention_nonfinite_rule(backend, where, bad):
    """A bad query row -> that output row NaN; a bad key or value row -> every row of its image
    (that head) NaN; other rows and images exact; an image without keys stays zero."""
    h, d = 2, 16
    counts = [3, 4, 2]  # image 2 gets no keys below
    cu_q, cu_k = _cu(0, 3, 7, 9), _cu(0, 3, 7, 7)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, d, generator=gen).to(DEVICE) for _ in range(3))
    ref = naive_attention(q.double(), k.double(), v.double(), counts, [3, 4, 0])
    t = {"q": q, "k": k, "v": v}[where]
    t[4, 1, 5] = bad  # image 1, head 1
    t[8, 0, 0] = bad  # image 2: as a query it has no keys; as a key / value it is padding
    out = varlen_attention(q, k, v, cu_q, cu_k, 4, 4, backend=backend).cpu()
    expect_nan = torch.zeros(9, h, dtype=torch.bool)
    if where == "q":
        expect_nan[4, 1] = True
    else:
        expect_nan[3:7, 1] = True
    assert torch.equal(out.isnan().any(-1), expect_nan)
    ok = ~expect_nan
    torch.testing.assert_close(out[ok].double(), ref[ok], atol=2e-4, rtol=2e-4)
    assert not out[7:].any(), "an image without keys gets zero rows"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", emulated_cuda_params())
def test_attention_nonfinite_rule_cuda(backend, where, bad, dtype):
    """The same rule on the CUDA kernels (head dim 32, half precision): the rule's own kernel
    (attention_nonfinite_kernel) after the forward."""
    h, d = 2, 32
    counts = [3, 4, 2]
    cu_q, cu_k = _cu(0, 3, 7, 9), _cu(0, 3, 7, 7)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, d, generator=gen).to(DEVICE, dtype) for _ in range(3))
    ref = naive_attention(q.double(), k.double(), v.double(), counts, [3, 4, 0])
    t = {"q": q, "k": k, "v": v}[where]
    t[4, 1, 5] = bad
    t[8, 0, 0] = bad
    out = varlen_attention(q, k, v, cu_q, cu_k, 4, 4, backend=backend).cpu()
    expect_nan = torch.zeros(9, h, dtype=torch.bool)
    if where == "q":
        expect_nan[4, 1] = True
    else:
        expect_nan[3:7, 1] = True
    assert torch.equal(out.isnan().any(-1), expect_nan)
    assert torch.equal(out.isnan().all(-1), expect_nan), "a NaN row is NaN throughout"
    ok = ~expect_nan
    torch.testing.assert_close(out[ok].double(), ref[ok], atol=2e-2, rtol=2e-2)
    assert not out[7:].any(), "an image without keys gets zero rows"


def _select_case(cls_row: list[float]):
    b, k, n = 2, 3, 6
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 4:] = False
    ts = TokenSet.from_mask(keep.to(DEVICE))
    cls = torch.tensor([[2.0, 0.0], [0.5, 0.0], [1.0, 0.0]]).expand(b, k, 2).clone()
    cls[0, 1] = torch.tensor(cls_row)
    ml = torch.tensor([[6.0, -3.0, 5.0, 0.0, 8.0, 2.0]]).expand(k, n).clone()
    ml[1] = ml[1].flip(0)
    ml_dense = ml.expand(b, k, n)
    idx = ts.indices.long().cpu()
    slots = ml_dense.permute(1, 0, 2).reshape(k, b * n)[:, idx]
    return cls, slots, ml_dense, keep, ts


@pytest.mark.parametrize(
    "cls_row",
    [[math.inf, 0.0], [-math.inf, 0.0], [0.0, math.inf], [math.inf, math.inf],
     [math.nan, 0.0], [0.0, -math.inf]],
    ids=["+inf-present", "-inf-present", "+inf-none", "inf-inf", "nan", "-inf-none"],
)
@pytest.mark.parametrize("backend", BACKENDS)
@IEEE_WARNINGS
def test_select_nonfinite_rule(backend, cls_row):
    """sigmoid(l_present - l_none) in the limit: +inf present is a sure class, -inf an absent
    one; inf - inf and NaN make the image's confidence NaN, so nothing of it exits."""
    cls, slots, ml_dense, keep, ts = _select_case(cls_row)
    sel = dtop_select(cls.to(DEVICE), slots.to(DEVICE), ts, 0.5, 1, backend=backend)
    expected = naive_select(cls, ml_dense, keep, 0.5, 1)
    assert torch.equal(sel.exited.cpu(), expected)
    if math.isnan(cls_row[0] - cls_row[1]):
        assert not expected[0].any()


# ---------------------------------------------------------------------- bounds and checks
@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_below_n_is_valid(backend):
    """from_mask(keep, capacity=c) with c < N: max_seqlen = min(N, c) is a valid bound and
    every op accepts it (a bound above the rows is valid too)."""
    b, n, c = 2, 16, 8
    keep = torch.zeros(b, n, dtype=torch.bool)
    keep[0, [1, 5, 9]] = True
    keep[1, [0, 15]] = True
    ts = TokenSet.from_mask(keep.to(DEVICE), capacity=6)
    assert ts.max_seqlen == 6
    blk = randomize_(Block(c, 2)).eval().to(DEVICE)
    x = torch.randn(b, n, c, device=DEVICE)
    out = pruned_block(x, ts, blk, backend=backend)
    torch.testing.assert_close(out.double().cpu(), naive_block(x.double().cpu(), keep,
                                                               copy.deepcopy(blk).cpu().double()),
                               atol=1e-4, rtol=1e-4)
    q = torch.randn(6, 2, 8, device=DEVICE)
    o = varlen_attention(q, q, q, ts.cu_seqlens, ts.cu_seqlens, 100, 100, backend=backend)
    ref = naive_attention(q.double().cpu(), q.double().cpu(), q.double().cpu(), [3, 2], [3, 2])
    torch.testing.assert_close(o[:5].double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_checked_mode_switch(monkeypatch):
    """CPU tensors are always checked; elsewhere check=True, or DTOP_CHECK=1 when check is None."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("DTOP_CHECK", raising=False)
    assert _checks.checking(None, torch.device("cpu")) and _checks.checking(False, "cpu" and
                                                                             torch.device("cpu"))
    assert not _checks.checking(None, cuda) and _checks.checking(True, cuda)
    monkeypatch.setenv("DTOP_CHECK", "1")
    assert _checks.checking(None, cuda) and not _checks.checking(False, cuda)
    monkeypatch.setenv("DTOP_CHECK", "0")
    assert not _checks.checking(None, cuda)


def test_validate_once_until_modified():
    ts = TokenSet.from_lists([[0, 2], [1]], seq_len=4)
    ts.validate()
    key = ts._checked
    ts.validate()
    assert ts._checked == key
    ts.indices[1] = 9  # in place: the next op checks again and catches it
    with pytest.raises(ValueError, match="does not belong to image 0"):
        gather_tokens(torch.randn(2, 4, 3), ts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_when_no_image_has_keys(backend):
    q = torch.randn(4, 2, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(3, 2, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(3, 2, 8, device=DEVICE, requires_grad=True)
    out = varlen_attention(q, k, v, _cu(0, 2, 4), _cu(0, 0, 0), 2, 0, backend=backend)
    assert out.grad_fn is not None and not out.any()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and not t.grad.any()
    empty = varlen_attention(q, k, v, _cu(0), _cu(0), 0, 0, backend=backend)  # B = 0
    empty.sum().backward()


# ---------------------------------------------------------------------- repeatability
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeatable(backend):
    """Forward twice: bitwise equal outputs. Backward twice: bitwise equal gradients (the
    kernels use no atomics; the reference is deterministic on the CPU)."""
    gen = torch.Generator().manual_seed(3)
    b, n, c = 3, 12, 16
    keep = torch.rand(b, n, generator=gen) < 0.6
    ts = TokenSet.from_mask(keep.to(DEVICE), capacity=b * n)
    blocks = [randomize_(Block(c, 2), gen).eval().to(DEVICE) for _ in range(2)]
    x = torch.randn(b, n, c, generator=gen).to(DEVICE)
    cls = torch.randn(b, 4, 2, generator=gen).to(DEVICE)
    ml = torch.randn(4, ts.capacity, generator=gen).to(DEVICE)

    def run():
        xg = x.clone().requires_grad_()
        out = pruned_stage(xg, ts, blocks, backend=backend)
        packed = gather_tokens(out, ts, backend=backend)
        dense = scatter_tokens(packed * 2, ts, out.detach().clone(), backend=backend)
        sel = dtop_select(cls, ml, ts, 0.3, 2, backend=backend)
        (out.square().sum() + dense.sum()).backward()
        grads = [xg.grad] + [p.grad.clone() for blk in blocks for p in blk.parameters()]
        for blk in blocks:
            blk.zero_grad()
        return [out, packed, dense, sel.exited, sel.tokens.indices, sel.tokens.cu_seqlens], grads

    fwd1, bwd1 = run()
    fwd2, bwd2 = run()
    for i, (a, b_) in enumerate(zip(fwd1, fwd2)):
        assert torch.equal(a, b_), f"forward output {i} differs between two runs"
    for i, (a, b_) in enumerate(zip(bwd1, bwd2)):
        assert torch.equal(a, b_), f"gradient {i} differs between two runs"


# ---------------------------------------------------------------------- memory
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="host RSS; a GPU run checks device memory")
@pytest.mark.parametrize(
    "backend,steps,size",
    [pytest.param("torch", 60, (4, 32, 32, 2), id="torch"),
     # the CPU interpreter runs a step in about 0.5 s: few steps, tiny shapes; the tensor count
     # still catches anything kept alive from one step to the next
     pytest.param("triton", 12, (2, 8, 16, 1), id="triton",
                  marks=backend_params("triton")[0].marks)])
def test_memory_flat(backend, steps, size):
    """Many packed forward + backward steps: no tensor outlives its step and resident memory
    does not grow."""
    gen = torch.Generator().manual_seed(4)
    b, n, c, depth = size
    blocks = [randomize_(Block(c, 2), gen).eval() for _ in range(depth)]

    def step(i: int) -> None:
        keep = torch.rand(b, n, generator=gen) < 0.3 + 0.5 * (i % 3) / 2
        ts = TokenSet.from_mask(keep, capacity=b * n)
        x = torch.randn(b, n, c, generator=gen, requires_grad=True)
        out = pruned_stage(x, ts, blocks, backend=backend)
        out.sum().backward()
        for blk in blocks:
            blk.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up: allocator pools, kernel caches
        step(i)
    tensors, before = _live_tensors(), _rss_mib()
    for i in range(steps):
        step(i)
    assert _live_tensors() <= tensors, "tensors outlive their step"
    growth = _rss_mib() - before
    assert growth < 16, f"RSS grew by {growth:.1f} MiB over {steps} steps"
