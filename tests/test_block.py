"""pruned_block / pruned_stage against the block's own dense forward run per image on the active
tokens (the official code's loop), every backend, forward and backward; GPU-sized stages."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from blocks import Block, randomize_, timm_block_class
from helpers import (
    DEVICE,
    EmulatedCuda,
    assert_err_rule,
    backend_marks,
    backend_params,
    emulated_cuda_params,
    make_tokens,
    random_keep,
    run_or_skip,
    skip_interpreter_bf16_dot,
)
from naive import naive_block, naive_gather
from torch import nn

from dtop_kernels import BackendError, TokenSet, pruned_block, pruned_stage

BACKENDS = backend_params("torch", "triton")
NAN = float("nan")

# Shapes by name. The Triton kernels run under the CPU interpreter without a GPU, seconds per
# block, so the torch backend gets the full grid and Triton a chosen subset of it.
CASES = {
    "B3-N37": (3, 37, [0, 37, 11]),  # empty, full and partial images
    "B1-one": (1, 21, [1]),
    "B2-N16": (2, 16, [16, 9]),
    "B3-N13": (3, 13, [0, 13, 5]),
}
DIMS = {  # C, heads, MLP ratio
    "C48-H3": (48, 3, 4.0),
    "C40-H2-D20": (40, 2, 2.0),
    "C32-H2": (32, 2, 2.0),
}
LAYOUTS = ("exact", "full")


def _grid(torch_args: list[tuple], triton_args: list[tuple]) -> list:
    """Params (*args, backend): every torch combination, the chosen Triton ones."""
    def ident(args):
        return "-".join(a if isinstance(a, str) else ("ls" if a else "plain") for a in args)

    params = [pytest.param(*a, "torch", id=f"{ident(a)}-torch") for a in torch_args]
    params += [pytest.param(*a, "triton", id=f"{ident(a)}-triton", marks=backend_marks("triton"))
               for a in triton_args]
    return params


def _block(dims: str, layer_scale: bool, gen, dtype=torch.float32, **kw) -> Block:
    c, h, ratio = DIMS[dims]
    blk = randomize_(Block(c, h, mlp_ratio=ratio, layer_scale=layer_scale, **kw), gen)
    return blk.to(DEVICE, dtype).eval()


def _as64(mods):
    return [copy.deepcopy(m).double() for m in mods]


def _case(case: str, c: int, layout: str, gen, dtype=torch.float32):
    b, n, counts = CASES[case]
    keep = random_keep(b, n, counts, gen)
    ts = make_tokens(keep, layout)
    x = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype)
    return keep.to(DEVICE), ts, x


def _dim(dims: str) -> int:
    return DIMS[dims][0]


@pytest.mark.parametrize(
    "case,dims,layer_scale,layout,backend",
    _grid(
        list(itertools.product(("B3-N37", "B1-one", "B2-N16"), ("C48-H3", "C40-H2-D20"),
                               (False, True), LAYOUTS)),
        [("B3-N13", "C32-H2", False, "full"), ("B3-N13", "C40-H2-D20", True, "exact"),
         ("B1-one", "C32-H2", False, "exact")],
    ),
)
def test_dense(case, dims, layer_scale, layout, backend, gen):
    blk = _block(dims, layer_scale, gen)
    keep, ts, x = _case(case, _dim(dims), layout, gen)
    x[~keep] = NAN  # inactive tokens are neither queries nor keys: must not leak
    x_before = x.clone()
    with torch.no_grad():
        y = pruned_block(x, ts, blk, backend=backend)
        same = naive_block(x, keep, blk)
        exact = naive_block(x.double(), keep, _as64([blk]))
    torch.testing.assert_close(x, x_before, rtol=0, atol=0, equal_nan=True)  # not in place
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y[~keep], x[~keep], rtol=0, atol=0, equal_nan=True)
    assert_err_rule(y[keep], same[keep], exact[keep], 1e-5, "active tokens")


@pytest.mark.parametrize(
    "case,layer_scale,backend",
    _grid(list(itertools.product(("B3-N37", "B1-one", "B2-N16"), (False, True))),
          [("B3-N13", False)]),
)
def test_packed(case, layer_scale, backend, gen):
    dims = "C48-H3" if backend == "torch" else "C32-H2"
    c = _dim(dims)
    blk = _block(dims, layer_scale, gen)
    keep, ts, x = _case(case, c, "full", gen)
    t = sum(CASES[case][2])
    packed = torch.full((ts.capacity, c), NAN, device=DEVICE)
    packed[:t] = naive_gather(x, keep)  # padding rows NaN: must not leak into real rows
    with torch.no_grad():
        y = pruned_block(packed, ts, blk, backend=backend)
        same = naive_gather(naive_block(x, keep, blk), keep)
        exact = naive_gather(naive_block(x.double(), keep, _as64([blk])), keep)
    assert y.shape == (ts.capacity, c)
    assert_err_rule(y[:t], same, exact, 1e-5, "packed rows")


@pytest.mark.parametrize("layer_scale,backend",
                         _grid([(False,), (True,)], [(False,)]))
def test_all_active_is_dense_forward(layer_scale, backend, gen):
    blk = _block("C32-H2", layer_scale, gen)
    x = torch.randn(2, 11, 32, generator=gen).to(DEVICE)
    ts = TokenSet.all_active(2, 11, device=DEVICE)
    with torch.no_grad():
        y = pruned_block(x, ts, blk, backend=backend)
        same = blk(x)
        exact = _as64([blk])[0](x.double())
    assert_err_rule(y, same, exact, 1e-5)


@pytest.mark.parametrize("layout,backend", _grid([(lo,) for lo in LAYOUTS], [("full",)]))
def test_stage(layout, backend, gen):
    """Several blocks (fused-eligible and layer-scale ones mixed) on one TokenSet."""
    dims = "C40-H2-D20" if backend == "torch" else "C32-H2"
    flags = (False, True, False) if backend == "torch" else (False, True)
    blocks = [_block(dims, ls, gen) for ls in flags]
    keep, ts, x = _case("B3-N37" if backend == "torch" else "B3-N13", _dim(dims), layout, gen)
    with torch.no_grad():
        y = pruned_stage(x, ts, blocks, backend=backend)
        same = naive_block(x, keep, blocks)
        exact = naive_block(x.double(), keep, _as64(blocks))
    assert torch.equal(y[~keep], x[~keep])
    assert_err_rule(y[keep], same[keep], exact[keep], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_stage(backend, gen):
    _, ts, x = _case("B2-N16", 8, "full", gen)
    y = pruned_stage(x, ts, [], backend=backend)
    assert torch.equal(y, x) and y is not x


@pytest.mark.parametrize(
    "dtype,backend",
    _grid([("fp16",), ("bf16",)], [("fp16",), ("bf16",)]),
)
def test_low_precision(dtype, backend, gen):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    skip_interpreter_bf16_dot(backend, dtype)
    blk = _block("C32-H2", False, gen, dtype)
    keep, ts, x = _case("B3-N13", 32, "full", gen, dtype)
    with torch.no_grad():
        y = pruned_block(x, ts, blk, backend=backend)
        same = naive_block(x, keep, blk)
        exact = naive_block(x.double(), keep, _as64([blk]))
    assert y.dtype == dtype
    assert torch.equal(y[~keep], x[~keep])
    assert_err_rule(y[keep], same[keep], exact[keep], 1e-2)


# ---------------------------------------------------------------------- gradients
def _grads(fn, x, mods, g):
    x = x.detach().clone().requires_grad_(True)
    params = [p for m in mods for p in m.parameters()]
    y = fn(x, mods)
    return torch.autograd.grad((y * g).sum(), [x] + params)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer_scale", [pytest.param(False, id="plain"),
                                         pytest.param(True, id="ls")])
def test_backward_float64_torch(layout, layer_scale, gen):
    blocks = _as64([_block("C32-H2", layer_scale, gen), _block("C32-H2", not layer_scale, gen)])
    keep, ts, x = _case("B3-N13", 32, layout, gen, torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got = _grads(lambda v, m: pruned_stage(v, ts, m, backend="torch"), x, blocks, g)
    want = _grads(lambda v, m: naive_block(v, keep, m), x, blocks, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "layout,layer_scale,backend",
    _grid(list(itertools.product(LAYOUTS, (False, True))),
          [("full", False), ("exact", True)]),
)
def test_backward_vs_naive(layout, layer_scale, backend, gen):
    blocks = [_block("C32-H2", layer_scale, gen)]
    if backend == "torch":
        blocks.append(_block("C32-H2", False, gen))
    keep, ts, x = _case("B3-N13", 32, layout, gen)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    got = _grads(lambda v, m: pruned_stage(v, ts, m, backend=backend), x, blocks, g)
    same = _grads(lambda v, m: naive_block(v, keep, m), x, blocks, g)
    exact = _grads(lambda v, m: naive_block(v, keep, m), x.double(), _as64(blocks), g.double())
    names = ["x"] + [n for i, m in enumerate(blocks) for n, _ in m.named_parameters(prefix=str(i))]
    for name, a, s, e in zip(names, got, same, exact):
        assert_err_rule(a, s, e, 1e-4, name)


def test_gradcheck_torch(gen):
    blk = _as64([randomize_(Block(8, 2, mlp_ratio=1.0, layer_scale=True), gen).to(DEVICE)])[0]
    ts = make_tokens(random_keep(2, 5, [3, 0], gen), "full")
    x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: pruned_block(v, ts, blk, backend="torch"), (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype,floor", [pytest.param(torch.float32, 1e-5, id="fp32"),
                                         pytest.param(torch.float16, 1e-3, id="fp16"),
                                         pytest.param(torch.bfloat16, 1e-2, id="bf16")])
@pytest.mark.parametrize("layer_scale", [pytest.param(False, id="plain"),
                                         pytest.param(True, id="layerscale")])
def test_stage_gpu_shapes(layer_scale, dtype, floor, backend, gen):
    """Two ViT-Ti-wide blocks over 256 tokens per image, forward and backward (input and every
    parameter), every backend the dispatcher allows."""
    _check_stage(192, 3, 256, [0, 256, 101], layer_scale, dtype, floor, backend, gen)


@pytest.mark.parametrize("backend", emulated_cuda_params())
@pytest.mark.parametrize("dtype,floor", [pytest.param(torch.float16, 1e-3, id="fp16"),
                                         pytest.param(torch.bfloat16, 1e-2, id="bf16")])
@pytest.mark.parametrize("layer_scale", [pytest.param(False, id="plain"),
                                         pytest.param(True, id="layerscale")])
def test_stage_emulated(layer_scale, dtype, floor, backend, gen):
    """The CUDA backend's fused blocks (gather-LayerNorm, attention, the linears with their
    epilogues, scatter) on the CUDA emulator, forward and backward: test_stage_gpu_shapes at a
    size the emulator runs in seconds (head dim 32, a row tail, an empty image)."""
    _check_stage(64, 2, 48, [0, 48, 17], layer_scale, dtype, floor, backend, gen)


def _check_stage(c, h, n, counts, layer_scale, dtype, floor, backend, gen):
    blocks = [randomize_(Block(c, h, layer_scale=layer_scale), gen).to(DEVICE).eval()
              for _ in range(2)]
    keep = random_keep(len(counts), n, counts, gen)
    ts = make_tokens(keep, "full")
    keep = keep.to(DEVICE)
    x = torch.randn(len(counts), n, c, generator=gen).to(DEVICE)
    g = torch.randn(len(counts), n, c, generator=gen).to(DEVICE)

    def grads(fn, mods, dt):
        mods = [copy.deepcopy(m).to(dt) for m in mods]
        xx = x.to(dt).requires_grad_(True)
        y = fn(xx, mods)
        params = [p for m in mods for p in m.parameters()]
        return y, torch.autograd.grad((y * g.to(dt)).sum(), [xx] + params)

    packed = lambda: grads(lambda v, m: pruned_stage(v, ts, m, backend=backend), blocks, dtype)
    # the emulated kernels must run: a backend error fails the test instead of skipping it
    y, got = packed() if isinstance(backend, EmulatedCuda) else run_or_skip(packed, backend)
    same_y, same = grads(lambda v, m: naive_block(v, keep, m), blocks, dtype)
    exact_y, exact = grads(lambda v, m: naive_block(v, keep, m), blocks, torch.float64)
    assert torch.equal(y[~keep], x.to(dtype)[~keep])
    assert_err_rule(y[keep], same_y[keep], exact_y[keep], floor, "out")
    # Parameter gradients are sums over every active token of the batch; how a backend orders
    # that low-precision reduction is its own business, so their floor scales with the size.
    rel = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 0.15}[dtype]
    for i, (a, s, e) in enumerate(zip(got, same, exact)):
        assert_err_rule(a, s, e, floor + rel * float(e.abs().max()), f"grad {i}")


# ---------------------------------------------------------------------- timm
@pytest.mark.timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_block(backend, gen):
    TimmBlock = timm_block_class()
    blk = randomize_(TimmBlock(32, 2, mlp_ratio=2.0, qkv_bias=True, init_values=0.7), gen)
    blk = blk.to(DEVICE).eval()
    keep, ts, x = _case("B3-N13", 32, "full", gen)
    with torch.no_grad():
        y = pruned_block(x, ts, blk, backend=backend)
        same = naive_block(x, keep, blk)
        exact = naive_block(x.double(), keep, _as64([blk]))
    assert torch.equal(y[~keep], x[~keep])
    assert_err_rule(y[keep], same[keep], exact[keep], 1e-5)


# ---------------------------------------------------------------------- errors and modes
def _small(c: int = 16, **kw) -> Block:
    return randomize_(Block(c, 2, mlp_ratio=1.0, **kw)).to(DEVICE).eval()


def _small_case(gen, dtype=torch.float32):
    keep = random_keep(2, 7, [3, 7], gen)
    return keep.to(DEVICE), make_tokens(keep, "exact"), torch.randn(2, 7, 16).to(DEVICE, dtype)


def test_training_dropout_raises(gen):
    _, ts, x = _small_case(gen)
    with pytest.raises(ValueError, match="drop"):
        pruned_block(x, ts, _small(drop=0.1).train())


def test_dropout_modules_fine_in_eval_and_p0_training(gen):
    keep, ts, x = _small_case(gen)
    for blk in (_small(drop=0.1).eval(), _small().train()):
        with torch.no_grad():
            y = pruned_block(x, ts, blk, backend="torch")
            exact = naive_block(x.double(), keep, _as64([blk.eval()]))
            same = naive_block(x, keep, blk)
        assert_err_rule(y[keep], same[keep], exact[keep], 1e-5)


def test_wrong_dim_raises(gen):
    _, ts, x = _small_case(gen)
    with pytest.raises(ValueError, match="qkv"):
        pruned_block(x, ts, _small(32))


def test_heads_not_dividing_dim_raises(gen):
    blk = _small()
    blk.attn.num_heads = 3
    _, ts, x = _small_case(gen)
    with pytest.raises(ValueError, match="num_heads"):
        pruned_block(x, ts, blk)


def test_not_a_vit_block_raises(gen):
    _, ts, x = _small_case(gen)
    with pytest.raises(TypeError, match="norm1"):
        pruned_block(x, ts, nn.Linear(16, 16))


@pytest.mark.parametrize(
    "shape",
    [pytest.param((3, 7, 16), id="wrong-B"), pytest.param((2, 8, 16), id="wrong-N"),
     pytest.param((9, 16), id="packed-wrong-capacity"), pytest.param((1, 2, 7, 16), id="4d")],
)
def test_bad_x_raises(shape):
    ts = TokenSet.from_lists([[0, 1, 2], list(range(7))], seq_len=7, device=DEVICE)
    with pytest.raises(ValueError):
        pruned_block(torch.zeros(shape, device=DEVICE), ts, _small())


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_kernel_backends_refuse_float64(backend, gen):
    _, ts, x = _small_case(gen, torch.float64)
    with pytest.raises(BackendError):
        pruned_block(x, ts, _small().double(), backend=backend)
