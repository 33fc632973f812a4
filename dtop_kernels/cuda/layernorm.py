"""Python side of the compiled LayerNorm kernels (csrc/layernorm.cu): checks and launch.

No autograd here (see dtop_kernels/ops/). Same semantics as dtop_kernels/triton/layernorm.py:
rows ``i < T = cu_seqlens[B]`` of the packed layout are normalized, padding rows are zero; mean
and rstd are fp32; the backward gives the packed dx and deterministic dweight / dbias. Nothing
here waits for the GPU. With ``gather``, ``tokens.indices`` must be valid (in [0, B * N)) on the
first T slots: they are not checked on the device.
"""

from __future__ import annotations

import torch

from dtop_kernels.cuda import DTYPE_CODES, _args, load_C, sm_count
from dtop_kernels.tokens import TokenSet


def _check_params(op: str, x2d: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    c = x2d.shape[1]
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    for name, t in params.items():
        _args.tensor(op, name, t, dim=1, dtypes=_args.FLOAT_DTYPES)
        _args.shape(op, name, t, (c,))
        if t.dtype not in (x2d.dtype, torch.float32):
            raise ValueError(f"{op}: {name} must be {x2d.dtype} (the rows' dtype) or float32; "
                             f"got {t.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"{op}: weight and bias must share one dtype; got {weight.dtype} and "
                         f"{bias.dtype}")


def _check_rows(op: str, x2d: torch.Tensor, tokens: TokenSet, gather: bool) -> None:
    rows = tokens.batch_size * tokens.seq_len if gather else tokens.capacity
    if x2d.shape[0] != rows:
        what = "B * N dense rows (gather=True)" if gather else "capacity packed rows"
        raise ValueError(f"{op}: x2d must have {what} = {rows} rows; got {x2d.shape[0]}")


def _check_out(op: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...],
               like: torch.Tensor) -> None:
    if t is None:
        return
    _args.tensor(op, name, t)
    _args.shape(op, name, t, shape)
    if t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} must be {like.dtype}; got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def layer_norm_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tokens: TokenSet,
    eps: float,
    gather: bool = False,
    store_x: bool = False,
    *,
    out: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm of the packed rows of ``tokens``; with ``gather`` the rows come from dense x.

    x2d: [B * N, C] dense rows when ``gather`` (row i reads ``x2d[tokens.indices[i]]``), else
    packed rows [capacity, C]; float32 / float16 / bfloat16, unit last stride (any row stride).
    weight, bias: [C], x2d's dtype or float32. out, x_out: optional contiguous [capacity, C]
    outputs in x2d's dtype (allocated when None).

    Returns ``(y, x_packed, mean, rstd)``: y [capacity, C]; x_packed [capacity, C] the raw
    (gathered) rows when ``store_x`` else None; mean, rstd [capacity] float32. For i < T:
    ``mean = sum(x) / C``, ``rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)``,
    ``y = (x - mean) * rstd * weight + bias`` in float32, rounded once. For i >= T:
    y = x_packed = 0 and mean = rstd = 0. Matches ``layer_norm_fwd`` of the Triton
    backend; every output row is written.
    """
    op = "layer_norm_fwd"
    _args.token_set(op, tokens)
    x2d = _args.rows(_args.tensor(op, "x2d", x2d, dim=2, dtypes=_args.FLOAT_DTYPES))
    _check_params(op, x2d, weight, bias)
    _check_rows(op, x2d, tokens, gather)
    cap, c = tokens.capacity, x2d.shape[1]
    _check_out(op, "out", out, (cap, c), x2d)
    _check_out(op, "x_out", x_out, (cap, c), x2d)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0; got {eps}")
    dev = _args.on_cuda(op, x2d=x2d, weight=weight, bias=bias, indices=tokens.indices, out=out,
                        x_out=x_out)
    y = torch.empty(cap, c, device=dev, dtype=x2d.dtype) if out is None else out
    xp = None
    if store_x:
        xp = torch.empty(cap, c, device=dev, dtype=x2d.dtype) if x_out is None else x_out
    mean = torch.empty(cap, device=dev, dtype=torch.float32)
    rstd = torch.empty(cap, device=dev, dtype=torch.float32)
    if cap == 0 or c == 0:
        return y, xp, mean, rstd
    weight, bias = weight.contiguous(), bias.contiguous()
    with _args.device_guard(dev):
        load_C().layernorm_fwd(
            x2d.data_ptr(), tokens.indices.data_ptr(), tokens.cu_seqlens.data_ptr(),
            weight.data_ptr(), bias.data_ptr(), y.data_ptr(), 0 if xp is None else xp.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), tokens.batch_size, x2d.shape[0], cap, c,
            x2d.stride(0),
            y.stride(0), c, eps, bool(gather), DTYPE_CODES[x2d.dtype], DTYPE_CODES[weight.dtype],
            _args.stream(dev),
        )
    return y, xp, mean, rstd


def num_partials(capacity: int, device: torch.device) -> int:
    """Partial rows of dweight / dbias the backward writes (= its blocks): 4 per SM at most."""
    return max(1, min(-(-capacity // 4), 4 * sm_count(device)))


def layer_norm_bwd(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    tokens: TokenSet,
    gather: bool = False,
    dx_add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`layer_norm_fwd` for the upstream gradient ``dy`` [capacity, C].

    x2d, weight, gather, tokens: as given to the forward; mean, rstd: its [capacity] float32
    outputs. dx_add: optional [capacity, C] (x2d's dtype) added to dx, e.g. the gradient of
    the forward's ``x_packed`` output.

    Returns ``(dx, dweight, dbias)``: dx [capacity, C] in x2d's dtype, packed (the caller
    scatters it to dense rows when ``gather``); for i < T
    ``dx = (g - (xhat * mean(xhat * g) + mean(g))) * rstd + dx_add`` with ``g = dy * weight``,
    ``xhat = (x - mean) * rstd``, computed in float32 and rounded once; for i >= T, dx = dx_add
    (or 0). dweight = sum_i dy * xhat, dbias = sum_i dy over i < T, [C] in weight's dtype:
    per-block float32 partial sums reduced by a second kernel in a fixed order (deterministic).
    """
    op = "layer_norm_bwd"
    _args.token_set(op, tokens)
    x2d = _args.rows(_args.tensor(op, "x2d", x2d, dim=2, dtypes=_args.FLOAT_DTYPES))
    _check_params(op, x2d, weight, None)
    _check_rows(op, x2d, tokens, gather)
    cap, c = tokens.capacity, x2d.shape[1]
    dy = _args.rows(_args.tensor(op, "dy", dy, dim=2))
    _args.shape(op, "dy", dy, (cap, c))
    if dx_add is not None:
        dx_add = _args.rows(_args.tensor(op, "dx_add", dx_add, dim=2))
        _args.shape(op, "dx_add", dx_add, (cap, c))
        _args.same_dtype(op, x2d=x2d, dy=dy, dx_add=dx_add)
    else:
        _args.same_dtype(op, x2d=x2d, dy=dy)
    for name, t in (("mean", mean), ("rstd", rstd)):
        _args.tensor(op, name, t, dim=1, dtypes=(torch.float32,))
        _args.shape(op, name, t, (cap,))
    dev = _args.on_cuda(op, dy=dy, x2d=x2d, weight=weight, mean=mean, rstd=rstd,
                        indices=tokens.indices, dx_add=dx_add)
    dx = torch.empty(cap, c, device=dev, dtype=x2d.dtype)
    dweight = torch.empty(c, device=dev, dtype=weight.dtype)
    dbias = torch.empty(c, device=dev, dtype=weight.dtype)
    if c == 0:
        return dx, dweight, dbias
    parts = num_partials(cap, dev)
    partials = torch.empty(2, parts, c, device=dev, dtype=torch.float32)
    weight, mean, rstd = weight.contiguous(), mean.contiguous(), rstd.contiguous()
    with _args.device_guard(dev):
        load_C().layernorm_bwd(
            dy.data_ptr(), x2d.data_ptr(), tokens.indices.data_ptr(),
            tokens.cu_seqlens.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            0 if dx_add is None else dx_add.data_ptr(), dx.data_ptr(), partials.data_ptr(),
            dweight.data_ptr(), dbias.data_ptr(), tokens.batch_size, x2d.shape[0], cap, c,
            dy.stride(0),
            x2d.stride(0), dx.stride(0), 0 if dx_add is None else dx_add.stride(0), parts,
            bool(gather), DTYPE_CODES[x2d.dtype], DTYPE_CODES[weight.dtype], _args.stream(dev),
        )
    return dx, dweight, dbias
