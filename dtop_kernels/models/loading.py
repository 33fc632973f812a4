"""Weight loading: timm ViT backbones and mmsegmentation (official DToP / SegViT) checkpoints.

Both return a :class:`LoadReport` and raise ``ValueError`` listing every shape mismatch before
writing anything. The position embedding is converted to the model's ``pos_grid`` (bicubic, the
class-token slot kept; a checkpoint without one gets a zero slot, which is never used). To load a
checkpoint fine-tuned at another resolution without resizing its position embedding twice,
build the model with that grid, e.g. ``vit_dtop_base(pos_grid=32)`` for 512 x 512 training.

mmsegmentation key mapping (mmseg's ``VisionTransformer`` backbone naming, with mmcv's
``MultiheadAttention`` and ``FFN``; ``{i}`` = block, ``{j}`` = decoder layer)::

    backbone.patch_embed.projection.{weight,bias}   -> patch_embed.proj.{weight,bias}
    backbone.pos_embed                              -> pos_embed (resized to pos_grid)
    backbone.layers.{i}.ln1.*                       -> blocks.{i}.norm1.*
    backbone.layers.{i}.attn.attn.in_proj_weight    -> blocks.{i}.attn.qkv.weight  ([q; k; v])
    backbone.layers.{i}.attn.attn.in_proj_bias      -> blocks.{i}.attn.qkv.bias
    backbone.layers.{i}.attn.attn.out_proj.*        -> blocks.{i}.attn.proj.*
    backbone.layers.{i}.ln2.*                       -> blocks.{i}.norm2.*
    backbone.layers.{i}.ffn.layers.0.0.*            -> blocks.{i}.mlp.fc1.*
    backbone.layers.{i}.ffn.layers.1.*              -> blocks.{i}.mlp.fc2.*
    auxiliary_head.{s}.<name>  (or auxiliary_head.<name> for a single auxiliary head)
                                                    -> heads.{s}.<name>
    decode_head.<name>                              -> heads.{S-1}.<name>

Head ``<name>`` is the same on both sides (the official PruneHead's names: ``input_proj``,
``proj_norm``, ``q``, ``decoder.layers.{j}.{self_attn.in_proj_weight, self_attn.in_proj_bias,
self_attn.out_proj, multihead_attn.{q,k,v,proj}, linear1, linear2, norm1, norm2, norm3}``,
``class_embed``). Unused keys (``backbone.cls_token``, a final norm ``backbone.ln1``,
``*.loss_decode.*`` buffers) are reported as unexpected. A backbone-only mmseg checkpoint (keys
without ``backbone.``) loads too; a leading ``module.`` (DDP) and a ``state_dict`` wrapper are
stripped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dtop_kernels.models.vit import resize_pos_embed_with_cls


@dataclass
class LoadReport:
    """What a load did. ``missing``: model keys left as they were (among those the source kind
    covers); ``unexpected``: source keys with no place in the model (ignored); ``resized``:
    model keys whose values were resized."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {self.missing}; unexpected "
                f"{self.unexpected}; resized {self.resized}")


def _is_backbone_key(k: str) -> bool:
    return k == "pos_embed" or k.startswith(("patch_embed.", "blocks."))


# ---------------------------------------------------------------------- timm
def load_timm_backbone(model: nn.Module, timm_vit_or_state_dict: nn.Module | Mapping
                       ) -> LoadReport:
    """Copy a timm ``VisionTransformer``'s patch embedding, position embedding and blocks into
    ``model`` (a :class:`ViTDToP` of the same width and depth). Heads are untouched.

    Accepts the timm module (its grid and prefix tokens are read from it) or its state dict
    (the position grid must then be square, with or without one class-token slot). timm's
    ``cls_token``, ``norm``, ``fc_norm`` and ``head`` are unused here and reported as unexpected.
    """
    src = timm_vit_or_state_dict
    grid = prefix = None
    if isinstance(src, nn.Module):
        pe = getattr(src, "patch_embed", None)
        grid = tuple(pe.grid_size) if getattr(pe, "grid_size", None) is not None else None
        if getattr(src, "no_embed_class", False):
            prefix = 0
        else:
            prefix = int(getattr(src, "num_prefix_tokens", 1))
        src = src.state_dict()
    mapped, unexpected = {}, []
    for k, v in src.items():
        if _is_backbone_key(k):
            mapped[k] = v
        else:
            unexpected.append(k)
    targets = [k for k in model.state_dict() if _is_backbone_key(k)]
    return _load(model, mapped, unexpected, targets, grid, prefix)


# ---------------------------------------------------------------------- mmseg
_BACKBONE_RULES = [
    (re.compile(r"patch_embed\.projection\.(weight|bias)"), r"patch_embed.proj.\1"),
    (re.compile(r"pos_embed"), "pos_embed"),
    (re.compile(r"layers\.(\d+)\.ln1\.(weight|bias)"), r"blocks.\1.norm1.\2"),
    (re.compile(r"layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)"), r"blocks.\1.attn.qkv.\2"),
    (re.compile(r"layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)"),
     r"blocks.\1.attn.proj.\2"),
    (re.compile(r"layers\.(\d+)\.ln2\.(weight|bias)"), r"blocks.\1.norm2.\2"),
    (re.compile(r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)"), r"blocks.\1.mlp.fc2.\2"),
]


def mmseg_key_to_model(key: str, num_stages: int) -> str | None:
    """The model key of an mmseg checkpoint key, or None when it has no place in the model."""
    if key.startswith(("decode_head.", "auxiliary_head.")):
        head, rest = key.split(".", 1)
        if head == "decode_head":
            s = num_stages - 1
        else:
            m = re.fullmatch(r"(\d+)\.(.*)", rest)
            s, rest = (int(m.group(1)), m.group(2)) if m else (0, rest)
            if s >= num_stages - 1:
                return None
        if rest.startswith(("loss_decode.", "conv_seg.")):
            return None
        return f"heads.{s}.{rest}"
    rest = key.removeprefix("backbone.")
    for pattern, repl in _BACKBONE_RULES:
        if pattern.fullmatch(rest):
            return pattern.sub(repl, rest)
    return None


def load_mmseg_checkpoint(model: nn.Module, state_dict: Mapping) -> LoadReport:
    """Load an mmsegmentation-style checkpoint (official DToP / SegViT naming, mapping in the
    module docstring) into ``model`` (a :class:`ViTDToP` of the same sizes)."""
    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, Mapping) else None
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors (or {{'state_dict': ...}}); "
                        f"got {type(state_dict).__name__}")
    mapped, unexpected = {}, []
    for k, v in sd.items():
        key = k.removeprefix("module.")
        new = mmseg_key_to_model(key, model.num_stages)
        if new is None or not isinstance(v, torch.Tensor):
            unexpected.append(k)
        else:
            mapped[new] = v
    return _load(model, mapped, unexpected, list(model.state_dict()), None, None)


# ---------------------------------------------------------------------- shared
def _pos_embed_for_model(v: torch.Tensor, model: nn.Module, grid: tuple[int, int] | None,
                         prefix: int | None) -> tuple[torch.Tensor, bool]:
    """Checkpoint position embedding [1, P + gh*gw, C] -> (the model's [1, 1 + Gh*Gw, C],
    whether the grid was resized)."""
    if v.dim() != 3 or v.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, L, C]; got {tuple(v.shape)}")
    length = v.shape[1]
    if grid is None:  # infer a square grid, with or without one class-token slot
        for p in (1, 0):
            g = math.isqrt(max(length - p, 0))
            if g * g == length - p and g > 0:
                grid, prefix = (g, g), p
                break
        else:
            raise ValueError(f"cannot infer a square position grid from pos_embed of length "
                             f"{length}; pass the timm module instead of its state dict")
    if prefix is None or prefix + grid[0] * grid[1] != length:
        prefix = length - grid[0] * grid[1]
    if prefix < 0:
        raise ValueError(f"pos_embed of length {length} is shorter than its grid {grid}")
    cls_slot = v[:, :1] if prefix >= 1 else v.new_zeros(1, 1, v.shape[-1])
    v = torch.cat([cls_slot, v[:, prefix:]], dim=1)
    resized = tuple(grid) != tuple(model.pos_grid)
    return resize_pos_embed_with_cls(v, grid, model.pos_grid), resized


def _load(model: nn.Module, mapped: dict[str, torch.Tensor], unexpected: list[str],
          targets: list[str], grid, prefix) -> LoadReport:
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    report = LoadReport(unexpected=list(unexpected))
    values, mismatched = {}, []
    for k, v in mapped.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if k == "pos_embed":
            v, resized = _pos_embed_for_model(v, model, grid, prefix)
            if resized:
                report.resized.append(k)
        if tuple(v.shape) != tuple(own[k].shape):
            mismatched.append(f"  {k}: checkpoint {tuple(v.shape)} vs model "
                              f"{tuple(own[k].shape)}")
        values[k] = v
    if mismatched:
        raise ValueError("checkpoint does not fit the model (build the model with the "
                         "checkpoint's sizes):\n" + "\n".join(mismatched))
    with torch.no_grad():
        for k, v in values.items():
            own[k].copy_(v.to(dtype=own[k].dtype, device=own[k].device))
    report.loaded = sorted(values)
    report.missing = [k for k in targets if k not in values]
    return report
