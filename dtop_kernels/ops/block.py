"""``pruned_block`` / ``pruned_stage``: ViT blocks run on the active tokens only."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtop_kernels import _checks, cuda, triton
from dtop_kernels.backends import Dispatcher, register, requested_backend
from dtop_kernels.ops import library
from dtop_kernels.ops.attention import attention_on
from dtop_kernels.ops.layernorm import layer_norm_tokens
from dtop_kernels.ops.linear import linear_tokens
from dtop_kernels.reference.block import block_packed
from dtop_kernels.tokens import TokenSet


def _norm_reasons(blocks: Sequence[nn.Module]) -> list[str]:
    r = []
    for i, blk in enumerate(blocks):
        for name in ("norm1", "norm2"):
            m = getattr(blk, name, None)
            if not isinstance(m, nn.LayerNorm) or m.weight is None or m.bias is None:
                r.append(f"blocks[{i}].{name} is not an affine nn.LayerNorm")
    return r


def _why_not_triton(x: torch.Tensor, tokens: TokenSet, blocks: Sequence[nn.Module] = ()):
    r = triton.device_reasons([x, tokens.indices]) + triton.dtype_reasons(x.dtype)
    return r + _norm_reasons(blocks)


def _why_not_cuda(x: torch.Tensor, tokens: TokenSet, blocks: Sequence[nn.Module] = ()):
    r = cuda.tensor_reasons([x, tokens.indices]) + cuda.mma_reasons(x.dtype)
    for blk in blocks[:1]:
        d = x.shape[-1] // blk.attn.num_heads
        r += cuda.head_dim_reasons(d, d)
    return r + _norm_reasons(blocks)


_dispatch = register(Dispatcher(
    "pruned_block",
    {"torch": lambda *a, **k: [],
     "triton": _why_not_triton,
     "cuda": _why_not_cuda},
    auto_order=("triton", "cuda", "torch"),
))

_REQUIRED = ("norm1", "attn", "attn.qkv", "attn.proj", "attn.num_heads", "norm2", "mlp")
# Submodules whose math block_packed reproduces (timm Block / Attention names); anything else
# (a parameter or module it would not apply) is named in the error.
_BLOCK_PARTS = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_ATTN_PARTS = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}


def _timm_class_ok(mod: nn.Module, name: str, cls: str) -> None:
    """A timm module must be (or inherit unchanged) timm's ``cls``: other timm blocks and
    attentions (post-norm, parallel, differential, rotary, ...) compute something else."""
    fwd = type(mod).forward
    if not type(mod).__module__.startswith("timm."):
        return
    if fwd.__qualname__ != f"{cls}.forward" or not fwd.__module__.startswith("timm."):
        raise TypeError(
            f"{name} is timm's {type(mod).__name__}, whose forward differs from timm's {cls}: "
            f"pruned_block reproduces the pre-norm timm Block with its standard Attention only"
        )


def check_block(block: nn.Module, dim: int) -> None:
    """Raise unless ``block`` computes what the packed path computes: a pre-norm block with
    timm ``Block`` names (optional ``ls1``/``ls2`` layer scale, ``attn.q_norm``/``k_norm``,
    ``attn.norm``, ``attn.gate``), matching ``dim``, without dropout / drop-path in training.
    The error names the attribute that cannot be honoured."""
    for name in _REQUIRED:
        obj = block
        for part in name.split("."):
            if not hasattr(obj, part):
                raise TypeError(
                    f"block has no `{name}`: pruned_block needs a pre-norm ViT block with timm's "
                    f"Block attribute names {_REQUIRED} (optional ls1/ls2)"
                )
            obj = getattr(obj, part)
    attn = block.attn
    _timm_class_ok(block, "block", "Block")
    _timm_class_ok(attn, "block.attn", "Attention")
    for owner, oname, parts in ((block, "block", _BLOCK_PARTS), (attn, "block.attn", _ATTN_PARTS)):
        for name, _ in owner.named_children():
            if name not in parts:
                raise TypeError(f"{oname}.{name} is a submodule pruned_block does not apply "
                                f"(it knows {sorted(parts)}); run this block densely")
        for name, _ in owner.named_parameters(recurse=False):
            raise TypeError(f"{oname}.{name} is a parameter pruned_block does not apply (e.g. a "
                            "separate q/v bias or layer-scale gamma); fold it into the known "
                            "submodules (qkv bias, ls1/ls2) or run this block densely")
    h = attn.num_heads
    if not isinstance(h, int) or h <= 0:
        raise ValueError(f"block.attn.num_heads must be a positive int; got {h!r}")
    qkv = attn.qkv
    if getattr(qkv, "in_features", dim) != dim or getattr(qkv, "out_features", 3 * dim) != 3 * dim:
        raise ValueError(
            f"block.attn.qkv maps {qkv.in_features} -> {qkv.out_features}; the tokens have C = "
            f"{dim}, so it must map {dim} -> {3 * dim}"
        )
    if dim % h:
        raise ValueError(f"C = {dim} is not divisible by num_heads = {h}")
    head_dim = getattr(attn, "head_dim", dim // h)
    if head_dim != dim // h:
        raise ValueError(f"block.attn.head_dim = {head_dim} but C / num_heads = {dim // h}: "
                         "pruned_block needs head_dim * num_heads = C")
    if block.training:
        for name, m in block.named_modules():
            p = m.p if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", 0.0)
            if p and p > 0:
                raise ValueError(
                    f"block.{name} drops with p={p} in training mode; pruned_block applies no "
                    "dropout or drop-path: set them to 0 or call block.eval()"
                )


def pruned_stage(
    x: torch.Tensor,
    tokens: TokenSet,
    blocks: Sequence[nn.Module],
    *,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """Run ``blocks`` in order on the active tokens only.

    x: dense [B, N, C] -> dense [B, N, C] (gathered once, scattered once; inactive tokens come
    out unchanged), or packed [capacity, C] -> packed [capacity, C] (padding rows carry no
    meaning). Each active token attends only to the active tokens of its own image. Every block
    must pass :func:`check_block`. ``check``: validate ``tokens`` once (one host sync; always for
    CPU tensors; None follows ``DTOP_CHECK``).

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
    for blk in blocks:
        check_block(blk, x.shape[-1])
    _checks.tokens_contract(tokens, _checks.check_flag(check))
    be = _dispatch.select(backend, x, tokens, blocks)
    x = _checks.last_dim_contiguous(x)
    plan = _stage_plan(x, tokens, blocks) if requested_backend(backend) == "auto" else None
    return _run_stage(x, tokens, blocks, plan or dict.fromkeys(STAGE_OPS, be))


STAGE_OPS = ("gather_tokens", "layer_norm", "packed_linear", "varlen_attention",
             "scatter_tokens")


def _stage_plan(x: torch.Tensor, tokens: TokenSet, blocks: Sequence[nn.Module]
                ) -> dict[str, str] | None:
    """Per-op backends of an "auto" stage on a GPU whose architecture has measured orders
    (dtop_kernels.auto_order), each op its own fastest verified backend; None without any
    measured order (the stage then runs on one backend)."""
    from dtop_kernels import auto_order
    from dtop_kernels.backends import dispatcher

    if not blocks or x.device.type != "cuda" or \
            not any(auto_order.measured_order(op, x.device) for op in STAGE_OPS):
        return None
    blk = blocks[0]
    d = x.shape[-1] // blk.attn.num_heads
    q = x.new_empty(0, blk.attn.num_heads, d)
    norm = next((b for b in auto_order.measured_order("layer_norm", x.device) or ()
                 if not _dispatch.why_not[b](x, tokens, blocks)), "torch")
    fc1 = getattr(blk.mlp, "fc1", None)
    linear = "torch" if not isinstance(fc1, nn.Linear) else \
        dispatcher("packed_linear").select("auto", x, fc1.weight, tokens, None)
    return {
        "gather_tokens": dispatcher("gather_tokens").select(
            "auto", x.new_empty(tokens.batch_size, tokens.seq_len, 0), tokens),
        "layer_norm": norm,
        "packed_linear": linear,
        "varlen_attention": dispatcher("varlen_attention").select("auto", q, q, q),
        "scatter_tokens": dispatcher("scatter_tokens").select("auto", x, tokens, None),
    }


def _identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _fusable(blk: nn.Module, backend: str) -> bool:
    """The standard timm block: plain Linear layers, exact GELU MLP, no extra norms, no layer
    scale (and, for the CUDA kernel, features that are multiples of 8). Such blocks run with
    fused linear epilogues; others call their modules."""
    attn, mlp = blk.attn, blk.mlp
    linears = ((attn, "qkv"), (attn, "proj"), (mlp, "fc1"), (mlp, "fc2"))
    if not all(isinstance(getattr(m, name, None), nn.Linear) for m, name in linears):
        return False
    if backend == "cuda" and any(getattr(m, name).in_features % 8 or
                                 getattr(m, name).out_features % 8 for m, name in linears):
        return False
    return (
        isinstance(getattr(mlp, "act", None), nn.GELU) and mlp.act.approximate == "none"
        and all(_identity(getattr(attn, n, None)) for n in ("q_norm", "k_norm", "norm", "gate"))
        and _identity(getattr(mlp, "norm", None))
        and all(_identity(getattr(blk, n, None)) for n in ("ls1", "ls2"))
    )


def _linears(backend: str):
    """``linear(x, weight, bias, tokens, activation=, residual=, out=)`` on ``backend``: the
    kernel backends fuse bias, GELU, residual and the scatter into the GEMM; torch runs cuBLAS
    (addmm: bias fused) on the packed rows, then the rest, leaving the padding rows unmasked
    (they carry no meaning in a stage). ``out`` (dense) is not written: the result is a new
    tensor."""
    return functools.partial(linear_tokens, backend=backend, inplace=False, zero_padding=False)


def _block_fused(packed, normed1, tokens, blk, attention, norm, linear, dense_out=None):
    """One standard block with packed linears (``_linears``): bias, GELU and residual in the
    GEMM epilogues on the kernel backends; with ``dense_out`` the last GEMM scatters its rows
    straight into it."""
    attn, mlp = blk.attn, blk.mlp
    cap, c = packed.shape
    h = attn.num_heads
    d = c // h
    if normed1 is None:
        normed1 = norm(blk.norm1, packed)
    qkv = linear(normed1, attn.qkv.weight, attn.qkv.bias, tokens)
    q, k, v = qkv.view(cap, 3, h, d).unbind(1)
    cu, m = tokens.cu_seqlens, tokens.max_seqlen
    o = attention(q, k, v, cu, cu, m, m, getattr(attn, "scale", d**-0.5)).reshape(cap, c)
    packed = linear(o, attn.proj.weight, attn.proj.bias, tokens, residual=packed)
    hid = linear(norm(blk.norm2, packed), mlp.fc1.weight, mlp.fc1.bias, tokens,
                 activation="gelu")
    return linear(hid, mlp.fc2.weight, mlp.fc2.bias, tokens, residual=packed, out=dense_out)


def _run_stage(x, tokens, blocks, plan: dict[str, str]):
    """The stage with a backend per op (``plan``, keys ``STAGE_OPS``), each op called once
    dispatched (``dtop::`` ops, no per-layer checks): LayerNorms (on a kernel backend the first
    fused with the gather), attention and packed linears (fused epilogues on the kernel
    backends, the last block scattering from its final GEMM); blocks that are not standard (see
    ``_fusable``) call their own linear modules."""
    ln_be, lin_be = plan["layer_norm"], plan["packed_linear"]
    idx, cu, n = tokens.indices, tokens.cu_seqlens, tokens.seq_len

    def norm(mod: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        if ln_be == "torch":
            return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        return layer_norm_tokens(t, mod.weight, mod.bias, tokens, mod.eps, backend=ln_be)[0]

    if not blocks:
        return x if x.dim() == 2 else x.clone()
    attention = attention_on(plan["varlen_attention"])
    linear = _linears(lin_be)
    dense = x.dim() == 3
    x2d = x.reshape(-1, x.shape[-1])
    normed1 = None
    if dense and ln_be != "torch":
        n1 = blocks[0].norm1
        normed1, packed = layer_norm_tokens(x2d, n1.weight, n1.bias, tokens, n1.eps,
                                            gather=True, store_x=True, backend=ln_be)
    elif dense:
        packed = library.gather(x2d, idx, cu, n, plan["gather_tokens"])
    else:
        packed = x
    for i, blk in enumerate(blocks):
        last = i == len(blocks) - 1
        if _fusable(blk, lin_be):
            out = x if dense and last and lin_be != "torch" else None
            packed = _block_fused(packed, normed1, tokens, blk, attention, norm, linear, out)
            if out is not None:
                return packed
        else:
            packed = block_packed(packed, tokens, blk, attention, norm=norm, normed1=normed1)
        normed1 = None
    if not dense:
        return packed
    return library.scatter(packed, idx, cu, x2d, n, False, plan["scatter_tokens"]).view(x.shape)


def pruned_block(
    x: torch.Tensor, tokens: TokenSet, block: nn.Module, *, backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """A pre-norm ViT block (timm ``Block`` names) applied to the active tokens only.

    LayerNorm -> multi-head self-attention -> residual -> LayerNorm -> MLP -> residual (with
    ``ls1``/``ls2`` layer scale, ``attn.q_norm``/``k_norm``, ``attn.norm`` and the
    ``attn.gate`` sigmoid gate when present). x: dense [B, N, C] -> dense (inactive tokens
    unchanged) or packed [capacity, C] -> packed. Same as ``pruned_stage(x, tokens, [block])``;
    a block whose math differs (see :func:`check_block`) raises, naming the attribute.
    """
    return pruned_stage(x, tokens, [block], backend=backend, check=check)
