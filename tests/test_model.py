"""The reference ViT-DToP model: execution modes, batching, training, loading, FLOPs, maps, and
on a GPU a packed forward without host syncs.

Tiny configurations on CPU. Pruning is synthesized (random weights are never confident): the
heads are scaled by ``make_heads_confident_`` and the threshold is lowered, and every pruning
test checks that the images of its batch really keep different numbers of tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blocks import import_timm
from helpers import backend_params
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dtop_kernels.models import (
    count_flops,
    dtop_loss,
    load_mmseg_checkpoint,
    load_timm_backbone,
    vit_dtop_base,
    vit_dtop_large,
    vit_dtop_tiny,
)
from dtop_kernels.models.losses import present_classes
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images

H, W = 128, 96  # 8 x 6 = 48 tokens
THRESHOLD = 0.5
BACKEND = "torch"  # the kernels' own tests cover the other backends; one model test below


def prunable_model(dtype=torch.float64, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw.setdefault("threshold", THRESHOLD)
    return make_heads_confident_(vit_dtop_tiny(**kw)).to(dtype).eval()


def images(batch=3, dtype=torch.float64, seed=1) -> torch.Tensor:
    return synthetic_images(batch, H, W, seed=seed, dtype=dtype)


def assert_prunes_differently(counts: torch.Tensor) -> None:
    n = (H // 16) * (W // 16)
    assert bool((counts[0] == n).all())
    assert bool((counts[1:] < n).all()), f"no pruning: {counts.tolist()}"
    assert len(set(counts[-1].tolist())) > 1, f"images prune alike: {counts.tolist()}"
    assert bool((counts[1:] <= counts[:-1]).all())


def assert_outputs_close(a, b, atol: float) -> None:
    torch.testing.assert_close(a.pred, b.pred, atol=atol, rtol=0)
    assert len(a.class_logits) == len(b.class_logits)
    for x, y in zip(a.class_logits + a.mask_logits, b.class_logits + b.mask_logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert torch.equal(a.active_counts, b.active_counts)
    assert torch.equal(a.exit_stage, b.exit_stage)


# ---------------------------------------------------------------------- configurations
def test_configs():
    with torch.device("meta"):
        base, large = vit_dtop_base(), vit_dtop_large(num_classes=59)
    assert (base.stage_ends, base.threshold, base.top_k) == ((6, 8, 12), 0.9, 5)
    assert (large.stage_ends, large.threshold, large.num_classes) == ((8, 16, 24), 0.95, 59)
    assert len(base.blocks) == 12 and base.blocks[0].attn.num_heads == 12
    assert len(large.blocks) == 24 and large.blocks[0].attn.num_heads == 16
    assert base.heads[0].input_proj.out_features == 384
    assert base.heads[0].decoder.layers[0].multihead_attn.num_heads == 6
    assert large.heads[0].input_proj.out_features == 512
    assert large.heads[0].decoder.layers[0].multihead_attn.num_heads == 8
    assert base.pos_embed.shape == (1, 1 + 24 * 24, 768)
    keys = set(base.state_dict())
    for k in ("patch_embed.proj.weight", "pos_embed", "blocks.11.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.3.norm2.bias",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "heads.2.q.weight",
              "heads.0.decoder.layers.2.multihead_attn.k.bias", "heads.1.class_embed.weight"):
        assert k in keys, k
    assert not any(k.startswith(("norm.", "cls_token")) for k in keys)
    with pytest.raises(ValueError, match="stage_ends"):
        vit_dtop_tiny(stage_ends=(2, 2, 4))


# ---------------------------------------------------------------------- execution modes
def test_dense_equals_packed_without_pruning():
    torch.manual_seed(0)
    model = vit_dtop_tiny(threshold=1.0).eval()
    img = images(2, torch.float32)
    with torch.no_grad():
        dense = model(img, mode="dense")
        for mode in ("packed", "loop"):
            assert_outputs_close(model(img, mode=mode, backend=BACKEND), dense, atol=1e-5)
    assert dense.pred.shape == (2, 5, H, W)
    assert bool((dense.exit_stage == 2).all())
    assert dense.active_counts.tolist() == [[48, 48]] * 3


@pytest.mark.parametrize("tighten", [pytest.param(True, id="tight"),
                                     pytest.param(False, id="padded"),
                                     pytest.param(16, id="bucket16")])
def test_loop_equals_packed_with_pruning(tighten):
    model = prunable_model(tighten=tighten)
    img = images()
    with torch.no_grad():
        loop, packed = model(img, mode="loop"), model(img, mode="packed", backend=BACKEND)
        dense = model(img, mode="dense")
    assert_prunes_differently(packed.active_counts)
    assert_outputs_close(packed, loop, atol=1e-10)
    assert not torch.allclose(packed.pred, dense.pred, atol=1e-3)  # pruning changed things
    # A token exits at head s exactly when stage s + 1 no longer runs on it.
    exits = packed.exit_stage.flatten(1)
    for s in range(1, model.num_stages):
        assert torch.equal((exits >= s).sum(1), packed.active_counts[s])


def test_exit_logits_override_prunes_the_given_pattern():
    """Synthesized exit logits go through the real rule identically in loop and packed mode,
    and the tokens that exit are the ones the rule picks on those logits."""
    from dtop_kernels import TokenSet, dtop_select

    torch.manual_seed(3)
    model = vit_dtop_tiny(threshold=0.6).double().eval()
    img = images(3)
    b, k, n = 3, model.num_classes, (H // 16) * (W // 16)
    override = [(torch.randn(b, k, 2, dtype=torch.float64) * 3,
                 torch.randn(b, k, n, dtype=torch.float64) * 4) for _ in range(2)]
    with torch.no_grad():
        loop = model(img, mode="loop", exit_logits=override)
        packed = model(img, mode="packed", backend=BACKEND, exit_logits=override)
    assert_outputs_close(packed, loop, atol=1e-10)
    assert_prunes_differently(packed.active_counts)
    # The first head's exits are exactly the rule applied to the first override.
    all_tokens = TokenSet.all_active(b, n)
    c0, m0 = override[0]
    want = dtop_select(c0, m0.transpose(0, 1).reshape(k, b * n), all_tokens, 0.6).exited
    assert torch.equal(packed.exit_stage.flatten(1) == 0, want)
    with pytest.raises(ValueError, match="exit_logits"):
        model(img, exit_logits=override[:1])


def test_image_output_independent_of_batch():
    model = prunable_model()
    img = images(3)
    with torch.no_grad():
        batch = model(img, backend=BACKEND)
        for b in range(3):
            alone = model(img[b:b + 1], backend=BACKEND)
            torch.testing.assert_close(alone.pred, batch.pred[b:b + 1], atol=1e-10, rtol=0)
            assert torch.equal(alone.active_counts[:, 0], batch.active_counts[:, b])
            assert torch.equal(alone.exit_stage[0], batch.exit_stage[b])
    assert_prunes_differently(batch.active_counts)


def test_packed_triton_backend_matches_torch():
    """The model on the Triton kernels (on CPU through the interpreter: slow, so tiny)."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = prunable_model(torch.float32).to(dev)
    img = synthetic_images(2, 64, 48, seed=1).to(dev)
    with torch.no_grad():
        ref = model(img, mode="loop")
        out = model(img, mode="packed", backend="triton")
    assert len(set(out.active_counts[-1].tolist())) > 1
    assert_outputs_close(out, ref, atol=1e-4 if dev == "cpu" else 2e-3)  # GPU: TF32 dots


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_packed_forward_makes_no_host_sync(backend):
    """A pruned packed forward (blocks, heads, selection, canvas) at fixed capacity never waits
    for the GPU (the default capacity on CUDA tightens each stage: a read-back by design)."""
    torch.manual_seed(0)
    model = make_heads_confident_(vit_dtop_tiny(threshold=0.5)).cuda().eval()
    img = synthetic_images(3, 128, 96).cuda()
    with torch.no_grad():
        ref = model(img, mode="loop")
        model(img, mode="packed", backend=backend, tighten=False)  # warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(img, mode="packed", backend=backend, tighten=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.active_counts, ref.active_counts)
    torch.testing.assert_close(out.pred, ref.pred, atol=1e-4, rtol=0)


def test_aux_heads_skipped_without_pruning():
    torch.manual_seed(0)
    model = vit_dtop_tiny(threshold=1.0).eval()
    img = images(2, torch.float32)
    with torch.no_grad():
        full = model(img, mode="dense")
        for mode in ("dense", "packed", "loop"):
            lean = model(img, mode=mode, aux_heads=False, backend=BACKEND)
            assert len(lean.class_logits) == len(lean.mask_logits) == 1
            torch.testing.assert_close(lean.pred, full.pred, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="aux_heads"):
            model(img, mode="packed", threshold=0.5, aux_heads=False)


def test_bad_inputs():
    model = vit_dtop_tiny()
    ok = torch.randn(1, 3, 32, 48)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 32, 48))
    with pytest.raises(TypeError, match="floating-point"):
        model(ok.to(torch.uint8))
    with pytest.raises(TypeError, match="float64 but the model is torch.float32"):
        model(ok.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(ok.numpy())
    with pytest.raises(ValueError, match="mode"):
        model(ok, mode="fast")
    with pytest.raises(ValueError, match="tighten must be"):
        model(ok, tighten=0)
    with pytest.raises(ValueError, match="tighten must be"):
        vit_dtop_tiny(tighten="yes")


def test_upsample_false_is_pred_before_the_upsampling():
    model = prunable_model()
    img = images(batch=2)
    with torch.no_grad():
        full = model(img, mode="packed", backend=BACKEND)
        grid = model(img, mode="packed", backend=BACKEND, upsample=False)
    assert grid.pred.shape == (2, model.num_classes, H // 16, W // 16)
    present = full.class_logits[-1].softmax(-1)[..., 0]
    torch.testing.assert_close(grid.pred, present[..., None, None] * full.mask_logits[-1].sigmoid())
    up = torch.nn.functional.interpolate(grid.pred, size=(H, W), mode="bilinear")
    torch.testing.assert_close(up, full.pred)


# ---------------------------------------------------------------------- training
def test_training_step_all_parameters_learn():
    model = prunable_model(torch.float32).train()
    img = images(2, torch.float32)
    target = torch.randint(0, 5, (2, H, W))
    target[0, :16] = 255
    target[1][target[1] == 3] = 0  # a class absent from one image
    out = model(img, mode="packed", backend=BACKEND)
    assert_prunes_differently(out.active_counts)
    losses = dtop_loss(out, target)
    assert set(losses) == {"loss"} | {f"{t}_{s}" for t in ("ce", "focal", "dice")
                                      for s in range(3)}
    losses["loss"].backward()
    for name, p in model.named_parameters():
        g = p.grad[:, 1:] if name == "pos_embed" else p.grad  # the class-token slot is unused
        assert g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0), name
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_packed_gradients_equal_loop_gradients():
    model = prunable_model(head_attn_drop=0.0).train()  # train mode, but deterministic
    img = images(3)
    target = torch.randint(0, 5, (3, H, W))
    grads = {}
    for mode in ("loop", "packed"):
        model.zero_grad()
        out = model(img, mode=mode, backend=BACKEND)
        dtop_loss(out, target)["loss"].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_prunes_differently(out.active_counts)
    for n, g in grads["loop"].items():
        # same math, different arithmetic: the loop differentiates SDPA through autograd, the
        # packed torch backend runs its own float32 attention backward (dtop_py::varlen_attention)
        torch.testing.assert_close(grads["packed"][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_loss_terms():
    target = torch.tensor([[[0, 0], [255, 2]], [[255, 255], [255, 255]]])
    present = present_classes(target, 3)
    assert present.tolist() == [[True, False, True], [False, False, False]]
    with pytest.raises(ValueError, match="labels outside"):
        present_classes(torch.tensor([[[0, 7]]]), 3)
    # Confident, correct logits give a small loss; the all-ignored image has no mask term.
    from dtop_kernels.models.dtop import DToPOutput

    cls = torch.tensor([[[9.0, -9], [-9, 9], [9, -9]], [[-9, 9]] * 3])
    masks = torch.full((2, 3, 2, 2), -20.0)
    masks[0, 0, 0], masks[0, 2, 1, 1] = 20.0, 20.0
    masks[0, 2, 1, 0] = 20.0  # the ignored pixel: background for every class (official)
    out = DToPOutput(None, (cls,), (masks,), None, None)
    losses = dtop_loss(out, target)
    assert float(losses["ce_0"]) < 1e-6 and float(losses["dice_0"]) < 0.5
    assert float(losses["focal_0"]) > 1.0  # the ignored pixel counts against class 2
    with pytest.raises(TypeError, match="integer label"):
        dtop_loss(out, target.float())


# ---------------------------------------------------------------------- FLOPs
def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)  # FlopCounterMode does not count the CPU SDPA kernel


def measured_flops(model, img, **kw) -> int:
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.no_grad(), FlopCounterMode(display=False,
                                          custom_mapping={sdpa: _cpu_sdpa_flops}) as fc:
        out = model(img, **kw)
    return fc.get_total_flops(), out


@pytest.mark.parametrize("aux_heads", [True, False])
def test_flops_match_flop_counter_dense(aux_heads):
    torch.manual_seed(0)
    model = vit_dtop_tiny().eval()
    img = torch.randn(2, 3, H, W)
    measured, _ = measured_flops(model, img, mode="dense", aux_heads=aux_heads)
    counted = count_flops(model, None, (H, W), aux_heads=aux_heads)
    assert measured == 2 * round(2 * counted.dense_macs)  # 2 images, 2 FLOPs per MAC
    assert float(counted.flops.sum()) * 2 == measured


def test_flops_match_flop_counter_with_pruning():
    model = prunable_model(torch.float32)
    img = images(3, torch.float32)
    measured, out = measured_flops(model, img, mode="loop")  # per-image ops at true counts
    assert_prunes_differently(out.active_counts)
    counted = count_flops(model, out.active_counts, (H, W))
    assert float(counted.flops.sum()) == measured
    assert bool((counted.saving > 0).all()) and bool((counted.macs < counted.dense_macs).all())


def test_flops_vit_base_near_paper():
    with torch.device("meta"):
        model = vit_dtop_base(num_classes=150)
    segvit = count_flops(model, None, 512, aux_heads=False).dense_macs / 1e9
    assert abs(segvit - 109.9) / 109.9 < 0.01  # the paper's SegViT ViT-B GFLOPs (MACs)
    with_aux = count_flops(model, None, 512).dense_macs / 1e9
    assert 114 < with_aux < 115


# ---------------------------------------------------------------------- weight loading
@pytest.mark.timm
def test_timm_backbone_matches_timm_forward():
    timm = import_timm()
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(H, W), patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=0,
        class_token=False, global_pool="avg").eval()
    model = vit_dtop_tiny(pos_grid=(H // 16, W // 16)).eval()
    report = load_timm_backbone(model, vit)
    assert report.missing == [] and report.resized == []
    assert report.unexpected == ["fc_norm.weight", "fc_norm.bias"]  # timm's pooled-head norm
    img = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ours = model.forward_backbone(img)
        ref = vit.forward_intermediates(img, indices=[3], norm=False, output_fmt="NLC",
                                        intermediates_only=True)[-1]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # A class-token model: the slot is kept (unused), the token itself is reported.
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=96, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=3)
    report = load_timm_backbone(model := vit_dtop_tiny(pos_grid=6), vit)
    assert torch.equal(model.pos_embed, vit.pos_embed) and report.missing == []
    assert sorted(report.unexpected) == ["cls_token", "head.bias", "head.weight", "norm.bias",
                                         "norm.weight"]


def test_timm_state_dict_loading_resizes_and_reports():
    torch.manual_seed(0)
    src = vit_dtop_tiny(pos_grid=4)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("heads.")}
    sd.update({"cls_token": torch.zeros(1, 1, 64), "norm.weight": torch.ones(64),
               "head.weight": torch.zeros(10, 64)})
    model = vit_dtop_tiny(pos_grid=6)
    report = load_timm_backbone(model, sd)
    assert report.missing == [] and report.resized == ["pos_embed"]
    assert sorted(report.unexpected) == ["cls_token", "head.weight", "norm.weight"]
    assert torch.equal(model.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], want.flatten(2).transpose(1, 2))
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(96, 64)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 64\)"):
        load_timm_backbone(model, sd)


class _MMCVLayer(nn.Module):
    """An mmseg ViT encoder layer's structure and names, built from torch.nn."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
        self.attn = nn.Module()
        self.attn.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.ffn = nn.Module()
        self.ffn.layers = nn.Sequential(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU()),
                                        nn.Linear(4 * c, c))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn.layers(self.ln2(x))


class _OfficialCrossAttn(nn.Module):
    """The official head's cross-attention layout (q, k, v, proj); keeps the head-mean logits."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mem, _v, **kwargs):
        b, k, d = x.shape
        q, kk, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                    for t in (self.q(x), self.k(mem), self.v(mem)))
        attn = q @ kk.transpose(-1, -2) * (d // self.heads) ** -0.5
        self.logits = attn.mean(1)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, k, d)), None


def _official_head(c: int, d: int, heads: int, k: int) -> nn.Module:
    head = nn.Module()
    head.input_proj, head.proj_norm = nn.Linear(c, d), nn.LayerNorm(d)
    head.q, head.class_embed = nn.Embedding(k, d), nn.Linear(d, 2)
    head.decoder = nn.Module()
    head.decoder.layers = nn.ModuleList()
    for _ in range(3):
        layer = nn.TransformerDecoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        layer.multihead_attn = _OfficialCrossAttn(d, heads)
        head.decoder.layers.append(layer)
    return head


def test_mmseg_checkpoint_matches_reference_modules():
    torch.manual_seed(0)
    c, g, k = 64, 4, 5
    ref = nn.Module()
    ref.backbone = nn.Module()
    ref.backbone.patch_embed = nn.Module()
    ref.backbone.patch_embed.projection = nn.Conv2d(3, c, 16, 16)
    ref.backbone.pos_embed = nn.Parameter(torch.randn(1, 1 + g * g, c) * 0.02)
    ref.backbone.cls_token = nn.Parameter(torch.zeros(1, 1, c))
    ref.backbone.layers = nn.ModuleList(_MMCVLayer(c, 2) for _ in range(4))
    ref.auxiliary_head = nn.ModuleList(_official_head(c, 32, 2, k) for _ in range(2))
    ref.decode_head = _official_head(c, 32, 2, k)
    sd = {**ref.state_dict(), "decode_head.loss_decode.criterion.empty_weight": torch.ones(2)}

    model = vit_dtop_tiny(num_classes=k, pos_grid=g, threshold=1.0).eval()
    report = load_mmseg_checkpoint(model, {"meta": {}, "state_dict": sd})
    assert report.missing == [] and report.resized == []
    assert sorted(report.unexpected) == ["backbone.cls_token",
                                         "decode_head.loss_decode.criterion.empty_weight"]
    img = torch.randn(2, 3, g * 16, g * 16)
    with torch.no_grad():
        out = model(img, mode="dense")
        x = ref.backbone.patch_embed.projection(img).flatten(2).transpose(1, 2)
        x = x + ref.backbone.pos_embed[:, 1:]
        feats = []
        for i, layer in enumerate(ref.backbone.layers):
            x = layer(x)
            if i + 1 in model.stage_ends:
                feats.append(x)
        for s, head in enumerate([*ref.auxiliary_head, ref.decode_head]):
            q = head.q.weight.expand(2, -1, -1)
            mem = head.proj_norm(head.input_proj(feats[s]))
            for layer in head.decoder.layers:
                q = layer(q, mem)
            logits = head.decoder.layers[-1].multihead_attn.logits
            torch.testing.assert_close(out.class_logits[s], head.class_embed(q), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(out.mask_logits[s].flatten(2), logits, atol=1e-5,
                                       rtol=1e-5)

    # A backbone-only mmseg checkpoint (no "backbone." prefix) with another position grid.
    bare = {kk.removeprefix("backbone."): v for kk, v in sd.items() if kk.startswith("backbone.")}
    bare["pos_embed"] = torch.randn(1, 1 + 9, c)
    report = load_mmseg_checkpoint(model, bare)
    assert report.resized == ["pos_embed"] and report.unexpected == ["cls_token"]
    assert all(m.startswith("heads.") for m in report.missing) and report.missing
    bad = dict(sd, **{"decode_head.class_embed.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match=r"heads\.2\.class_embed\.weight"):
        load_mmseg_checkpoint(model, bad)


# ---------------------------------------------------------------------- pruning maps
def test_pruning_maps(tmp_path):
    pytest.importorskip("matplotlib")
    from dtop_kernels.models import save_pruning_maps
    from dtop_kernels.models.pruning_maps import main

    model = prunable_model(torch.float32)
    img = images(2, torch.float32)
    with torch.no_grad():
        out = model(img, backend=BACKEND)
    paths = save_pruning_maps(img, out.exit_stage, tmp_path / "maps" / "img",
                              stage_ends=model.stage_ends)
    assert [p.name for p in paths] == ["img_0.png", "img_1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    paths = main(["--out", str(tmp_path / "cli"), "--images", "2", "--size", "64", "96"])
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_pruning_map_colours_are_the_legend_colours(tmp_path):
    """Exit colours are drawn unblended: each head's legend colour fills its tokens' area."""
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    from matplotlib.colors import to_rgb

    from dtop_kernels.models.visualize import EXIT_COLOURS, NEVER_EXITED, save_pruning_maps

    exit_stage = torch.zeros(8, 8, dtype=torch.long)
    exit_stage[:, 4:] = 2  # left half exits at head 0, right half never exits
    (path,) = save_pruning_maps(torch.rand(3, 128, 128), exit_stage, tmp_path / "m",
                                stage_ends=[2, 3, 4])
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).copy())

    def share(colour: str) -> float:
        rgb = torch.tensor([round(255 * c) for c in to_rgb(colour)], dtype=pixels.dtype)
        return float((pixels == rgb).all(1).float().mean())

    assert share(EXIT_COLOURS[0]) > 0.03 and share(NEVER_EXITED) > 0.03
    assert share(EXIT_COLOURS[1]) < 0.01  # head 1: its legend patch only
