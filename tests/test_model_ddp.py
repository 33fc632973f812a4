"""The packed ViT-DToP model trains under DistributedDataParallel (2 CPU processes, gloo).

Spawns processes; deselect with ``-m "not distributed"`` (or ``-k "not ddp"``). Each rank prunes
its own images differently; after two steps every rank must hold the parameters of a
single-process run that averages the ranks' gradients.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtop_kernels.models import dtop_loss, vit_dtop_tiny
from dtop_kernels.models.losses import present_classes
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images

pytestmark = pytest.mark.distributed

WORLD, STEPS, LR, TIMEOUT_S = 2, 2, 0.05, 120
H, W = 96, 80


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_heads_confident_(vit_dtop_tiny(threshold=0.5, head_attn_drop=0.0))
    return model.double().train()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    seed = 100 * step + rank
    img = synthetic_images(2, H, W, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return img, torch.randint(0, 5, (2, H, W), generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        counts = []
        for step in range(STEPS):
            img, target = _batch(rank, step)
            out = ddp(img, mode="packed", backend="torch")
            counts.append(out.active_counts)
            opt.zero_grad()
            dtop_loss(out, target)["loss"].backward()
            opt.step()
        torch.save({"state": model.state_dict(), "counts": counts},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process_reference() -> dict[str, torch.Tensor]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        batches = [_batch(r, step) for r in range(WORLD)]
        num_masks = max(sum(float(present_classes(t, 5).sum()) for _, t in batches) / WORLD, 1.0)
        opt.zero_grad()
        for img, target in batches:  # DDP averages the ranks' gradients
            loss = dtop_loss(model(img, mode="packed", backend="torch"), target, num_masks=num_masks)["loss"]
            (loss / WORLD).backward()
        opt.step()
    return model.state_dict()


def test_ddp_training_step_matches_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    counts = torch.stack([torch.cat(r["counts"], dim=1) for r in results])  # [rank, S, steps*B]
    assert not torch.equal(counts[0], counts[1]), "the ranks should prune differently"
    assert bool((counts[:, 1:] < (H // 16) * (W // 16)).all())
    ref = _single_process_reference()
    for name, want in ref.items():
        for r in results:
            torch.testing.assert_close(r["state"][name], want, atol=1e-10, rtol=1e-8, msg=name)
