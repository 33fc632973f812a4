"""Pruning maps: where each token exited, drawn over the image (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

MATPLOTLIB_HINT = 'pip install matplotlib (or, from the checkout, pip install ".[models]")'


# one colour per exit head (tab10), and the colour of the tokens that never exited
EXIT_COLOURS = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
NEVER_EXITED = "#1f77b4"


def require_matplotlib(what: str = "save_pruning_maps") -> None:
    """Raise ImportError naming ``what`` and the install command unless matplotlib imports.

    Command-line tools call it before any work, so a missing optional dependency fails first."""
    _matplotlib(what)


def _matplotlib(what: str = "save_pruning_maps"):
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs matplotlib, which is not installed: "
                          f"{MATPLOTLIB_HINT}") from e
    return Figure, ListedColormap, Patch


def save_pruning_maps(
    image: torch.Tensor,
    exit_stage: torch.Tensor,
    path_prefix: str | Path,
    *,
    num_stages: int | None = None,
    stage_ends: Sequence[int] | None = None,
) -> list[Path]:
    """Save ``{path_prefix}_{b}.png`` for each image: the image and, beside it, the head at
    which each token exited, in unblended colours that match the legend (one colour per head;
    the last colour = never exited).

    image: [B, 3, H, W] or [3, H, W] (any range: scaled to [0, 1] per image for display);
    exit_stage: int [B, Hg, Wg] or [Hg, Wg] (``DToPOutput.exit_stage``). ``num_stages``
    defaults to ``len(stage_ends)`` or ``exit_stage.max() + 1``; ``stage_ends`` (1-based layer
    of each head) labels the legend. Returns the paths written.
    """
    Figure, ListedColormap, Patch = _matplotlib()
    if image.dim() == 3:
        image = image[None]
    if exit_stage.dim() == 2:
        exit_stage = exit_stage[None]
    if image.dim() != 4 or exit_stage.dim() != 3 or image.shape[0] != exit_stage.shape[0]:
        raise ValueError(f"image [B, 3, H, W] and exit_stage [B, Hg, Wg] must agree on B; got "
                         f"{tuple(image.shape)} and {tuple(exit_stage.shape)}")
    if num_stages is None:
        num_stages = len(stage_ends) if stage_ends else int(exit_stage.max()) + 1
    labels = [f"head {s}" + (f" (layer {stage_ends[s]})" if stage_ends else "")
              for s in range(num_stages)]
    labels[-1] += ": never exited"
    colours = EXIT_COLOURS[:num_stages - 1] + [NEVER_EXITED]
    cmap = ListedColormap(colours)
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in range(image.shape[0]):
        img = image[b].detach().float().cpu()
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
        h, w = img.shape[-2:]
        ex = exit_stage[b].detach().cpu()
        fig = Figure(figsize=(8, 4 * h / w + 1.0), layout="constrained")
        ax_img, ax_map = fig.subplots(1, 2)
        ax_img.imshow(img.permute(1, 2, 0).numpy())
        ax_img.set_title("input")
        ax_map.imshow(ex.numpy(), cmap=cmap, vmin=-0.5, vmax=num_stages - 0.5,
                      extent=(0, w, h, 0), interpolation="nearest")
        ax_map.set_title("head at which each token exited")
        for ax in (ax_img, ax_map):
            ax.set_axis_off()
        shares = [100 * float((ex == s).float().mean()) for s in range(num_stages)]
        fig.legend(handles=[Patch(facecolor=c, edgecolor="black", label=f"{lab}: {p:.0f}%")
                            for c, lab, p in zip(colours, labels, shares)],
                   loc="outside lower center", ncols=min(num_stages, 3), frameon=False)
        path = prefix.parent / f"{prefix.name}_{b}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
