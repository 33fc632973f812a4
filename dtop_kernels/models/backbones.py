"""Backbones brought from timm and transformers, their modules used as they are (shared).

:func:`timm_backbone` and :func:`transformers_backbone` split a source model into a
:class:`Backbone`: a stem (patch embedding, prefix tokens, position embedding; for DINOv3 the
rotary embeddings) made of the source's own embedding modules, and the source's own layers.
The final norm, pooling and classifier are left out (the DToP heads read the layers' outputs).
``ViTDToP.from_timm`` / ``ViTDToP.from_transformers`` build on them.

:func:`backbone_spec` describes such a backbone as plain data (timm: the ``VisionTransformer``
constructor arguments read from the modules; transformers: the model class name and its config
as a dict) and :func:`backbone_from_spec` rebuilds it: checkpoints store the description, which
loads weights-only, and nothing but timm's ``VisionTransformer`` and the model classes of the
transformers package is ever built from it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from dtop_kernels.layers import family_of


class Backbone(NamedTuple):
    """A stem (img [B, in_chans, H, W] -> tokens [B, P + Hg*Wg, C], prefix tokens first) and
    the layers that run on its tokens."""

    stem: nn.Module
    layers: list[nn.Module]


def _conv_name(module: nn.Module, what: str) -> str:
    """The name of ``module``'s patch projection (a square, stride = kernel nn.Conv2d)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and \
                m.kernel_size[0] == m.kernel_size[1]:
            return name
    raise TypeError(f"{what} has no square, non-overlapping nn.Conv2d patch projection")


class _Stem(nn.Module):
    """What every stem has: ``proj`` (the patch projection conv, for the patch size, device,
    dtype and FLOPs), ``num_prefix_tokens``, ``position_embeddings(img)``."""

    _proj_name: str
    num_prefix_tokens: int

    @property
    def proj(self) -> nn.Conv2d:
        return self.get_submodule(self._proj_name)

    def position_embeddings(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [Hg*Wg, D] of rotary embeddings, None without them."""
        return None


class TimmStem(_Stem):
    """A timm ``VisionTransformer``'s embedding: ``patch_embed``, ``cls_token``, ``reg_token``,
    ``pos_embed`` (resized by timm for other image sizes when the model was created with
    ``dynamic_img_size=True``), ``pos_drop``, ``norm_pre``: the model's own modules and
    parameters, applied by timm's own ``_pos_embed``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name in ("patch_embed", "_pos_embed", "blocks", "num_prefix_tokens"):
            if not hasattr(vit, name):
                raise TypeError(f"model has no `{name}`: from_timm takes a timm "
                                "VisionTransformer (timm.create_model('vit_...'))")
        p = getattr(getattr(vit, "patch_drop", None), "prob", 0.0)
        if p:
            raise ValueError(f"model.patch_drop drops {p} of the patches; DToP decides which "
                             "tokens run: create the model with patch_drop_rate=0")
        self._pos_embed_of = type(vit)._pos_embed
        self.patch_embed = vit.patch_embed
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, \
            vit.pos_embed
        self.pos_drop, self.norm_pre = vit.pos_drop, vit.norm_pre
        self.no_embed_class = vit.no_embed_class
        self.dynamic_img_size = vit.dynamic_img_size
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self._proj_name = "patch_embed." + _conv_name(vit.patch_embed, "model.patch_embed")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self._pos_embed_of(self, self.patch_embed(img)))


def timm_backbone(vit: nn.Module) -> Backbone:
    """The stem and blocks of a timm ``VisionTransformer``."""
    stem = TimmStem(vit)
    return Backbone(stem, list(vit.blocks))


_HF_LAYER_PATHS = ("layers", "encoder.layer", "encoder.layers", "model.layer")
_HF_PREFIX = ("cls_token", "distillation_token", "register_tokens")


class TransformersStem(_Stem):
    """A transformers vision model's ``embeddings`` (class / distillation / register tokens,
    position embeddings interpolated to the image size as the model's
    ``interpolate_pos_encoding`` does) and, for DINOv3, its ``rope_embeddings``: the model's own
    modules; ``model_class`` and ``config`` describe the model (:func:`backbone_spec`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "embeddings"):
            raise TypeError(f"{type(model).__name__} has no `embeddings`: from_transformers "
                            "takes a ViT, DeiT, DINOv2 (with registers) or DINOv3 ViT model")
        self.model_class, self.config = type(model), getattr(model, "config", None)
        self.embeddings = model.embeddings
        self.rope_embeddings = getattr(model, "rope_embeddings", None)
        self.interpolate = "interpolate_pos_encoding" in \
            inspect.signature(self.embeddings.forward).parameters
        self.num_prefix_tokens = sum(
            getattr(self.embeddings, n).shape[1] for n in _HF_PREFIX
            if isinstance(getattr(self.embeddings, n, None), torch.Tensor))
        self._proj_name = "embeddings." + _conv_name(self.embeddings,
                                                     f"{type(model).__name__}.embeddings")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        img = img.to(self.proj.weight.dtype)
        if self.interpolate:
            return self.embeddings(img, interpolate_pos_encoding=True)
        return self.embeddings(img)

    def position_embeddings(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.rope_embeddings is None:
            return None
        return self.rope_embeddings(img.to(self.proj.weight.dtype))


def transformers_backbone(model: nn.Module) -> Backbone:
    """The stem and layers of a transformers vision model (a task model such as
    ``ViTForImageClassification`` gives its base model)."""
    base = model if hasattr(model, "embeddings") else getattr(model, "base_model", model)
    for path in _HF_LAYER_PATHS:
        layers = base
        for part in path.split("."):
            layers = getattr(layers, part, None)
        if isinstance(layers, nn.ModuleList):
            break
    else:
        raise TypeError(f"{type(base).__name__} has none of {_HF_LAYER_PATHS} as its list of "
                        "layers: from_transformers takes a ViT, DeiT, DINOv2 (with registers) "
                        "or DINOv3 ViT model")
    for i, layer in enumerate(layers):
        try:
            family_of(layer)
        except TypeError as e:
            raise TypeError(f"layer {i}: {e}") from None
    return Backbone(TransformersStem(base), list(layers))


SOURCES = ("timm", "transformers")
# timm VisionTransformer arguments a spec records (those of the installed timm); structure
# only: the head, pooling and final norm are not part of the backbone
_TIMM_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
              "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm",
              "proj_bias", "init_values", "class_token", "pos_embed", "no_embed_class",
              "reg_tokens", "pre_norm", "dynamic_img_size", "dynamic_img_pad", "pos_drop_rate",
              "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "act_layer")
# MLP activations by timm's names (get_act_layer); none recorded: nn.GELU, timm's default
_TIMM_ACTS = ("gelu_tanh", "quick_gelu", "gelu", "silu", "relu")
_TIMM_NORMS = ("timm", "torch")  # timm.layers.LayerNorm, torch.nn.LayerNorm
# transformers model types whose layers pruned_block runs (layers.FAMILIES)
_HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit")
_DTYPES = {str(d).removeprefix("torch."): d
           for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_PLAIN = (bool, int, float, str, type(None))
_RUNTIME = frozenset({"training", "fused_attn", "grad_checkpointing", "gradient_checkpointing"})


class SpecError(ValueError):
    """A backbone that a spec cannot describe, or a spec that does not describe a backbone."""


def _no_spec(why: str) -> SpecError:
    return SpecError(f"{why}. A checkpoint records the backbone as timm VisionTransformer "
                     "arguments or a transformers model class and config; for this model save "
                     "its state dict (torch.save(model.state_dict(), path)), and to load it "
                     "rebuild the model with ViTDToP.from_timm / from_transformers yourself and "
                     "call load_state_dict")


def check_data(obj: object, where: str) -> None:
    """SpecError unless ``obj`` is plain data: dicts, lists and tuples of strings, numbers,
    bools and None, of exactly those types (what ``torch.load(weights_only=True)`` reads)."""
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise SpecError(f"{where}: key {k!r} is not a string or an int")
            check_data(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_data(v, f"{where}[{i}]")
    elif type(obj) not in _PLAIN:
        raise SpecError(f"{where} is a {type(obj).__qualname__}, not plain data (a string, "
                        "number, bool, None, list, tuple or dict)")


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _present(module: nn.Module | None) -> bool:
    """Whether an optional timm submodule is there (not None, not an ``nn.Identity``)."""
    return module is not None and not isinstance(module, nn.Identity)


def _timm_kwargs(stem: TimmStem, layers: Sequence[nn.Module]) -> dict:
    """The ``VisionTransformer`` arguments of a timm stem and blocks, read from the modules."""
    import timm.layers

    vit = _vit_class()
    if stem._pos_embed_of is not vit._pos_embed:
        raise _no_spec("the model's class overrides timm VisionTransformer._pos_embed")
    try:
        pe, block = stem.patch_embed, layers[0]
        attn, mlp, dim = block.attn, block.mlp, stem.proj.out_channels
        hidden = mlp.fc1.out_features
        ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim
        act = mlp.act
        drop_path = getattr(layers[-1], "drop_path1", None)
        kw = {"img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
              "in_chans": stem.proj.in_channels, "embed_dim": dim, "depth": len(layers),
              "num_heads": attn.num_heads, "mlp_ratio": ratio,
              "qkv_bias": attn.qkv.bias is not None,
              "qk_norm": _present(getattr(attn, "q_norm", None)),
              "scale_attn_norm": _present(getattr(attn, "norm", None)),
              "scale_mlp_norm": _present(getattr(mlp, "norm", None)),
              "proj_bias": attn.proj.bias is not None,
              "init_values": getattr(block.ls1, "init_values", 1.0) if _present(block.ls1)
              else None,
              "class_token": stem.cls_token is not None,
              "pos_embed": "learn" if stem.pos_embed is not None else "none",
              "no_embed_class": stem.no_embed_class,
              "reg_tokens": 0 if stem.reg_token is None else stem.reg_token.shape[1],
              "pre_norm": _present(stem.norm_pre),
              "dynamic_img_size": stem.dynamic_img_size,
              "dynamic_img_pad": pe.dynamic_img_pad,
              "pos_drop_rate": stem.pos_drop.p, "proj_drop_rate": attn.proj_drop.p,
              "attn_drop_rate": attn.attn_drop.p,
              "drop_path_rate": getattr(drop_path, "drop_prob", 0.0)}
        norm = block.norm1
    except (AttributeError, IndexError, TypeError) as e:
        raise _no_spec(f"the timm backbone is not a standard VisionTransformer ({e})") from None
    if type(act) is not nn.GELU or act.approximate != "none":  # the VisionTransformer default
        names = [n for n in _TIMM_ACTS if timm.layers.get_act_layer(n) is type(act)]
        if not names:
            raise _no_spec(f"the timm backbone's MLP activation {act!r} has no timm name")
        kw["act_layer"] = names[0]
    kinds = {timm.layers.LayerNorm: "timm", nn.LayerNorm: "torch"}
    if type(norm) not in kinds:
        raise _no_spec(f"the timm backbone's norm {type(norm).__name__} is neither timm's nor "
                       "torch's LayerNorm")
    known = inspect.signature(vit).parameters
    return {"kwargs": {k: v for k, v in kw.items() if k in known},
            "norm": kinds[type(norm)], "norm_eps": norm.eps}


def _hf_class(name: object) -> type:
    """The transformers model class named ``name``: an attribute of the package, of one of the
    model types whose layers the package runs."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() \
        and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.")
            and getattr(cls.config_class, "model_type", None) in _HF_MODEL_TYPES):
        raise SpecError(f"{name!r} is not a transformers model class of the types "
                        f"{', '.join(_HF_MODEL_TYPES)}")
    return cls


def _structure(backbone: Backbone) -> list[tuple]:
    """Per module of the stem and layers: its name, class, plain settings, and the names and
    shapes of its tensors."""
    out = []
    parts = [("patch_embed", backbone.stem),
             *((f"blocks.{i}", layer) for i, layer in enumerate(backbone.layers))]
    for prefix, part in parts:
        for name, m in part.named_modules(prefix=prefix):
            attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")
                     and k not in _RUNTIME and isinstance(v, (*_PLAIN, tuple))}
            tensors = {k: tuple(t.shape) for k, t in (*m._parameters.items(),
                                                      *m._buffers.items()) if t is not None}
            out.append((name, f"{type(m).__module__}.{type(m).__qualname__}", attrs, tensors))
    return out


def _first_difference(want: list[tuple], got: list[tuple]) -> str:
    for w, g in zip(want, got):
        if w != g:
            what = ("class", "settings", "tensors")
            diff = next(i for i in range(1, 4) if w[i] != g[i])
            return f"{g[0]}: {what[diff - 1]} {g[diff]} where the description builds {w[diff]}"
    short, long = (want, got) if len(want) < len(got) else (got, want)
    extra = long[len(short)][0]
    return f"{extra} exists only in {'the model' if long is got else 'the description'}"


def backbone_spec(backbone: Backbone) -> dict:
    """A description of ``backbone`` (from :func:`timm_backbone` or
    :func:`transformers_backbone`) as plain data, which :func:`backbone_from_spec` rebuilds:
    ``source`` ("timm" or "transformers"), ``dtype``, and timm's ``kwargs`` (of
    ``VisionTransformer``), ``norm`` and ``norm_eps``, or transformers' ``class`` (its name in
    the package) and ``config`` (``config.to_dict()``). The description is built (on the meta
    device) and compared with the backbone module by module: SpecError, saying what differs
    and what to do instead, when it does not rebuild the same structure."""
    stem, layers = backbone
    if isinstance(stem, TimmStem):
        spec = {"source": "timm", **_timm_kwargs(stem, layers)}
    elif isinstance(stem, TransformersStem):
        name = stem.model_class.__name__
        try:
            known = _hf_class(name) is stem.model_class
        except SpecError:
            known = False
        if not known or stem.config is None:
            raise _no_spec(f"{stem.model_class.__module__}.{stem.model_class.__qualname__} is "
                           "not a model class of the transformers package (of the types "
                           f"{', '.join(_HF_MODEL_TYPES)})")
        spec = {"source": "transformers", "class": name, "config": stem.config.to_dict()}
    else:
        raise _no_spec(f"its stem {type(stem).__name__} comes from neither from_timm nor "
                       "from_transformers")
    spec["dtype"] = str(stem.proj.weight.dtype).removeprefix("torch.")
    if spec["dtype"] not in _DTYPES:
        raise _no_spec(f"its dtype {spec['dtype']} is none of {sorted(_DTYPES)}")
    check_data(spec, "the backbone description")
    with torch.device("meta"):
        rebuilt = backbone_from_spec(spec)
    want, got = _structure(rebuilt), _structure(backbone)
    if want != got:
        raise _no_spec(f"the {spec['source']} backbone differs from what its description "
                       f"rebuilds ({_first_difference(want, got)})")
    return spec


def backbone_from_spec(spec: Mapping) -> Backbone:
    """The backbone a :func:`backbone_spec` describes, on the current device: a new timm
    ``VisionTransformer`` (its weights uninitialized) or transformers model, of the recorded
    dtype, in eval mode; load the weights next. Builds nothing else: SpecError for any other
    source, class, argument or dtype."""
    if not isinstance(spec, Mapping) or spec.get("source") not in SOURCES:
        raise SpecError(f"a backbone description needs 'source' in {SOURCES}; got {spec!r:.200}")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec.get("dtype"), str) else None
    if dtype is None:
        raise SpecError(f"backbone dtype must be one of {sorted(_DTYPES)}; got "
                        f"{spec.get('dtype')!r}")
    if spec["source"] == "timm":
        import timm.layers

        kwargs, norm, eps = spec.get("kwargs"), spec.get("norm"), spec.get("norm_eps")
        if not isinstance(kwargs, Mapping) or not set(kwargs) <= set(_TIMM_ARGS):
            raise SpecError(f"timm kwargs must be a dict of {_TIMM_ARGS}; got {kwargs!r:.200}")
        check_data(kwargs, "timm kwargs")
        if kwargs.get("act_layer", "gelu") not in _TIMM_ACTS or norm not in _TIMM_NORMS \
                or not isinstance(eps, float):
            raise SpecError(f"timm act_layer must be one of {_TIMM_ACTS}, norm one of "
                            f"{_TIMM_NORMS} and norm_eps a float; got "
                            f"{kwargs.get('act_layer')!r}, {norm!r}, {eps!r}")
        layer_norm = timm.layers.LayerNorm if norm == "timm" else nn.LayerNorm
        vit = _vit_class()(**kwargs, num_classes=0, global_pool="", weight_init="skip",
                           norm_layer=functools.partial(layer_norm, eps=eps))
        return timm_backbone(vit.to(dtype).eval())
    cls, config = _hf_class(spec.get("class")), spec.get("config")
    if not isinstance(config, Mapping):
        raise SpecError(f"transformers config must be a dict; got {config!r:.200}")
    check_data(config, "transformers config")
    model = cls(cls.config_class.from_dict(dict(config)))
    return transformers_backbone(model.to(dtype).eval())
