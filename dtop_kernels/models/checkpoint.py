"""Model configurations by name and training checkpoints (save, load, rebuild the model).

A checkpoint is a dict saved with ``torch.save``: ``model`` (state dict), ``config`` (``arch``,
``num_classes`` and the keyword overrides that rebuild the model with :func:`build_model`),
``iteration``, and when written by the trainer ``optimizer``, ``scaler``, ``rng`` (torch,
numpy, CUDA generator states) and ``args``.

A model built around a given backbone (``ViTDToP.from_timm`` / ``from_transformers``) has no
name: its config (:func:`backbone_config`, arch ``"backbone"``) carries a skeleton of the
backbone, its stem and layers without their data (the module structure, pickled: loading runs
the code the file names, so load only trusted files, and needs timm or transformers importable),
which :func:`build_model` fills with fresh tensors before the state dict loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dtop_kernels.models.backbones import Backbone, materialize, skeleton
from dtop_kernels.models.dtop import ViTDToP, vit_dtop_base, vit_dtop_large, vit_dtop_tiny


def vit_dtop_small(num_classes: int = 6, threshold: float = 0.9, **kw) -> ViTDToP:
    """A small configuration that trains on a CPU in minutes: 6 layers, 128 wide, 4 heads;
    heads after layers 3, 4, 6 (ViT-B's 6 / 8 / 12 pattern halved; 64 wide, 2 heads); 16 x 16
    position grid (256-pixel crops)."""
    cfg = {"embed_dim": 128, "depth": 6, "num_heads": 4, "stage_ends": (3, 4, 6),
           "head_width": 64, "head_heads": 2, "top_k": 5, "pos_grid": 16}
    return ViTDToP(num_classes, threshold=threshold, **{**cfg, **kw})


ARCHS = {"tiny": vit_dtop_tiny, "small": vit_dtop_small, "base": vit_dtop_base,
         "large": vit_dtop_large}
BACKBONE_ARCH = "backbone"  # a model around a given backbone (from_timm / from_transformers)


def build_model(arch: str, num_classes: int, *, backbone: nn.ModuleList | None = None,
                **overrides) -> ViTDToP:
    """``ARCHS[arch](num_classes, **overrides)``; for arch ``"backbone"``
    ``ViTDToP.from_backbone`` on the ``backbone`` skeleton (:func:`backbone_config`), its
    tensors allocated uninitialized (load the weights next). ValueError naming the choices
    otherwise."""
    if arch == BACKBONE_ARCH:
        if backbone is None:
            raise ValueError("arch 'backbone' needs the backbone skeleton of backbone_config()")
        stem, *layers = materialize(backbone)
        return ViTDToP.from_backbone(Backbone(stem, layers), num_classes, **overrides)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS) + [BACKBONE_ARCH]}; got {arch!r}")
    return ARCHS[arch](num_classes=num_classes, **overrides)


def model_config(arch: str, num_classes: int, **overrides) -> dict:
    return {"arch": arch, "num_classes": num_classes, "overrides": dict(overrides)}


def backbone_config(model: ViTDToP) -> dict:
    """The checkpoint config of a model built around a given backbone (``from_timm``,
    ``from_transformers``, ``from_backbone``): its settings and a skeleton of its stem and
    layers (module structure without data), from which :func:`load_model` rebuilds it."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(model, "build_overrides", None) is None:
        raise ValueError("model was not built by ViTDToP.from_timm / from_transformers / "
                         "from_backbone: save it with model_config(arch, num_classes, ...)")
    return {**model_config(BACKBONE_ARCH, model.num_classes, **model.build_overrides),
            "backbone": skeleton(nn.ModuleList([model.patch_embed, *model.blocks]))}


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, iteration: int,
                    **extra) -> Path:
    """Write a checkpoint atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # DistributedDataParallel
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "config": config, "iteration": iteration, **extra},
               tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict; ValueError naming the file when it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise ValueError(f"{path} is not a dtop_kernels training checkpoint (no 'model' and "
                         "'config'); load official or timm weights with load_mmseg_checkpoint "
                         "or load_timm_backbone")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides
               ) -> tuple[ViTDToP, dict]:
    """Rebuild the model of a checkpoint and load its weights: (model in eval mode, checkpoint).
    ``overrides`` (e.g. ``threshold``) replace the saved configuration's."""
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], cfg["num_classes"], backbone=cfg.get("backbone"),
                        **{**cfg["overrides"], **overrides})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
