"""capture_forward: the ViT-DToP forward in a CUDA graph. On the CPU: argument checks and the
eager stand-in; on a GPU (marked): replays equal the eager forward for new images and new
pruning patterns, every backend that can run."""

from __future__ import annotations

import warnings

import pytest
import torch

from dtop_kernels import BackendError
from dtop_kernels.models import capture_forward, vit_dtop_tiny
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images

H, W = 128, 96


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return make_heads_confident_(vit_dtop_tiny(num_classes=5, threshold=0.5)).to(
        device, dtype).eval()


def _close(a, b, atol):
    torch.testing.assert_close(a.pred, b.pred, atol=atol, rtol=0)
    for x, y in zip(a.class_logits + a.mask_logits, b.class_logits + b.mask_logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert torch.equal(a.active_counts, b.active_counts)
    assert torch.equal(a.exit_stage, b.exit_stage)


def test_argument_checks():
    model = _model()
    with pytest.raises(ValueError, match="mode must be one of"):
        capture_forward(model, 2, 128, mode="loop")
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        capture_forward(model, 2, (128, 100))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        capture_forward(model, 0, 128)
    with pytest.raises(ValueError, match="warmup"):
        capture_forward(model, 2, 128, warmup=0)
    with pytest.raises(TypeError, match="ViTDToP"):
        capture_forward(torch.nn.Linear(2, 2), 2, 128)
    with pytest.raises(ValueError, match="model.eval"):
        capture_forward(_model().train(), 2, 128)


def test_cpu_fallback_runs_eager_with_the_same_contract():
    model = _model()
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        capture_forward(model, 2, (H, W), fallback=False)
    fwd = capture_forward(model, 2, (H, W), backend="torch")
    assert not fwd.graphed and "CUDA device" in fwd.reason
    img = synthetic_images(2, H, W, seed=3)
    with torch.no_grad():
        _close(fwd(img), model(img, mode="packed", backend="torch"), atol=0)
    with pytest.raises(ValueError, match=r"img must be shape \(2, 3, 128, 96\)"):
        fwd(synthetic_images(3, H, W))
    with pytest.raises(ValueError, match="exit_logits must be given exactly"):
        fwd(img, [(torch.zeros(2, 5, 2), torch.zeros(2, 5, 48))] * 2)


def test_cpu_fallback_with_exit_logits():
    model = _model()
    fwd = capture_forward(model, 2, (H, W), exit_logits=True, upsample=False)
    img = synthetic_images(2, H, W, seed=4)
    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(2, 5, 2, generator=g), 6 * torch.randn(2, 5, 48, generator=g))
              for _ in range(2)]
    with torch.no_grad():
        want = model(img, mode="packed", exit_logits=logits, upsample=False)
    _close(fwd(img, logits), want, atol=0)
    assert want.pred.shape == (2, 5, H // 16, W // 16)
    with pytest.raises(ValueError, match="needs 2"):
        fwd(img, logits[:1])


# ---------------------------------------------------------------------- GPU
DTYPES = [pytest.param(torch.float16, 2e-2, id="fp16"), pytest.param(torch.float32, 1e-3,
                                                                       id="fp32")]


def _captured(model, backend, **kw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return capture_forward(model, 2, (H, W), backend=backend, **kw)
    except BackendError as e:
        pytest.skip(f"backend {backend!r} cannot run here:\n{e}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_packed_replay_equals_eager(backend, dtype, atol):
    model = _model("cuda", dtype)
    fwd = _captured(model, backend)
    assert fwd.graphed
    counts = set()
    for seed in (5, 6, 7):  # new images: new pruning, inside the graph
        img = synthetic_images(2, H, W, seed=seed, dtype=dtype).cuda()
        got = fwd(img)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = model(img, mode="packed", backend=backend, tighten=False)
        _close(got, want, atol)
        counts.add(tuple(got.active_counts.flatten().tolist()))
    assert len(counts) > 1, "every replay pruned alike: the selection did not run in the graph"


@pytest.mark.gpu
def test_dense_replay_and_exit_logits():
    model = _model("cuda", torch.float16)
    dense = capture_forward(model, 2, (H, W), mode="dense", aux_heads=False)
    packed = capture_forward(model, 2, (H, W), exit_logits=True, upsample=False)
    g = torch.Generator().manual_seed(0)
    for seed in (1, 2):
        img = synthetic_images(2, H, W, seed=seed, dtype=torch.float16).cuda()
        logits = [(torch.randn(2, 5, 2, generator=g).cuda(),
                   6 * torch.randn(2, 5, 48, generator=g).cuda()) for _ in range(2)]
        with torch.no_grad():
            _close(dense(img), model(img, mode="dense", aux_heads=False), 2e-2)
            _close(packed(img, logits), model(img, exit_logits=logits, upsample=False,
                                              tighten=False), 2e-2)
