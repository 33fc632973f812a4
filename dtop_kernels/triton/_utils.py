"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib
import threading

import torch


def interpret_blocks() -> int:
    """Tile size to use under the CPU interpreter (small keeps tests fast), else 0."""
    from dtop_kernels.triton import interpret

    return 16 if interpret() else 0


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32: the reference is fp32. Other
    dtypes keep Triton's default (None)."""
    return "ieee" if dtype == torch.float32 else None


_WRAP = threading.local()


@contextlib.contextmanager
def wrap_launches():
    """Within: :func:`wrapped` wraps kernels with ``torch.library.wrap_triton`` (the bodies of
    the ``triton_op``s of ``dtop_kernels.ops.triton_ops`` run in it)."""
    before = getattr(_WRAP, "on", False)
    _WRAP.on = True
    try:
        yield
    finally:
        _WRAP.on = before


def wrapped(kernel):
    """``kernel``, or within :func:`wrap_launches` ``torch.library.wrap_triton(kernel)``: there,
    inside a ``torch.library.triton_op`` traced by ``torch.export`` / ``torch.compile``, the
    launch becomes a node of the graph that (AOT)Inductor compiles into the package instead of a
    call back into Python; run eagerly (and under the CPU interpreter), the same launch. Outside
    it the kernel is launched as it is, without the wrapper's per-launch cost."""
    if not getattr(_WRAP, "on", False):
        return kernel
    from torch.library import wrap_triton

    try:
        return wrap_triton(kernel)
    except RuntimeError:  # not a triton.jit / autotune function (a stand-in a test put there)
        return kernel
