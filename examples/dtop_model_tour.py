"""A tour of the reference ViT-DToP model on synthetic data (CPU, seconds).

    python examples/dtop_model_tour.py [--steps 5] [--maps DIR]

Trains a tiny model for a few steps with the DToP loss (AdamW, head lr x10 as published), then
runs the three execution modes on the same weights, compares them, and counts FLOPs at the
token counts each image really kept. Its last line is a verdict: what the timings show and why.
"""

from __future__ import annotations

import argparse
import time

import torch

from dtop_kernels.models import count_flops, dtop_loss, save_pruning_maps, vit_dtop_tiny
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images
from dtop_kernels.models.visualize import require_matplotlib


def main() -> None:
    ap = argparse.ArgumentParser(
        description="A tour of the reference ViT-DToP model on synthetic data (CPU, seconds): "
                    "a few training steps with the DToP loss, the three execution modes "
                    "compared on the same weights, FLOPs at the kept token counts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="training steps before the comparison")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"),
                    help="image height and width in pixels (multiples of 16)")
    ap.add_argument("--maps", metavar="DIR",
                    help="also write pruning maps (PNG) to DIR; needs matplotlib")
    args = ap.parse_args()
    if args.size[0] % 16 or args.size[1] % 16 or min(args.size) < 16:
        ap.error(f"--size H W must be positive multiples of 16, got {args.size[0]} {args.size[1]}")
    if args.maps:
        try:
            require_matplotlib("--maps")
        except ImportError as e:
            ap.exit(2, f"error: {e}\n")
    torch.manual_seed(0)
    h, w = args.size
    model = make_heads_confident_(vit_dtop_tiny(num_classes=5, threshold=0.5))

    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    opt = torch.optim.AdamW([{"params": backbone, "lr": 2e-5},
                             {"params": heads, "lr": 2e-4}], weight_decay=0.01)
    model.train()
    for step in range(args.steps):
        img = synthetic_images(4, h, w, seed=step)
        target = torch.randint(0, 5, (4, h, w), generator=torch.Generator().manual_seed(step))
        out = model(img, mode="packed")
        losses = dtop_loss(out, target)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        print(f"step {step}: loss {losses['loss'].item():.3f}, active tokens per stage "
              f"{out.active_counts.tolist()}")

    model.eval()
    img = synthetic_images(4, h, w, seed=1000)
    with torch.no_grad():
        outs, ms = {}, {}
        for mode in ("dense", "loop", "packed"):
            t = time.perf_counter()
            outs[mode] = model(img, mode=mode)
            ms[mode] = 1e3 * (time.perf_counter() - t)
            print(f"{mode:>6}: {ms[mode]:.1f} ms")
    diff = (outs["loop"].pred - outs["packed"].pred).abs().max().item()
    print(f"max |loop - packed| = {diff:.2e}; exit maps equal: "
          f"{torch.equal(outs['loop'].exit_stage, outs['packed'].exit_stage)}")
    flops = count_flops(model, outs["packed"].active_counts, (h, w))
    print(flops.summary())
    if args.maps:
        for p in save_pruning_maps(img, outs["packed"].exit_stage, f"{args.maps}/tour",
                                   stage_ends=model.stage_ends):
            print("wrote", p)
    print(verdict(ms, float(flops.saving.mean()), flops.dense_macs))


def verdict(ms: dict[str, float], saving: float, dense_macs: float) -> str:
    """One line: what the timings of this tour show, why, and where pruning pays."""
    faster = ms["packed"] < ms["dense"]
    return (f"verdict: pruning saved {100 * saving:.0f}% of the FLOPs, and packed took "
            f"{ms['packed']:.0f} ms against {ms['dense']:.0f} ms dense"
            + ("" if faster else f": a tiny model ({dense_macs / 1e6:.0f} MFLOPs per image), "
               "where fixed per-op costs outweigh the FLOPs, timed once")
            + "; where it pays: python benchmarks/latency.py (ViT-B at 512 px, "
            "docs/benchmarks.md), and a trained model's exits: docs/training.md")


if __name__ == "__main__":
    main()
