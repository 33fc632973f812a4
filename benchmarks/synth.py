"""Synthesized exit logits: make the real DToP exit rule prune a chosen, spatially coherent pattern.

Without trained weights a ViT-DToP is unsure about every token, so nothing would exit. The model
takes ``exit_logits=``: per auxiliary head, class logits [B, K, 2] and mask logits [B, K, N] that
the exit rule (``dtop_select`` / the official per-image loop) sees instead of the head's own. This
module builds them so that a target number of tokens stays after each exit:

- Per image, a smooth random field over the token grid: a sum of 2 to 6 Gaussian bumps (random
  centre, width 10-30% of the grid, amplitude 0.5-1). Bump j is one object of class ``cls_j``;
  each token belongs to the class of the bump that contributes most there.
- Easy regions exit first: at head s the candidates are the ``t`` active tokens with the highest
  field (a superlevel set: blobs around the bump centres). Candidate tokens get a confident mask
  logit for their class (``lo .. lo + 3``, increasing with the field, distinct values so the
  rule's top-k never sees a tie); every other (token, class) pair gets a low logit. The classes
  present in the image get class logits [12, 0] (present), the others [-12, 0].
- The rule keeps the ``top_k`` most confident candidates of each class, so exits =
  ``sum_c max(0, count_c - top_k)``. ``t`` grows until exits equal the target exactly (adding a
  candidate adds at most one exit, so the search never overshoots).

The plan also returns the token counts each stage must run on and the head at which each token
exits, so a benchmark can check that the model pruned exactly what was asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PRESENT_LOGIT = 12.0  # softmax([12, 0])[0] = 0.999994


@dataclass
class ExitPlan:
    """Synthesized exit logits for a batch and what the exit rule must do with them."""

    exit_logits: list[tuple[torch.Tensor, torch.Tensor]]  # per aux head: [B, K, 2], [B, K, N]
    counts: torch.Tensor  # int64 [S, B]: tokens each stage runs on
    exit_stage: torch.Tensor  # int64 [B, N]: head at which each token exits (S - 1 = never)

    def to(self, device: torch.device | str) -> ExitPlan:
        """Exit logits moved to ``device`` (kept fp32: the rule scores in fp32 and bf16 would
        create ties among the confident logits)."""
        logits = [(c.to(device), m.to(device)) for c, m in self.exit_logits]
        return ExitPlan(logits, self.counts, self.exit_stage)


def image_keeps(batch: int, keep: float, spread: float = 0.1) -> list[float]:
    """Per-image fraction kept at each exit: evenly spread over ``keep +- w`` with
    ``w = min(spread, 1 - keep, keep - 0.05)``, so images prune differently and the batch mean is
    ``keep`` (all equal at keep = 1)."""
    if batch == 1:
        return [keep]
    w = max(0.0, min(spread, 1.0 - keep, keep - 0.05))
    return [keep + w * (2 * i / (batch - 1) - 1) for i in range(batch)]


def target_counts(n: int, keeps: Sequence[float], num_stages: int) -> torch.Tensor:
    """int64 [S, B]: stage s of image b runs on ``round(n * keep_b ** s)`` tokens."""
    return torch.tensor([[round(n * k**s) for k in keeps] for s in range(num_stages)],
                        dtype=torch.int64)


def _field(grid: tuple[int, int], num_classes: int, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(field [N] float64, class [N] int64) of one image (module docstring)."""
    gh, gw = grid
    ys = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw).reshape(-1)
    xs = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw).reshape(-1)
    m = int(torch.randint(2, 7, (1,), generator=gen))
    classes = torch.randperm(num_classes, generator=gen)[:m]
    classes = classes[torch.arange(m) % classes.numel()]  # fewer classes than bumps: reuse
    size = max(gh, gw)
    bumps = []
    for _ in range(m):
        cy, cx = float(torch.rand(1, generator=gen)) * gh, float(torch.rand(1, generator=gen)) * gw
        sigma = (0.1 + 0.2 * float(torch.rand(1, generator=gen))) * size
        amp = 0.5 + 0.5 * float(torch.rand(1, generator=gen))
        bumps.append(amp * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)))
    stack = torch.stack(bumps)  # [m, N]
    field = stack.sum(0) + 1e-6 * torch.rand(gh * gw, generator=gen, dtype=torch.float64)
    return field, classes[stack.argmax(0)]


def _exits(n_active: int, n_exit: int, order_cls: torch.Tensor, top_k: int,
           num_classes: int) -> int:
    """Smallest candidate count t (the t highest-field active tokens, classes ``order_cls``)
    whose rule outcome removes ``n_exit`` tokens; n_active if that is not reachable."""
    t = n_exit
    while True:
        counts = torch.bincount(order_cls[:t], minlength=num_classes)
        done = int((counts - top_k).clamp(min=0).sum())
        if done >= n_exit or t >= n_active:
            return t
        t = min(n_active, t + n_exit - done)


def plan_exits(
    batch: int,
    grid: tuple[int, int],
    num_classes: int,
    num_stages: int,
    keep: float,
    *,
    threshold: float,
    top_k: int,
    seed: int = 0,
) -> ExitPlan:
    """Exit logits for ``num_stages - 1`` auxiliary heads so that stage s of image b runs on
    ``target_counts(N, image_keeps(batch, keep), num_stages)[s, b]`` tokens (exactly, unless a
    target is unreachable because of the top-k retention; ``counts`` then holds what happens).

    ``threshold`` and ``top_k`` are the model's rule parameters. Returns an :class:`ExitPlan`
    on the CPU (fp32 logits).
    """
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(seed)
    target = target_counts(n, image_keeps(batch, keep), num_stages)
    # Confident logits clear the threshold: softmax([12, 0])[0] * sigmoid(lo) > threshold.
    thr = min(max(threshold, 1e-6), 1 - 1e-6)
    lo = max(4.0, math.log(thr / (1 - thr)) + 1.5)
    low = min(-4.0, math.log(thr / (1 - thr)) - 4.0)
    last = num_stages - 1
    exit_stage = torch.full((batch, n), last, dtype=torch.int64)
    counts = torch.zeros(num_stages, batch, dtype=torch.int64)
    cls_l = torch.full((last, batch, num_classes, 2), 0.0)
    cls_l[..., 0] = -PRESENT_LOGIT
    mask_l = torch.full((last, batch, num_classes, n), low)
    for b in range(batch):
        field, cls = _field(grid, num_classes, gen)
        active = torch.ones(n, dtype=torch.bool)
        for s in range(num_stages):
            counts[s, b] = int(active.sum())
            if s == last:
                break
            cls_l[s, b, cls.unique(), 0] = PRESENT_LOGIT
            n_act = int(counts[s, b])
            n_exit = n_act - int(target[s + 1, b])
            if n_exit <= 0:
                continue
            idx = active.nonzero().squeeze(1)
            order = idx[torch.argsort(field[idx], descending=True)]  # most confident first
            t = _exits(n_act, n_exit, cls[order], top_k, num_classes)
            cand = order[:t]
            conf = lo + 3.0 * torch.linspace(1.0, 0.0, t) if t > 1 else torch.full((t,), lo + 3)
            mask_l[s, b, cls[cand], cand] = conf.float()
            # The rule: per class, the top_k most confident candidates stay; the rest exit.
            gone = []
            for c in cls[cand].unique():
                members = cand[cls[cand] == c]  # already in decreasing confidence
                gone.append(members[top_k:])
            gone = torch.cat(gone)
            active[gone] = False
            exit_stage[b, gone] = s
    logits = [(cls_l[s].clone(), mask_l[s].clone()) for s in range(last)]
    return ExitPlan(logits, counts, exit_stage)
