"""Reference gather / scatter between dense ``[B, N, C]`` and packed ``[capacity, C]``."""

from __future__ import annotations

import torch

from dtop_kernels.tokens import TokenSet


def gather_tokens(x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """Packed rows of the active tokens: ``packed[i] = x.view(B*N, C)[indices[i]]``.

    x: [B, N, C]. Returns [capacity, C]; padding rows (i >= T) are zero.
    """
    b, n, c = x.shape
    valid = tokens.valid_slots()
    idx = tokens.indices.long().clamp(min=0)
    packed = x.reshape(b * n, c).index_select(0, idx)
    return torch.where(valid[:, None], packed, packed.new_zeros(()))


def scatter_tokens(
    packed: torch.Tensor, tokens: TokenSet, base: torch.Tensor, add: bool = False
) -> torch.Tensor:
    """``base`` with active rows replaced by (``add``: increased by) the packed rows.

    packed: [capacity, C], base: [B, N, C]. Returns a new [B, N, C] tensor; padding rows of
    ``packed`` are ignored.
    """
    b, n, c = base.shape
    dest = torch.where(tokens.valid_slots(), tokens.indices.long(), b * n)  # padding -> spare row
    ext = torch.cat([base.reshape(b * n, c), base.new_zeros(1, c)])
    ext = ext.index_add(0, dest, packed) if add else ext.index_copy(0, dest, packed)
    return ext[: b * n].view(b, n, c)
