"""DToP training loss: the same SegViT (ATM) loss on every head, with fixed matching.

Query c <-> class c. For each head s, with its class logits and its canvas (the mask logits of
head s at the tokens still active there, and those of the head each earlier-exited token left
at; for the final head this is the final canvas, so exited positions train the head they
exited at):

- ``ce``: cross-entropy on the 2-way class logits, target "present" for the classes in the
  image and "no object" for the others, class weights [1, ``no_object_weight`` = 0.1];
- ``focal``: sigmoid focal loss (alpha 0.25, gamma 2) of the mask logits, upsampled bilinearly
  to the label size, against each present class's binary mask: mean over pixels, summed over
  masks, divided by the number of masks;
- ``dice``: ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask, same normalization.

Weights 1 / 20 / 1. The number of masks is the batch's count of (image, present class) pairs,
averaged over the processes of a ``torch.distributed`` group when one is initialized, at least 1.
As in the official criterion, ``ignore_index`` pixels only leave the class set: they count as
background in every class's mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtop_kernels.models.dtop import DToPOutput


def present_classes(target: torch.Tensor, num_classes: int, ignore_index: int = 255
                    ) -> torch.Tensor:
    """Bool [B, K]: class c occurs in image b. target: int [B, H, W]; raises ValueError on a
    label outside [0, K) that is not ``ignore_index``."""
    b = target.shape[0]
    t = target.reshape(b, -1).long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"target has labels outside [0, {num_classes}) other than "
                         f"ignore_index={ignore_index}: {t[bad].unique()[:8].tolist()}")
    hit = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=target.device)
    hit.scatter_(1, torch.where(valid, t, num_classes), True)
    return hit[:, :num_classes]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per mask: mean over pixels of the focal loss. logits, targets: [M, P] -> [M]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(dim=1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per mask: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``. [M, P] -> [M]."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(dim=1) + 1) / (p.sum(dim=1) + targets.sum(dim=1) + 1)


def dtop_loss(
    output: DToPOutput,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    no_object_weight: float = 0.1,
    class_weight: float = 1.0,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    num_masks: float | None = None,
) -> dict[str, torch.Tensor]:
    """The DToP loss of a forward (module docstring).

    output: :class:`DToPOutput`; target: int64 [B, H, W] labels in [0, K) or ``ignore_index``.
    ``num_masks`` overrides the normalizer (default: computed, averaged across processes).
    Returns ``{"loss": total, "ce_s", "focal_s", "dice_s" for each head s}`` (weighted terms).
    """
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32,
                                                                    torch.uint8):
        raise TypeError(f"target must be an integer label tensor [B, H, W]; got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    b, k = output.class_logits[-1].shape[:2]
    if target.dim() != 3 or target.shape[0] != b:
        raise ValueError(f"target must be [B={b}, H, W]; got {tuple(target.shape)}")
    present = present_classes(target, k, ignore_index)
    img, cls = present.nonzero(as_tuple=True)
    masks = (target[img].long() == cls[:, None, None]).flatten(1).float()  # [M, H*W]
    if num_masks is None:
        count = torch.tensor(float(img.numel()), device=target.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        num_masks = count.clamp(min=1.0)
    labels = (~present).long()  # 0 = present, 1 = no object
    ce_weight = torch.tensor([1.0, no_object_weight], device=target.device)
    losses: dict[str, torch.Tensor] = {}
    for s, (logits, mask_logits) in enumerate(zip(output.class_logits, output.mask_logits)):
        losses[f"ce_{s}"] = class_weight * F.cross_entropy(
            logits.float().transpose(1, 2), labels, weight=ce_weight)
        src = F.interpolate(mask_logits[img, cls][:, None].float(), size=target.shape[-2:],
                            mode="bilinear", align_corners=False).flatten(1)  # [M, H*W]
        losses[f"focal_{s}"] = focal_weight * sigmoid_focal_loss(src, masks).sum() / num_masks
        losses[f"dice_{s}"] = dice_weight * dice_loss(src, masks).sum() / num_masks
    losses["loss"] = sum(losses.values())
    return losses
