"""The reference ops have a device path (T stays on the device, masked / padded ops) used on
CUDA and a host path used on the CPU; both must agree. The device path is exercised here on CPU
tensors so that CPU CI covers the code that runs on GPUs."""

from __future__ import annotations

import pytest
import torch

from dtop_kernels import TokenSet
from dtop_kernels.reference import attention as ra
from dtop_kernels.reference import gather as rg


def _tokens(padded: bool) -> TokenSet:
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 29, generator=g) < 0.5
    keep[0] = False
    keep[1] = True
    return TokenSet.from_mask(keep, capacity=3 * 29 if padded else None)


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_gather_scatter_paths_agree(padded):
    t = _tokens(padded)
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


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_paths_agree(padded, cross):
    t = _tokens(padded)
    h, d = 2, 16
    k = torch.randn(t.capacity, h, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    if cross:
        kq = 5
        q = torch.randn(3 * kq, h, d, dtype=torch.float64, requires_grad=True)
        cu_q, mq = torch.arange(4, dtype=torch.int32) * kq, kq
    else:
        q = torch.randn_like(k, requires_grad=True)
        cu_q, mq = t.cu_seqlens, t.max_seqlen
    args = (q, k, v, cu_q, t.cu_seqlens, mq, t.max_seqlen, 0.3, cross)
    a, b = ra.attention_looped(*args), ra.attention_padded(*args)
    if not cross:
        a, b = (a,), (b,)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, rtol=1e-12, atol=1e-12)
    loss_a = sum((u * (i + 1)).sum() for i, u in enumerate(a))
    loss_b = sum((u * (i + 1)).sum() for i, u in enumerate(b))
    for u, w in zip(torch.autograd.grad(loss_a, (q, k, v)), torch.autograd.grad(loss_b, (q, k, v))):
        torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-10)
