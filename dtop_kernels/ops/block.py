"""``pruned_block`` / ``pruned_stage``: ViT layers run on the active tokens only."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register, requested_backend
from dtop_kernels.layers import LayerParts, apply_rope, read_layer
from dtop_kernels.ops import library
from dtop_kernels.ops.attention import attention_on
from dtop_kernels.ops.layernorm import layer_norm_tokens
from dtop_kernels.ops.linear import linear_tokens
from dtop_kernels.reference.block import block_packed
from dtop_kernels.tokens import TokenSet

Rope = tuple[torch.Tensor, torch.Tensor]


def _why_not_triton(x: torch.Tensor, tokens: TokenSet, layers: Sequence[LayerParts] = ()):
    return triton.device_reasons([x, tokens.indices]) + triton.dtype_reasons(x.dtype)


def _why_not_cuda(x: torch.Tensor, tokens: TokenSet, layers: Sequence[LayerParts] = ()):
    r = cuda.tensor_reasons([x, tokens.indices]) + cuda.mma_reasons(x.dtype)
    for parts in layers[:1]:
        d = x.shape[-1] // parts.num_heads
        r += cuda.head_dim_reasons(d, d)
    return r


_dispatch = register(Dispatcher(
    "pruned_block",
    {"torch": lambda *a, **k: [],
     "triton": _why_not_triton,
     "cuda": _why_not_cuda},
    auto_order=("triton", "cuda", "torch"),
))


def check_block(block: nn.Module, dim: int) -> LayerParts:
    """The parts of ``block`` for tokens of width ``dim``: any layer family of
    :mod:`dtop_kernels.layers` (a pre-norm block with timm ``Block`` names, optional
    ``ls1``/``ls2`` layer scale, ``attn.q_norm``/``k_norm``, ``attn.norm``, ``attn.gate``;
    transformers' ViT, DeiT, DINOv2 (with registers) and DINOv3 layers), without dropout /
    drop-path in training. Raises otherwise, naming the attribute that cannot be honoured."""
    return read_layer(block, dim)


def pruned_stage(
    x: torch.Tensor,
    tokens: TokenSet,
    blocks: Sequence[nn.Module],
    *,
    position_embeddings: Rope | None = None,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """Run ``blocks`` in order on the active tokens only.

    x: dense [B, N, C] -> dense [B, N, C] (gathered once, scattered once; inactive tokens come
    out unchanged), or packed [capacity, C] -> packed [capacity, C] (padding rows carry no
    meaning). Each active token attends only to the active tokens of its own image. Every block
    must pass :func:`check_block`. ``check``: validate ``tokens`` once (one host sync; always for
    CPU tensors; None follows ``DTOP_CHECK``).

    ``position_embeddings``: for layers with rotary embeddings (DINOv3), the (cos, sin)
    [N_patches, D] of the image's patch grid, as transformers passes them to its layers (the
    model's ``rope_embeddings(pixel_values)``). The first ``P = N - N_patches`` tokens of every
    image are prefix tokens (class, registers) and get no rotation; token ``n >= P`` is patch
    ``n - P``, wherever it sits in the packed rows.

    Equivalent PyTorch, per image b with keep mask m_b::

        y = x.clone(); y[b, m_b] = blocks(x[b, m_b][None])[0]
    """
    _checks.token_set(tokens)
    _checks.float_tensor("x", x)
    _checks.same_device(x=x, indices=tokens.indices)
    if x.dim() == 3:
        _checks.dense_matches("x", x, tokens)
    elif x.dim() == 2:
        _checks.packed_matches("x", x, tokens)
    else:
        raise ValueError(f"x must be dense [B, N, C] or packed [capacity, C]; got "
                         f"{_checks.describe(x)}")
    layers = [check_block(blk, x.shape[-1]) for blk in blocks]
    rope = _stage_rope(layers, position_embeddings, tokens, x)
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    be = _dispatch.select(backend, x, tokens, layers)
    x = _checks.last_dim_contiguous(x)
    plan = _stage_plan(x, tokens, layers) if requested_backend(backend) == "auto" else None
    return _run_stage(x, tokens, layers, plan or dict.fromkeys(STAGE_OPS, be), rope)


def _stage_rope(layers: Sequence[LayerParts], position_embeddings: Rope | None,
                tokens: TokenSet, x: torch.Tensor) -> Rope | None:
    """Per-slot (cos, sin) [capacity, D] for a stage with rotary layers (None without)."""
    ropes = [p.family.name for p in layers if p.rope]
    if position_embeddings is None:
        if ropes:
            raise ValueError(f"a {ropes[0]} layer applies rotary position embeddings: pass "
                             "position_embeddings=(cos, sin) [N_patches, D], what the "
                             "transformers model's rope_embeddings(pixel_values) returns")
        return None
    if not ropes:
        raise ValueError("position_embeddings were given but no layer of the stage applies "
                         "rotary position embeddings; leave them out")
    return slot_rope(position_embeddings, tokens, x.shape[-1] // layers[0].num_heads, x.dtype)


def slot_rope(position_embeddings: Rope, tokens: TokenSet, head_dim: int, dtype: torch.dtype
              ) -> Rope:
    """Per-slot (cos, sin) [capacity, D] from the patch grid's (cos, sin) [N_patches, D]: token
    n of an image (from ``tokens.indices``) is patch ``n - P`` (P = N - N_patches prefix tokens
    first, as transformers counts them); prefix and padding slots get the identity (cos 1,
    sin 0). No host sync."""
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        raise TypeError("position_embeddings must be a (cos, sin) pair of [N_patches, D] "
                        "tensors, what the transformers model's rope_embeddings(pixel_values) "
                        "returns")
    cos, sin = position_embeddings
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.float_tensor(f"position_embeddings {name}", t)
        _checks.same_device(**{name: t, "indices": tokens.indices})
        if t.dim() != 2 or t.shape[-1] != head_dim or not 0 < t.shape[0] <= tokens.seq_len:
            raise ValueError(f"position_embeddings {name} must be [N_patches, D] with "
                             f"0 < N_patches <= N = {tokens.seq_len} and D = the head dim "
                             f"{head_dim}; got {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"position_embeddings cos {tuple(cos.shape)} and sin "
                         f"{tuple(sin.shape)} differ in shape")
    n = tokens.seq_len
    pos = tokens.indices.long() % n - (n - cos.shape[0])
    ok = ((pos >= 0) & tokens.valid_slots())[:, None]
    pos = pos.clamp(min=0)
    return (torch.where(ok, cos[pos], 1.0).to(dtype), torch.where(ok, sin[pos], 0.0).to(dtype))


STAGE_OPS = ("gather_tokens", "layer_norm", "packed_linear", "varlen_attention",
             "scatter_tokens")


def _stage_plan(x: torch.Tensor, tokens: TokenSet, layers: Sequence[LayerParts]
                ) -> dict[str, str] | None:
    """Per-op backends of an "auto" stage on a GPU whose architecture has measured orders
    (dtop_kernels.auto_order), each op its own fastest verified backend; None without any
    measured order (the stage then runs on one backend)."""
    from dtop_kernels import auto_order
    from dtop_kernels.backends import dispatcher

    if not layers or not any(auto_order.measured_order(op, x.device) for op in STAGE_OPS):
        return None
    parts = layers[0]
    d = x.shape[-1] // parts.num_heads
    q = x.new_empty(0, parts.num_heads, d)
    norm = next((b for b in auto_order.measured_order("layer_norm", x.device) or ()
                 if not _dispatch.why_not[b](x, tokens, layers)), "torch")
    linear = "torch" if parts.fc is None else \
        dispatcher("packed_linear").select("auto", x, parts.fc[0].weight, tokens, None)
    return {
        "gather_tokens": dispatcher("gather_tokens").select(
            "auto", x.new_empty(tokens.batch_size, tokens.seq_len, 0), tokens),
        "layer_norm": norm,
        "packed_linear": linear,
        "varlen_attention": dispatcher("varlen_attention").select("auto", q, q, q),
        "scatter_tokens": dispatcher("scatter_tokens").select("auto", x, tokens, None),
    }


def _fusable(parts: LayerParts, backend: str) -> bool:
    """The standard layer: plain Linear projections, exact GELU MLP, no extra norms, no layer
    scale (and, for the CUDA kernel, features that are multiples of 8). Such layers run with
    fused linear epilogues; others call their modules."""
    linears = (*parts.qkv, parts.proj)
    if parts.fc is None or not all(isinstance(m, nn.Linear) for m in linears) or parts.extras \
            or parts.ls1 is not None or parts.ls2 is not None:
        return False
    return backend != "cuda" or not any(m.in_features % 8 or m.out_features % 8
                                        for m in (*linears, *parts.fc))


def _linears(backend: str):
    """``linear(x, weight, bias, tokens, activation=, residual=, out=)`` on ``backend``: the
    kernel backends fuse bias, GELU, residual and the scatter into the GEMM; torch runs cuBLAS
    (addmm: bias fused) on the packed rows, then the rest, leaving the padding rows unmasked
    (they carry no meaning in a stage). ``out`` (dense) is not written: the result is a new
    tensor."""
    return functools.partial(linear_tokens, backend=backend, inplace=False, zero_padding=False)


def _block_fused(packed, normed1, tokens, parts: LayerParts, attention, norm, linear,
                 rope: Rope | None, dense_out=None):
    """One standard layer with packed linears (``_linears``): bias, GELU and residual in the
    GEMM epilogues on the kernel backends; with ``dense_out`` the last GEMM scatters its rows
    straight into it."""
    cap, c = packed.shape
    h = parts.num_heads
    d = c // h
    if normed1 is None:
        normed1 = norm(parts.norm1, packed)
    qkv = linear(normed1, *parts.qkv_weight(), tokens)
    q, k, v = qkv.view(cap, 3, h, d).unbind(1)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    cu, m = tokens.cu_seqlens, tokens.max_seqlen
    o = attention(q, k, v, cu, cu, m, m, parts.scale).reshape(cap, c)
    packed = linear(o, parts.proj.weight, parts.proj.bias, tokens, residual=packed)
    fc1, fc2 = parts.fc
    hid = linear(norm(parts.norm2, packed), fc1.weight, fc1.bias, tokens, activation="gelu")
    return linear(hid, fc2.weight, fc2.bias, tokens, residual=packed, out=dense_out)


def _run_stage(x, tokens, layers: Sequence[LayerParts], plan: dict[str, str],
               rope: Rope | None = None):
    """The stage with a backend per op (``plan``, keys ``STAGE_OPS``), each op called once
    dispatched (``dtop_py::`` ops, no per-layer checks): LayerNorms (on a kernel backend the first
    fused with the gather), attention and packed linears (fused epilogues on the kernel
    backends, the last layer scattering from its final GEMM); layers that are not standard (see
    ``_fusable``) call their own projection and MLP modules. ``rope``: per-slot (cos, sin) for
    the rotary layers."""
    ln_be, lin_be = plan["layer_norm"], plan["packed_linear"]
    idx, cu, n = tokens.indices, tokens.cu_seqlens, tokens.seq_len

    def norm(mod: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        if ln_be == "torch":
            return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        return layer_norm_tokens(t, mod.weight, mod.bias, tokens, mod.eps, backend=ln_be)[0]

    if not layers:
        return x if x.dim() == 2 else x.clone()
    attention = attention_on(plan["varlen_attention"])
    linear = _linears(lin_be)
    dense = x.dim() == 3
    x2d = x.reshape(-1, x.shape[-1])
    normed1 = None
    if dense and ln_be != "torch":
        n1 = layers[0].norm1
        normed1, packed = layer_norm_tokens(x2d, n1.weight, n1.bias, tokens, n1.eps,
                                            gather=True, store_x=True, backend=ln_be)
    elif dense:
        packed = library.call.gather(x2d, idx, cu, n, plan["gather_tokens"])
    else:
        packed = x
    for i, parts in enumerate(layers):
        last = i == len(layers) - 1
        layer_rope = rope if parts.rope else None
        if _fusable(parts, lin_be):
            out = x if dense and last and lin_be != "torch" else None
            packed = _block_fused(packed, normed1, tokens, parts, attention, norm, linear,
                                  layer_rope, out)
            if out is not None:
                return packed
        else:
            packed = block_packed(packed, tokens, parts, attention, norm=norm, normed1=normed1,
                                  rope=layer_rope)
        normed1 = None
    if not dense:
        return packed
    return library.call.scatter(packed, idx, cu, x2d, n, False,
                                plan["scatter_tokens"]).view(x.shape)


def pruned_block(
    x: torch.Tensor, tokens: TokenSet, block: nn.Module, *,
    position_embeddings: Rope | None = None, backend: str = "auto", check: bool | None = None,
) -> torch.Tensor:
    """A pre-norm ViT layer applied to the active tokens only: timm ``Block`` names, or a
    transformers ``ViTLayer`` / ``DeiTLayer`` / ``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` /
    ``DINOv3ViTLayer`` as it is (:mod:`dtop_kernels.layers`).

    LayerNorm -> multi-head self-attention -> residual -> LayerNorm -> MLP -> residual (with
    the layer's layer scale, ``attn.q_norm``/``k_norm``, ``attn.norm`` and the ``attn.gate``
    sigmoid gate when present; rotary embeddings from ``position_embeddings``, see
    :func:`pruned_stage`). x: dense [B, N, C] -> dense (inactive tokens unchanged) or packed
    [capacity, C] -> packed. Same as ``pruned_stage(x, tokens, [block])``; a layer whose math
    differs (see :func:`check_block`) raises, naming the attribute.
    """
    return pruned_stage(x, tokens, [block], position_embeddings=position_embeddings,
                        backend=backend, check=check)
