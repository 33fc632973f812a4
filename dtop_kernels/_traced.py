"""Values that torch.compile traces as constants (``assume_constant_result``), in a module of
their own: the decorator imports torch._dynamo (and with it triton), which ``import
dtop_kernels`` must not. Imported only while compiling."""

from __future__ import annotations

import torch


@torch.compiler.assume_constant_result
def forward_origin(cls: type) -> str:
    """``"module:qualname"`` of ``cls.forward``, read eagerly and a constant of the trace:
    dynamo (torch 2.14) reads a function's ``__qualname__`` as the descriptor, so a comparison
    with it would fail inside a compiled region."""
    fwd = cls.forward
    return f"{fwd.__module__}:{fwd.__qualname__}"
