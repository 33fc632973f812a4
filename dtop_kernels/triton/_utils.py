"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch


def interpret_blocks() -> int:
    """Tile size to use under the CPU interpreter (small keeps tests fast), else 0."""
    return 16 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 0


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32: the reference is fp32. Other
    dtypes keep Triton's default (None)."""
    return "ieee" if dtype == torch.float32 else None
