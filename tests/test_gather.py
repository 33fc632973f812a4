"""gather_tokens / scatter_tokens against the naive per-image boolean-mask loop, every backend,
forward and backward: layouts, dtypes, strided views, garbage in padding slots, the reference's
host and device paths, GPU-sized shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    backend_params,
    cuda_kernel_test,
    make_tokens,
    mixed_tokens,
    ragged_tokens,
    random_keep,
    run_or_skip,
)
from naive import naive_gather, naive_scatter

from dtop_kernels import BackendError, TokenSet, gather_tokens, scatter_tokens
from dtop_kernels.cuda import gather as cuda_gather

BACKENDS = backend_params("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

CASES = [
    pytest.param(3, 37, 13, [0, 37, 11], id="B3-N37-C13-empty-full-partial"),
    pytest.param(1, 37, 13, [37], id="B1-all"),
    pytest.param(1, 16, 8, [0], id="B1-none"),
    pytest.param(4, 20, 64, [1, 20, 0, 7], id="B4-N20-C64-mixed"),
    pytest.param(2, 9, 1, [9, 1], id="C1"),
]
LAYOUTS = [pytest.param(name, id=name) for name in ("exact", "padded", "full")]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float64, id="fp64"),
]


def _supported(backend: str, dtype: torch.dtype) -> bool:
    return backend == "torch" or dtype in KERNEL_DTYPES


def _inputs(b, n, c, counts, layout, dtype, gen):
    keep = random_keep(b, n, counts, gen)
    ts = make_tokens(keep, layout)
    keep = keep.to(DEVICE)
    x = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype)
    return keep, ts, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,n,c,counts", CASES)
def test_gather(b, n, c, counts, layout, dtype, backend, gen):
    keep, ts, x = _inputs(b, n, c, counts, layout, dtype, gen)
    x[~keep] = float("nan")  # inactive tokens must never be read
    if not _supported(backend, dtype):
        with pytest.raises(BackendError):
            gather_tokens(x, ts, backend=backend)
        return
    packed = gather_tokens(x, ts, backend=backend)
    t = sum(counts)
    assert packed.shape == (ts.capacity, c) and packed.dtype == dtype
    assert torch.equal(packed[:t], naive_gather(x, keep))
    assert torch.all(packed[t:] == 0), "padding rows must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,n,c,counts", CASES)
@pytest.mark.parametrize("add", [pytest.param(False, id="copy"), pytest.param(True, id="add")])
def test_scatter(b, n, c, counts, layout, dtype, backend, add, gen):
    keep, ts, _ = _inputs(b, n, c, counts, layout, dtype, gen)
    t = sum(counts)
    packed = torch.randn(ts.capacity, c, generator=gen).to(DEVICE, dtype)
    packed[t:] = float("nan")  # padding rows must be ignored
    out = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype)
    if add:
        out[~keep] = float("nan")  # untouched rows stay NaN; active rows get base + packed
    else:
        out.fill_(float("nan"))  # every active row must be written
    base = out.clone()
    if not _supported(backend, dtype):
        with pytest.raises(BackendError):
            scatter_tokens(packed, ts, out, add=add, backend=backend)
        return
    res = scatter_tokens(packed, ts, out, add=add, backend=backend)
    assert res is out, "scatter_tokens writes in place into `out` and returns it"
    expected = naive_scatter(packed[:t], keep, base, add=add)
    assert torch.equal(res.isnan(), ~keep[..., None].expand_as(res))
    # One fp32 add rounded once is exact; the CPU interpreter truncates fp32 -> bf16 instead of
    # rounding (a GPU rounds), so allow one bf16 ulp there.
    interp_bf16 = add and dtype == torch.bfloat16 and backend == "triton" and DEVICE.type == "cpu"
    rtol = 2.0**-7 if interp_bf16 else 0.0
    torch.testing.assert_close(res, expected, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_without_out(layout, backend, gen):
    keep, ts, _ = _inputs(3, 37, 13, [0, 37, 11], layout, torch.float32, gen)
    packed = torch.randn(ts.capacity, 13, generator=gen).to(DEVICE)
    res = scatter_tokens(packed, ts, backend=backend)
    expected = naive_scatter(packed[:sum([0, 37, 11])], keep, torch.zeros_like(res))
    assert torch.equal(res, expected)


# ---------------------------------------------------------------------- padding contents
def _garbage_padding_tokens() -> tuple[torch.Tensor, TokenSet]:
    """A valid TokenSet whose padding slots hold arbitrary values (from_indices only checks the
    valid part): padding must be ignored whatever it holds."""
    keep = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    idx = torch.tensor([1, 3, 4, 100, -7, 2], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    return keep.to(DEVICE), TokenSet.from_indices(idx, cu, seq_len=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_in_padding_slots_is_ignored(backend, gen):
    keep, ts = _garbage_padding_tokens()
    x = torch.randn(2, 4, 5, generator=gen).to(DEVICE)
    packed = gather_tokens(x, ts, backend=backend)
    assert torch.equal(packed[:3], naive_gather(x, keep)) and torch.all(packed[3:] == 0)
    src = torch.randn(ts.capacity, 5, generator=gen).to(DEVICE)
    for add in (False, True):
        out = torch.randn(2, 4, 5, generator=gen).to(DEVICE)
        expected = naive_scatter(src[:3], keep, out, add=add)
        assert torch.equal(scatter_tokens(src, ts, out, add=add, backend=backend), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_device_path(layout, gen):
    """The reference's no-sync path (used on CUDA) against the naive loop, run on this device,
    also with garbage in the padding slots."""
    from dtop_kernels.reference import gather as rg

    keep, ts, _ = _inputs(3, 37, 13, [0, 37, 11], layout, torch.float64, gen)
    cases = [(keep, ts)] + ([_garbage_padding_tokens()] if layout == "full" else [])
    for kp, tk in cases:
        xx = torch.randn(tk.batch_size, tk.seq_len, 6, generator=gen, dtype=torch.float64)
        xx = xx.to(DEVICE)
        t = int(kp.sum())
        packed = rg.gather_masked(xx, tk)
        assert torch.equal(packed[:t], naive_gather(xx, kp)) and torch.all(packed[t:] == 0)
        src = torch.randn(tk.capacity, 6, generator=gen, dtype=torch.float64).to(DEVICE)
        for add in (False, True):
            assert torch.equal(rg.scatter_masked(src, tk, xx, add),
                               naive_scatter(src[:t], kp, xx, add=add))


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_reference_paths_agree(padded):
    """The reference's device path (T stays on the device: masked ops, used on CUDA) and its
    host path (T read once, used on the CPU) agree, forward and backward, on CPU tensors."""
    from dtop_kernels.reference import gather as rg

    t = mixed_tokens(padded)
    total = int(t.cu_seqlens[-1])
    x = torch.randn(3, 29, 7, dtype=torch.float64, requires_grad=True)
    a, b = rg.gather_counted(x, t, total), rg.gather_masked(x, t)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (a, b)))
    packed = torch.randn(t.capacity, 7, dtype=torch.float64)
    for add in (False, True):
        assert torch.equal(rg.scatter_counted(packed, t, x, add, total),
                           rg.scatter_masked(packed, t, x, add))


# ---------------------------------------------------------------------- strided inputs
def _views(b, n, c, gen):
    """Non-contiguous [B, N, C] views of fresh random storage."""
    return {
        "transposed": torch.randn(b, c, n, generator=gen).to(DEVICE).transpose(1, 2),
        "channel-slice": torch.randn(b, n, c + 3, generator=gen).to(DEVICE)[..., 1:c + 1],
        "batch-stride": torch.randn(2 * b, n, c, generator=gen).to(DEVICE)[::2],
        "token-stride": torch.randn(b, 2 * n, c, generator=gen).to(DEVICE)[:, ::2],
    }


VIEWS = [pytest.param(v, id=v) for v in ("transposed", "channel-slice", "batch-stride",
                                         "token-stride")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", VIEWS)
def test_gather_non_contiguous(view, backend, gen):
    b, n, c = 3, 37, 13
    keep, ts, _ = _inputs(b, n, c, [5, 37, 0], "padded", torch.float32, gen)
    x = _views(b, n, c, gen)[view]
    assert not x.is_contiguous()
    packed = gather_tokens(x, ts, backend=backend)
    assert torch.equal(packed[:42], naive_gather(x, keep))
    assert torch.all(packed[42:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add", [pytest.param(False, id="copy"), pytest.param(True, id="add")])
def test_scatter_non_contiguous_packed(add, backend, gen):
    b, n, c = 3, 37, 13
    keep, ts, _ = _inputs(b, n, c, [5, 37, 0], "padded", torch.float32, gen)
    packed = torch.randn(c, ts.capacity, generator=gen).to(DEVICE).t()
    out = torch.randn(b, n, c, generator=gen).to(DEVICE)
    expected = naive_scatter(packed[:42], keep, out, add=add)
    res = scatter_tokens(packed, ts, out, add=add, backend=backend)
    assert torch.equal(res, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", VIEWS)
def test_scatter_into_non_contiguous_out(view, backend, gen):
    """A strided ``out`` is written in place (its storage changes), or a kernel backend declines
    it with BackendError; it is never silently left stale or written out of place."""
    b, n, c = 3, 37, 13
    keep, ts, _ = _inputs(b, n, c, [5, 37, 0], "padded", torch.float32, gen)
    out = _views(b, n, c, gen)[view]
    packed = torch.randn(ts.capacity, c, generator=gen).to(DEVICE)
    expected = naive_scatter(packed[:42], keep, out)
    try:
        res = scatter_tokens(packed, ts, out, backend=backend)
    except BackendError:
        assert backend != "torch"
        return
    assert res is out
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_gather(layout, gen):
    _, ts, x = _inputs(2, 7, 3, [3, 0], layout, torch.float64, gen)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, ts, backend="torch"), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("add", [pytest.param(False, id="copy"), pytest.param(True, id="add")])
def test_gradcheck_scatter(layout, add, gen):
    _, ts, base = _inputs(2, 7, 3, [3, 7], layout, torch.float64, gen)
    packed = torch.randn(ts.capacity, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    packed.requires_grad_(True)
    base.requires_grad_(True)

    def f(packed, base):
        return scatter_tokens(packed, ts, base.clone(), add=add, backend="torch")

    assert torch.autograd.gradcheck(f, (packed, base))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("add", [pytest.param(False, id="copy"), pytest.param(True, id="add")])
def test_backward_vs_naive(layout, add, backend, gen):
    b, n, c = 3, 19, 5
    counts = [4, 0, 19]
    t = sum(counts)
    keep, ts, x = _inputs(b, n, c, counts, layout, torch.float32, gen)
    base = torch.randn(b, n, c, generator=gen).to(DEVICE)
    g = torch.randn(b, n, c, generator=gen).to(DEVICE)
    w = torch.randn(ts.capacity, c, generator=gen).to(DEVICE)

    def run(gather, scatter):
        xx, bb = x.clone().requires_grad_(True), base.clone().requires_grad_(True)
        p = gather(xx)
        packed = p * w[: p.shape[0]]
        y = scatter(packed, bb.clone())
        gx, gb = torch.autograd.grad((y * g).sum(), (xx, bb))
        return gx, gb

    got = run(lambda v: gather_tokens(v, ts, backend=backend),
              lambda p, o: scatter_tokens(p, ts, o, add=add, backend=backend))
    want = run(lambda v: naive_gather(v, keep),
               lambda p, o: naive_scatter(p[:t], keep, o, add=add))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---------------------------------------------------------------------- GPU-sized shapes
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("padded", [pytest.param(False, id="exact"),
                                    pytest.param(True, id="padded")])
def test_gather_scatter_gpu_shapes(padded, dtype, backend, gen):
    """ViT-B's 197 tokens with 77 channels, both ways, every backend the dispatcher allows."""
    b, n, c = 4, 197, 77
    counts = [0, 197, 1, 60]
    t = sum(counts)
    keep = random_keep(b, n, counts, gen)
    ts = make_tokens(keep, "full" if padded else "exact")
    keep = keep.to(DEVICE)
    x = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype)
    x[~keep] = float("nan")
    packed = run_or_skip(lambda: gather_tokens(x, ts, backend=backend), backend)
    assert torch.equal(packed[:t], naive_gather(x, keep))
    assert torch.all(packed[t:] == 0)
    for add in (False, True):
        src = torch.randn(ts.capacity, c, generator=gen).to(DEVICE, dtype)
        src[t:] = float("nan")
        out = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype)
        out[~keep] = float("nan")
        base = out.clone()
        res = run_or_skip(
            lambda s=src, o=out, a=add: scatter_tokens(s, ts, o, add=a, backend=backend), backend)
        assert res is out
        torch.testing.assert_close(res, naive_scatter(src[:t], keep, base, add=add), rtol=0,
                                   atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter_backward_gpu(backend, gen):
    b, n, c = 3, 64, 40
    counts = [64, 0, 17]
    t = sum(counts)
    keep = random_keep(b, n, counts, gen)
    ts = make_tokens(keep, "full")
    keep = keep.to(DEVICE)
    x = torch.randn(b, n, c, generator=gen).to(DEVICE).requires_grad_(True)
    base = torch.randn(b, n, c, generator=gen).to(DEVICE).requires_grad_(True)
    g = torch.randn(b, n, c, generator=gen).to(DEVICE)

    def op():
        p = gather_tokens(x, ts, backend=backend)
        y = scatter_tokens(p * 2, ts, base.clone(), add=True, backend=backend)
        return torch.autograd.grad((y * g).sum(), (x, base))

    got = run_or_skip(op, backend)
    y = naive_scatter(naive_gather(x, keep) * 2, keep, base.clone(), add=True)
    want = torch.autograd.grad((y * g).sum(), (x, base))
    assert t > 0
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---------------------------------------------------------------------- errors
def _ts():
    return TokenSet.from_lists([[0, 2], [1]], seq_len=4, device=DEVICE)


@pytest.mark.parametrize(
    "x,err",
    [
        pytest.param(torch.zeros(2, 4, 3, dtype=torch.int32), TypeError, id="int-dtype"),
        pytest.param(torch.zeros(3, 4, 3), ValueError, id="wrong-B"),
        pytest.param(torch.zeros(2, 5, 3), ValueError, id="wrong-N"),
        pytest.param(torch.zeros(8, 3), ValueError, id="2d"),
        pytest.param([[0.0]], TypeError, id="list"),
    ],
)
def test_gather_errors(x, err):
    if isinstance(x, torch.Tensor):
        x = x.to(DEVICE)
    with pytest.raises(err):
        gather_tokens(x, _ts())


def test_gather_needs_tokenset():
    x = torch.zeros(2, 4, 3, device=DEVICE)
    with pytest.raises(TypeError, match="TokenSet"):
        gather_tokens(x, torch.tensor([0, 2, 5], dtype=torch.int32))


@pytest.mark.parametrize(
    "packed,out,err",
    [
        pytest.param(torch.zeros(3, 5), torch.zeros(2, 4, 3), ValueError, id="wrong-C"),
        pytest.param(torch.zeros(4, 3), torch.zeros(2, 4, 3), ValueError, id="wrong-capacity"),
        pytest.param(torch.zeros(3, 3), torch.zeros(3, 4, 3), ValueError, id="wrong-B"),
        pytest.param(torch.zeros(3, 3), torch.zeros(2, 5, 3), ValueError, id="wrong-N"),
        pytest.param(torch.zeros(3, 3, dtype=torch.float16), torch.zeros(2, 4, 3), TypeError,
                     id="dtype-mismatch"),
        pytest.param(torch.zeros(3, 3, dtype=torch.int64), None, TypeError, id="int-packed"),
        pytest.param(torch.zeros(1, 3, 3), None, ValueError, id="3d-packed"),
    ],
)
def test_scatter_errors(packed, out, err):
    packed = packed.to(DEVICE)
    out = None if out is None else out.to(DEVICE)
    with pytest.raises(err):
        scatter_tokens(packed, _ts(), out)


def test_scatter_needs_tokenset():
    with pytest.raises(TypeError, match="TokenSet"):
        scatter_tokens(torch.zeros(3, 3), "tokens")


# ---------------------------------------------------------------------- the compiled kernels
# csrc/gather.cu through its launcher, on the GPU or the CUDA emulator: every word width the row
# size selects (16, 8, 4, 2 bytes; 1 byte through the binding with an odd address), scatter and
# scatter-add (16-byte packs and single elements) in every dtype, against the naive loop.
WORD_CASES = [
    pytest.param(torch.float32, 4, id="fp32-16B-words"),
    pytest.param(torch.float32, 2, id="fp32-8B-words"),
    pytest.param(torch.float32, 3, id="fp32-4B-words"),
    pytest.param(torch.float16, 8, id="fp16-16B-words"),
    pytest.param(torch.float16, 4, id="fp16-8B-words"),
    pytest.param(torch.float16, 2, id="fp16-4B-words"),
    pytest.param(torch.float16, 3, id="fp16-2B-words"),
    pytest.param(torch.bfloat16, 24, id="bf16-16B-words"),
    pytest.param(torch.bfloat16, 5, id="bf16-2B-words"),
]


def _kernel_rows(dtype, cols, dev, counts=(0, 5, 13), n=16, extra=3):
    """tokens (capacity T + extra), their keep mask on the CPU, and dense x [B, N, cols]."""
    ts = ragged_tokens(list(counts), n, extra, device=dev)
    keep = ts.keep_mask().cpu()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(counts), n, cols, generator=g).to(dtype)
    return ts, keep, x


@pytest.mark.parametrize("dtype,cols", WORD_CASES)
@cuda_kernel_test
def test_cuda_gather_scatter_rows(dtype, cols, kernel_device):
    dev = kernel_device
    ts, keep, x = _kernel_rows(dtype, cols, dev)
    t = int(keep.sum())
    out = torch.full((ts.capacity, cols), float("nan"), dtype=dtype, device=dev)
    got = cuda_gather.gather_rows(x.to(dev), ts.indices, ts.cu_seqlens, out=out)
    assert got is out
    assert torch.equal(got[:t].cpu(), naive_gather(x, keep)), "gathered rows"
    assert torch.all(got[t:] == 0), "padding rows are zero"
    packed = torch.randn(ts.capacity, cols).to(dtype)
    packed[t:] = float("nan")  # rows past T are never read
    for add in (False, True):
        base = torch.randn(x.shape).to(dtype)
        y = cuda_gather.scatter_rows(packed.to(dev), ts.indices, ts.cu_seqlens,
                                     base.to(dev, copy=True), add=add)
        # the kernel adds in float32 and rounds once, as PyTorch's half / bfloat16 add does
        assert torch.equal(y.cpu(), naive_scatter(packed[:t], keep, base, add=add)), \
            f"scatter (add={add})"


@cuda_kernel_test
def test_cuda_gather_scatter_odd_address(kernel_device):
    """Rows at an odd byte address move as single bytes (the narrowest word): through the
    binding, which takes any address."""
    from dtop_kernels.cuda import DTYPE_CODES, _args, load_C

    dev = kernel_device
    ts, keep, x = _kernel_rows(torch.float16, 3, dev)
    t, cols = int(keep.sum()), 3
    nbytes = x.numel() * 2
    src = torch.zeros(nbytes + 1, dtype=torch.uint8, device=dev)
    src[1:] = x.reshape(-1).view(torch.uint8).to(dev)
    dst = torch.full((ts.capacity * cols * 2 + 1,), 0xFF, dtype=torch.uint8, device=dev)
    load_C().gather_rows(src.data_ptr() + 1, ts.indices.data_ptr(), ts.cu_seqlens.data_ptr(),
                         dst.data_ptr() + 1, 3, 3 * 16, ts.capacity, cols,
                         DTYPE_CODES[torch.float16], _args.stream(dev))
    got = dst[1:].cpu().clone().view(torch.float16).view(ts.capacity, cols)
    assert torch.equal(got[:t], naive_gather(x, keep)) and torch.all(got[t:] == 0)
    assert int(dst[0]) == 0xFF, "the byte before the output is untouched"
    # ... and back: the packed rows scattered into zeros at an odd address
    dense = torch.zeros(nbytes + 1, dtype=torch.uint8, device=dev)
    load_C().scatter_rows(dst.data_ptr() + 1, ts.indices.data_ptr(), ts.cu_seqlens.data_ptr(),
                          dense.data_ptr() + 1, 3, 3 * 16, ts.capacity, cols,
                          DTYPE_CODES[torch.float16], False, _args.stream(dev))
    back = dense[1:].cpu().clone().view(torch.float16).view(x.shape)
    assert torch.equal(back, naive_scatter(got[:t], keep, torch.zeros_like(x)))
