"""The op library (``libdtop_ops.so``, csrc/oplib): its ``dtop::`` ops' CPU implementations
against the package's PyTorch reference (the ``dtop_py::`` ops on the torch backend), their
schemas and fake implementations (``torch.library.opcheck``), and the library's exported
symbols (the stable ABI only: nothing of PyTorch's C++ API)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from helpers import random_keep

from dtop_kernels import TokenSet
from dtop_kernels.ops import library as L
from dtop_kernels.ops import native


@pytest.fixture(scope="module", autouse=True)
def ops_library():
    try:
        return native.load()
    except native.OpsLibraryError as e:
        if os.environ.get("DTOP_REQUIRE_OPS_LIBRARY"):
            raise
        pytest.skip(f"no op library: {e}")


D = torch.ops.dtop
DTYPES = [torch.float32, torch.float16, torch.float64]


def _tokens(gen, b=3, n=12, counts=(12, 5, 0), capacity=24) -> TokenSet:
    return TokenSet.from_mask(random_keep(b, n, list(counts), gen), capacity=capacity)


def _scrambled(ts: TokenSet) -> TokenSet:
    """``ts`` with garbage in its padding slots (indices past T are never read)."""
    idx = ts.indices.clone()
    t = int(ts.cu_seqlens[-1])
    idx[t:] = torch.arange(idx.shape[0] - t, dtype=torch.int32) * 7 - 3
    return TokenSet(idx, ts.cu_seqlens, ts.batch_size, ts.seq_len, ts.max_seqlen)


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-12}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter(dtype, gen):
    ts = _scrambled(_tokens(gen))
    x = torch.randn(36, 16, generator=gen).to(dtype)
    got = D.gather(x, ts.indices, ts.cu_seqlens, 12)
    assert torch.equal(got, L.gather(x, ts.indices, ts.cu_seqlens, 12, "torch"))
    p = torch.randn(ts.capacity, 16, generator=gen).to(dtype)
    for base in (None, torch.randn(36, 16, generator=gen).to(dtype)):
        for add in (False, True):
            got = D.scatter(p, ts.indices, ts.cu_seqlens, base, 12, add)
            want = L.scatter(p, ts.indices, ts.cu_seqlens, base, 12, add, "torch")
            if add and dtype == torch.float16:  # one rounding, the reference's too
                torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
            else:
                assert torch.equal(got, want), (base is None, add)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather_rows", [False, True])
def test_layer_norm(dtype, gather_rows, gen):
    ts = _tokens(gen)
    x = torch.randn(36 if gather_rows else ts.capacity, 32, generator=gen).mul(3).add(1)
    x = x.to(dtype)
    w, b = torch.randn(32, generator=gen).to(dtype), torch.randn(32, generator=gen).to(dtype)
    args = (x, w, b, ts.indices, ts.cu_seqlens, 12, 1e-6, gather_rows)
    got = D.layer_norm(*args)
    want = L.layer_norm(*args, "torch")
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, atol=_tol(dtype) * 4, rtol=_tol(dtype))


def _attention_case(gen, dtype, logits: bool, hd=32, h=2):
    if logits:  # uniform queries (the DToP heads' class queries): 4 per image
        cu_q = torch.arange(4, dtype=torch.int32) * 4
        mq, tq = 4, 12
    else:
        cu_q = torch.tensor([0, 9, 14, 14], dtype=torch.int32)
        mq, tq = 9, 18
    cu_k = torch.tensor([0, 11, 16, 16], dtype=torch.int32)
    q = torch.randn(tq, h, hd, generator=gen).to(dtype)
    k = torch.randn(20, h, hd, generator=gen).to(dtype)
    v = torch.randn(20, h, hd + 8, generator=gen).to(dtype)
    return q, k, v, cu_q, cu_k, mq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", [False, True])
def test_varlen_attention(dtype, logits, gen):
    q, k, v, cu_q, cu_k, mq = _attention_case(gen, dtype, logits)
    args = (q, k, v, cu_q, cu_k, mq, 11, 32 ** -0.5, logits)
    out, lse, lg = D.varlen_attention(*args)
    ref_out, _, ref_lg = L.varlen_attention(*args, "torch")
    torch.testing.assert_close(out, ref_out, atol=_tol(dtype) * 4, rtol=_tol(dtype))
    assert lse.numel() == 0
    if logits:
        torch.testing.assert_close(lg, ref_lg, atol=_tol(dtype) * 4, rtol=_tol(dtype))


def test_varlen_attention_nonfinite_rule(gen):
    """A non-finite query row gives a NaN row; a non-finite key or value row NaN rows for its
    image and head; an image without keys zero rows; padding rows zero (as every backend)."""
    q, k, v, cu_q, cu_k, mq = _attention_case(gen, torch.float32, False)
    q = torch.cat([q, torch.randn(4, 2, 32, generator=gen)])  # 4 padding rows
    q[2, 0, 5] = float("nan")
    k[12, 1, 0] = float("inf")  # image 1, head 1
    q[15, 0, 0] = float("inf")  # image 2 has no keys: stays zero
    args = (q, k, v, cu_q, cu_k, mq, 11, 32 ** -0.5, False)
    got = D.varlen_attention(*args)[0]
    want = L.varlen_attention(*args, "torch")[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert got[2, 0].isnan().all() and not got[2, 1].isnan().any()
    assert got[9:14, 1].isnan().all() and not got[9:14, 0].isnan().any()
    assert (got[14:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather_rows", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_packed_linear(dtype, gather_rows, scatter, gen):
    """Against the formula on the gathered rows, in float64."""
    ts = _scrambled(_tokens(gen))
    x = torch.randn(36 if gather_rows else ts.capacity, 16, generator=gen).to(dtype)
    w, b = torch.randn(24, 16, generator=gen).to(dtype), torch.randn(24, generator=gen).to(dtype)
    res = torch.randn(ts.capacity, 24, generator=gen).to(dtype)
    base = torch.randn(36, 24, generator=gen).to(dtype) if scatter else None
    t = int(ts.cu_seqlens[-1])
    idx = ts.indices[:t].long()
    rows = (x[idx] if gather_rows else x[:t]).double()
    for act, bias, residual in ((L.ACT_GELU, b, res), (L.ACT_NONE, None, None)):
        y, pre = D.packed_linear(x, w, bias, residual, base, ts.indices, ts.cu_seqlens, 12, act,
                                 gather_rows, True)
        z = rows @ w.double().t() + (0 if bias is None else bias.double())
        yy = torch.nn.functional.gelu(z) if act == L.ACT_GELU else z
        yy = yy + (0 if residual is None else residual[:t].double())
        tol = {"atol": _tol(dtype) * 20, "rtol": _tol(dtype) * 4}
        torch.testing.assert_close(pre[:t].double(), z, **tol)
        assert (pre[t:] == 0).all()
        if scatter:
            want = base.double().clone()
            want[idx] = yy
            torch.testing.assert_close(y.double(), want, **tol)
        else:
            torch.testing.assert_close(y[:t].double(), yy, **tol)
            assert (y[t:] == 0).all()


@pytest.mark.parametrize("top_k", [0, 1, 2, 5])
@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.95])
def test_select(top_k, threshold, gen):
    """Bit-equal to the reference: ties at saturated scores (1.0), NaN logits, empty images,
    garbage in the padding slots."""
    ts = _scrambled(_tokens(gen, b=4, n=16, counts=(16, 7, 0, 11), capacity=50))
    cls = torch.randn(4, 3, 2, generator=gen).mul(4)
    cls[0, 1] = torch.tensor([60.0, -60.0])  # present for sure: scores tie at 1.0
    mask = torch.randn(3, ts.capacity, generator=gen).mul(6)
    mask[1, :10] = 80.0
    mask[2, 3] = float("nan")
    args = (cls, mask, ts.indices, ts.cu_seqlens, 16, ts.max_seqlen, threshold, top_k)
    got = D.select(*args)
    want = L.select(*args, "torch")
    for g, r in zip(got, want):
        assert torch.equal(g, r), (g, r)


def test_select_half_inputs(gen):
    ts = _tokens(gen)
    cls = torch.randn(3, 4, 2, generator=gen).mul(4).half()
    mask = torch.randn(4, ts.capacity, generator=gen).mul(6).half()
    args = (cls, mask, ts.indices, ts.cu_seqlens, 12, ts.max_seqlen, 0.5, 1)
    for g, r in zip(D.select(*args), L.select(*args, "torch")):
        assert torch.equal(g, r)


# ---------------------------------------------------------------------- schemas and fakes
def _opcheck_cases(gen):
    ts = _tokens(gen)
    x = torch.randn(36, 16, generator=gen)
    p = torch.randn(ts.capacity, 16, generator=gen)
    w, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    q, k, v, cu_q, cu_k, mq = _attention_case(gen, torch.float32, True)
    cls = torch.randn(3, 4, 2, generator=gen)
    mask = torch.randn(4, ts.capacity, generator=gen)
    lw = torch.randn(24, 16, generator=gen)
    i, c = ts.indices, ts.cu_seqlens
    return {
        "gather": [(x, i, c, 12)],
        "scatter": [(p, i, c, None, 12, False), (p, i, c, x, 12, True)],
        "layer_norm": [(x, w, b, i, c, 12, 1e-6, True), (p, w, b, i, c, 12, 1e-6, False)],
        "varlen_attention": [(q, k, v, cu_q, cu_k, mq, 11, 0.2, True),
                             (q, k, v, cu_q, cu_k, mq, 11, 0.2, False)],
        "packed_linear": [(x, lw, None, None, None, i, c, 12, 1, True, True),
                          (p, lw, torch.randn(24), torch.randn(ts.capacity, 24),
                           torch.randn(36, 24), i, c, 12, 0, False, False)],
        "select": [(cls, mask, i, c, 12, ts.max_seqlen, 0.5, 1)],
    }


def test_opcheck_every_op(gen):
    cases = _opcheck_cases(gen)
    assert set(cases) == set(native.OPS)
    for name, arg_sets in cases.items():
        for args in arg_sets:
            torch.library.opcheck(getattr(D, name).default, args)


def test_every_op_defined_once_in_cpp():
    """One schema per op, defined by the library (not by Python), with a CPU kernel."""
    for name in native.OPS:
        op = getattr(D, name).default
        assert op._schema.name == f"dtop::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        assert "backend" not in [a.name for a in op._schema.arguments]


def test_bad_input_names_the_op():
    x = torch.randn(4, 8)
    idx, cu = torch.zeros(2, dtype=torch.int64), torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"dtop::gather: indices and cu_seqlens must be int32"):
        D.gather(x, idx, cu, 4)
    with pytest.raises(RuntimeError, match=r"dtop::gather: x2d must be \[B \* N, C\]"):
        D.gather(x, idx.int(), cu, 3)


# ---------------------------------------------------------------------- the symbols
def test_exports_only_the_stable_abi():
    """The library defines one C symbol of its own and needs only C symbols of PyTorch (the
    stable shim): no mangled at:: / c10:: / torch:: symbol in either direction."""
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    path = native.ops_library_path()

    def symbols(flag):
        out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True,
                             check=True).stdout
        return [ln.split()[-1] for ln in out.splitlines() if ln.strip()]

    defined = [s for s in symbols("--defined-only") if not s.startswith("_ZSt")
               and not s.startswith("_ZNSt") and not s.startswith("_ZTS")
               and not s.startswith("_ZTI") and not s.startswith("_ZTV")]
    assert defined == ["dtop_ops_library_version"], defined
    undefined = symbols("--undefined-only")
    torch_cpp = [s for s in undefined if s.startswith("_Z") and any(
        ns in s for ns in ("2at", "3c10", "5torch", "6caffe2"))]
    assert not torch_cpp, torch_cpp
    assert any(s.startswith("aoti_torch_") for s in undefined)


def test_library_version_string():
    import dtop_kernels

    version = native.library_version()
    assert version.startswith(dtop_kernels.__version__ + " torch "), version


# ---------------------------------------------------------------------- the CUDA implementations
# csrc/oplib/dtop_ops_cuda.cpp over the kernels of csrc/, run by the CUDA emulator on CPU tensors
# (pytest -m emulated), against the CPU implementations above.
EMULATED = [pytest.param(v, id=f"emulated-{v}", marks=pytest.mark.emulated)
            for v in ("memcheck", "race")]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def cuda_ops(request):
    import cuda_emulator

    return getattr(torch.ops, cuda_emulator.load_oplib(request.param))


def _close(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_cuda_gather_scatter(cuda_ops, dtype, gen):
    ts = _scrambled(_tokens(gen))
    x = torch.randn(36, 16, generator=gen).to(dtype)
    assert torch.equal(cuda_ops.gather(x, ts.indices, ts.cu_seqlens, 12),
                       D.gather(x, ts.indices, ts.cu_seqlens, 12))
    p = torch.randn(ts.capacity, 16, generator=gen).to(dtype)
    for base in (None, torch.randn(36, 16, generator=gen).to(dtype)):
        for add in (False, True):
            got = cuda_ops.scatter(p, ts.indices, ts.cu_seqlens, base, 12, add)
            _close(got, D.scatter(p, ts.indices, ts.cu_seqlens, base, 12, add), dtype)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("gather_rows", [False, True])
def test_cuda_layer_norm(cuda_ops, dtype, gather_rows, gen):
    ts = _tokens(gen)
    x = torch.randn(36 if gather_rows else ts.capacity, 64, generator=gen).mul(3).add(1)
    x = x.to(dtype)
    w, b = torch.randn(64, generator=gen).to(dtype), torch.randn(64, generator=gen).to(dtype)
    args = (x, w, b, ts.indices, ts.cu_seqlens, 12, 1e-6, gather_rows)
    for g, r in zip(cuda_ops.layer_norm(*args), D.layer_norm(*args)):
        assert g.dtype == r.dtype and g.shape == r.shape
        _close(g, r, dtype if g.dtype == dtype else torch.float32)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("gather_rows", "scatter"), [(False, False), (True, True)])
def test_cuda_packed_linear(cuda_ops, dtype, gather_rows, scatter, gen):
    ts = _scrambled(_tokens(gen))
    x = torch.randn(36 if gather_rows else ts.capacity, 32, generator=gen).to(dtype)
    w = torch.randn(24, 32, generator=gen).div(4).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype)
    res = torch.randn(ts.capacity, 24, generator=gen).to(dtype)
    base = torch.randn(36, 24, generator=gen).to(dtype) if scatter else None
    for act, bias, residual in ((1, b, res), (0, None, None)):
        args = (x, w, bias, residual, base, ts.indices, ts.cu_seqlens, 12, act, gather_rows, True)
        for g, r in zip(cuda_ops.packed_linear(*args), D.packed_linear(*args)):
            _close(g, r, dtype)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("top_k", [0, 2])
def test_cuda_select(cuda_ops, top_k, gen):
    ts = _scrambled(_tokens(gen, b=4, n=16, counts=(16, 7, 0, 11), capacity=50))
    cls = torch.randn(4, 3, 2, generator=gen).mul(4)
    cls[0, 1] = torch.tensor([60.0, -60.0])
    mask = torch.randn(3, ts.capacity, generator=gen).mul(6)
    mask[1, :10] = 80.0
    mask[2, 3] = float("nan")
    args = (cls, mask, ts.indices, ts.cu_seqlens, 16, ts.max_seqlen, 0.3, top_k)
    for g, r in zip(cuda_ops.select(*args), D.select(*args)):
        assert torch.equal(g, r), (g, r)


@pytest.mark.parametrize("cuda_ops", EMULATED[1:], indirect=True)
def test_cuda_refuses_what_its_kernels_cannot_take(cuda_ops, gen):
    ts = _tokens(gen)
    x = torch.randn(36, 12, generator=gen).half()
    with pytest.raises(RuntimeError, match="multiples of 8"):
        cuda_ops.packed_linear(x, torch.randn(8, 12).half(), None, None, None, ts.indices,
                               ts.cu_seqlens, 12, 0, True, False)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        cuda_ops.packed_linear(x.float(), torch.randn(8, 12), None, None, None, ts.indices,
                               ts.cu_seqlens, 12, 0, True, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cuda_ops.gather(x.double(), ts.indices, ts.cu_seqlens, 12)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("logits", [False, True])
def test_cuda_varlen_attention(cuda_ops, dtype, logits, gen):
    q, k, v, cu_q, cu_k, mq = _attention_case(gen, dtype, logits)
    v = v[..., :32].contiguous()  # the CUDA kernels take v's head dim equal to q's
    args = (q, k, v, cu_q, cu_k, mq, 11, 32 ** -0.5, logits)
    got, want = cuda_ops.varlen_attention(*args), D.varlen_attention(*args)
    _close(got[0], want[0], dtype)
    assert got[1].numel() == 0
    if logits:
        _close(got[2], want[2], dtype)


@pytest.mark.parametrize("cuda_ops", EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_varlen_attention_nonfinite_rule(cuda_ops, dtype, gen):
    """The rule's kernel (csrc/attention_fwd.cu) against the CPU implementation's."""
    q, k, v, cu_q, cu_k, mq = _attention_case(gen, dtype, False)
    v = v[..., :32].contiguous()
    q = torch.cat([q, torch.randn(4, 2, 32, generator=gen).to(dtype)])  # 4 padding rows
    q[2, 0, 5] = float("nan")
    k[12, 1, 0] = float("inf")  # image 1, head 1
    v[3, 0, 7] = float("-inf")  # image 0, head 0
    q[15, 0, 0] = float("inf")  # image 2 has no keys: stays zero
    args = (q, k, v, cu_q, cu_k, mq, 11, 32 ** -0.5, False)
    got, want = cuda_ops.varlen_attention(*args)[0], D.varlen_attention(*args)[0]
    assert torch.equal(got.isnan(), want.isnan())
    assert got[:9, 0].isnan().all() and got[9:14, 1].isnan().all() and got[2, 0].isnan().all()
    ok = ~want.isnan()
    _close(got[ok], want[ok], dtype)
    assert (got[14:] == 0).all()


# ---------------------------------------------------------------------- the Triton backend's ops
# dtop_kernels.ops.triton_ops: the triton_ops an export on a GPU traces for backend="triton".
# Here eagerly, under Triton's CPU interpreter: the same kernels, launched through wrap_triton,
# as the dtop_py:: ops on the Triton backend.
def _triton_ops():
    pytest.importorskip("triton")
    from dtop_kernels.ops import triton_ops

    return triton_ops


def _same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True)


def test_triton_ops_match_the_triton_backend(gen):
    T = _triton_ops()
    cases = _opcheck_cases(gen)
    cases.pop("packed_linear")  # its Triton kernel takes float16 / bfloat16 on a GPU only
    for name, arg_sets in cases.items():
        for args in arg_sets:
            _same(T.op(name)(*args), getattr(L, name)(*args, "triton"))


def test_triton_ops_schemas():
    """The op library's schemas, namespace dtop_triton (no backend argument)."""
    T = _triton_ops()
    assert {fn._name.split("::")[-1] for fn in T.OPS} == set(native.OPS)
    for name in native.OPS:
        mine, lib = T.op(name).default._schema, getattr(D, name).default._schema
        assert mine.name == f"dtop_triton::{name}"
        assert [a.name for a in mine.arguments] == [a.name for a in lib.arguments]


def test_triton_ops_launch_through_wrap_triton(monkeypatch, gen):
    """Inside the triton_ops every launch goes through wrap_triton (what makes it a graph node
    under export); the dtop_py:: ops launch the kernels as they are."""
    T = _triton_ops()
    import torch.library as tl_

    seen = []
    real = tl_.wrap_triton

    def spy(kernel):
        seen.append(kernel)
        return real(kernel)

    monkeypatch.setattr(tl_, "wrap_triton", spy)
    args = _opcheck_cases(gen)["select"][0]
    T.op("select")(*args)
    assert len(seen) == 2  # the score and rank kernels
    seen.clear()
    L.select(*args, "triton")
    assert seen == []


# ---------------------------------------------------------------------- autograd of the dtop:: ops
# Registered in Python (dtop_kernels/ops/native.py) with the op library's own ops and PyTorch
# operators: gradcheck in float64 against finite differences of the C++ forward.
def _grad(t):
    return t.double().requires_grad_(True)


def test_gradcheck_gather_scatter(gen):
    ts = _tokens(gen, n=6, counts=(6, 3, 0), capacity=12)
    i, c = ts.indices, ts.cu_seqlens
    x = _grad(torch.randn(18, 4, generator=gen))
    assert torch.autograd.gradcheck(lambda x: D.gather(x, i, c, 6), (x,))
    p = _grad(torch.randn(12, 4, generator=gen))
    base = _grad(torch.randn(18, 4, generator=gen))
    for add in (False, True):
        assert torch.autograd.gradcheck(lambda p, b, add=add: D.scatter(p, i, c, b, 6, add),
                                        (p, base))
    assert torch.autograd.gradcheck(lambda p: D.scatter(p, i, c, None, 6, False), (p,))


@pytest.mark.parametrize("gather_rows", [False, True])
def test_gradcheck_layer_norm(gather_rows, gen):
    ts = _tokens(gen, n=6, counts=(6, 3, 0), capacity=12)
    x = _grad(torch.randn(18 if gather_rows else 12, 8, generator=gen))
    w, b = _grad(torch.randn(8, generator=gen)), _grad(torch.randn(8, generator=gen))

    def f(x, w, b):
        y, xp, _, _ = D.layer_norm(x, w, b, ts.indices, ts.cu_seqlens, 6, 1e-5, gather_rows)
        return (y, xp) if gather_rows else y

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("logits", [False, True])
def test_gradcheck_varlen_attention(logits, gen):
    if logits:
        cu_q, mq, tq = torch.arange(4, dtype=torch.int32) * 2, 2, 6
    else:
        cu_q, mq, tq = torch.tensor([0, 3, 5, 5], dtype=torch.int32), 3, 7
    cu_k = torch.tensor([0, 4, 6, 6], dtype=torch.int32)
    q = _grad(torch.randn(tq, 2, 4, generator=gen))
    k, v = _grad(torch.randn(7, 2, 4, generator=gen)), _grad(torch.randn(7, 2, 4, generator=gen))

    def f(q, k, v):
        out, _, lg = D.varlen_attention(q, k, v, cu_q, cu_k, mq, 4, 0.5, logits)
        return (out, lg) if logits else out

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize(("gather_rows", "scatter"), [(False, False), (True, True)])
def test_gradcheck_packed_linear(act, gather_rows, scatter, gen):
    ts = _tokens(gen, n=6, counts=(6, 3, 0), capacity=12)
    x = _grad(torch.randn(18 if gather_rows else 12, 8, generator=gen))
    w, b = _grad(torch.randn(5, 8, generator=gen)), _grad(torch.randn(5, generator=gen))
    res = _grad(torch.randn(12, 5, generator=gen))
    base = _grad(torch.randn(18, 5, generator=gen)) if scatter else None

    def f(x, w, b, res, *base):
        y, pre = D.packed_linear(x, w, b, res, base[0] if base else None, ts.indices,
                                 ts.cu_seqlens, 6, act, gather_rows, True)
        return y, pre

    assert torch.autograd.gradcheck(f, (x, w, b, res) + ((base,) if scatter else ()))


def test_opcheck_with_gradients(gen):
    """opcheck's autograd-registration test needs inputs that require grad."""
    for name, arg_sets in _opcheck_cases(gen).items():
        if name == "select":
            continue
        for args in arg_sets:
            args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor)
                         and a.is_floating_point() else a for a in args)
            torch.library.opcheck(getattr(D, name).default, args)
