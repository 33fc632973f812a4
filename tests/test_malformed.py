"""A catalogue of malformed inputs: each must end in a clear error (type and a message naming the
problem), on every backend that can run here. Broken device-side contracts that get past the
checks (``validate=False`` sets handed straight to the kernels) must never crash a process: those
run in a child process, so a segfault fails one test instead of the suite."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from blocks import Block
from helpers import backend_marks
from torch import nn

from dtop_kernels import (
    BackendError,
    TokenSet,
    dtop_select,
    gather_tokens,
    packed_linear,
    pruned_block,
    scatter_tokens,
    varlen_attention,
)

ROOT = Path(__file__).resolve().parents[1]
I32 = torch.int32


def _i(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=I32)


def _raw(idx, cu, n: int = 4, max_seqlen: int | None = None) -> TokenSet:
    """A hand-built set (no validation): B = len(cu) - 1 images of ``n`` tokens."""
    return TokenSet.from_indices(_i(*idx), _i(*cu), n, max_seqlen, validate=False)


def _good() -> TokenSet:
    return TokenSet.from_lists([[0, 2], [1]], seq_len=4)


def _x(c: int = 8) -> torch.Tensor:
    return torch.randn(2, 4, c)


def _qkv(rows: int = 6, h: int = 2, d: int = 8):
    return (torch.randn(rows, h, d) for _ in range(3))


def _va(cu_q=(0, 6), cu_k=(0, 6), mq=6, mk=6, **kw):
    q, k, v = _qkv()
    cq = cu_q if isinstance(cu_q, (list, torch.Tensor)) else _i(*cu_q)
    ck = cu_k if isinstance(cu_k, (list, torch.Tensor)) else _i(*cu_k)
    return varlen_attention(q, k, v, cq, ck, mq, mk, **kw)


def _sel(cls_shape=(2, 3, 2), ml_shape=(3, 3), tokens=None, **kw):
    ts = tokens if tokens is not None else _good()
    return dtop_select(torch.randn(*cls_shape), torch.randn(*ml_shape), ts,
                       kw.pop("threshold", 0.5), kw.pop("top_k", 2), **kw)


def _lin(w_shape=(16, 8), bias=None, residual=None, out=None, **kw):
    return packed_linear(_x(), torch.randn(*w_shape), bias, _good(), residual=residual,
                         out=out, **kw)


class _QBiasAttention(nn.Module):  # BEiT style: separate q / v biases next to a bias-free qkv
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.num_heads = h
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.proj = nn.Linear(c, c)


def _block(**change) -> nn.Module:
    blk = Block(8, 2).eval()
    for name, value in change.items():
        obj = blk
        *path, last = name.split(".")
        for p in path:
            obj = getattr(obj, p)
        if value is None:
            delattr(obj, last)
        else:
            setattr(obj, last, value)
    return blk


# (id, call, error type, regex the message must match)
CATALOGUE = [
    # ---- TokenSet construction
    ("mask-float", lambda: TokenSet.from_mask(torch.ones(2, 3)), TypeError, "bool tensor"),
    ("mask-1d", lambda: TokenSet.from_mask(torch.ones(3, dtype=torch.bool)), TypeError,
     r"\[B, N\]"),
    ("mask-capacity-negative",
     lambda: TokenSet.from_mask(torch.ones(2, 3, dtype=torch.bool), capacity=-1), ValueError,
     "capacity"),
    ("mask-capacity-over-BN",
     lambda: TokenSet.from_mask(torch.ones(2, 3, dtype=torch.bool), capacity=7), ValueError,
     "capacity"),
    ("mask-capacity-below-total",
     lambda: TokenSet.from_mask(torch.ones(2, 3, dtype=torch.bool), capacity=4), ValueError,
     "do not fit in capacity"),
    ("lists-out-of-range", lambda: TokenSet.from_lists([[0, 4]], seq_len=4), ValueError,
     r"must lie in \[0, 4\)"),
    ("lists-duplicate", lambda: TokenSet.from_lists([[1, 1]], seq_len=4), ValueError,
     "duplicates"),
    ("lists-seq-len-0", lambda: TokenSet.from_lists([[]], seq_len=0), ValueError, "seq_len"),
    ("indices-int64",
     lambda: TokenSet.from_indices(torch.tensor([0]), _i(0, 1), 4), TypeError, "int32"),
    ("cu-2d", lambda: TokenSet.from_indices(_i(0), _i(0, 1)[None], 4), ValueError, "1-D"),
    ("cu-start-not-0", lambda: TokenSet.from_indices(_i(0, 1), _i(1, 2), 4), ValueError,
     r"cu_seqlens\[0\] must be 0"),
    ("cu-non-monotone", lambda: TokenSet.from_indices(_i(0, 1, 4), _i(0, 2, 1, 3), 4),
     ValueError, "non-decreasing"),
    ("cu-end-over-capacity", lambda: TokenSet.from_indices(_i(0, 1), _i(0, 3), 4), ValueError,
     "exceeds capacity"),
    ("index-out-of-image", lambda: TokenSet.from_indices(_i(0, 9), _i(0, 1, 2), 4), ValueError,
     "does not belong to image 1"),
    ("index-negative", lambda: TokenSet.from_indices(_i(-3), _i(0, 1), 4), ValueError,
     "out of range"),
    ("index-huge", lambda: TokenSet.from_indices(_i(2**31 - 1), _i(0, 1), 4), ValueError,
     "out of range"),
    ("indices-unsorted", lambda: TokenSet.from_indices(_i(2, 1), _i(0, 2), 4), ValueError,
     "strictly increasing"),
    ("max-seqlen-below-count",
     lambda: TokenSet.from_indices(_i(0, 1, 2), _i(0, 3), 4, max_seqlen=2), ValueError,
     "more than max_seqlen"),
    ("max-seqlen-over-N", lambda: TokenSet.from_indices(_i(0), _i(0, 1), 4, max_seqlen=5),
     ValueError, "max_seqlen must be an int"),
    ("capacity-over-BN", lambda: TokenSet.from_indices(_i(0, 1, 2, 3, 0), _i(0, 4), 4),
     ValueError, "exceeds B\\*N"),
    # ---- broken sets built with validate=False reach the ops: the CPU check catches them
    ("op-index-out-of-range", lambda: gather_tokens(_x(), _raw([0, 9], [0, 1, 2])), ValueError,
     "does not belong to image 1"),
    ("op-index-negative", lambda: scatter_tokens(torch.randn(2, 8), _raw([0, -1], [0, 1, 2])),
     ValueError, "out of range"),
    ("op-cu-non-monotone",
     lambda: packed_linear(_x(), torch.randn(8, 8), None, _raw([0, 4, 5], [0, 2, 1])),
     ValueError, "non-decreasing"),
    ("op-cu-end-over-capacity",
     lambda: pruned_block(_x(), _raw([0, 4], [0, 1, 3]), Block(8, 2).eval()), ValueError,
     "exceeds capacity"),
    ("op-max-seqlen-below-count",
     lambda: _sel(tokens=_raw([0, 1, 4], [0, 2, 3], max_seqlen=1)), ValueError,
     "more than max_seqlen"),
    # ---- gather / scatter arguments
    ("gather-x-not-tensor", lambda: gather_tokens([[0.0]], _good()), TypeError,
     "x must be a torch.Tensor"),
    ("gather-x-wrong-shape", lambda: gather_tokens(torch.randn(3, 4, 8), _good()), ValueError,
     "does not match tokens"),
    ("gather-x-int", lambda: gather_tokens(torch.ones(2, 4, 8, dtype=torch.int64), _good()),
     TypeError, "float32"),
    ("gather-tokens-not-set", lambda: gather_tokens(_x(), _i(0, 1)), TypeError, "TokenSet"),
    ("scatter-rows-mismatch", lambda: scatter_tokens(torch.randn(5, 8), _good()), ValueError,
     "capacity"),
    ("scatter-C-mismatch", lambda: scatter_tokens(torch.randn(3, 8), _good(), _x(6)),
     ValueError, "C="),
    ("scatter-dtype-mismatch",
     lambda: scatter_tokens(torch.randn(3, 8), _good(), _x().half()), TypeError,
     "share one dtype"),
    ("check-not-bool", lambda: gather_tokens(_x(), _good(), check="yes"), TypeError,
     "check must be"),
    # ---- varlen_attention arguments and offsets
    ("attn-cu-list", lambda: _va(cu_q=[0, 6]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ("attn-cu-int64", lambda: _va(cu_q=torch.tensor([0, 6])), TypeError, "int32"),
    ("attn-cu-start-not-0", lambda: _va(cu_q=(1, 6)), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    ("attn-cu-non-monotone", lambda: _va(cu_q=(0, 4, 2), cu_k=(0, 3, 6)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    ("attn-cu-end-over-rows", lambda: _va(cu_k=(0, 9), mk=9), ValueError,
     r"cu_seqlens_k\[-1\] = 9 exceeds the 6 packed rows"),
    ("attn-max-below-count", lambda: _va(mq=5), ValueError, "more than its max_seqlen = 5"),
    ("attn-max-negative", lambda: _va(mk=-1), ValueError, "non-negative int"),
    ("attn-max-bool", lambda: _va(mk=True), ValueError, "non-negative int"),
    ("attn-dropout-1", lambda: _va(dropout_p=1.0), ValueError, "dropout_p"),
    ("attn-cu-shapes", lambda: _va(cu_q=(0, 3, 6)), ValueError, r"\[B \+ 1\]"),
    ("attn-head-mismatch",
     lambda: varlen_attention(torch.randn(6, 2, 8), torch.randn(6, 3, 8), torch.randn(6, 3, 8),
                              _i(0, 6), _i(0, 6), 6, 6), ValueError, "H and D"),
    ("attn-logits-not-uniform", lambda: _va(cu_q=(0, 2, 6), cu_k=(0, 3, 6), mq=4,
                                            return_logits=True), ValueError, "return_logits"),
    # ---- packed_linear arguments
    ("linear-weight-K", lambda: _lin(w_shape=(16, 6)), ValueError, "does not match x's K"),
    ("linear-activation", lambda: _lin(activation="relu"), ValueError, "activation"),
    ("linear-bias-size", lambda: _lin(bias=torch.randn(15)), ValueError, "bias"),
    ("linear-residual-shape", lambda: _lin(residual=torch.randn(3, 15)), ValueError,
     "residual must be packed"),
    ("linear-out-N", lambda: _lin(out=torch.randn(2, 4, 15)), ValueError, "out must be dense"),
    # ---- dtop_select arguments
    ("select-class-shape", lambda: _sel(cls_shape=(2, 3, 3)), ValueError,
     "class_logits must be"),
    ("select-mask-shape", lambda: _sel(ml_shape=(3, 4)), ValueError, "mask_logits must be"),
    ("select-threshold-nan", lambda: _sel(threshold=math.nan), ValueError, "threshold is NaN"),
    ("select-top-k-negative", lambda: _sel(top_k=-1), ValueError, "top_k"),
    ("select-top-k-bool", lambda: _sel(top_k=True), ValueError, "top_k"),
    # ---- pruned_block: blocks whose math the packed path does not reproduce
    ("block-no-attn", lambda: pruned_block(_x(), _good(), _block(attn=None)), TypeError,
     "block has no `attn`"),
    ("block-qkv-dims", lambda: pruned_block(_x(), _good(), _block(**{"attn.qkv":
                                                                    nn.Linear(8, 16)})),
     ValueError, "qkv must map the tokens' C = 8 to 24 features"),
    ("block-q-bias", lambda: pruned_block(_x(), _good(), _block(attn=_QBiasAttention(8, 2))),
     TypeError, "block.attn.q_bias"),
    ("block-unknown-attn-part",
     lambda: pruned_block(_x(), _good(), _block(**{"attn.rope": nn.Linear(4, 4)})), TypeError,
     "block.attn.rope"),
    ("block-layer-scale-gamma",
     lambda: pruned_block(_x(), _good(), _block(gamma_1=nn.Parameter(torch.ones(8)))),
     TypeError, "block.gamma_1"),
    ("block-head-dim",
     lambda: pruned_block(_x(), _good(), _block(**{"attn.head_dim": 2})), ValueError,
     "head_dim = 2"),
    ("block-dropout-training", lambda: pruned_block(_x(), _good(), Block(8, 2, drop=0.1)),
     ValueError, "drops with p=0.1"),
    ("block-x-4d", lambda: pruned_block(torch.randn(1, 2, 4, 8), _good(), _block()),
     ValueError, r"dense \[B, N, C\] or packed"),
    # ---- dispatch
    ("backend-unknown", lambda: gather_tokens(_x(), _good(), backend="fast"), ValueError,
     "backend must be one of"),
    ("backend-cuda-on-cpu", lambda: gather_tokens(_x(), _good(), backend="cuda"), BackendError,
     "cuda"),
]


def test_catalogue_size():
    assert len(CATALOGUE) >= 40


@pytest.mark.parametrize("backend", [pytest.param(b, id=b, marks=backend_marks(b))
                                     for b in ("torch", "triton")])
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CATALOGUE])
def test_malformed(case, backend, monkeypatch):
    _, call, err, match = case
    if case[0].startswith("backend-"):
        if backend != "torch":
            pytest.skip("dispatch errors do not depend on the backend")
    else:  # every op call runs on the backend under test
        monkeypatch.setenv("DTOP_BACKEND", backend)
    with pytest.raises(err, match=match):
        call()


def test_env_backend_unknown(monkeypatch):
    monkeypatch.setenv("DTOP_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DTOP_BACKEND must be one of"):
        gather_tokens(_x(), _good())


# ---------------------------------------------------------------------- child processes
_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from dtop_kernels import TokenSet
    from dtop_kernels.reference import attention as ra, gather as rg
    from dtop_kernels.triton import attention as ta, gather as tg, layernorm as tl_, linear as tli

    I = lambda *v: torch.tensor(v, dtype=torch.int32)
    B, N, C = 2, 4, 8
    # slot 1 points far past x, slot 2 before it: never dereferenced, whatever the checks
    bad = TokenSet.from_indices(I(0, 10**9, -5, 5), I(0, 3, 4), N, validate=False)
    x = torch.randn(B * N, C)
    g = tg.gather_rows(x, bad)
    assert torch.equal(g[0], x[0]) and torch.equal(g[3], x[5]), "valid rows"
    assert not g[1:3].any(), "out-of-range rows read as zeros"
    out = torch.zeros(B * N, C)
    tg.scatter_rows(torch.ones(4, C), bad, out, add=False)
    assert out.sum() == 2 * C, "only the two valid rows are written"
    w, b = torch.ones(C), torch.zeros(C)
    y, _, _, _ = tl_.layer_norm_fwd(x, w, b, bad, 1e-6, gather=True)
    assert torch.isfinite(y).all()
    wt = torch.randn(C, C)
    y, _ = tli.linear_fwd(x, wt, None, bad, gather=True)
    assert not y[1:3].any()
    dense = torch.zeros(B * N, C)
    tli.linear_fwd(torch.randn(4, C), wt, None, bad, out=dense)
    assert (dense.abs().sum(1) > 0).sum() <= 2
    # the torch reference's sync-free (GPU) paths mask the same indices
    assert not rg.gather_masked(x.view(B, N, C), bad)[1:3].any()
    rg.scatter_masked(torch.ones(4, C), bad, torch.zeros(B, N, C), add=True)
    # broken offsets on the attention kernels: non-monotone, past the rows, bound too small
    q = torch.randn(6, 2, 16)
    for cu, m in ((I(0, 5, 2), 6), (I(0, 4, 40), 40), (I(0, 3, 6), 1)):
        o, lse = ta.attention_fwd(q, q, q, cu, cu, m, 0.25)
        ta.attention_bwd(torch.ones_like(o), q, q, q, o, lse, cu, cu, m, m, 0.25)
        ra.attention_padded(q, q, q, cu, cu, m, m, 0.25)
    print("survived")
""")


@pytest.mark.skipif(backend_marks("triton") != [], reason="needs the Triton interpreter")
def test_broken_contracts_never_crash():
    """Out-of-range and negative indices and broken offsets go straight to the kernels (the
    checks bypassed): the process must survive, nothing outside the buffers is touched."""
    proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True,
                          check=False, text=True, timeout=300)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "survived" in proc.stdout
