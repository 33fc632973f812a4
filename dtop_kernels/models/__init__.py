"""The reference ViT-DToP model (SegViT + Dynamic Token Pruning) on the package's ops.

- :class:`ViTDToP`, :func:`vit_dtop_base`, :func:`vit_dtop_large`, :func:`vit_dtop_tiny`:
  the model and its configurations; ``model(img, mode="dense" | "loop" | "packed")``;
  ``ViTDToP.from_timm`` / ``ViTDToP.from_transformers``: the model around a timm or
  transformers ViT (:mod:`.backbones`).
- :func:`dtop_loss`: the training loss of every head.
- :func:`load_timm_backbone`, :func:`load_mmseg_checkpoint`: weight loading.
- :func:`count_flops`: analytic FLOPs at the actual token counts.
- :func:`capture_forward`: the forward captured in a CUDA graph, replayed for new images.
- :func:`save_pruning_maps`: where tokens exited (matplotlib).

- :mod:`.checkpoint`: configurations by name, checkpoints (save, weights-only load).

Data sets and transforms live in :mod:`dtop_kernels.data`; training and evaluation are the entry
points ``python -m dtop_kernels.train`` and ``python -m dtop_kernels.evaluate``.

timm, matplotlib and Pillow are optional and imported only where used.
"""

from dtop_kernels.models.dtop import (
    DToPOutput,
    ViTDToP,
    vit_dtop_base,
    vit_dtop_large,
    vit_dtop_tiny,
)
from dtop_kernels.models.flops import FlopCount, count_flops
from dtop_kernels.models.graphs import CapturedForward, capture_forward
from dtop_kernels.models.loading import LoadReport, load_mmseg_checkpoint, load_timm_backbone
from dtop_kernels.models.losses import dtop_loss
from dtop_kernels.models.visualize import save_pruning_maps

__all__ = [
    "CapturedForward",
    "DToPOutput",
    "FlopCount",
    "LoadReport",
    "ViTDToP",
    "capture_forward",
    "count_flops",
    "dtop_loss",
    "load_mmseg_checkpoint",
    "load_timm_backbone",
    "save_pruning_maps",
    "vit_dtop_base",
    "vit_dtop_large",
    "vit_dtop_tiny",
]
