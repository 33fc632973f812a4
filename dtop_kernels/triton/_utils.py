"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import torch


def interpret_blocks() -> int:
    """Tile size to use under the CPU interpreter (small keeps tests fast), else 0."""
    from dtop_kernels.triton import interpret

    return 16 if interpret() else 0


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32: the reference is fp32. Other
    dtypes keep Triton's default (None)."""
    return "ieee" if dtype == torch.float32 else None
