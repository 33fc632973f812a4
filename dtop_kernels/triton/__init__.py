"""The Triton backend: kernels and their host launchers (imported only when it runs), and, here,
what it supports, declared once; the ops combine these declarations with their own shapes.

Importing this package does not import triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # attention: one tile holds a whole head


@functools.cache
def import_error() -> str | None:
    """None when triton imports, else why not (imports triton once)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.1')"
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
        return f"triton fails to import: {e}"
    return None


def interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` selects Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reasons(tensors: Iterable[torch.Tensor]) -> list[str]:
    """Why the Triton kernels cannot run on these tensors' devices (empty: they can)."""
    err = import_error()
    if err:
        return [err]
    devs = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if devs - {"cuda"} and not interpret():
        return [(f"tensors on {sorted(devs - {'cuda'})}: Triton needs CUDA tensors "
                 "(or TRITON_INTERPRET=1 for the CPU interpreter, slow, for tests)")]
    return []


def dtype_reasons(dtype: torch.dtype) -> list[str]:
    if dtype in DTYPES:
        return []
    return [f"dtype {dtype} not supported (float32, float16, bfloat16)"]


def head_dim_reasons(q_dim: int, v_dim: int) -> list[str]:
    r = []
    if v_dim != q_dim:
        r.append(f"v head dim {v_dim} differs from q/k head dim {q_dim}")
    if q_dim > MAX_HEAD_DIM:
        r.append(f"head dim {q_dim} > {MAX_HEAD_DIM}")
    return r
