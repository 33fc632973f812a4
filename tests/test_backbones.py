"""ViTDToP.from_timm / from_transformers: a ViT-DToP around a given backbone.

With pruning off the backbone computes what the source model computes (its final tokens before
the final norm); with pruning, the packed mode (torch and Triton backends) equals the loop mode
(the source's own layers run image by image on the kept tokens), prefix tokens never exit,
FLOPs match FlopCounterMode, training reaches the source's weights and checkpoints rebuild
(from plain data, weights-only).

Small random configurations, no network; each test skips without timm / transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from blocks import import_timm, import_transformers
from helpers import backend_params
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dtop_kernels.models import ViTDToP, count_flops, dtop_loss
from dtop_kernels.models.backbones import check_data
from dtop_kernels.models.checkpoint import (
    CheckpointError,
    backbone_config,
    load_model,
    save_checkpoint,
)
from dtop_kernels.models.dtop import paper_stage_ends

C, HEADS, DEPTH, K = 64, 2, 4, 4
H, W = 64, 80  # 4 x 5 patches of 16


def _timm_vit(**kw):
    timm = import_timm()
    kw = {"img_size": 64, "embed_dim": C, "depth": DEPTH, "num_heads": HEADS,
          "dynamic_img_size": True, **kw}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kw).eval()


def _hf(kind: str):
    tf = import_transformers()
    common = {"hidden_size": C, "num_attention_heads": HEADS, "num_hidden_layers": DEPTH,
              "image_size": 64, "patch_size": 16}
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(intermediate_size=96, **common))
    if kind == "deit":
        return tf.DeiTModel(tf.DeiTConfig(intermediate_size=96, **common))
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(layerscale_value=0.5, **common))
    if kind == "dinov2_with_registers":
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            layerscale_value=0.5, num_register_tokens=2, **common))
    if kind == "dinov3":
        if not hasattr(tf, "DINOv3ViTModel"):
            pytest.skip(f"transformers {tf.__version__} has no DINOv3 ViT")
        return tf.DINOv3ViTModel(tf.DINOv3ViTConfig(
            intermediate_size=96, layerscale_value=0.5, num_register_tokens=2,
            use_gated_mlp=True, hidden_act="silu", **common))
    raise AssertionError(kind)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _source_final_tokens(kind: str, src, img):
    """The source's tokens after its last layer, before its final norm: timm's forward_features
    with the norm off; transformers' last hidden state of the layers."""
    if kind.startswith("timm"):
        src = copy.deepcopy(src)
        src.norm = torch.nn.Identity()
        return src.forward_features(img)
    kw = {"interpolate_pos_encoding": True} if kind in ("vit", "deit") else {}
    return src(img, output_hidden_states=True, **kw).hidden_states[-1]


SOURCES = [
    pytest.param("timm", id="timm-cls", marks=pytest.mark.timm),
    pytest.param("timm-reg", id="timm-cls-registers-layerscale", marks=pytest.mark.timm),
    pytest.param("timm-noprefix", id="timm-no-prefix", marks=pytest.mark.timm),
    pytest.param("vit", id="ViT", marks=pytest.mark.transformers),
    pytest.param("deit", id="DeiT", marks=pytest.mark.transformers),
    pytest.param("dinov2", id="Dinov2", marks=pytest.mark.transformers),
    pytest.param("dinov2_with_registers", id="Dinov2WithRegisters",
                 marks=pytest.mark.transformers),
    pytest.param("dinov3", id="DINOv3ViT", marks=pytest.mark.transformers),
]
PREFIX = {"timm": 1, "timm-reg": 3, "timm-noprefix": 0, "vit": 1, "deit": 2, "dinov2": 1,
          "dinov2_with_registers": 3, "dinov3": 3}


def _source(kind: str):
    torch.manual_seed(0)
    if kind == "timm":
        return _randomize(_timm_vit())
    if kind == "timm-reg":
        return _randomize(_timm_vit(reg_tokens=2, init_values=0.5))
    if kind == "timm-noprefix":
        return _randomize(_timm_vit(class_token=False, global_pool="avg"))
    return _randomize(_hf(kind))


def _dtop(kind: str, src, **kw) -> ViTDToP:
    make = ViTDToP.from_timm if kind.startswith("timm") else ViTDToP.from_transformers
    return make(src, num_classes=K, **kw).eval()


def _exit_logits(model: ViTDToP, b: int, seed: int = 0):
    """Confident exit logits for a random 20% (first image) to 70% (last) of the patch tokens at
    every auxiliary head (top_k=1 keeps one per class): a chosen, ragged pruning pattern for
    random weights."""
    gen = torch.Generator().manual_seed(seed)
    n = (H // 16) * (W // 16)
    out = []
    for _ in range(model.num_stages - 1):
        cls = torch.zeros(b, K, 2)
        cls[..., 0] = 10.0
        mask = torch.full((b, K, n), -10.0)
        sure = torch.rand(b, n, generator=gen) < torch.linspace(0.2, 0.7, b)[:, None]
        label = torch.randint(0, K, (b, n), generator=gen)
        mask.scatter_(1, label[:, None], torch.where(sure, 10.0, -10.0)[:, None])
        out.append((cls, mask))
    return out


@pytest.mark.parametrize("kind", SOURCES)
def test_equals_source_without_pruning(kind):
    src = _source(kind)
    model = _dtop(kind, src, threshold=1.0)
    assert model.num_prefix_tokens == PREFIX[kind]
    assert model.stage_ends == (2, 3, 4) and model.threshold == 1.0
    img = torch.randn(2, 3, H, W)
    with torch.no_grad():
        want = _source_final_tokens(kind, src, img)
        got = model.forward_backbone(img)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        dense = model(img, "dense")
        packed = model(img, "packed", backend="torch")
    torch.testing.assert_close(packed.pred, dense.pred, atol=1e-6, rtol=1e-6)
    assert bool((packed.active_counts == 20).all())


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("kind", SOURCES)
def test_packed_equals_loop_with_pruning(kind, backend):
    src = _source(kind)
    model = _dtop(kind, src, threshold=0.5, top_k=1)
    img = torch.randn(3, 3, H, W)
    exits = _exit_logits(model, 3)
    with torch.no_grad():
        loop = model(img, "loop", exit_logits=exits)
        packed = model(img, "packed", backend=backend, exit_logits=exits)
    counts = loop.active_counts
    assert bool((counts[0] == 20).all()) and bool((counts[1:] < 20).all())
    assert any(len(set(c.tolist())) > 1 for c in counts), counts  # ragged
    assert torch.equal(packed.active_counts, counts)
    assert torch.equal(packed.exit_stage, loop.exit_stage)
    torch.testing.assert_close(packed.pred, loop.pred, atol=2e-5, rtol=1e-4)
    for a, b in zip(packed.mask_logits + packed.class_logits,
                    loop.mask_logits + loop.class_logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)  # FlopCounterMode does not count the CPU SDPA kernel


@pytest.mark.parametrize("kind", [SOURCES[1], SOURCES[-1]])
def test_flops_match_flop_counter(kind):
    model = _dtop(kind, _source(kind), threshold=0.5, top_k=1)
    img = torch.randn(3, 3, H, W)
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.no_grad(), FlopCounterMode(display=False,
                                          custom_mapping={sdpa: _cpu_sdpa_flops}) as fc:
        out = model(img, "loop", exit_logits=_exit_logits(model, 3))
    counted = count_flops(model, out.active_counts, (H, W))
    assert float(counted.flops.sum()) == fc.get_total_flops()
    assert bool((counted.saving > 0).all())


@pytest.mark.parametrize("kind", [SOURCES[1], SOURCES[-1]])
def test_training_reaches_the_source_and_packed_grads_equal_loop(kind):
    src = _source(kind)
    model = _dtop(kind, src, threshold=0.5, top_k=1, head_attn_drop=0.0).train()
    img = torch.randn(2, 3, H, W)
    target = torch.randint(0, K, (2, H, W))
    exits = _exit_logits(model, 2, seed=1)
    grads = {}
    for mode in ("loop", "packed"):
        model.zero_grad()
        torch.manual_seed(1)  # the same draw of DINOv3's training-time rotary rescaling
        out = model(img, mode, backend="torch", exit_logits=exits)
        dtop_loss(out, target)["loss"].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert bool((out.active_counts[-1] < 20).all())
    assert grads["packed"].keys() == grads["loop"].keys()
    for n, g in grads["loop"].items():
        torch.testing.assert_close(grads["packed"][n], g, atol=1e-5, rtol=1e-4, msg=n)
    # the weights are shared: the source's own last layer gets the gradients
    last = next(model.blocks[-1].parameters())
    assert any(p is last for p in src.parameters())
    assert last.grad is not None and bool(last.grad.abs().sum() > 0)


def _no_pickled_objects(path) -> None:
    """The file holds tensors and plain data only: it loads weights-only and names no global."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = torch.load(path, weights_only=True)
    check_data(ckpt["config"], "config")  # no module or other object in it


@pytest.mark.parametrize("kind", SOURCES)
def test_checkpoint_rebuilds(kind, tmp_path):
    """The checkpoint describes the backbone as plain data and loads weights-only (no trust
    needed); the rebuilt model computes what the saved one does."""
    model = _dtop(kind, _source(kind), threshold=0.5, top_k=1)
    path = save_checkpoint(tmp_path / "c.pth", model, backbone_config(model), 7)
    _no_pickled_objects(path)
    again, ckpt = load_model(path, threshold=0.6)
    assert ckpt["config"]["backbone"]["source"] == ("timm" if kind.startswith("timm")
                                                    else "transformers")
    assert ckpt["iteration"] == 7 and again.threshold == 0.6 and again.top_k == 1
    assert again.num_prefix_tokens == PREFIX[kind]
    img = torch.randn(2, 3, H, W)
    exits = _exit_logits(model, 2)
    with torch.no_grad():
        a = model(img, "packed", backend="torch", threshold=0.6, exit_logits=exits)
        b = again(img, "packed", backend="torch", exit_logits=exits)
        assert torch.equal(again.forward_backbone(img), model.forward_backbone(img))
    assert torch.equal(a.pred, b.pred)


@pytest.mark.timm
def test_checkpoint_refuses_what_it_cannot_describe():
    """A timm model its VisionTransformer arguments do not rebuild fails at save time, saying
    what differs and what to do instead."""
    vit = _timm_vit()
    vit.blocks[2].norm1.eps = 1e-3
    model = _dtop("timm", vit)
    with pytest.raises(ValueError, match=r"blocks\.2\.norm1: settings .*'eps': 0\.001.* save its "
                       r"state dict .*from_timm / from_transformers yourself"):
        backbone_config(model)
    vit = _timm_vit()
    for block in vit.blocks:
        block.mlp.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match=r"MLP activation GELU\(approximate='tanh'\) has no "
                       "timm name"):
        backbone_config(_dtop("timm", vit))


@pytest.mark.transformers
def test_checkpoint_builds_only_described_classes(tmp_path):
    """A file naming another class or source is refused before anything is built from it;
    a transformers model class of the user's own is refused at save time."""
    tf = import_transformers()

    class MyViT(tf.ViTModel):
        pass

    with pytest.raises(ValueError, match=r"MyViT is not a model class of the transformers "
                       "package"):
        backbone_config(_dtop("vit", MyViT(_hf("vit").config)))
    model = _dtop("vit", _hf("vit"))
    config = backbone_config(model)
    for bad in ({"class": "BertModel"}, {"class": "os.system"}, {"class": "AutoTokenizer"},
                {"source": "pickle"}, {"dtype": "int64"}, {"dtype": ["float32"]}):
        path = save_checkpoint(tmp_path / "bad.pth", model,
                               {**config, "backbone": {**config["backbone"], **bad}}, 1)
        with pytest.raises(CheckpointError, match="cannot build its model"):
            load_model(path)


@pytest.mark.parametrize("p", [0, 1, 3])
def test_token_set_with_prefix(p):
    """The prefixed set equals the one built from the mask with the prefix tokens kept, and the
    slot map puts every row of the original set on its token's row in it."""
    from dtop_kernels import TokenSet

    gen = torch.Generator().manual_seed(p)
    keep = torch.rand(4, 9, generator=gen) < 0.5
    keep[1] = False
    keep[2] = True
    ts = TokenSet.from_mask(keep, capacity=30)  # padding slots too
    full, slots = ts.with_prefix(p)
    want = TokenSet.from_mask(torch.cat([torch.ones(4, p, dtype=torch.bool), keep], 1))
    t = int(want.cu_seqlens[-1])
    assert torch.equal(full.cu_seqlens, want.cu_seqlens) and full.seq_len == 9 + p
    assert torch.equal(full.indices[:t], want.indices) and bool((full.indices[t:] == -1).all())
    assert full.capacity == 30 + 4 * p and full.max_seqlen == ts.max_seqlen + p
    valid = ts.valid_slots()
    n_old, n_new = ts.indices[valid].long(), full.indices[slots[valid]].long()
    assert torch.equal(n_new // (9 + p), n_old // 9) and torch.equal(n_new % (9 + p) - p,
                                                                        n_old % 9)
    assert bool((slots[~valid] >= t).all()) and len(set(slots.tolist())) == 30


def test_paper_stage_ends():
    assert paper_stage_ends(12) == (6, 8, 12) and paper_stage_ends(24) == (8, 16, 24)
    assert paper_stage_ends(6) == (3, 4, 6) and paper_stage_ends(2) == (1, 2)
    assert paper_stage_ends(1) == (1,) and paper_stage_ends(40) == (13, 27, 40)


@pytest.mark.timm
def test_from_timm_refuses():
    with pytest.raises(TypeError, match="from_timm takes a timm VisionTransformer"):
        ViTDToP.from_timm(torch.nn.Linear(4, 4), num_classes=K)
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        ViTDToP.from_timm(_timm_vit(patch_drop_rate=0.5), num_classes=K)
    vit = _timm_vit()
    vit.blocks[1] = torch.nn.Linear(C, C)
    with pytest.raises(TypeError, match="backbone layer 1: block has no `norm1`"):
        ViTDToP.from_timm(vit, num_classes=K)


@pytest.mark.transformers
def test_from_transformers_refuses():
    tf = import_transformers()
    bert = tf.BertModel(tf.BertConfig(hidden_size=C, num_attention_heads=HEADS,
                                      num_hidden_layers=1))
    with pytest.raises(TypeError, match="BertLayer, which pruned_block does not know"):
        ViTDToP.from_transformers(bert, num_classes=K)
    model = _hf("dinov2")
    model.encoder.layer[2].adapter = torch.nn.Linear(C, C)  # not what Dinov2Layer holds
    with pytest.raises(TypeError, match=r"layer 2: layer\.adapter is a submodule"):
        ViTDToP.from_transformers(model, num_classes=K)


TRAIN_KINDS = [pytest.param("timm-reg", id="timm", marks=pytest.mark.timm),
               pytest.param("dinov2", id="Dinov2", marks=pytest.mark.transformers)]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from dtop_kernels.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=4, val=2, num_classes=K, seed=3, height=(60, 72),
                            width=(64, 90))
    return root


@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_train_command_trains_a_model_around_its_own_backbone(kind, train_data, tmp_path):
    """``dtop-train --init FILE`` with a checkpoint of a from_timm / from_transformers model
    trains that model: the file sets the model (threshold replaced only when given), training
    moves the source's weights, the checkpoints rebuild it, ``--resume`` continues it exactly,
    and options that would contradict the file are refused."""
    pytest.importorskip("PIL")
    from dtop_kernels.evaluate import main as evaluate_main
    from dtop_kernels.models.backbones import TimmStem, TransformersStem
    from dtop_kernels.models.checkpoint import read_checkpoint
    from dtop_kernels.train import main as train_main

    model = _dtop(kind, _source(kind), threshold=0.5)
    init = save_checkpoint(tmp_path / "init.pth", model, backbone_config(model), 0)
    common = ["--data", str(train_data), "--crop", "64", "--scale", "128", "64",
              "--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "1", "--workers", "0",
              "--log-interval", "1", "--quiet", "--iters", "3", "--dense-iters", "1",
              "--ckpt-interval", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_main(["--out", str(a), "--init", str(init), *common])
    trained, ckpt = load_model(a / "final.pth")
    stem = TimmStem if kind.startswith("timm") else TransformersStem
    assert isinstance(trained.patch_embed, stem)
    assert ckpt["config"] == backbone_config(trained)
    assert trained.threshold == 0.5 and trained.num_prefix_tokens == PREFIX[kind]
    before = model.state_dict()
    moved = [k for k, v in trained.state_dict().items()
             if k.startswith("blocks.") and not torch.equal(v, before[k])]
    assert moved, "training left the source's layers as they were"

    # --resume continues the run exactly: the weights and optimizer of the uninterrupted run
    train_main(["--out", str(b), "--resume", str(a / "iter_1.pth"), *common])
    ra, rb = read_checkpoint(a / "final.pth"), read_checkpoint(b / "final.pth")
    for k, v in ra["model"].items():
        assert torch.equal(v, rb["model"][k]), k

    # the file's threshold is replaced only when --threshold is given
    c = tmp_path / "c"
    train_main(["--out", str(c), "--init", str(init), "--threshold", "0.7", *common[:-6],
                "--iters", "1", "--ckpt-interval", "1"])
    assert read_checkpoint(c / "final.pth")["config"]["overrides"]["threshold"] == 0.7

    # the evaluation command takes the trained checkpoint
    evaluate_main(["--checkpoint", str(a / "final.pth"), "--data", str(train_data),
                   "--thresholds", "0.5", "--latency-images", "0", "--json",
                   str(tmp_path / "e.json")])

    for extra, match in [(["--arch", "tiny"], "drop --arch tiny"),
                         (["--pos-grid", "8"], "drop --pos-grid 8"),
                         (["--num-classes", str(K + 1)], f"has {K} classes, the data set {K + 1}"),
                         (["--crop", "72"], "not a multiple of the model's patch size 16")]:
        with pytest.raises(SystemExit, match=match):
            train_main(["--out", str(tmp_path / "d"), "--init", str(init), *common, *extra])


COMPILE_KINDS = [p for p in SOURCES if p.values[0] in ("timm-reg", "dinov2_with_registers",
                                                        "dinov3")]


@pytest.mark.parametrize("kind", COMPILE_KINDS)
def test_packed_forward_compiles_in_one_graph(kind):
    """torch.compile traces the packed forward of a model around a timm / transformers
    backbone with no graph break at fixed capacity (the layers' checks are constants of the
    trace), and the compiled forward computes what eager does."""
    model = _dtop(kind, _source(kind), threshold=0.6, top_k=1)
    img = torch.randn(3, 3, H, W)
    exits = _exit_logits(model, 3)

    def fwd(img):
        return model(img, "packed", backend="torch", tighten=False, exit_logits=exits)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ex = torch._dynamo.explain(fwd)(img)
            assert ex.graph_break_count == 0, [str(r.reason)[:300] for r in ex.break_reasons]
            want = fwd(img)
            got = torch.compile(fwd, fullgraph=True, backend="aot_eager")(img)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got.active_counts, want.active_counts)
    assert bool((want.active_counts[1:] < want.active_counts[:1]).any())
    torch.testing.assert_close(got.pred, want.pred, atol=1e-5, rtol=1e-5)
