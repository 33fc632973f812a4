"""Backbones brought from timm and transformers, their modules used as they are (shared).

:func:`timm_backbone` and :func:`transformers_backbone` split a source model into a
:class:`Backbone`: a stem (patch embedding, prefix tokens, position embedding; for DINOv3 the
rotary embeddings) made of the source's own embedding modules, and the source's own layers.
The final norm, pooling and classifier are left out (the DToP heads read the layers' outputs).
``ViTDToP.from_timm`` / ``ViTDToP.from_transformers`` build on them.
"""

from __future__ import annotations

import copy
import inspect
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
    modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "embeddings"):
            raise TypeError(f"{type(model).__name__} has no `embeddings`: from_transformers "
                            "takes a ViT, DeiT, DINOv2 (with registers) or DINOv3 ViT model")
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


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and persistent buffers are on the meta device (no
    data): what a checkpoint stores to rebuild the architecture; :func:`materialize` undoes it.
    Non-persistent buffers (e.g. rotary frequencies) keep their values."""
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for p in mod._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def materialize(module: nn.Module) -> nn.Module:
    """Allocate (uninitialized, on the CPU) every meta tensor of a :func:`skeleton`, in place;
    load a state dict next."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"),
                                                     p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty_like(b, device="cpu")
    return module
