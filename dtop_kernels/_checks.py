"""Input checks shared by the public ops: host-side only, never a device sync."""

from __future__ import annotations

import torch

from dtop_kernels.tokens import TokenSet

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"a {type(t).__name__}"


def tensor(name: str, t: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {describe(t)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims; got {describe(t)}")
    return t


def float_tensor(name: str, t: object, dim: int | None = None) -> torch.Tensor:
    t = tensor(name, t, dim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64; got {t.dtype}"
        )
    return t


def token_set(t: object) -> TokenSet:
    if not isinstance(t, TokenSet):
        raise TypeError(
            f"tokens must be a dtop_kernels.TokenSet; got {describe(t)} (build one with "
            "TokenSet.from_mask / from_lists / all_active)"
        )
    return t


def same_device(**tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all inputs must be on one device; got {listed}")


def same_dtype(**tensors: torch.Tensor) -> None:
    dts = {name: t.dtype for name, t in tensors.items()}
    if len(set(dts.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in dts.items())
        raise TypeError(f"inputs must share one dtype; got {listed}")


def dense_matches(name: str, x: torch.Tensor, tokens: TokenSet) -> None:
    if x.shape[0] != tokens.batch_size or x.shape[1] != tokens.seq_len:
        raise ValueError(
            f"{name} [B, N, C] = {tuple(x.shape)} does not match tokens (B={tokens.batch_size}, "
            f"N={tokens.seq_len})"
        )


def packed_matches(name: str, p: torch.Tensor, tokens: TokenSet) -> None:
    if p.shape[0] != tokens.capacity:
        raise ValueError(
            f"{name} [capacity, C] has {p.shape[0]} rows but tokens.capacity = {tokens.capacity}"
        )


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()
