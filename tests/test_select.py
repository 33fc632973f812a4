"""dtop_select against a literal per-image, per-class implementation of the DToP exit rule, every
backend; GPU-sized shapes and the compiled CUDA launcher (argument checks on CPU tensors, the
kernel against the reference and Triton on a GPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import (
    DEVICE,
    backend_marks,
    backend_params,
    compiled_asm,
    cuda_kernel_test,
    make_tokens,
    ragged_tokens,
    random_keep,
    run_or_skip,
    triton_cross_check,
)
from naive import exits_allowed, naive_select

from dtop_kernels import BackendError, Selection, TokenSet, dtop_select
from dtop_kernels.cuda import select as cuda_select
from dtop_kernels.reference import select as ref_select

BACKENDS = backend_params("torch", "triton")


def _slot_logits(dense: torch.Tensor, keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, K, N] per-token mask logits -> the op's layout [K, capacity]: column j for the j-th
    active token (image then position). Padding columns get very confident logits, which must
    be ignored."""
    b_idx, n_idx = keep.nonzero(as_tuple=True)
    k = dense.shape[1]
    out = torch.full((k, capacity), 30.0, dtype=dense.dtype, device=dense.device)
    out[:, : b_idx.numel()] = dense[b_idx, :, n_idx].t()
    return out


def _logits(b, k, n, gen, quantize: float | None, dup_classes: bool):
    """class logits [B, K, 2] and dense mask logits [B, K, N]; quantized so that exact ties in
    confidence happen (equal inputs give bit-equal scores in any implementation)."""
    cls = torch.randn(b, k, 2, generator=gen) * 2
    cls[..., 0] += 2.0  # most classes "present" so confidences can pass high thresholds
    ml = torch.randn(b, k, n, generator=gen) * 3
    if quantize:
        cls = torch.round(cls / quantize) * quantize
        ml = torch.round(ml / quantize) * quantize
    if dup_classes and k > 1:
        # Pairs of classes with identical class logits and mask logits: argmax ties across c.
        cls[:, 1::2] = cls[:, 0:-1:2][:, : cls[:, 1::2].shape[1]]
        ml[:, 1::2] = ml[:, 0:-1:2][:, : ml[:, 1::2].shape[1]]
    return cls, ml


def _check(sel: Selection, keep: torch.Tensor, ts: TokenSet, logits: tuple, threshold: float,
           top_k: int) -> torch.Tensor:
    """The exit mask against the naive rule on ``logits`` (class, dense mask) with near ties
    either way (``exits_allowed``), the next TokenSet against the exit mask. Returns it (CPU)."""
    assert isinstance(sel, Selection)
    assert sel.exited.dtype == torch.bool and sel.exited.shape == keep.shape
    exited, keep = sel.exited.cpu(), keep.cpu()
    expected_exit = naive_select(*logits, keep, threshold, top_k)
    if not torch.equal(exited, expected_exit):
        reasons = exits_allowed(exited, *logits, keep, threshold, top_k)
        where = (exited != expected_exit).nonzero().tolist()
        assert not reasons, f"exit mask differs from the naive rule at (b, n) = {where[:10]}: " \
            f"{reasons[:3]}"
    nxt = sel.tokens
    assert nxt.capacity == ts.capacity and nxt.max_seqlen == ts.max_seqlen
    assert (nxt.batch_size, nxt.seq_len) == (ts.batch_size, ts.seq_len)
    remaining = keep & ~exited
    assert torch.equal(nxt.keep_mask().cpu(), remaining)
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(remaining.sum(1), 0)
    assert torch.equal(nxt.cu_seqlens.cpu(), cu)
    nxt.validate()
    t = int(cu[-1])
    assert torch.all(nxt.indices[t:] == -1), "padding slots of the next set must hold -1"
    return exited


SHAPES = {
    "B1-K3-N16": (1, 3, 16),
    "B4-K7-N37": (4, 7, 37),
    "B2-K150-N64": (2, 150, 64),
    "B3-K7-N64": (3, 7, 64),
    "B1-K150-N16": (1, 150, 16),
}
REGIMES = {  # threshold, quantization step, duplicated classes
    "many-candidates": (0.5, None, False),
    "ties": (0.8, 0.5, True),
    "few-candidates": (0.97, None, False),
}


def _grid() -> list:
    """(seed, shape, regime, top_k, backend): the full grid on the torch backend; a subset on
    Triton, which runs under the (slow) CPU interpreter without a GPU."""
    full = itertools.product((0, 1), ("B1-K3-N16", "B4-K7-N37", "B2-K150-N64", "B3-K7-N64"),
                             REGIMES, (0, 1, 5))
    subset = list(itertools.product((0,), ("B4-K7-N37",), REGIMES, (0, 1, 5)))
    subset += [(1, "B3-K7-N64", "ties", 5), (0, "B1-K150-N16", "many-candidates", 5),
               (1, "B1-K150-N16", "ties", 1)]
    params = []
    for backend, grid in (("torch", full), ("triton", subset)):
        for seed, shape, regime, top_k in grid:
            params.append(pytest.param(
                seed, shape, regime, top_k, backend, marks=backend_marks(backend),
                id=f"seed{seed}-{shape}-{regime}-top{top_k}-{backend}"))
    return params


@pytest.mark.parametrize("seed,shape,regime,top_k,backend", _grid())
def test_select_vs_naive(seed, shape, regime, top_k, backend):
    b, k, n = SHAPES[shape]
    threshold, quant, dup = REGIMES[regime]
    gen = torch.Generator().manual_seed(1000 * seed + b * k * n)
    # Start from a partial set (some tokens already exited), one image possibly empty.
    counts = [int(c) for c in torch.randint(0, n + 1, (b,), generator=gen)]
    counts[0] = n if seed == 0 else max(counts[0], 1)
    keep = random_keep(b, n, counts, gen)
    layout = ("exact", "padded", "full")[(seed + top_k) % 3]
    ts = make_tokens(keep, layout)
    cls, ml = _logits(b, k, n, gen, quant, dup)
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts,
                      threshold, top_k, backend=backend)
    _check(sel, keep, ts, (cls, ml), threshold, top_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_happen_and_are_broken_by_position(backend):
    """All tokens of an image with equal confidence and label: the lowest positions stay."""
    b, k, n = 2, 4, 12
    cls = torch.zeros(b, k, 2)
    cls[:, :, 0] = 5.0  # every class present with the same probability
    ml = torch.zeros(b, k, n)
    ml[:, 1] = 4.0  # classes 1 and 2 tie everywhere: label = 1 (lowest)
    ml[:, 2] = 4.0
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, ::3] = False
    ts = make_tokens(keep, "padded")
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts,
                      0.5, 5, backend=backend)
    expected = naive_select(cls, ml, keep, 0.5, 5)
    for i in range(b):  # the first 5 active positions stay
        stay = keep[i].nonzero().squeeze(1)[:5]
        assert not expected[i, stay].any()
        assert expected[i].sum() == keep[i].sum() - 5
    _check(sel, keep, ts, (cls, ml), 0.5, 5)


@pytest.mark.parametrize(
    "layout,backend",
    [pytest.param(lo, "torch", id=f"{lo}-torch") for lo in ("exact", "padded", "full")]
    + [pytest.param("padded", "triton", id="padded-triton", marks=backend_marks("triton"))],
)
def test_exits_accumulate(layout, backend, gen):
    b, k, n = 3, 7, 37
    keep0 = random_keep(b, n, [37, 20, 0], gen)
    ts0 = make_tokens(keep0, layout)
    cls1, ml1 = _logits(b, k, n, gen, None, False)
    sel1 = dtop_select(cls1.to(DEVICE), _slot_logits(ml1, keep0, ts0.capacity).to(DEVICE), ts0,
                       0.6, 2, backend=backend)
    ex1 = _check(sel1, keep0, ts0, (cls1, ml1), 0.6, 2)
    keep1 = keep0 & ~ex1
    assert ex1.any(), "the first selection should exit something for this test to mean much"
    cls2, ml2 = _logits(b, k, n, gen, None, False)
    ml2[:, :, :] += 1.0
    sel2 = dtop_select(cls2.to(DEVICE), _slot_logits(ml2, keep1, ts0.capacity).to(DEVICE),
                       sel1.tokens, 0.5, 1, backend=backend)
    ex2 = _check(sel2, keep1, sel1.tokens, (cls2, ml2), 0.5, 1)
    assert not (ex1 & ex2).any()
    final = sel2.tokens.keep_mask().cpu()
    assert torch.equal(final, keep0 & ~ex1 & ~ex2)
    assert not (final & ex1).any(), "an exited token never comes back"


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_one_exits_nothing(backend, gen):
    b, k, n = 2, 5, 16
    cls = torch.zeros(b, k, 2)
    cls[..., 0] = 60.0  # present probability rounds to 1.0 in fp32
    ml = torch.full((b, k, n), 60.0)  # sigmoid rounds to 1.0: conf == 1.0, not > 1.0
    keep = random_keep(b, n, [16, 9], gen)
    ts = make_tokens(keep, "padded")
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts, 1.0,
                      0, backend=backend)
    assert not sel.exited.any()
    assert torch.equal(sel.tokens.keep_mask().cpu(), keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logits(backend, gen):
    b, k, n = 2, 7, 37
    keep = random_keep(b, n, [37, 15], gen)
    ts = make_tokens(keep, "full")
    cls, ml = _logits(b, k, n, gen, 0.25, True)
    cls, ml = cls.half(), ml.half()
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts, 0.7,
                      2, backend=backend)
    _check(sel, keep, ts, (cls, ml), 0.7, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, gen):
    b, k, n = 2, 7, 37
    keep = random_keep(b, n, [30, 12], gen)
    ts = make_tokens(keep, "padded")
    cls, ml = _logits(b, k, n, gen, None, False)
    cls_s = cls.transpose(1, 2).contiguous().transpose(1, 2)  # [B, K, 2], last-dim stride K
    ml_s = _slot_logits(ml, keep, ts.capacity).t().contiguous().t()  # [K, cap], column-major
    assert cls_s.stride(-1) != 1 and ml_s.stride(-1) != 1
    sel = dtop_select(cls_s.to(DEVICE), ml_s.to(DEVICE), ts, 0.6, 1, backend=backend)
    _check(sel, keep, ts, (cls, ml), 0.6, 1)


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
def test_nan_logits_never_exit(backend, gen):
    """A NaN score makes a token's confidence NaN (torch.max semantics): it is no candidate and
    does not count against the others; a NaN class logit keeps its whole image."""
    b, k, n = 3, 4, 24
    keep = random_keep(b, n, [24, 20, 17], gen)
    ts = make_tokens(keep, "padded")
    cls, ml = _logits(b, k, n, gen, None, False)
    cls[0, 2, 0] = float("nan")  # image 0: every token scores NaN for class 2
    nan_tokens = [(1, int(keep[1].nonzero()[3])), (2, int(keep[2].nonzero()[0]))]
    ml[1, :, nan_tokens[0][1]] = float("nan")  # all classes
    ml[2, 3, nan_tokens[1][1]] = float("nan")  # one class
    # The same rule with those tokens made certain non-candidates instead of NaN.
    cls_ref, ml_ref = cls.nan_to_num(0.0), ml.clone()
    ml_ref[0] = -60.0
    for i, j in nan_tokens:
        ml_ref[i, :, j] = -60.0
    expected = naive_select(cls_ref, ml_ref, keep, 0.3, 1)
    assert expected[1:].any() and not expected[0].any()
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts, 0.3,
                      1, backend=backend)
    _check(sel, keep, ts, (cls_ref, ml_ref), 0.3, 1)


@pytest.mark.parametrize("gap, any_exit", [(95.0, False), (80.0, True)], ids=["95", "80"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class_logits_far_apart(backend, gap, any_exit, gen):
    """softmax([0, 95])[0] = 5.5e-42 is subnormal: it counts as 0 on every backend, so at
    threshold 0 no token is a candidate. softmax([0, 80])[0] = 1.8e-35 is a normal float32:
    those tokens are candidates and are ranked."""
    b, k, n = 2, 2, 16
    keep = random_keep(b, n, [16, 11], gen)
    ts = make_tokens(keep, "full")
    cls = torch.tensor([0.0, gap]).expand(b, k, 2).clone()
    ml = torch.randint(-1, 3, (b, k, n), generator=gen).float() * 2  # -2, 0, 2, 4
    expected = naive_select(cls, ml, keep, 0.0, 2)
    assert bool(expected.any()) == any_exit
    sel = dtop_select(cls.to(DEVICE), _slot_logits(ml, keep, ts.capacity).to(DEVICE), ts, 0.0,
                      2, backend=backend)
    _check(sel, keep, ts, (cls, ml), 0.0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_classes_or_no_images(backend):
    ts = TokenSet.from_lists([[0, 1], [3]], seq_len=4, device=DEVICE)
    sel = dtop_select(torch.zeros(2, 0, 2, device=DEVICE), torch.zeros(0, 3, device=DEVICE), ts,
                      0.1, backend=backend)
    assert not sel.exited.any() and torch.equal(sel.tokens.keep_mask(), ts.keep_mask())
    empty = TokenSet.from_lists([], seq_len=4, device=DEVICE)
    sel = dtop_select(torch.zeros(0, 3, 2, device=DEVICE), torch.zeros(3, 0, device=DEVICE),
                      empty, 0.1, backend=backend)
    assert sel.exited.shape == (0, 4)


def test_not_differentiable(gen):
    b, k, n = 1, 3, 8
    keep = torch.ones(b, n, dtype=torch.bool)
    ts = make_tokens(keep, "exact")
    cls = torch.randn(b, k, 2, device=DEVICE, requires_grad=True)
    ml = torch.randn(k, n, device=DEVICE, requires_grad=True)
    sel = dtop_select(cls, ml, ts, 0.3)
    assert not sel.exited.requires_grad


# ---------------------------------------------------------------------- errors
def _args():
    ts = TokenSet.from_lists([[0, 1], [2]], seq_len=4, device=DEVICE)
    cls = torch.zeros(2, 3, 2, device=DEVICE)
    ml = torch.zeros(3, 3, device=DEVICE)
    return cls, ml, ts


@pytest.mark.parametrize(
    "change,err",
    [
        pytest.param({"cls": torch.zeros(2, 3, 3)}, ValueError, id="cls-not-2-way"),
        pytest.param({"cls": torch.zeros(3, 3, 2)}, ValueError, id="cls-wrong-B"),
        pytest.param({"cls": torch.zeros(2, 3)}, ValueError, id="cls-2d"),
        pytest.param({"ml": torch.zeros(3, 4)}, ValueError, id="ml-wrong-capacity"),
        pytest.param({"ml": torch.zeros(2, 3)}, ValueError, id="ml-wrong-K"),
        pytest.param({"ml": torch.zeros(3, 3, dtype=torch.int64)}, TypeError, id="ml-int"),
        pytest.param({"top_k": -1}, ValueError, id="negative-top_k"),
        pytest.param({"top_k": True}, ValueError, id="bool-top_k"),
        pytest.param({"top_k": 2.0}, ValueError, id="float-top_k"),
        pytest.param({"threshold": float("nan")}, ValueError, id="nan-threshold"),
        pytest.param({"ts": "tokens"}, TypeError, id="not-a-TokenSet"),
        pytest.param({"backend": "gpu"}, ValueError, id="unknown-backend"),
    ],
)
def test_errors(change, err):
    cls, ml, ts = _args()
    args = {"cls": cls, "ml": ml, "ts": ts, "threshold": 0.5, "top_k": 5, "backend": "auto"}
    args.update({key: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v)
                 for key, v in change.items()})
    with pytest.raises(err):
        dtop_select(args["cls"], args["ml"], args["ts"], args["threshold"], args["top_k"],
                    backend=args["backend"])


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_kernel_backends_refuse_float64(backend):
    cls, ml, ts = _args()
    with pytest.raises(BackendError):
        dtop_select(cls.double(), ml.double(), ts, 0.5, backend=backend)


# ---------------------------------------------------------------------- near ties, accuracy
def _near(exits: list[int], cls_rows: list[list[float]], ml: list[list[float]], threshold: float,
          top_k: int, ulps: int = 8) -> list[str]:
    """exits_allowed for one image: exiting positions, class logits [K, 2], mask logits [K, N]
    (float64, all tokens active)."""
    n = len(ml[0])
    exited = torch.zeros(1, n, dtype=torch.bool)
    exited[0, exits] = True
    return exits_allowed(exited, torch.tensor([cls_rows], dtype=torch.float64),
                         torch.tensor([ml], dtype=torch.float64),
                         torch.ones(1, n, dtype=torch.bool), threshold, top_k, ulps)


def test_exits_allowed_accepts_either_side_of_a_near_tie_only():
    """Confidences a fraction of a float32 ulp apart may rank either way; far apart or exactly
    equal ones (position order) may not; neither may a near tie with ulps=0."""
    sure = [[20.0, 0.0]]
    near_pair = [[2.0, 2.0 + 1e-7, 2.5]]  # token 1 beats token 0 by 0.2 ulp; token 2 is far
    assert _near([0, 1], sure, near_pair, 0.5, 1) == []  # the rule: token 2 stays
    assert _near([1, 2], sure, near_pair, 0.5, 1) != []
    assert _near([0], sure, near_pair, 0.5, 2) == []  # the rule: token 0 exits
    assert _near([1], sure, near_pair, 0.5, 2) == []  # the near tie the other way
    assert _near([1], sure, near_pair, 0.5, 2, ulps=0) != []
    assert _near([2], sure, near_pair, 0.5, 2) != []  # token 2 is far above both
    equal = [[2.0, 2.0, 2.0]]  # an exact tie: the lowest positions stay
    assert _near([2], sure, equal, 0.5, 2) == []
    assert _near([0], sure, equal, 0.5, 2) != []


def test_exits_allowed_near_the_threshold_and_across_classes():
    """A confidence within a few ulps of the threshold is a candidate or not; class scores
    within a few ulps of each other give either label, and the ranks follow the label."""
    sure = [[20.0, 0.0]]
    conf = 1 / (1 + math.exp(-20.0)) / (1 + math.exp(-3.0))
    for threshold in (conf * (1 - 1e-8), conf * (1 + 1e-8)):  # either side of the token
        assert _near([0], sure, [[3.0, -4.0]], threshold, 0) == []
        assert _near([], sure, [[3.0, -4.0]], threshold, 0) == []
    assert _near([], sure, [[3.0, -4.0]], conf * 0.9, 0) != []  # far above: it exits
    assert _near([1], sure, [[3.0, -4.0]], conf * 0.9, 0) != []  # far below: it cannot
    # Token 0 scores 3.0 for class 0 and 3.0 + 1e-7 for class 1 (label 1, a near tie); token 1
    # is sure of class 1, token 2 of class 0, both less confident. top_k 1.
    two = [[20.0, 0.0], [20.0, 0.0]]
    ml = [[3.0, -5.0, 2.0], [3.0 + 1e-7, 2.5, -5.0]]
    assert _near([1], two, ml, 0.5, 1) == []  # label 1: token 1 exits
    assert _near([2], two, ml, 0.5, 1) == []  # label 0: token 2 exits
    assert _near([1, 2], two, ml, 0.5, 1) != []
    assert _near([], two, ml, 0.5, 1) != []
    assert _near([2], two, ml, 0.5, 1, ulps=0) != []


def test_triton_score_compiles_to_accurate_exp_and_division():
    """On a GPU ``tl.exp`` is a bare ex2.approx of x * log2(e), whose error grows with |x|, and
    ``/`` is div.full (2 ulp), where the CPU interpreter computes numpy's exp and division: near
    ties of saturated scores could then flip. Compiled for sm_90, the score kernel uses
    libdevice's expf (range-reduced) and correctly rounded division."""
    asm = compiled_asm("_score_kernel")
    assert "math.exp" not in asm["ttir"] and "__nv_expf" in asm["ttir"]
    assert "arith.divf" not in asm["ttir"] and "tt.precise_divf" in asm["ttir"]
    for approx in ("div.full", "div.approx", "rcp.approx"):
        assert approx not in asm["ptx"], approx
    assert "div.rn.f32" in asm["ptx"]


# ---------------------------------------------------------------------- GPU-sized shapes
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("top_k", [0, 5])
def test_select_gpu_shapes(top_k, dtype, backend, gen):
    """ADE20K's 150 classes over 1024 tokens per image, every backend the dispatcher allows."""
    b, k, n = 4, 150, 1024
    keep = random_keep(b, n, [1024, 0, 500, 37], gen)
    ts = make_tokens(keep, "full")
    cls = (torch.randn(b, k, 2, generator=gen) * 2).to(dtype)
    cls[..., 0] += 2
    ml = (torch.round(torch.randn(b, k, n, generator=gen) * 6) / 2).to(dtype)
    slots = _slot_logits(ml, keep, ts.capacity)
    sel = run_or_skip(lambda: dtop_select(cls.to(DEVICE), slots.to(DEVICE), ts, 0.9, top_k,
                                          backend=backend), backend)
    _check(sel, keep, ts, (cls, ml), 0.9, top_k)


# ---------------------------------------------------------------------- CUDA launcher
# Argument checks run before any CUDA call, so they are tested everywhere with CPU tensors.
def test_cuda_launcher_checks_cpu():
    t = TokenSet.from_lists([[0, 2], [1]], seq_len=4)
    cls, mask = torch.randn(2, 5, 2), torch.randn(5, t.capacity)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_select.dtop_select(cls, mask, t, 0.5, 5)
    with pytest.raises(ValueError, match="mask_logits"):
        cuda_select.dtop_select(cls, torch.randn(4, t.capacity), t, 0.5, 5)
    with pytest.raises(ValueError, match="class_logits"):
        cuda_select.dtop_select(torch.randn(2, 5, 3), mask, t, 0.5, 5)
    with pytest.raises(ValueError, match="NaN"):
        cuda_select.dtop_select(cls, mask, t, float("nan"), 5)
    with pytest.raises(ValueError, match="top_k"):
        cuda_select.dtop_select(cls, mask, t, 0.5, -1)
    with pytest.raises(ValueError, match="classes"):
        cuda_select.dtop_select(torch.randn(2, 0, 2), torch.randn(0, t.capacity), t, 0.5, 5)


# The kernel against the reference and the Triton launcher: kept slots, exits, bounds.
CUDA_CASES = [
    pytest.param([40, 0, 1, 25], 48, 7, 0, id="B4-zero-one"),
    pytest.param([300], 320, 150, 9, id="B1-many-classes-padded"),
    pytest.param([600, 513], 700, 20, 3, id="B2-multi-tile"),
    pytest.param([0, 0], 8, 3, 4, id="all-empty"),
]
CUDA_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
               (torch.float32, torch.float16, torch.bfloat16)]


def _check_selection(got, want, tokens):
    (nxt, exited), (nxt_ref, exited_ref) = got, want
    assert torch.equal(exited, exited_ref)
    assert torch.equal(nxt.cu_seqlens, nxt_ref.cu_seqlens)
    assert torch.equal(nxt.indices, nxt_ref.indices)  # kept slots in order, -1 after
    assert nxt.capacity == tokens.capacity and nxt.max_seqlen == tokens.max_seqlen


@pytest.mark.parametrize("counts,n,k,extra", CUDA_CASES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("top_k", [0, 1, 5])
@cuda_kernel_test
def test_cuda_select_matches_reference(counts, n, k, extra, dtype, top_k, kernel_device):
    g = torch.Generator().manual_seed(2)
    dev = kernel_device
    tokens = ragged_tokens(counts, n, extra, device=dev)
    # Logits on two disjoint grids (class: odd quarters, mask: halves; exact in every dtype):
    # distinct scores differ by >= 1.4e-4 relative and sit >= 3e-3 from the threshold, so the
    # comparison is exact whatever the sigmoid / softmax rounding; equal scores (many) are ties.
    cls = torch.zeros(len(counts), k, 2)
    cls[..., 0] = (2 * torch.randint(-6, 6, (len(counts), k), generator=g) + 1) / 4
    mask = torch.randint(-6, 17, (k, tokens.capacity), generator=g) / 2
    cls, mask = cls.to(dev, dtype), mask.to(dev, dtype)
    t = int(tokens.cu_seqlens[-1])
    mask[:, t:] = float("nan")  # padding columns must never be read
    got = cuda_select.dtop_select(cls, mask, tokens, 0.5, top_k)
    _check_selection(got, ref_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)
    triton_select = triton_cross_check("select", dev)
    if triton_select is None:
        return
    _check_selection(got, triton_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)


@cuda_kernel_test
def test_cuda_select_ties_and_all_exit(kernel_device):
    dev = kernel_device
    tokens = ragged_tokens([12, 9], 16, 2, device=dev)
    cls = torch.tensor([[[4.0, -4.0]] * 3] * 2, device=dev)
    # Every class and token has the same score: label 0 (lowest class), rank = slot order.
    mask = torch.full((3, tokens.capacity), 6.0, device=dev)
    for top_k in (0, 3, 50):
        got = cuda_select.dtop_select(cls, mask, tokens, 0.5, top_k)
        _check_selection(got, ref_select.dtop_select(cls, mask, tokens, 0.5, top_k), tokens)
    nxt, exited = cuda_select.dtop_select(cls, mask, tokens, 0.5, 0)
    assert int(nxt.cu_seqlens[-1]) == 0 and int(exited.sum()) == 21
    assert torch.all(nxt.indices == -1)
