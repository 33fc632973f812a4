"""Python side of the compiled DToP exit rule (csrc/select.cu): checks and launch.

Same semantics as dtop_kernels/triton/select.py and dtop_kernels/reference/select.py; the whole
selection, the prefix sum (CUB) and the compaction run on the current stream, so nothing here
waits for the GPU and the call can be captured in a CUDA graph (the workspace is allocated by
the caching allocator).
"""

from __future__ import annotations

import math

import torch

from dtop_kernels.cuda import DTYPE_CODES, _args, load_C
from dtop_kernels.tokens import TokenSet

MAX_CLASSES = 12288  # csrc/select.cu: one image's class probabilities in 48 KB of shared memory


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of uint8 starting on a 256-byte boundary (the kernel's contract), whatever the
    allocator's own alignment."""
    raw = torch.empty(nbytes + 255, device=device, dtype=torch.uint8)
    start = -raw.data_ptr() % 256
    return raw[start:start + nbytes]


def dtop_select(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    tokens: TokenSet,
    threshold: float,
    top_k: int,
) -> tuple[TokenSet, torch.Tensor]:
    """The DToP exit rule at an auxiliary head and the next token set.

    class_logits: [B, K, 2] ([present, no object] logits per class query); mask_logits:
    [K, capacity], column j for the token in slot j of ``tokens``. Both float32 / float16 /
    bfloat16 (they may differ), unit last stride.

    Per valid slot (fp32): ``present[c] = sigmoid(class_logits[b, c, 0] - class_logits[b, c, 1])``
    (the softmax over the two logits), ``s[c] = present[c] * sigmoid(mask_logits[c, slot])``,
    confidence / label = max / argmax over c (the lowest class wins ties). Candidates have
    confidence > ``threshold`` (strict); a candidate exits when at least ``top_k`` candidates of
    its image and label beat it (higher confidence, or equal confidence at a lower slot), i.e.
    the ``top_k`` most confident candidates of each (image, label) stay.

    Returns ``(next_tokens, exited)``: the TokenSet of the slots that stay (same capacity,
    ``max_seqlen`` and ``seq_len``; indices in slot order, -1 past the new total, which stays on
    the device) and the bool [B, N] mask of the tokens that exit here. Matches
    ``dtop_kernels.triton.select.dtop_select``.
    """
    op = "dtop_select"
    _args.token_set(op, tokens)
    b, cap = tokens.batch_size, tokens.capacity
    class_logits = _args.rows(
        _args.tensor(op, "class_logits", class_logits, dim=3, dtypes=_args.FLOAT_DTYPES))
    mask_logits = _args.rows(
        _args.tensor(op, "mask_logits", mask_logits, dim=2, dtypes=_args.FLOAT_DTYPES))
    k = class_logits.shape[1]
    _args.shape(op, "class_logits", class_logits, (b, k, 2))
    _args.shape(op, "mask_logits", mask_logits, (k, cap))
    if not 1 <= k <= MAX_CLASSES:
        raise ValueError(f"{op}: the number of classes K must be in [1, {MAX_CLASSES}]; got {k}")
    if b > 65535:
        raise ValueError(f"{op}: batch size must be <= 65535; got {b} (split the batch)")
    top_k = _args.non_negative_int(op, "top_k", top_k)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError(f"{op}: threshold is NaN")
    dev = _args.on_cuda(op, class_logits=class_logits, mask_logits=mask_logits,
                        indices=tokens.indices)
    if b == 0:
        return tokens, torch.zeros(0, tokens.seq_len, device=dev, dtype=torch.bool)
    next_indices = torch.empty(cap, device=dev, dtype=torch.int32)
    next_cu = torch.empty(b + 1, device=dev, dtype=torch.int32)
    exited = torch.empty(b, tokens.seq_len, device=dev, dtype=torch.bool)
    with _args.device_guard(dev):
        mod = load_C()
        workspace = _workspace(mod.select_workspace_bytes(cap), dev)
        mod.dtop_select(
            class_logits.data_ptr(), mask_logits.data_ptr(), tokens.indices.data_ptr(),
            tokens.cu_seqlens.data_ptr(), next_indices.data_ptr(), next_cu.data_ptr(),
            exited.data_ptr(), workspace.data_ptr(), workspace.numel(), b, tokens.seq_len, cap,
            tokens.max_seqlen, k, class_logits.stride(0), class_logits.stride(1),
            mask_logits.stride(0), threshold, top_k, DTYPE_CODES[class_logits.dtype],
            DTYPE_CODES[mask_logits.dtype], _args.stream(dev),
        )
    nxt = TokenSet(next_indices, next_cu, b, tokens.seq_len, tokens.max_seqlen)
    return nxt, exited
