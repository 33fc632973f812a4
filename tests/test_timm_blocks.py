"""pruned_block against timm's own Block variants: the ones whose math the packed path reproduces
run and match timm's dense forward per image; the others raise, naming what cannot be honoured.

Needs timm (skipped without it); run it in an environment where timm imports."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import backend_params
from naive import naive_block

pytestmark = pytest.mark.timm
try:  # timm imports torchvision, which fails beside some torch builds with other errors
    import timm.layers.attention as timm_attention
    import timm.models.vision_transformer as timm_vit
except Exception as e:
    if os.environ.get("DTOP_REQUIRE_TIMM") == "1":  # CI's timm environment: must not skip
        raise
    pytest.skip(f"timm is not importable: {e!r}", allow_module_level=True)

from dtop_kernels import TokenSet, pruned_block

C, H = 32, 4


def _randomize(blk: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))
    return blk


def _gated(**kw) -> torch.nn.Module:
    blk = timm_vit.Block(C, H, qkv_bias=True, **kw)
    blk.attn = timm_attention.Attention(C, H, qkv_bias=True, gated=True)
    return blk


def _unfused(**kw) -> torch.nn.Module:
    blk = timm_vit.Block(C, H, **kw)
    blk.attn.fused_attn = False
    return blk


VARIANTS = [
    pytest.param(lambda: timm_vit.Block(C, H), id="default"),
    pytest.param(lambda: timm_vit.Block(C, H, qkv_bias=True), id="qkv-bias"),
    pytest.param(lambda: timm_vit.Block(C, H, proj_bias=False), id="no-proj-bias"),
    pytest.param(lambda: timm_vit.Block(C, H, qk_norm=True), id="qk-norm"),
    pytest.param(lambda: timm_vit.Block(C, H, init_values=0.5), id="layer-scale"),
    pytest.param(lambda: timm_vit.Block(C, H, scale_attn_norm=True, scale_mlp_norm=True),
                 id="scale-norms"),
    pytest.param(lambda: timm_vit.Block(C, H, drop_path=0.2, attn_drop=0.1, proj_drop=0.1),
                 id="dropout-in-eval"),
    pytest.param(_unfused, id="fused-attn-off"),
    pytest.param(_gated, id="gated-attention"),
]


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("make", VARIANTS)
def test_matches_timm(make, backend):
    torch.manual_seed(0)
    blk = _randomize(make()).eval()
    b, n = 3, 10
    keep = torch.rand(b, n) < 0.6
    keep[2] = False
    keep[1] = True
    ts = TokenSet.from_mask(keep, capacity=b * n)
    x = torch.randn(b, n, C, requires_grad=True)
    out = pruned_block(x, ts, blk, backend=backend)
    xd = x.detach().double().requires_grad_()
    ref = naive_block(xd, keep, copy.deepcopy(blk).double())
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    g = torch.randn(b, n, C)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=5e-4, rtol=5e-4)


REFUSED = [
    pytest.param(lambda: timm_vit.ResPostBlock(C, H), TypeError, "ResPostBlock", id="res-post"),
    pytest.param(lambda: timm_vit.ParallelScalingBlock(C, H), TypeError, "block has no",
                 id="parallel-scaling"),
    pytest.param(lambda: timm_vit.Block(C, H, attn_layer="diff"), TypeError, "DiffAttention",
                 id="diff-attention"),
    pytest.param(lambda: timm_vit.Block(C, H, drop_path=0.1).train(), ValueError,
                 "drop_path1 drops with p=0.1", id="drop-path-training"),
    pytest.param(lambda: timm_vit.Block(C, H, attn_drop=0.1).train(), ValueError,
                 "attn_drop drops with p=0.1", id="attn-drop-training"),
]


@pytest.mark.parametrize("make,err,match", REFUSED)
def test_refuses_other_math(make, err, match):
    blk = make()
    if not blk.training:
        blk.eval()
    ts = TokenSet.from_mask(torch.rand(2, 6) < 0.5, capacity=12)
    with pytest.raises(err, match=match):
        pruned_block(torch.randn(2, 6, C), ts, blk, backend="torch")
