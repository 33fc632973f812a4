"""Triton kernels that have no public op of their own: packed LayerNorm (packed linear: see
test_linear.py).

Compared with plain PyTorch on the valid rows; padding rows must come out zero. Runs under the
CPU interpreter (TRITON_INTERPRET=1, set by conftest) or on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtop_kernels import TokenSet

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(b: int, n: int, counts: list[int], padded: bool, seed: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(b, n, dtype=torch.bool)
    for i, c in enumerate(counts):
        keep[i, torch.randperm(n, generator=g)[:c]] = True
    keep = keep.to(DEVICE)
    return TokenSet.from_mask(keep, capacity=b * n) if padded else TokenSet.from_mask(keep)


def _valid(t: TokenSet) -> int:
    return int(t.cu_seqlens[-1])


CASES = [
    pytest.param(3, 21, [0, 21, 7], True, id="padded-zero-full-partial"),
    pytest.param(1, 17, [1], False, id="B1-one-token"),
    pytest.param(2, 9, [0, 0], True, id="all-empty"),
]


@pytest.mark.parametrize("b,n,counts,padded", CASES)
@pytest.mark.parametrize("c", [13, 64], ids=["C13", "C64"])
@pytest.mark.parametrize("gather", [False, True], ids=["packed", "gather"])
def test_layer_norm_tokens(b, n, counts, padded, c, gather):
    from dtop_kernels.ops.layernorm import layer_norm_tokens

    torch.manual_seed(3)
    t = _tokens(b, n, counts, padded)
    nv = _valid(t)
    w = torch.randn(c, device=DEVICE, requires_grad=True)
    bias = torch.randn(c, device=DEVICE, requires_grad=True)
    if gather:
        x = torch.randn(b * n, c, device=DEVICE, requires_grad=True)
        rows = x[t.keep_mask().reshape(-1)]
    else:
        x = torch.randn(t.capacity, c, device=DEVICE, requires_grad=True)
        rows = x[:nv]
    y, xo = layer_norm_tokens(x, w, bias, t, 1e-6, gather=gather, store_x=gather)
    ref = F.layer_norm(rows, (c,), w, bias, 1e-6)
    torch.testing.assert_close(y[:nv], ref, rtol=1e-5, atol=1e-5)
    assert torch.all(y[nv:] == 0)
    if gather:
        torch.testing.assert_close(xo[:nv], rows, rtol=0, atol=0)
        assert torch.all(xo[nv:] == 0)
    g = torch.randn_like(y)
    loss = (y * g).sum() + ((xo * g).sum() if gather else 0)
    loss_ref = (ref * g[:nv]).sum() + ((rows * g[:nv]).sum() if gather else 0)
    for a, e in zip(torch.autograd.grad(loss, [x, w, bias]),
                    torch.autograd.grad(loss_ref, [x, w, bias])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_layer_norm_tokens_fp16():
    from dtop_kernels.ops.layernorm import layer_norm_tokens

    torch.manual_seed(4)
    t = _tokens(2, 16, [9, 16], padded=True)
    nv = _valid(t)
    x = torch.randn(t.capacity, 48, device=DEVICE).half()
    w, bias = torch.randn(48, device=DEVICE).half(), torch.randn(48, device=DEVICE).half()
    y, _ = layer_norm_tokens(x, w, bias, t, 1e-6)
    exact = F.layer_norm(x[:nv].double(), (48,), w.double(), bias.double(), 1e-6)
    same_dtype = F.layer_norm(x[:nv].float(), (48,), w.float(), bias.float(), 1e-6).half()
    err = (y[:nv].double() - exact).abs().max()
    err_ref = (same_dtype.double() - exact).abs().max()
    assert err <= 2 * err_ref + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_forward_makes_no_host_sync(backend):
    """A pruned packed forward (blocks, heads, selection, canvas) never waits for the GPU."""
    from dtop_kernels.models import vit_dtop_tiny
    from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images

    torch.manual_seed(0)
    model = make_heads_confident_(vit_dtop_tiny(threshold=0.5)).cuda().eval()
    img = synthetic_images(3, 128, 96).cuda()
    with torch.no_grad():
        ref = model(img, mode="loop")
        model(img, mode="packed", backend=backend)  # compile / warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(img, mode="packed", backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.active_counts, ref.active_counts)
    torch.testing.assert_close(out.pred, ref.pred, atol=1e-4, rtol=0)
