"""Argument checks shared by the CUDA launchers: host-side only, no CUDA call, no device sync.

Every failed check raises ValueError saying what to fix (TypeError when an argument is not a
tensor / TokenSet at all). Shapes and dtypes are checked before devices, so the checks can be
exercised with CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from dtop_kernels.cuda import DTYPE_CODES, kernel_device_type
from dtop_kernels.tokens import TokenSet

FLOAT_DTYPES = tuple(DTYPE_CODES)  # float32, float16, bfloat16
HALF_DTYPES = (torch.float16, torch.bfloat16)


def tensor(op: str, name: str, t: object, dim: int | None = None,
           dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """``t`` is a tensor with ``dim`` dims and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dims; got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{op}: {name} must be {names}; got {t.dtype}")
    return t


def shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}; got {tuple(t.shape)}")


def same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dts = {n: t.dtype for n, t in tensors.items()}
    if len(set(dts.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in dts.items())
        raise ValueError(f"{op}: inputs must share one dtype; got {listed}")


def on_cuda(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors are on one CUDA device (one CPU device under
    ``dtop_kernels.cuda.emulated``); returns it."""
    given = {n: t for n, t in tensors.items() if t is not None}
    want = kernel_device_type()
    for n, t in given.items():
        if t.device.type != want:
            raise ValueError(f"{op}: the CUDA kernels need CUDA tensors; got {n} on {t.device} "
                             + ("(use backend='torch' on the CPU)" if want == "cuda"
                                else "(emulated: CPU tensors)"))
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{n} on {t.device}" for n, t in given.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listed}")
    return next(iter(devices))


def int32_vector(op: str, name: str, t: object, length: int | None = None) -> torch.Tensor:
    """A contiguous 1-D int32 tensor (``length`` entries when given)."""
    t = tensor(op, name, t, dim=1, dtypes=(torch.int32,))
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have {length} entries; got {t.shape[0]}")
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous")
    return t


def token_set(op: str, t: object) -> TokenSet:
    if not isinstance(t, TokenSet):
        raise TypeError(f"{op}: tokens must be a dtop_kernels.TokenSet; got {type(t).__name__}")
    return t


def non_negative_int(op: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int; got {value!r}")
    return value


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride (copied only when needed)."""
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a 16-byte aligned base, unit last stride and other strides moving whole
    16-byte words (what the 16-byte loads need); copied only when needed."""
    elems = 16 // t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(s % elems == 0 for s in t.stride()[:-1]))
    if ok or t.numel() == 0:
        return t
    c = t.contiguous()
    return c if c is not t else t.clone()  # contiguous but misaligned: a fresh allocation


def stream(device: torch.device) -> int:
    """The current CUDA stream of ``device``, as the int the compiled module takes (0 when
    emulated)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for a launch (nothing to do when emulated)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

