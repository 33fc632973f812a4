"""Python side of the compiled packed linear kernel (csrc/linear.cu): checks and launch.

No autograd here (see dtop_kernels/ops/linear.py). Same semantics as
dtop_kernels/triton/linear.py: rows ``i < T = cu_seqlens[B]`` are tokens, row tiles past T run
no product, packed outputs are zero there. float16 / bfloat16 only, in and out features
multiples of 8. With gather or scatter, ``tokens.indices`` must be valid (in [0, B * N)) on the
first T slots: they are not checked on the device. Nothing here waits for the GPU.

Tile shape: the kernel picks 128 x 64 tiles for outputs of N <= 1024 columns and 128 x 128
above (for dx: by in_features), the rule of the Triton backend's ``_config``; the figures are in
the header of csrc/linear.cu.
"""

from __future__ import annotations

import torch

from dtop_kernels.cuda import DTYPE_CODES, _args, load_C
from dtop_kernels.tokens import TokenSet

ACT_NONE, ACT_GELU = 0, 1


def _check_sizes(op: str, n: int, k: int) -> None:
    if n % 8 or k % 8:
        raise ValueError(f"{op}: the CUDA linear kernel needs in and out features that are "
                         f"multiples of 8; got {k} -> {n} (use backend='triton' or 'torch')")


def _aligned_out(op: str, name: str, t: torch.Tensor) -> None:
    if _args.aligned16(t) is not t:
        raise ValueError(f"{op}: {name} is written in place, so it must be 16-byte aligned with "
                         f"a unit last stride and a row stride that is a multiple of 8; got "
                         f"strides {t.stride()}")


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: TokenSet,
    act: int = ACT_NONE, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
    save_pre: bool = False, gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``act(x_i @ weight^T + bias) + residual_i`` for the token rows i < T.

    x: [capacity, K] packed rows, or [B * N, K] dense rows with ``gather`` (row i reads
    ``x[indices[i]]``); weight [N, K]; bias [N] or None; residual [capacity, N] or None; all one
    dtype (float16 / bfloat16). ``act``: ACT_NONE or ACT_GELU (exact erf GELU).
    out: None, or dense rows [B * N, N] into which row i is scattered (``out[indices[i]]``; other
    rows untouched).

    Returns ``(y, pre)``: y [capacity, N] (zero past T), or ``out``; pre [capacity, N] the
    pre-activation ``x_i @ weight^T + bias`` (zero past T) when ``save_pre``, else None.
    Accumulation and the epilogue run in float32, rounded once per output.
    """
    op = "linear_fwd"
    _args.token_set(op, tokens)
    x = _args.tensor(op, "x", x, dim=2, dtypes=_args.HALF_DTYPES)
    weight = _args.tensor(op, "weight", weight, dim=2, dtypes=_args.HALF_DTYPES)
    cap, k = tokens.capacity, x.shape[1]
    n = weight.shape[0]
    rows = tokens.batch_size * tokens.seq_len if gather else cap
    _args.shape(op, "x", x, (rows, k))
    _args.shape(op, "weight", weight, (n, k))
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        tensors["bias"] = _args.tensor(op, "bias", bias, dim=1)
        _args.shape(op, "bias", bias, (n,))
    if residual is not None:
        tensors["residual"] = _args.tensor(op, "residual", residual, dim=2)
        _args.shape(op, "residual", residual, (cap, n))
    if out is not None:
        tensors["out"] = _args.tensor(op, "out", out, dim=2)
        _args.shape(op, "out", out, (tokens.batch_size * tokens.seq_len, n))
    _args.same_dtype(op, **tensors)
    _check_sizes(op, n, k)
    if act not in (ACT_NONE, ACT_GELU):
        raise ValueError(f"{op}: act must be ACT_NONE (0) or ACT_GELU (1); got {act!r}")
    dev = _args.on_cuda(op, indices=tokens.indices, **tensors)
    if out is not None:
        _aligned_out(op, "out", out)
    x, weight = _args.aligned16(x), _args.aligned16(weight)
    bias = None if bias is None else _args.aligned16(bias)
    residual = None if residual is None else _args.aligned16(residual)
    y = out if out is not None else torch.empty(cap, n, device=dev, dtype=x.dtype)
    pre = torch.empty(cap, n, device=dev, dtype=x.dtype) if save_pre else None
    if cap == 0 or n == 0:
        return y, pre
    idx = tokens.indices.data_ptr()
    with _args.device_guard(dev):
        load_C().linear_fwd(
            x.data_ptr(), idx if gather else 0, weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            0 if residual is None else residual.data_ptr(), 0 if pre is None else pre.data_ptr(),
            y.data_ptr(), idx if out is not None else 0, tokens.cu_seqlens.data_ptr(),
            tokens.batch_size, cap, n, k, x.stride(0), weight.stride(0),
            0 if residual is None else residual.stride(0), 0 if pre is None else pre.stride(0),
            y.stride(0), tokens.batch_size * tokens.seq_len, act, DTYPE_CODES[x.dtype],
            _args.stream(dev),
        )
    return y, pre


def linear_bwd_input(dz: torch.Tensor, weight: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """dx = dz @ weight on the token rows, zero past T. dz: [capacity, N], weight [N, K], one
    dtype (float16 / bfloat16). Returns dx [capacity, K]."""
    op = "linear_bwd_input"
    _args.token_set(op, tokens)
    dz = _args.tensor(op, "dz", dz, dim=2, dtypes=_args.HALF_DTYPES)
    weight = _args.tensor(op, "weight", weight, dim=2, dtypes=_args.HALF_DTYPES)
    cap, n = tokens.capacity, weight.shape[0]
    k = weight.shape[1]
    _args.shape(op, "dz", dz, (cap, n))
    _args.same_dtype(op, dz=dz, weight=weight)
    _check_sizes(op, n, k)
    dev = _args.on_cuda(op, dz=dz, weight=weight, indices=tokens.indices)
    dz, weight = _args.aligned16(dz), _args.aligned16(weight)
    dx = torch.empty(cap, k, device=dev, dtype=dz.dtype)
    if cap == 0 or k == 0:
        return dx
    with _args.device_guard(dev):
        load_C().linear_bwd_input(
            dz.data_ptr(), weight.data_ptr(), dx.data_ptr(), tokens.cu_seqlens.data_ptr(),
            tokens.batch_size, cap, n, k, dz.stride(0), weight.stride(0), dx.stride(0),
            DTYPE_CODES[dz.dtype], _args.stream(dev),
        )
    return dx
