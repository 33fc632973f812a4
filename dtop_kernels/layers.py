"""What a pre-norm ViT layer computes, read from its module: one adapter per layer family.

``pruned_block`` / ``pruned_stage`` and the reference block run any layer these adapters read,
the modules themselves (weights, LayerNorm eps, activation, layer scale) used as they are:

- ``timm``: timm's ``Block`` with its standard ``Attention`` (and any module with those names,
  e.g. the package's own ``Block``): ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``,
  optional ``ls1``/``ls2``, ``attn.q_norm``/``k_norm``/``norm``/``gate``;
- ``vit``: transformers' ``ViTLayer`` and ``DeiTLayer`` (``layernorm_before``,
  ``attention.{q,k,v,o}_proj``, ``layernorm_after``, ``mlp``);
- ``dinov2``: transformers' ``Dinov2Layer`` and ``Dinov2WithRegistersLayer`` (``norm1``,
  ``attention``, ``layer_scale1``, ``norm2``, ``mlp`` or SwiGLU, ``layer_scale2``);
- ``dinov3``: transformers' ``DINOv3ViTLayer``: the DINOv2 layout plus rotary position
  embeddings on the patch tokens' queries and keys (the prefix tokens, class and registers,
  get none, as in transformers).

A layer these adapters cannot honour raises, naming the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Family:
    """Where one layer family keeps each part (attribute paths on the layer; ``qkv``, ``proj``,
    ``heads``, ``scale`` and ``extras`` on its attention)."""

    name: str
    classes: tuple[str, ...]  # transformers class names; () = the timm names (the default)
    norm1: str
    norm2: str
    attn: str
    qkv: tuple[str, ...]  # one C -> 3C projection, or q, k, v
    proj: str
    mlp: str
    ls: tuple[str, str] | None  # layer scale after attention, after the MLP (optional)
    heads: str
    scale: str
    mlp_fc: tuple[str, str, str]  # (fc1, activation, fc2) of a plain GELU MLP (fast path)
    mlp_classes: tuple[str, ...]  # MLP classes that compute fc2(act(fc1(x))); () = any
    layer_children: frozenset[str]
    attn_children: frozenset[str]
    attn_extras: tuple[str, ...] = ()  # timm: q_norm, k_norm, norm, gate
    attn_dropout: tuple[str, ...] = ()  # float attributes: attention dropout probability
    rope: bool = False


_HF_ATTN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_DINO_LAYER = frozenset({"norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp",
                         "layer_scale2"})

TIMM = Family(
    "timm", (), "norm1", "norm2", "attn", ("qkv",), "proj", "mlp", ("ls1", "ls2"), "num_heads",
    "scale", ("fc1", "act", "fc2"), (),
    frozenset({"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}),
    frozenset({"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}),
    attn_extras=("q_norm", "k_norm", "norm", "gate"),
)
FAMILIES = (
    TIMM,
    Family("vit", ("ViTLayer", "DeiTLayer"), "layernorm_before", "layernorm_after", "attention",
           ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", None, "num_attention_heads",
           "scaling", ("fc1", "activation_fn", "fc2"), ("ViTMLP", "DeiTMLP"),
           frozenset({"attention", "layernorm_before", "layernorm_after", "mlp", "dropout"}),
           _HF_ATTN, attn_dropout=("attention_dropout",)),
    Family("dinov2", ("Dinov2Layer", "Dinov2WithRegistersLayer"), "norm1", "norm2", "attention",
           ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", ("layer_scale1", "layer_scale2"),
           "num_attention_heads", "scaling", ("fc1", "activation_fn", "fc2"),
           ("Dinov2MLP", "Dinov2WithRegistersMLP"), _DINO_LAYER, _HF_ATTN,
           attn_dropout=("attention_dropout",)),
    Family("dinov3", ("DINOv3ViTLayer",), "norm1", "norm2", "attention",
           ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", ("layer_scale1", "layer_scale2"),
           "num_heads", "scaling", ("up_proj", "act_fn", "down_proj"), ("DINOv3ViTMLP",),
           _DINO_LAYER, _HF_ATTN, attn_dropout=("dropout",), rope=True),
)
SUPPORTED = ("timm Block", "ViTLayer", "DeiTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer",
             "DINOv3ViTLayer")


@dataclass(frozen=True, eq=False)
class LayerParts:
    """The modules of one pre-norm layer, as its family's adapter found them:
    ``x + ls1(proj(attention(qkv(norm1(x)))))`` then ``x + ls2(mlp(norm2(x)))``."""

    family: Family
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    num_heads: int
    scale: float
    qkv: tuple[nn.Module, ...]
    proj: nn.Module
    mlp: nn.Module
    ls1: nn.Module | None
    ls2: nn.Module | None
    extras: dict[str, nn.Module]  # timm's q_norm, k_norm, norm, gate when present
    fc: tuple[nn.Linear, nn.Linear] | None  # mlp = fc2(exact GELU(fc1(x))): the fast path

    @property
    def rope(self) -> bool:
        return self.family.rope

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused [3C, C] weight and [3C] bias (None: no bias) of projections that are all
        nn.Linear. Separate q, k, v projections are concatenated (a differentiable copy; a
        missing bias counts as zeros)."""
        if len(self.qkv) == 1:
            return self.qkv[0].weight, self.qkv[0].bias
        w = torch.cat([m.weight for m in self.qkv])
        if all(m.bias is None for m in self.qkv):
            return w, None
        return w, torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias
                             for m in self.qkv])

    def qkv_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, C] -> [T, 3C]: q, k, v side by side."""
        if len(self.qkv) == 1:
            return self.qkv[0](x)
        return torch.cat([m(x) for m in self.qkv], dim=-1)


def family_of(layer: nn.Module) -> Family:
    """The family whose layout ``layer`` has: a transformers layer (or a subclass) by its
    transformers class, whose forward it must keep; anything else by timm's names."""
    cls = type(layer)
    for klass in cls.__mro__:
        if not klass.__module__.startswith("transformers."):
            continue
        fam = next((f for f in FAMILIES if klass.__name__ in f.classes), None)
        if fam is None:
            raise TypeError(f"layer is transformers' {klass.__name__}, which pruned_block does "
                            f"not know; supported layers: {', '.join(SUPPORTED)}")
        if cls.forward is not klass.forward:
            raise TypeError(f"layer is a {klass.__name__} whose forward is overridden "
                            f"({cls.forward.__qualname__}): pruned_block reproduces the "
                            f"transformers {klass.__name__} forward only")
        return fam
    return TIMM


def _get(obj: nn.Module, path: str, owner: str, fam: Family):
    for part in path.split("."):
        if not hasattr(obj, part):
            raise TypeError(f"{owner} has no `{path}`: pruned_block reads a {fam.name} layer "
                            f"from these attributes (supported layers: {', '.join(SUPPORTED)})")
        obj = getattr(obj, part)
    return obj


def _forward_origin(cls: type) -> str:
    """``"module:qualname"`` of ``cls.forward``; under torch.compile a constant of the trace
    (dtop_kernels/_traced.py says why)."""
    if torch.compiler.is_compiling():
        from dtop_kernels._traced import forward_origin

        return forward_origin(cls)
    fwd = cls.forward
    return f"{fwd.__module__}:{fwd.__qualname__}"


def _timm_class_ok(mod: nn.Module, name: str, cls: str) -> None:
    """A timm module must be (or inherit unchanged) timm's ``cls``: other timm blocks and
    attentions (post-norm, parallel, differential, rotary, ...) compute something else."""
    if not type(mod).__module__.startswith("timm."):
        return
    origin = _forward_origin(type(mod))
    if not (origin.startswith("timm.") and origin.endswith(":" + cls + ".forward")):
        raise TypeError(
            f"{name} is timm's {type(mod).__name__}, whose forward differs from timm's {cls}: "
            f"pruned_block reproduces the pre-norm timm Block with its standard Attention only"
        )


def _exact_gelu(act: nn.Module | None) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _plain_mlp(mlp: nn.Module, fam: Family) -> tuple[nn.Linear, nn.Linear] | None:
    """(fc1, fc2) when ``mlp`` computes ``fc2(exact GELU(fc1(x)))`` (its other children
    identities), else None."""
    fc1, act, fc2 = (getattr(mlp, n, None) for n in fam.mlp_fc)
    if fam.mlp_classes and type(mlp).__name__ not in fam.mlp_classes:
        return None
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and _exact_gelu(act)):
        return None
    if fc1.out_features != fc2.in_features:
        return None
    others = (m for n, m in mlp.named_children() if n not in fam.mlp_fc)
    if not all(isinstance(m, (nn.Identity, nn.Dropout)) for m in others):
        return None
    return fc1, fc2


def read_layer(layer: nn.Module, dim: int) -> LayerParts:
    """The parts of ``layer`` (any supported family) for tokens of width ``dim``; raises
    TypeError / ValueError naming the attribute that cannot be honoured: an unknown submodule or
    parameter, a width or head count that does not fit, dropout or drop-path in training."""
    fam = family_of(layer)
    root = "block" if fam is TIMM else "layer"
    parts = {n: _get(layer, getattr(fam, n), root, fam) for n in ("norm1", "norm2", "mlp")}
    attn = _get(layer, fam.attn, root, fam)
    if fam is TIMM:
        _timm_class_ok(layer, "block", "Block")
        _timm_class_ok(attn, "block.attn", "Attention")
    aname = f"{root}.{fam.attn}"
    qkv = tuple(_get(attn, n, aname, fam) for n in fam.qkv)
    proj = _get(attn, fam.proj, aname, fam)
    h = _get(attn, fam.heads, aname, fam)
    for owner, oname, known in ((layer, root, fam.layer_children),
                                (attn, aname, fam.attn_children)):
        for name, _ in owner.named_children():
            if name not in known:
                raise TypeError(f"{oname}.{name} is a submodule pruned_block does not apply "
                                f"(it knows {sorted(known)}); run this layer densely")
        for name, _ in owner.named_parameters(recurse=False):
            raise TypeError(f"{oname}.{name} is a parameter pruned_block does not apply (e.g. a "
                            "separate q/v bias or layer-scale gamma); fold it into the known "
                            "submodules or run this layer densely")
    for name in ("norm1", "norm2"):
        m = parts[name]
        if not isinstance(m, nn.LayerNorm) or m.weight is None or m.bias is None:
            raise TypeError(f"{root}.{getattr(fam, name)} is not an affine nn.LayerNorm "
                            f"({type(m).__name__}): pruned_block applies LayerNorm only")
    if not isinstance(h, int) or isinstance(h, bool) or h <= 0:
        raise ValueError(f"{aname}.{fam.heads} must be a positive int; got {h!r}")
    if dim % h:
        raise ValueError(f"C = {dim} is not divisible by {aname}.{fam.heads} = {h}")
    width = sum(getattr(m, "out_features", dim * 3 // len(qkv)) for m in qkv)
    if any(getattr(m, "in_features", dim) != dim for m in qkv) or width != 3 * dim:
        names = ", ".join(f"{aname}.{n}" for n in fam.qkv)
        raise ValueError(f"{names} must map the tokens' C = {dim} to {3 * dim} features in all "
                         f"(q, k, v of {dim} each); got {width}")
    d = dim // h
    head_dim = getattr(attn, "head_dim", d)
    if head_dim != d:
        raise ValueError(f"{aname}.head_dim = {head_dim} but C / heads = {d}: "
                         "pruned_block needs head_dim * heads = C")
    if layer.training:
        _no_training_dropout(layer, attn, fam, root)
    ls1, ls2 = (getattr(layer, n, None) for n in fam.ls) if fam.ls else (None, None)
    extras = {n: m for n in fam.attn_extras
              if not _identity(m := getattr(attn, n, None))}
    return LayerParts(fam, parts["norm1"], parts["norm2"], h,
                      float(getattr(attn, fam.scale, d**-0.5)), qkv, proj, parts["mlp"],
                      None if _identity(ls1) else ls1, None if _identity(ls2) else ls2,
                      extras, _plain_mlp(parts["mlp"], fam))


def _no_training_dropout(layer: nn.Module, attn: nn.Module, fam: Family, root: str) -> None:
    for name, m in layer.named_modules():
        p = m.p if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", 0.0)
        if p and p > 0:
            raise ValueError(
                f"{root}.{name} drops with p={p} in training mode; pruned_block applies no "
                "dropout or drop-path: set them to 0 or call eval()"
            )
    for name in fam.attn_dropout:
        p = getattr(attn, name, 0.0)
        if p and p > 0:
            raise ValueError(
                f"{root}.{fam.attn}.{name} = {p} drops attention probabilities in training "
                "mode; pruned_block applies no dropout: set it to 0 or call eval()"
            )


def _identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def call_layer(layer: nn.Module, x: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The layer's own dense forward on x [B, N, C] -> [B, N, C]: timm-style ``layer(x)``; a
    transformers layer with its ``position_embeddings`` (cos, sin) [N_patches, D] when it
    applies rotary embeddings (the last N_patches tokens are patches)."""
    if family_of(layer).rope:
        out = layer(x, position_embeddings=position_embeddings)
    else:
        out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: ``cat(-x[D/2:], x[:D/2])`` (the rotary embedding's pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, H, D] with per-row cos, sin [T, D] (identity rows: cos 1,
    sin 0), in x's dtype."""
    return x * cos[:, None].to(x.dtype) + rotate_half(x) * sin[:, None].to(x.dtype)
