"""Reference gather / scatter between dense ``[B, N, C]`` and packed ``[capacity, C]``.

On CUDA the valid count T stays on the device (masked index ops, no sync). On the CPU reading
it costs nothing, so the CPU path indexes the valid rows directly.
"""

from __future__ import annotations

import torch

from dtop_kernels.tokens import TokenSet


def host_count(tokens: TokenSet) -> int | None:
    """T when it can be read without a device sync (CPU tensors), else None."""
    if tokens.device.type == "cpu":
        return min(int(tokens.cu_seqlens[-1]), tokens.capacity)
    return None


def in_range(indices: torch.Tensor, rows: int) -> torch.Tensor:
    """Bool: indices that address one of ``rows`` rows. Unchecked out-of-range indices (a
    broken contract on the sync-free path) read zeros and write nowhere, never out of bounds."""
    return (indices >= 0) & (indices < rows)


def gather_tokens(x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """Packed rows of the active tokens: ``packed[i] = x.view(B*N, C)[indices[i]]``.

    x: [B, N, C]. Returns [capacity, C]; padding rows (i >= T) are zero.
    """
    total = host_count(tokens)
    if total is not None:
        return gather_counted(x, tokens, total)
    return gather_masked(x, tokens)


def gather_counted(x: torch.Tensor, tokens: TokenSet, total: int) -> torch.Tensor:
    """:func:`gather_tokens` given T on the host."""
    b, n, c = x.shape
    packed = x.reshape(b * n, c).index_select(0, tokens.indices[:total])
    if total == tokens.capacity:
        return packed
    return torch.cat([packed, packed.new_zeros(tokens.capacity - total, c)])


def gather_masked(x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """:func:`gather_tokens` with T left on the device (no sync)."""
    b, n, c = x.shape
    flat = x.reshape(b * n, c)
    valid = tokens.valid_slots() & in_range(tokens.indices, b * n)
    packed = flat.index_select(0, torch.where(valid, tokens.indices, 0))  # padding: any value
    return torch.where(valid[:, None], packed, packed.new_zeros(()))


def scatter_tokens(
    packed: torch.Tensor, tokens: TokenSet, base: torch.Tensor, add: bool = False
) -> torch.Tensor:
    """``base`` with active rows replaced by (``add``: increased by) the packed rows.

    packed: [capacity, C], base: [B, N, C]. Returns a new [B, N, C] tensor; padding rows of
    ``packed`` are ignored.
    """
    total = host_count(tokens)
    if total is not None:
        return scatter_counted(packed, tokens, base, add, total)
    return scatter_masked(packed, tokens, base, add)


def scatter_counted(
    packed: torch.Tensor, tokens: TokenSet, base: torch.Tensor, add: bool, total: int
) -> torch.Tensor:
    """:func:`scatter_tokens` given T on the host."""
    b, n, c = base.shape
    flat = base.reshape(b * n, c)
    idx = tokens.indices[:total].long()
    rows = packed[:total]
    out = flat.index_add(0, idx, rows) if add else flat.index_copy(0, idx, rows)
    return out.view(b, n, c)


def scatter_masked(
    packed: torch.Tensor, tokens: TokenSet, base: torch.Tensor, add: bool
) -> torch.Tensor:
    """:func:`scatter_tokens` with T left on the device (no sync)."""
    b, n, c = base.shape
    flat = base.reshape(b * n, c)
    valid = tokens.valid_slots() & in_range(tokens.indices, b * n)
    dest = torch.where(valid, tokens.indices.long(), b * n)  # padding -> spare row
    ext = torch.cat([flat, base.new_zeros(1, c)])
    ext = ext.index_add(0, dest, packed) if add else ext.index_copy(0, dest, packed)
    return ext[: b * n].view(b, n, c)
