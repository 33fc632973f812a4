"""Write pruning maps (where each token exited) of a tiny random model on synthetic images.

    pip install matplotlib        # or, from the checkout: pip install ".[models]"
    python -m dtop_kernels.models.pruning_maps --out DIR

Runs :func:`dtop_kernels.models.vit_dtop_tiny` with confident heads
(:mod:`dtop_kernels.models.synthetic`) on synthetic images and writes one PNG per image
(:func:`save_pruning_maps`), then prints each image's active tokens per stage.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from dtop_kernels.models.dtop import vit_dtop_tiny
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images
from dtop_kernels.models.visualize import require_matplotlib, save_pruning_maps

__all__ = ["main", "save_pruning_maps"]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(
        prog="python -m dtop_kernels.models.pruning_maps",
        description="Write pruning maps (where each token exited, one PNG per image) of a tiny "
                    "random ViT-DToP with confident heads on synthetic images. Needs matplotlib.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True,
                    help="directory for the PNGs (created; files pruning_map_<b>.png)")
    ap.add_argument("--images", type=int, default=4, help="number of synthetic images")
    ap.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"),
                    help="image height and width in pixels (multiples of 16)")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="the exit rule's confidence threshold p0 (1.0: nothing exits)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the images")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error(f"--images must be at least 1, got {args.images}")
    if args.size[0] % 16 or args.size[1] % 16 or min(args.size) < 16:
        ap.error(f"--size H W must be positive multiples of 16 (the patch size), "
                 f"got {args.size[0]} {args.size[1]}")
    try:
        require_matplotlib("python -m dtop_kernels.models.pruning_maps")
    except ImportError as e:
        ap.exit(2, f"error: {e}\n")
    torch.manual_seed(args.seed)
    model = make_heads_confident_(vit_dtop_tiny(threshold=args.threshold)).eval()
    img = synthetic_images(args.images, *args.size, seed=args.seed)
    with torch.no_grad():
        out = model(img, mode="packed")
    paths = save_pruning_maps(img, out.exit_stage, Path(args.out) / "pruning_map",
                              stage_ends=model.stage_ends)
    counts = out.active_counts.tolist()
    for b, p in enumerate(paths):
        print(f"{p}: active tokens per stage {[c[b] for c in counts]}")
    return paths


if __name__ == "__main__":
    main()
