"""The host side of every CUDA path, run on the CPU with fake CUDA tensors (tests/fake_cuda.py).

Run by ``python tests/fake_cuda.py`` (a CUDA build of torch; CI uses torch 2.14.1): the packed
ViT-DToP forward and backward at fixed capacity on every backend with the kernels' launches
recorded, the dtop ops' real implementations, capture_forward's preparation, tighten, the
measured auto order, the public ops' checks and dispatch, and dynamo tracing as on sm_80 and
sm_90, each under a check that fails on any op that would make the host wait for the device.
Values are never computed: what the kernels compute is tested elsewhere (and on a GPU).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from fake_cuda import (
    ARCHS,
    HostSync,
    HostSyncCheck,
    available,
    backward,
    fake_cuda,
    moved_to_device,
    on_device,
)

from dtop_kernels import TokenSet, gather_tokens
from dtop_kernels.backends import dispatcher
from dtop_kernels.models import graphs, vit_dtop_tiny

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ARCH_PARAMS = [pytest.param(a, id=f"sm_{a[0]}{a[1]}") for a in ARCHS]
# the CUDA tensor-core kernels take float16 / bfloat16; the others run in every dtype
BACKENDS = [pytest.param("torch", torch.float32, id="torch"),
            pytest.param("triton", torch.float16, id="triton"),
            pytest.param("cuda", torch.float16, id="cuda"),
            pytest.param("auto", torch.bfloat16, id="auto")]
# the kernels each backend's packed forward and backward must launch (not their fakes)
KERNELS = {
    "triton": {"_gather_kernel", "_scatter_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel",
               "_linear_kernel", "_linear_dw_kernel", "_fwd_kernel", "_bwd_dkdv_kernel",
               "_bwd_dq_kernel", "_logits_kernel", "_score_kernel", "_rank_kernel"},
    "cuda": {"gather_rows", "scatter_rows", "layernorm_fwd", "layernorm_bwd", "linear_fwd",
             "linear_bwd_input", "attention_fwd", "attention_bwd", "attention_head_mean_logits",
             "dtop_select"},
}


def _model(dtype: torch.dtype):
    # head width 64: head dim 32, which the CUDA attention kernels are compiled for; no
    # attention dropout, which only the torch backend has
    return on_device(lambda: vit_dtop_tiny(threshold=0.5, head_width=64, head_attn_drop=0.0),
                     dtype)


def _image(dtype: torch.dtype, batch: int = 2) -> torch.Tensor:
    # 96 x 96: the tiny model's 6 x 6 position grid as it is (no resize)
    return torch.empty(batch, 3, 96, 96, device="cuda", dtype=dtype)


# ---------------------------------------------------------------------- the check itself
@pytest.mark.parametrize("name", ["item", "bool", "nonzero", "mask index", "to cpu",
                                  "from cpu", "cpu operand", "setitem scalar"])
def test_check_catches_each_kind_of_sync(name):
    cases = {
        "item": lambda x, i: x.sum().item(),
        "bool": lambda x, i: bool(x.sum() > 0),
        "nonzero": lambda x, i: x.nonzero(),
        "mask index": lambda x, i: x[x > 0],
        "to cpu": lambda x, i: x.cpu(),
        "from cpu": lambda x, i: torch.ones(3).to(x.device),
        "cpu operand": lambda x, i: x.index_select(0, torch.arange(2)),
        "setitem scalar": lambda x, i: x.__setitem__(i, 1.0),
    }
    with fake_cuda(check=False):
        x = torch.empty(4, device="cuda")
        idx = torch.zeros(2, dtype=torch.long, device="cuda")
        with pytest.raises(HostSync), HostSyncCheck():
            cases[name](x, idx)


def test_check_passes_device_only_work():
    with fake_cuda() as launches:
        x = torch.empty(4, 3, device="cuda")
        i = torch.zeros(2, dtype=torch.long, device="cuda")
        y = (x[i] * 2 + 1).relu().sum(0)  # scalars as kernel arguments are fine
        x.index_fill_(0, i, 0.0)
        assert y.device.type == "cuda" and not launches


# ---------------------------------------------------------------------- finding 1
def test_dense_mask_makes_no_host_sync():
    """``flat[idx] = True`` copied a CPU scalar to the device with a stream sync."""
    with fake_cuda(check=False):
        keep = torch.empty(2, 10, dtype=torch.bool, device="cuda")
        tokens = TokenSet.from_mask(keep, capacity=20)
        with HostSyncCheck():
            mask = tokens.keep_mask()
            exits = tokens.dense_mask(tokens.valid_slots())
    assert mask.shape == exits.shape == (2, 10)


# ---------------------------------------------------------------------- the packed model
@pytest.mark.parametrize("arch", ARCH_PARAMS)
@pytest.mark.parametrize("backend, dtype", BACKENDS)
def test_packed_forward_and_backward_make_no_host_sync(arch, backend, dtype):
    """Fixed capacity (tighten=False): blocks, heads, exit rule, canvas and every backward
    formula stay on the device; the kernel backends launch their kernels (the ops ran their
    real implementations, not their fakes) and every parameter gets a gradient."""
    with fake_cuda(arch, check=False) as launches:
        model = _model(dtype).train()
        img = _image(dtype)
        with HostSyncCheck():
            out = model(img, mode="packed", backend=backend, tighten=False)
            loss = out.pred.float().sum() + sum(c.float().sum() for c in out.class_logits)
            backward(loss)
        missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert out.pred.shape == (2, model.num_classes, 96, 96)
    assert not missing, missing
    if backend in KERNELS:
        assert KERNELS[backend] <= launches.names(backend), \
            sorted(KERNELS[backend] - launches.names(backend))
    else:  # "auto" without a measured order: the verified torch backend, no kernel launches
        assert not launches


def test_default_capacity_on_cuda_reads_back_by_design():
    """The packed forward's default on CUDA tightens each stage to a 64-row bucket: one
    deliberate read-back per stage (a GPU no-sync test must pass tighten=False)."""
    with fake_cuda(check=False):
        model = _model(torch.float32).eval()
        img = _image(torch.float32)
        with torch.no_grad(), pytest.raises(HostSync, match="_to_copy|_local_scalar"), \
                HostSyncCheck():
            model(img, mode="packed", backend="torch")


def test_tighten_is_one_read_back():
    with fake_cuda(check=False):
        tokens = TokenSet.from_mask(torch.empty(2, 10, dtype=torch.bool, device="cuda"),
                                    capacity=20)
        with pytest.raises(HostSync, match="host and the device"), HostSyncCheck():
            tokens.tighten(8)


# ---------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("backend, dtype", BACKENDS)
def test_capture_forward_preparation(backend, dtype, monkeypatch):
    """capture_forward's buffers, warm-up and capture; the captured region may not sync (a
    real capture fails there) and a replay only copies the input in."""
    monkeypatch.setattr(graphs, "graph_reason", lambda device: None)
    with fake_cuda(check=False) as launches:
        model = _model(dtype).eval()
        fwd = graphs.capture_forward(model, 2, 96, backend=backend)
        assert fwd.graphed
        n = len(launches)
        with HostSyncCheck():
            out = fwd(_image(dtype))
    assert fwd.graph.replays == 1 and len(launches) == n  # replayed, not run again
    assert out.pred.shape == (2, model.num_classes, 96, 96)


# ---------------------------------------------------------------------- dispatch
def _table(tmp_path, arch: str) -> str:
    order = {"gather_tokens": ["triton", "torch"], "scatter_tokens": ["cuda", "torch"],
             "layer_norm": ["triton", "torch"], "packed_linear": ["cuda", "torch"],
             "varlen_attention": ["triton", "cuda", "torch"],
             "dtop_select": ["cuda", "triton", "torch"]}
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"format": 1, "gpus": {arch: {
        "device": "test", "torch": torch.__version__, "date": "test", "order": order}}}))
    return str(path)


def test_auto_follows_the_measured_order_of_the_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOP_AUTO_ORDER", _table(tmp_path, "sm_90"))
    for arch, want in (((9, 0), ("triton", "cuda")), ((8, 0), ("torch", "torch"))):
        with fake_cuda(arch):
            x = torch.empty(2, 10, 8, device="cuda", dtype=torch.float16)
            tokens = TokenSet.all_active(2, 10, device="cuda")
            packed = torch.empty(20, 8, device="cuda", dtype=torch.float16)
            got = (dispatcher("gather_tokens").select("auto", x, tokens),
                   dispatcher("scatter_tokens").select("auto", packed, tokens, None))
        assert got == want, arch


def test_public_op_checks_and_dispatch_on_cuda():
    """Bad input raises the op's own error before anything runs; the checked mode (one
    deliberate read-back) is the only sync; the unchecked call makes none."""
    with fake_cuda(check=False) as launches:
        x = torch.empty(2, 10, 8, device="cuda", dtype=torch.float16)
        tokens = TokenSet.all_active(2, 10, device="cuda")
        with HostSyncCheck():
            with pytest.raises(ValueError, match="device"):
                gather_tokens(x, TokenSet.all_active(2, 10))  # tokens on the CPU
            packed = gather_tokens(x, tokens, backend="cuda")
        with pytest.raises(HostSync), HostSyncCheck():
            gather_tokens(x, tokens, backend="cuda", check=True)
    assert packed.shape == (20, 8) and launches.names("cuda") == {"gather_rows"}


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("arch", ARCH_PARAMS)
@pytest.mark.parametrize("measured", [pytest.param(False, id="shipped-table"),
                                      pytest.param(True, id="measured-table")])
def test_dynamo_traces_the_packed_forward_in_one_graph(arch, measured, tmp_path, monkeypatch):
    """``backend="auto"`` at fixed capacity: one graph, no break (the auto order's table
    lookup is a constant of the trace), the ops the measured order picks in it."""
    from torch.utils._python_dispatch import _disable_current_modes

    if measured:
        monkeypatch.setenv("DTOP_AUTO_ORDER", _table(tmp_path, f"sm_{arch[0]}{arch[1]}"))
    graphs_seen = []

    class Traced(Exception):
        pass

    def capture(gm, example_inputs):
        graphs_seen.append(gm)
        raise Traced

    with fake_cuda(arch, check=False):
        model = _model(torch.float16).eval()
        img = _image(torch.float16)

        def fwd(img):
            return model(img, mode="packed", backend="auto", tighten=False)

        torch._dynamo.reset()
        try:
            with torch.no_grad(), _disable_current_modes():  # dynamo fakes the inputs itself
                with pytest.raises(Exception) as err:
                    torch.compile(fwd, fullgraph=True, backend=capture)(img)
        finally:
            torch._dynamo.reset()
    assert len(graphs_seen) == 1, str(err.value)[:2000]
    backends = {n.args[-1] for n in graphs_seen[0].graph.nodes
                if n.op == "call_function" and str(n.target).startswith("dtop_py.")}
    if measured:  # the measured kernels (torch where a kernel backend cannot take a call)
        assert {"triton", "cuda"} <= backends <= {"triton", "cuda", "torch"}, backends
    else:
        assert backends == {"torch"}


# ---------------------------------------------------------------------- your own ViT
def _own_backbone(kind: str):
    """A tiny ViT-DToP around a timm / transformers backbone (test_backbones' sizes), built on
    the CPU: their constructors read values back, which fake tensors cannot."""
    from test_backbones import _hf, _timm_vit

    from dtop_kernels.models import ViTDToP

    kw = {"num_classes": 4, "threshold": 0.5, "head_attn_drop": 0.0}  # as _model
    if kind == "timm":
        return ViTDToP.from_timm(_timm_vit(reg_tokens=2, init_values=0.5), **kw)
    return ViTDToP.from_transformers(_hf(kind), **kw)


OWN = [pytest.param("timm", marks=pytest.mark.timm, id="timm"),
       pytest.param("dinov2_with_registers", marks=pytest.mark.transformers,
                    id="Dinov2WithRegisters"),
       pytest.param("dinov3", marks=pytest.mark.transformers, id="DINOv3ViT")]


@pytest.mark.parametrize("kind", OWN)
@pytest.mark.parametrize("backend, dtype", [BACKENDS[0], BACKENDS[1]])
def test_own_backbone_packed_forward_backward_and_capture(kind, backend, dtype, monkeypatch):
    """A model around a timm or transformers backbone: the packed forward and backward at
    fixed capacity make no host sync (prefix tokens, rotary positions of the kept tokens
    included) and capture_forward captures it, a replay only copying the input in."""
    monkeypatch.setattr(graphs, "graph_reason", lambda device: None)
    cpu_model = _own_backbone(kind)
    with fake_cuda(check=False) as launches:
        model = moved_to_device(cpu_model, dtype).train()
        img = torch.empty(2, 3, 64, 80, device="cuda", dtype=dtype)
        with HostSyncCheck():
            out = model(img, mode="packed", backend=backend, tighten=False)
            loss = out.pred.float().sum() + sum(c.float().sum() for c in out.class_logits)
            backward(loss)
        # transformers' mask token only serves masked-image pre-training
        missing = [n for n, p in model.named_parameters()
                   if p.grad is None and not n.endswith("mask_token")]
        model.eval()
        fwd = graphs.capture_forward(model, 2, (64, 80), backend=backend)
        n = len(launches)
        with HostSyncCheck():
            again = fwd(img)
    assert out.pred.shape == (2, 4, 64, 80) and again.pred.shape == (2, 4, 64, 80)
    assert not missing, missing
    assert fwd.graphed and fwd.graph.replays == 1 and len(launches) == n
    if backend in KERNELS:
        assert launches.names(backend) & {"_fwd_kernel", "_linear_kernel"}


# ---------------------------------------------------------------------- export on a GPU
@pytest.mark.parametrize("backend, dtype", [BACKENDS[0], BACKENDS[1], BACKENDS[2]])
def test_export_on_cuda_calls_package_ops_only(backend, dtype):
    """torch.export of the packed forward on (fake) CUDA tensors with a dynamic batch, as
    ``dtop_kernels.export`` traces it: the graph calls the op library's dtop:: ops (torch, cuda
    backends) or the Triton backend's triton_ops (dtop_triton::), never a Python-only dtop_py::
    op. (The op library's CUDA kernels are not needed to trace: the ops' fakes are.)"""
    from dtop_kernels.deploy import PackedForward
    from dtop_kernels.ops import library, native

    try:
        native.load()
    except native.OpsLibraryError as e:
        if os.environ.get("DTOP_REQUIRE_OPS_LIBRARY"):
            raise
        pytest.skip(str(e))
    with fake_cuda((8, 0), check=False):
        module = PackedForward(_model(dtype).eval(), None, backend)
        batch = torch.export.Dim("batch", min=1, max=16)
        with torch.no_grad(), library.native_ops():
            prog = torch.export.export(module, (_image(dtype),), dynamic_shapes=({0: batch},),
                                       strict=False)
    ns = {str(n.target).split(".")[0] for n in prog.graph.nodes if n.op == "call_function"
          and str(n.target).startswith("dtop")}
    ops = {str(n.target).split(".")[1] for n in prog.graph.nodes if n.op == "call_function"
           and str(n.target).startswith("dtop")}
    assert ns == {"dtop_triton" if backend == "triton" else "dtop"}, ns
    want = {"scatter", "select", "varlen_attention"}
    if backend != "torch":  # the kernel backends run the blocks' ops too
        want |= {"layer_norm", "packed_linear"}  # gathers fused into their loads
    assert want <= ops, sorted(want - ops)
