"""A tour of the reference ViT-DToP model on synthetic data (CPU, seconds).

    python examples/dtop_model_tour.py [--steps 5] [--maps DIR]

Trains a tiny model for a few steps with the DToP loss (AdamW, head lr x10 as published), then
runs the three execution modes on the same weights, compares them, and counts FLOPs at the
token counts each image really kept.
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
        outs = {}
        for mode in ("dense", "loop", "packed"):
            t = time.perf_counter()
            outs[mode] = model(img, mode=mode)
            print(f"{mode:>6}: {1e3 * (time.perf_counter() - t):.1f} ms")
    diff = (outs["loop"].pred - outs["packed"].pred).abs().max().item()
    print(f"max |loop - packed| = {diff:.2e}; exit maps equal: "
          f"{torch.equal(outs['loop'].exit_stage, outs['packed'].exit_stage)}")
    print(count_flops(model, outs["packed"].active_counts, (h, w)).summary())
    if args.maps:
        for p in save_pruning_maps(img, outs["packed"].exit_stage, f"{args.maps}/tour",
                                   stage_ends=model.stage_ends):
            print("wrote", p)


if __name__ == "__main__":
    main()
