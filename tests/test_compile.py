"""torch.compile of packed code: no graph break at fixed capacity, results equal to eager.

The ops are ``torch.library`` custom ops with fake kernels (dtop_kernels/ops/library.py), so
dynamo traces a whole pruned stage, and the whole packed ViT-DToP forward with the exit rule,
without running them. ``aot_eager`` traces the forward and backward graphs exactly as inductor
receives them (fake tensors, functionalization, the registered backward formulas) and runs them
eagerly; one test compiles with inductor (the default backend) end to end.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, backend_params, make_tokens, random_keep

from dtop_kernels import TokenSet, pruned_stage
from dtop_kernels.models import dtop_loss, vit_dtop_tiny
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images
from dtop_kernels.models.vit import Block

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _breaks(fn, *args, **kwargs) -> tuple[int, list[str]]:
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    return ex.graph_break_count, [str(r.reason)[:200] for r in ex.break_reasons]


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("threshold", 0.5)
    return make_heads_confident_(vit_dtop_tiny(**kw)).to(DEVICE)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("dense", [pytest.param(True, id="dense"), pytest.param(False, id="packed")])
def test_pruned_stage_fullgraph(backend, dense, gen):
    b, n, c = 3, 20, 32
    keep = random_keep(b, n, [20, 7, 0], gen)
    tokens = make_tokens(keep, "padded")
    blocks = torch.nn.ModuleList(Block(c, 2) for _ in range(2)).to(DEVICE)
    x = torch.randn(b, n, c, generator=gen).to(DEVICE)
    if not dense:
        x = x.reshape(b * n, c)[torch.where(tokens.valid_slots(), tokens.indices, 0).long()]

    def fn(x, tokens):
        return pruned_stage(x, tokens, blocks, backend=backend)

    count, reasons = _breaks(fn, x, tokens)
    assert count == 0, reasons
    want = fn(x, tokens)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, tokens)
    valid = tokens.valid_slots()
    if not dense:  # padding rows carry no meaning
        got, want = got[valid], want[valid]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_packed_model_fullgraph(backend):
    model = _model().eval()
    img = synthetic_images(3, 96, 80).to(DEVICE)

    def fwd(img):
        return model(img, mode="packed", backend=backend, tighten=False)

    with torch.no_grad():
        count, reasons = _breaks(fwd, img)
        assert count == 0, reasons
        want = fwd(img)
        got = torch.compile(fwd, fullgraph=True, backend="aot_eager")(img)
    counts = want.active_counts
    assert bool((counts[1:] < counts[:1]).any()), "the test needs tokens to exit"
    assert torch.equal(got.active_counts, counts)
    assert torch.equal(got.exit_stage, want.exit_stage)
    torch.testing.assert_close(got.pred, want.pred, atol=1e-5, rtol=1e-5)


def test_packed_model_inductor():
    """The default backend (inductor: generated C++ on the CPU) end to end."""
    model = _model().eval()
    img = synthetic_images(2, 64, 64).to(DEVICE)
    with torch.no_grad():
        want = model(img, mode="packed", tighten=False)
        got = torch.compile(model, fullgraph=True)(img, mode="packed", tighten=False)
    assert torch.equal(got.active_counts, want.active_counts)
    torch.testing.assert_close(got.pred, want.pred, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_compiled_training_step(backend):
    """One training step through the compiled packed forward and its backward graph: the
    gradients of every parameter equal eager's."""
    model = _model(head_attn_drop=0.0).train()
    img = synthetic_images(3, 64, 64, seed=3).to(DEVICE)
    target = torch.randint(0, 5, (3, 64, 64), generator=torch.Generator().manual_seed(0))
    target = target.to(DEVICE)

    def fwd(img):
        return model(img, mode="packed", backend=backend, tighten=False)

    grads = []
    for fn in (fwd, torch.compile(fwd, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        out = fn(img)
        dtop_loss(out, target)["loss"].backward()  # through the compiled backward graph
        counts = out.active_counts
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert bool((counts[1:] < counts[:1]).any()), "the test needs tokens to exit"
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_check_true_inside_compile_is_an_error(gen):
    keep = random_keep(2, 8, [3, 5], gen)
    tokens = TokenSet.from_mask(keep.to(DEVICE), capacity=16)
    blocks = [Block(16, 2).to(DEVICE)]
    x = torch.randn(2, 8, 16, generator=gen).to(DEVICE)

    def fn(x):
        return pruned_stage(x, tokens, blocks, check=True)

    with pytest.raises(Exception, match="validate the TokenSet before the compiled call"):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
