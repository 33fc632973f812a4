"""Write pruning maps of a tiny random model with synthesized pruning:

    python -m dtop_kernels.models.pruning_maps --out DIR

runs :func:`dtop_kernels.models.vit_dtop_tiny` with confident heads
(:mod:`dtop_kernels.models.synthetic`) on synthetic images and writes one PNG per image
(:func:`save_pruning_maps`; needs matplotlib).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from dtop_kernels.models.dtop import vit_dtop_tiny
from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images
from dtop_kernels.models.visualize import save_pruning_maps

__all__ = ["main", "save_pruning_maps"]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the PNGs")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
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
