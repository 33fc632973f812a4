"""Input checks shared by the public ops: host-side only, except the checked mode (one sync)."""

from __future__ import annotations

import os

import torch

from dtop_kernels.tokens import TokenSet, check_offsets

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
    for name, t in tensors.items():
        tensor(name, t)
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


# ---------------------------------------------------------------------- checked mode
def checking(check: bool | None, device: torch.device) -> bool:
    """Whether the device-side contracts are verified for this call.

    Always for CPU tensors (reading them back costs no sync there); on other devices when
    ``check=True``, or when ``check`` is None and ``DTOP_CHECK=1`` is set. Off by default there
    (the hot path never syncs) and always off inside ``torch.compile``, where ``check=True``
    raises. Unchecked, a violated contract gives unspecified values (never an out-of-bounds
    access).
    """
    if torch.compiler.is_compiling():  # a host read would break the graph
        if check:
            raise ValueError("check=True reads the token counts back to the host, which "
                             "torch.compile cannot trace: validate the TokenSet before the "
                             "compiled call (tokens.validate()) and pass check=None or False")
        return False
    if device.type == "cpu" or check:
        return True
    if check is None:
        return os.environ.get("DTOP_CHECK", "").strip() not in ("", "0")
    return False


def tokens_contract(tokens: TokenSet, check: bool | None) -> None:
    """:meth:`TokenSet.validate` (one host sync) when :func:`checking` says so."""
    if checking(check, tokens.device):
        tokens.validate()


def cu_contract(check: bool | None, **specs: tuple[torch.Tensor, int, int]) -> None:
    """Offsets ``name=(cu_seqlens, rows, max_seqlen)``: start at 0, never decrease, end at most
    at ``rows``, and no image exceeds ``max_seqlen``; one host sync for all of them, when
    :func:`checking` says so."""
    tensors = [cu for cu, _, _ in specs.values()]
    if not tensors or not checking(check, tensors[0].device):
        return
    host = torch.cat(tensors).long().cpu().split([t.shape[0] for t in tensors])
    for (name, (_, rows, max_seqlen)), cu in zip(specs.items(), host):
        check_offsets(cu, name, rows,
                      rows_what=f"the {rows} packed rows it indexes: the offsets count more "
                                "tokens than the tensor holds",
                      max_seqlen=max_seqlen, counted=f"rows in {name}", max_what="its max_seqlen")


def check_flag(check: object) -> bool | None:
    if check is not None and not isinstance(check, bool):
        raise TypeError(f"check must be True, False or None (DTOP_CHECK decides); got {check!r}")
    return check
