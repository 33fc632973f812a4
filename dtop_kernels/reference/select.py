"""Reference DToP exit rule and the compaction that builds the next TokenSet (no host sync)."""

from __future__ import annotations

import torch

from dtop_kernels.tokens import TokenSet

# Scores below the smallest normal float32 count as 0 on every backend (hardware and libraries
# differ on subnormal exponentials: some flush them, some keep them).
TINY = 2.0**-126


def token_scores(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, tokens: TokenSet
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and label of every packed slot, in fp32.

    ``s[c, n] = softmax(class_logits[b, c])[0] * sigmoid(mask_logits[c, n])``, as
    ``sigmoid(l_present - l_none)`` (the limit for infinite logits), scores below ``TINY`` set
    to 0; ``conf = max_c s``, ``label = argmax_c s`` (lowest class on ties; NaN wins).
    Padding slots get conf 0. class_logits: [B, K, 2]; mask_logits: [K, capacity].
    Returns (conf [capacity], label int64).
    """
    b = tokens.batch_size
    cl = class_logits.float()
    present = torch.sigmoid(cl[..., 0] - cl[..., 1])  # [B, K]
    image = tokens.slot_image()
    score = present[image.clamp(max=b - 1)] * mask_logits.float().t().sigmoid()  # [cap, K]
    score = torch.where(score < TINY, score.new_zeros(()), score)  # NaN stays NaN
    conf, label = score.max(dim=1)
    conf = torch.where(image < b, conf, conf.new_zeros(()))
    return conf, label


def select_slots(
    conf: torch.Tensor, label: torch.Tensor, tokens: TokenSet, threshold: float, top_k: int,
    num_classes: int,
) -> torch.Tensor:
    """Bool [capacity]: slots that exit. Candidates have ``conf > threshold``; per image and
    label the ``top_k`` most confident candidates (lowest position on ties) stay."""
    cap, b = tokens.capacity, tokens.batch_size
    image = tokens.slot_image()
    cand = (image < b) & (conf > threshold)
    group = torch.where(cand, image * num_classes + label, b * num_classes)
    by_conf = torch.argsort(-conf, stable=True)  # ties keep slot order = position order
    perm = by_conf[torch.argsort(group[by_conf], stable=True)]
    g = group[perm]
    pos = torch.arange(cap, device=conf.device)
    start = torch.ones_like(g, dtype=torch.bool)
    start[1:] = g[1:] != g[:-1]
    first = torch.cummax(torch.where(start, pos, 0), dim=0).values
    rank = torch.empty_like(pos)
    rank[perm] = pos - first
    return cand & (rank >= top_k)


@torch.no_grad()
def dtop_select(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    tokens: TokenSet,
    threshold: float,
    top_k: int = 5,
) -> tuple[TokenSet, torch.Tensor]:
    """See :func:`dtop_kernels.dtop_select`."""
    conf, label = token_scores(class_logits, mask_logits, tokens)
    exits = select_slots(conf, label, tokens, threshold, top_k, class_logits.shape[1])
    return tokens.compact(~exits), tokens.dense_mask(exits)
