"""``dtop_select``: the DToP exit rule and compaction to the next TokenSet."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register
from dtop_kernels.ops import library
from dtop_kernels.tokens import TokenSet


def _why_not_triton(class_logits, mask_logits, tokens) -> list[str]:
    r = triton.device_reasons([class_logits, mask_logits, tokens.indices])
    return r + _float64_reasons(class_logits, mask_logits)


def _why_not_cuda(class_logits, mask_logits, tokens) -> list[str]:
    r = cuda.tensor_reasons([class_logits, mask_logits, tokens.indices])
    return r + _float64_reasons(class_logits, mask_logits)


def _float64_reasons(class_logits, mask_logits) -> list[str]:
    if torch.float64 in (class_logits.dtype, mask_logits.dtype):
        return ["float64 logits not supported (float32, float16, bfloat16)"]
    return []


_dispatch = register(Dispatcher(
    "dtop_select",
    {"torch": lambda *a, **k: [], "triton": _why_not_triton, "cuda": _why_not_cuda},
    auto_order=("triton", "cuda", "torch"),
))


class Selection(NamedTuple):
    tokens: TokenSet  # the tokens that stay active (same capacity; count on the device)
    exited: torch.Tensor  # bool [B, N]: tokens that exit at this head


def dtop_select(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    tokens: TokenSet,
    threshold: float,
    top_k: int = 5,
    *,
    backend: str = "auto",
    check: bool | None = None,
) -> Selection:
    """The DToP exit rule at an auxiliary head, on the device, with no host sync.

    class_logits: [B, K, 2] ([present, no object] per class query); mask_logits: [K, capacity],
    column j for the token in slot j of ``tokens`` (the layout ``varlen_attention(...,
    return_logits=True)`` returns). Score ``s[c, n] = softmax(class_logits[b, c])[0] *
    sigmoid(mask_logits[c, n])`` in fp32, computed as ``sigmoid(l_present - l_none) *
    sigmoid(mask_logit)``, with scores below the smallest normal float32 (2**-126) counted as
    0; confidence and label are its max / argmax over c (lowest class on ties). Candidates:
    active tokens with confidence > ``threshold`` (strict). For each image and label the
    ``top_k`` most confident candidates stay active (lowest position first on ties); every
    other candidate exits. Not differentiable.

    Non-finite logits, the same on every backend: ``sigmoid(+inf) = 1`` and ``sigmoid(-inf) =
    0``, so a +Inf present logit (finite no-object logit) is a sure class and -Inf an absent
    one; a NaN logit, or +Inf/-Inf in both class logits (inf - inf), makes the confidence of
    the tokens it touches NaN (as ``torch.max`` does): those tokens never exit (a NaN class
    logit keeps its whole image). ``check`` validates ``tokens`` (one host sync; always for CPU
    tensors; None follows ``DTOP_CHECK``).

    Returns ``Selection(tokens, exited)``: the next TokenSet (exited tokens removed, same
    capacity and bounds; call ``.tighten()`` for exact ones) and the bool [B, N] exit mask.
    """
    _checks.token_set(tokens)
    _checks.float_tensor("class_logits", class_logits, dim=3)
    _checks.float_tensor("mask_logits", mask_logits, dim=2)
    b, k = tokens.batch_size, class_logits.shape[1]
    if class_logits.shape[0] != b or class_logits.shape[2] != 2:
        raise ValueError(f"class_logits must be [B={b}, K, 2]; got "
                         f"{tuple(class_logits.shape)}")
    if mask_logits.shape != (k, tokens.capacity):
        raise ValueError(f"mask_logits must be [K={k}, capacity={tokens.capacity}]; got "
                         f"{tuple(mask_logits.shape)}")
    _checks.same_device(class_logits=class_logits, mask_logits=mask_logits,
                        indices=tokens.indices)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int; got {top_k!r}")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    be = _dispatch.select(backend, class_logits, mask_logits, tokens)
    if b == 0 or k == 0:
        none = torch.zeros(b, tokens.seq_len, dtype=torch.bool, device=tokens.device)
        return Selection(tokens, none)
    idx, cu, exited = library.call.select(class_logits, mask_logits, tokens.indices,
                                          tokens.cu_seqlens, tokens.seq_len, tokens.max_seqlen,
                                          threshold, top_k, be)
    return Selection(TokenSet(idx, cu, b, tokens.seq_len, tokens.max_seqlen), exited)
