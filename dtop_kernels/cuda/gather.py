"""Python side of the compiled gather / scatter kernels (csrc/gather.cu): checks and launch.

No autograd here (see dtop_kernels/ops/). Token layout: ``indices`` int32 [capacity] holds flat
row indices into the B * N rows of ``x``, image after image; ``cu_seqlens`` int32 [B + 1];
T = cu_seqlens[B] is read by the kernel, so nothing here waits for the GPU. The indices must
be valid (in [0, B * N), unique; the public ops check this when asked, see DTOP_CHECK); an
index outside [0, B * N) is never dereferenced by the kernels (its row reads as zeros and is
written nowhere).
"""

from __future__ import annotations

import torch

from dtop_kernels.cuda import DTYPE_CODES, _args, kernel_device_type, load_C


def _check_layout(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, op: str,
                  x_name: str = "x") -> None:
    """x: [B, N, C] CUDA float; indices: int32 [capacity]; cu_seqlens: int32 [B + 1]."""
    if x.dim() != 3:
        raise ValueError(f"{op}: {x_name} must be [B, N, C]; got shape {tuple(x.shape)}")
    if x.device.type != kernel_device_type():
        raise ValueError(f"{op}: tensors must be on a CUDA device; got {x_name} on {x.device}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"{op}: dtype must be float32, float16 or bfloat16; got {x.dtype}")
    for name, t in (("indices", indices), ("cu_seqlens", cu_seqlens)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, {x_name} on {x.device}; "
                             "put them on one device")
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be int32; got {t.dtype} (use .int())")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D; got shape {tuple(t.shape)}")
    if cu_seqlens.shape[0] != x.shape[0] + 1:
        raise ValueError(f"{op}: cu_seqlens must have B + 1 = {x.shape[0] + 1} entries; "
                         f"got {cu_seqlens.shape[0]}")


def _check_rows(t: torch.Tensor, name: str, shape: tuple[int, ...], like: torch.Tensor,
                op: str) -> None:
    """t has the given shape and the dtype and device of ``like``."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}; got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{op}: {name} must be {like.dtype} on {like.device}; "
                         f"got {t.dtype} on {t.device}")


def gather_rows(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Packs the active rows: out[i] = x.view(B * N, C)[indices[i]] for i < T, 0 after.

    x: [B, N, C]; indices: int32 [capacity]; cu_seqlens: int32 [B + 1];
    out: [capacity, C] (same dtype and device as x) or None. Returns out.
    """
    _check_layout(x, indices, cu_seqlens, "gather_rows")
    capacity, num_cols = indices.shape[0], x.shape[2]
    if out is None:
        out = x.new_empty(capacity, num_cols)
    else:
        _check_rows(out, "out", (capacity, num_cols), x, "gather_rows")
        if not out.is_contiguous():
            raise ValueError("gather_rows: out must be contiguous")
    if out.numel() == 0:
        return out
    if x.numel() == 0:  # no rows to gather: T = 0, everything is padding
        return out.zero_()
    x, indices, cu_seqlens = x.contiguous(), indices.contiguous(), cu_seqlens.contiguous()
    with _args.device_guard(x.device):
        load_C().gather_rows(
            x.data_ptr(), indices.data_ptr(), cu_seqlens.data_ptr(), out.data_ptr(),
            x.shape[0], x.shape[0] * x.shape[1], capacity, num_cols, DTYPE_CODES[x.dtype],
            _args.stream(x.device),
        )
    return out


def scatter_rows(packed: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor,
                 out: torch.Tensor, add: bool = False) -> torch.Tensor:
    """Unpacks rows in place: out.view(B * N, C)[indices[i]] = packed[i] (or += if add), i < T.

    packed: [capacity, C]; indices: int32 [capacity], distinct on the first T slots (rows are
    added without atomics: two rows with one destination race; a TokenSet's indices are distinct
    by construction, ``TokenSet.validate`` checks it); cu_seqlens: int32 [B + 1];
    out: [B, N, C], contiguous, same dtype and device as packed. Returns out.
    """
    _check_layout(out, indices, cu_seqlens, "scatter_rows", x_name="out")
    capacity, num_cols = indices.shape[0], out.shape[2]
    _check_rows(packed, "packed", (capacity, num_cols), out, "scatter_rows")
    if not out.is_contiguous():
        raise ValueError("scatter_rows: out must be contiguous (it is written in place)")
    if packed.numel() == 0 or out.numel() == 0:  # nothing to move (T = 0 when out is empty)
        return out
    packed, indices, cu_seqlens = packed.contiguous(), indices.contiguous(), cu_seqlens.contiguous()
    with _args.device_guard(out.device):
        load_C().scatter_rows(
            packed.data_ptr(), indices.data_ptr(), cu_seqlens.data_ptr(), out.data_ptr(),
            out.shape[0], out.shape[0] * out.shape[1], capacity, num_cols, DTYPE_CODES[out.dtype],
            bool(add),
            _args.stream(out.device),
        )
    return out
