"""pruned_block on transformers' own layers, as they are: ViT, DeiT, DINOv2 (with registers,
SwiGLU) and DINOv3 (rotary embeddings, gated MLP) match the layer's own forward run image by
image on the kept tokens (forward and input gradient, float64 references), on the torch and
Triton backends; layers or settings the packed path cannot honour raise, naming the attribute.

Needs transformers (skipped without it); small random configurations, no network."""

from __future__ import annotations

import copy

import pytest
import torch
from blocks import import_transformers
from helpers import backend_params

from dtop_kernels import TokenSet, pruned_block, pruned_stage

pytestmark = pytest.mark.transformers

C, H, P, GRID = 32, 4, 3, (4, 5)  # P prefix tokens (class + 2 registers) before 4 x 5 patches
N = P + GRID[0] * GRID[1]


def _layer(kind: str, **kw) -> torch.nn.Module:
    tf = import_transformers()
    common = {"hidden_size": C, "num_attention_heads": H, "num_hidden_layers": 1}
    if kind == "vit":
        cfg, mod = tf.ViTConfig(intermediate_size=48, **common, **kw), tf.models.vit.modeling_vit
        return mod.ViTLayer(cfg)
    if kind == "deit":
        cfg = tf.DeiTConfig(intermediate_size=48, **common, **kw)
        return tf.models.deit.modeling_deit.DeiTLayer(cfg)
    if kind in ("dinov2", "dinov2_with_registers"):
        cls = tf.Dinov2Config if kind == "dinov2" else tf.Dinov2WithRegistersConfig
        cfg = cls(mlp_ratio=2, layerscale_value=0.7, **common, **kw)
        mod = tf.models.dinov2.modeling_dinov2 if kind == "dinov2" else \
            tf.models.dinov2_with_registers.modeling_dinov2_with_registers
        return (mod.Dinov2Layer if kind == "dinov2" else mod.Dinov2WithRegistersLayer)(cfg)
    if kind == "dinov3":
        cfg = _dinov3_config(**kw)
        return _dinov3().DINOv3ViTLayer(cfg)
    raise AssertionError(kind)


def _dinov3():
    tf = import_transformers()
    try:
        from transformers.models.dinov3_vit import modeling_dinov3_vit
    except ImportError:
        pytest.skip(f"transformers {tf.__version__} has no DINOv3 ViT")
    return modeling_dinov3_vit


def _dinov3_config(**kw):
    _dinov3()
    import transformers

    return transformers.DINOv3ViTConfig(
        hidden_size=C, num_attention_heads=H, num_hidden_layers=1, intermediate_size=40,
        layerscale_value=0.7, num_register_tokens=P - 1, patch_size=4,
        image_size=(4 * GRID[0], 4 * GRID[1]), **kw)


def _rope(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own rotary embedding of the GRID patches: (cos, sin) [N - P, D]."""
    rope = _dinov3().DINOv3ViTRopePositionEmbedding(cfg)
    return rope(torch.zeros(1, 3, 4 * GRID[0], 4 * GRID[1]))


def _randomize(layer: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))
    return layer


LAYERS = [
    pytest.param("vit", {}, id="ViTLayer"),
    pytest.param("vit", {"qkv_bias": False, "hidden_act": "gelu_new"}, id="ViTLayer-nobias-tanh"),
    pytest.param("deit", {}, id="DeiTLayer"),
    pytest.param("dinov2", {}, id="Dinov2Layer"),
    pytest.param("dinov2", {"use_swiglu_ffn": True}, id="Dinov2Layer-swiglu"),
    pytest.param("dinov2_with_registers", {}, id="Dinov2WithRegistersLayer"),
    pytest.param("dinov3", {}, id="DINOv3ViTLayer"),
    pytest.param("dinov3", {"use_gated_mlp": True, "hidden_act": "silu", "query_bias": False},
                 id="DINOv3ViTLayer-gated"),
]


def _per_image(layer, x, keep, rope):
    """The layer's own forward, image by image, on the kept tokens (inactive rows unchanged);
    a rotary layer gets the rows of its kept patches (the prefix tokens are always kept)."""
    out = x.clone()
    for b in range(x.shape[0]):
        if not bool(keep[b].any()):
            continue
        kw = {}
        if rope is not None:
            kp = keep[b, P:]
            kw["position_embeddings"] = (rope[0][kp], rope[1][kp])
        out[b, keep[b]] = layer(x[b, keep[b]][None], **kw)[0]
    return out


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("kind,kw", LAYERS)
def test_matches_layer_per_image(kind, kw, backend):
    layer = _randomize(_layer(kind, **kw)).eval()
    rope = _rope(layer.attention.config) if kind == "dinov3" else None
    b = 4
    keep = torch.rand(b, N) < 0.5
    keep[:, :P] = True  # prefix tokens never exit
    keep[1] = True
    keep[2, P:] = False  # prefix tokens only
    keep[3, P:P + 2] = False  # the first patches gone: later ones keep their own positions
    keep[3, -1] = True
    ts = TokenSet.from_mask(keep, capacity=b * N)
    x = torch.randn(b, N, C, requires_grad=True)
    out = pruned_block(x, ts, layer, position_embeddings=rope, backend=backend)
    xd = x.detach().double().requires_grad_()
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    ref = _per_image(copy.deepcopy(layer).double(), xd, keep, rope64)
    assert torch.equal(out[~keep], x[~keep])
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    g = torch.randn(b, N, C)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_dinov3_stage_packed_positions(backend):
    """A two-layer DINOv3 stage on packed rows of a tight set: each kept patch keeps its own
    rotary position, whatever slot it lands in."""
    cfg = _dinov3_config()
    layers = [_randomize(_dinov3().DINOv3ViTLayer(cfg)).eval() for _ in range(2)]
    rope = _rope(cfg)
    keep = torch.rand(3, N) < 0.4
    keep[:, :P] = True
    ts = TokenSet.from_mask(keep)
    x = torch.randn(3, N, C)
    packed = x.reshape(-1, C)[ts.indices.long()]
    with torch.no_grad():
        out = pruned_stage(packed, ts, layers, position_embeddings=rope, backend=backend)
        ref = x.double()
        for layer in layers:
            ref = _per_image(copy.deepcopy(layer).double(), ref, keep,
                             tuple(t.double() for t in rope))
    torch.testing.assert_close(out.double(), ref.reshape(-1, C)[ts.indices.long()],
                               atol=2e-4, rtol=2e-4)


def _case():
    keep = torch.ones(2, N, dtype=torch.bool)
    return TokenSet.from_mask(keep), torch.randn(2, N, C)


def test_rotary_layer_needs_positions():
    ts, x = _case()
    with pytest.raises(ValueError, match="position_embeddings=\\(cos, sin\\)"):
        pruned_block(x, ts, _layer("dinov3").eval(), backend="torch")
    cos, sin = _rope(_dinov3_config())
    with pytest.raises(ValueError, match=r"\[N_patches, D\]"):
        pruned_block(x, ts, _layer("dinov3").eval(), position_embeddings=(cos[:, :4], sin),
                     backend="torch")
    with pytest.raises(ValueError, match="no layer of the stage applies rotary"):
        pruned_block(x, ts, _layer("vit").eval(), position_embeddings=(cos, sin),
                     backend="torch")


REFUSED = [
    pytest.param(lambda: _layer("vit", hidden_dropout_prob=0.1).train(), ValueError,
                 r"layer\.dropout drops with p=0\.1", id="vit-hidden-dropout-training"),
    pytest.param(lambda: _layer("vit", attention_probs_dropout_prob=0.1).train(), ValueError,
                 r"layer\.attention\.attention_dropout = 0\.1", id="vit-attention-dropout"),
    pytest.param(lambda: _layer("dinov2", drop_path_rate=0.2).train(), ValueError,
                 r"layer\.drop_path drops with p=0\.2", id="dinov2-drop-path-training"),
]


@pytest.mark.parametrize("make,err,match", REFUSED)
def test_refuses_training_dropout(make, err, match):
    ts, x = _case()
    with pytest.raises(err, match=match):
        pruned_block(x, ts, make(), backend="torch")


def test_refuses_unknown_or_changed_layers():
    tf = import_transformers()
    ts, x = _case()
    vit = tf.models.vit.modeling_vit

    class Custom(vit.ViTLayer):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs) * 2

    with pytest.raises(TypeError, match="forward is overridden"):
        pruned_block(x, ts, Custom(_layer("vit").attention.config).eval(), backend="torch")
    layer = _layer("dinov2").eval()
    layer.extra = torch.nn.Linear(C, C)
    with pytest.raises(TypeError, match=r"layer\.extra is a submodule"):
        pruned_block(x, ts, layer, backend="torch")
    bert = tf.models.bert.modeling_bert.BertLayer(tf.BertConfig(hidden_size=C,
                                                                num_attention_heads=H))
    with pytest.raises(TypeError, match="BertLayer, which pruned_block does not know"):
        pruned_block(x, ts, bert.eval(), backend="torch")
