"""Model configurations by name and training checkpoints (save, load, rebuild the model).

A checkpoint is a dict saved with ``torch.save``: ``model`` (state dict), ``config`` (``arch``,
``num_classes`` and the keyword overrides that rebuild the model with :func:`build_model`),
``iteration``, and when written by the trainer ``optimizer``, ``scaler``, ``rng`` (torch and
CUDA generator states) and ``args``: tensors, numbers, strings and containers only.

Every file is read with ``torch.load(..., weights_only=True)``: tensors, plain containers and
numpy scalars and arrays (data only; they appear in the ``meta`` of mmcv checkpoints), no code
from the file runs. A file that needs more (pickled Python objects) is refused with
:class:`CheckpointError` naming what it holds, unless the caller passes
``trust_checkpoint=True`` (``--trust-checkpoint``), which loads it with ``weights_only=False``
and so runs whatever code the file carries: only for files from a trusted source.

A model built around a given backbone (``ViTDToP.from_timm`` / ``from_transformers``) has no
name: its config (:func:`backbone_config`, arch ``"backbone"``) describes the backbone as plain
data (:func:`~dtop_kernels.models.backbones.backbone_spec`: timm ``VisionTransformer``
arguments, or a transformers model class name and config dict), so such a file loads
weights-only too. :func:`build_model` builds only timm's ``VisionTransformer`` or a model class
of the transformers package from it (no network), and the weights then load strictly; timm or
transformers must be importable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dtop_kernels.models.backbones import Backbone, backbone_from_spec, backbone_spec, check_data
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


def build_model(arch: str, num_classes: int, *, backbone: Mapping | None = None,
                **overrides) -> ViTDToP:
    """``ARCHS[arch](num_classes, **overrides)``; for arch ``"backbone"``
    ``ViTDToP.from_backbone`` on the backbone that ``backbone`` (the description of
    :func:`backbone_config`) rebuilds, its weights not those of the file (load them next).
    ValueError naming the choices otherwise."""
    if arch == BACKBONE_ARCH:
        if backbone is None:
            raise ValueError("arch 'backbone' needs the backbone description of "
                             "backbone_config()")
        return ViTDToP.from_backbone(backbone_from_spec(backbone), num_classes, **overrides)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS) + [BACKBONE_ARCH]}; got {arch!r}")
    return ARCHS[arch](num_classes=num_classes, **overrides)


_mult = np.core.multiarray if np.__version__ < "2" else np._core.multiarray
# numpy data the weights-only unpickler may build, under numpy 2's and numpy 1's names
NUMPY_DATA = [np.dtype, np.ndarray, _mult.scalar, _mult._reconstruct,
              (_mult.scalar, "numpy.core.multiarray.scalar"),
              (_mult._reconstruct, "numpy.core.multiarray._reconstruct"),
              *{type(np.dtype(c)) for c in "?bhilqBHILQefdgFDGSU"}]  # bool, numbers, strings
_NUMPY_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                for g in NUMPY_DATA}


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and why."""


class DamagedCheckpointError(CheckpointError):
    """A file that is not a complete ``torch.save`` archive (truncated, empty, another format)."""


def model_config(arch: str, num_classes: int, **overrides) -> dict:
    return {"arch": arch, "num_classes": num_classes, "overrides": dict(overrides)}


class _Writer:
    """A file's ``write``, remembering the OSError it raised (``torch.save`` reports a failed
    write as a RuntimeError without the cause, e.g. a full disk)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def backbone_config(model: ViTDToP) -> dict:
    """The checkpoint config of a model built by ``ViTDToP.from_timm`` or
    ``from_transformers``: its settings and a description of its backbone as plain data
    (:func:`~dtop_kernels.models.backbones.backbone_spec`), from which :func:`load_model`
    rebuilds it. ValueError (saying what to do instead) for a model built otherwise, or a
    backbone the description would not rebuild exactly."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(model, "build_overrides", None) is None:
        raise ValueError("model was not built by ViTDToP.from_timm / from_transformers / "
                         "from_backbone: save it with model_config(arch, num_classes, ...)")
    spec = backbone_spec(Backbone(model.patch_embed, list(model.blocks)))
    config = {**model_config(BACKBONE_ARCH, model.num_classes, **model.build_overrides),
              "backbone": spec}
    check_data(config, "the model's settings")
    return config


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, iteration: int,
                    **extra) -> Path:
    """Write a checkpoint atomically: into ``PATH.tmp``, flushed to disk (fsync), then renamed
    over ``path`` (``os.replace``), so ``path`` holds either its previous content or the new
    one, whole, whenever the process is killed. A failed write (e.g. a full disk) removes the
    temporary file and raises :class:`CheckpointError`; every existing checkpoint is left as
    it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # DistributedDataParallel
    tmp = path.with_name(path.name + ".tmp")
    state = {"model": model.state_dict(), "config": config, "iteration": iteration, **extra}
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise CheckpointError(f"could not write checkpoint {path}: {why}. It was not written; "
                              f"the checkpoints already in {path.parent} are intact") from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load_file(path: str | Path, *, trust_checkpoint: bool = False) -> object:
    """``torch.load`` of ``path`` on the CPU, weights-only unless ``trust_checkpoint``
    (module docstring). FileNotFoundError, :class:`DamagedCheckpointError` or
    :class:`CheckpointError` (refused: it holds pickled Python objects), each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(NUMPY_DATA):
            return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or foreign file makes it raise
        if not trust_checkpoint:
            try:
                needs = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                         if g not in _NUMPY_NAMES]
            except Exception:  # noqa: BLE001 - not a zip archive: nothing to list
                needs = []
            if needs:
                raise CheckpointError(
                    f"{path}: refused: besides tensors and plain containers it holds pickled "
                    f"Python objects ({', '.join(needs[:5])}), and unpickling them can run any "
                    "code the file carries. If you trust where it came from, pass "
                    "--trust-checkpoint (trust_checkpoint=True); or load it once in a trusted "
                    "session and save only its state dict") from None
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__
        size = path.stat().st_size
        raise DamagedCheckpointError(
            f"{path}: damaged or not a PyTorch checkpoint ({size} bytes; truncated, or not a "
            f"complete torch.save archive: {first})") from None


def read_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> dict:
    """The checkpoint dict (:func:`load_file`); CheckpointError naming the file when it is
    not a checkpoint of this package."""
    ckpt = load_file(path, trust_checkpoint=trust_checkpoint)
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a dtop_kernels training checkpoint (no 'model' "
                              "and 'config'); load official or timm weights with "
                              "load_mmseg_checkpoint or load_timm_backbone (train --init)")
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or not {"arch", "num_classes", "overrides"} <= cfg.keys():
        raise CheckpointError(f"{path}: its 'config' is not a model configuration (arch, "
                              f"num_classes, overrides); got {cfg!r:.200}")
    return ckpt


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, state: Mapping, source: str | Path) -> None:
    """``model.load_state_dict(state)``; CheckpointError naming ``source`` and a few missing,
    unexpected and mismatched keys when the weights do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    problems = [f"{what}: {_some(keys)}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes))
        if keys]
    if problems:
        raise CheckpointError(f"{source}: its weights do not fit this model configuration "
                              f"({'; '.join(problems)})")
    model.load_state_dict(state)


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               trust_checkpoint: bool = False, **overrides) -> tuple[ViTDToP, dict]:
    """Rebuild the model of a checkpoint and load its weights: (model in eval mode, checkpoint).
    ``overrides`` (e.g. ``threshold``) replace the saved configuration's."""
    ckpt = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    cfg = ckpt["config"]
    try:
        model = build_model(cfg["arch"], cfg["num_classes"], backbone=cfg.get("backbone"),
                            **{**cfg["overrides"], **overrides})
    except (ImportError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build its model (arch {cfg['arch']!r}, "
                              f"num_classes {cfg['num_classes']!r}, overrides "
                              f"{cfg['overrides']!r:.200}): {e}") from e
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt
