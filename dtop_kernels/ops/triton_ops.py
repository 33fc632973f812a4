"""The Triton backend's forward ops as ``torch.library.triton_op`` (namespace ``dtop_triton``):
what ``dtop_kernels.export`` traces when the Triton backend runs a model on a GPU.

A ``triton_op`` is traced through: its Triton kernels (launched through
``torch.library.wrap_triton``, :func:`dtop_kernels.triton._utils.wrapped`) become nodes of the
exported graph, and AOTInductor compiles them into the package with the rest of the model, so
the package calls no Python. Each op runs the same launcher as the ``dtop_py::`` op with
``backend="triton"`` (:mod:`.library`), with the same arguments minus the backend; eager calls
(and the CPU interpreter) run the kernels directly. Forward only: a package holds an inference
graph. Importing this module needs triton.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from dtop_kernels.ops import library as L
from dtop_kernels.triton._utils import wrap_launches

NS = "dtop_triton"
TRITON = "triton"


@triton_op(f"{NS}::gather", mutates_args=())
def gather(x2d: Tensor, indices: Tensor, cu_seqlens: Tensor, seq_len: int) -> Tensor:
    with wrap_launches():
        return L.gather._init_fn(x2d, indices, cu_seqlens, seq_len, TRITON)


@triton_op(f"{NS}::scatter", mutates_args=())
def scatter(packed: Tensor, indices: Tensor, cu_seqlens: Tensor, base: Tensor | None,
            seq_len: int, add: bool) -> Tensor:
    with wrap_launches():
        return L.scatter._init_fn(packed, indices, cu_seqlens, base, seq_len, add, TRITON)


@triton_op(f"{NS}::layer_norm", mutates_args=())
def layer_norm(x2d: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, cu_seqlens: Tensor,
               seq_len: int, eps: float, gather_rows: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with wrap_launches():
        return L.layer_norm._init_fn(x2d, weight, bias, indices, cu_seqlens, seq_len, eps,
                                     gather_rows, TRITON)


@triton_op(f"{NS}::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     return_logits: bool) -> tuple[Tensor, Tensor, Tensor]:
    with wrap_launches():
        return L.varlen_attention._init_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, scale, return_logits, TRITON)


@triton_op(f"{NS}::packed_linear", mutates_args=())
def packed_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                  base: Tensor | None, indices: Tensor, cu_seqlens: Tensor, seq_len: int,
                  act: int, gather_rows: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    with wrap_launches():
        return L.packed_linear._init_fn(x2d, weight, bias, residual, base, indices, cu_seqlens,
                                        seq_len, act, gather_rows, save_pre, TRITON)


@triton_op(f"{NS}::select", mutates_args=())
def select(class_logits: Tensor, mask_logits: Tensor, indices: Tensor, cu_seqlens: Tensor,
           seq_len: int, max_seqlen: int, threshold: float, top_k: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    with wrap_launches():
        return L.select._init_fn(class_logits, mask_logits, indices, cu_seqlens, seq_len,
                                 max_seqlen, threshold, top_k, TRITON)


OPS = (gather, scatter, layer_norm, varlen_attention, packed_linear, select)


def op(name: str):
    """``torch.ops.dtop_triton.<name>``."""
    return getattr(torch.ops.dtop_triton, name)
