"""Export a DToP model to an AOTInductor package that runs without Python's ``dtop_kernels``.

:func:`export` traces a model at fixed capacity (``tighten=False``: every stage keeps buffers of
``B * N`` token rows, so no shape depends on how many tokens exit) with a dynamic batch
dimension, and compiles it into one ``.pt2`` file. The packed forward's own ops are the op
library's ``dtop::`` ops (C++, :mod:`dtop_kernels.ops.native`), so the package runs wherever that
library is loaded: from Python with plain torch, or from C++ with ``AOTIModelPackageLoader``.
``docs/deploy.md`` walks through it; ``dtop-export`` does it from a checkpoint.

The package's metadata records what made it (``dtop_kernels``, torch, the op library's version
and the ``dtop::`` ops its graph calls); :func:`check_package` compares them with a library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dtop_kernels.ops import library, native

#: The metadata keys every package written by :func:`export` carries (all strings).
METADATA_KEYS = ("dtop_kernels.version", "dtop_kernels.torch", "dtop_kernels.ops_library",
                 "dtop_kernels.ops", "dtop_kernels.outputs", "dtop_kernels.batch",
                 "dtop_kernels.image", "dtop_kernels.dynamic_image")


class ExportError(ValueError):
    """The model or its inputs cannot be exported; the message says what to change."""


class PackedForward(nn.Module):
    """The exported computation of a :class:`~dtop_kernels.models.ViTDToP`: the packed forward at
    fixed capacity. ``img [B, 3, H, W] -> (pred [B, K, H, W], exit_stage int64 [B, Hg, Wg])``."""

    def __init__(self, model: nn.Module, threshold: float | None, backend: str) -> None:
        super().__init__()
        self.model, self.threshold, self.backend = model, threshold, backend

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(img, mode="packed", backend=self.backend, threshold=self.threshold,
                         tighten=False)
        return out.pred, out.exit_stage


def _is_dtop_model(model: nn.Module) -> bool:
    from dtop_kernels.models.dtop import ViTDToP

    return isinstance(model, ViTDToP)


def _check(model: nn.Module, example_inputs: tuple, dynamic_batch: bool) -> None:
    """Everything that can be told before tracing."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if model.training:
        raise ExportError("the model is in training mode: call model.eval() before exporting "
                          "(a package holds the inference graph: no dropout, no auxiliary "
                          "losses)")
    if not isinstance(example_inputs, tuple) or not example_inputs or not all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        raise ExportError("example_inputs must be a non-empty tuple of tensors, e.g. (img,)")
    if _is_dtop_model(model) and model.tighten not in (None, False):
        raise ExportError(f"the model has tighten={model.tighten!r}: tightening reads the token "
                          "counts back to the host and shrinks the buffers, which a compiled "
                          "graph cannot do; export runs at fixed capacity: set "
                          "model.tighten = False (or None)")
    devices = {t.device.type for t in example_inputs}
    devices |= {p.device.type for p in model.parameters()}
    if len(devices) > 1:
        raise ExportError(f"the model and its inputs are on {sorted(devices)}: put them on one "
                          "device")
    if devices - {"cpu", "cuda"}:
        raise ExportError(f"export takes a CPU or CUDA model; got {sorted(devices)}")
    if dynamic_batch and any(t.dim() == 0 for t in example_inputs):
        raise ExportError("dynamic_batch needs a batch dimension (dim 0) on every input")
    if dynamic_batch and any(t.shape[0] < 2 for t in example_inputs):
        raise ExportError("with dynamic_batch, give example inputs of batch size >= 2 (a batch "
                          "of 1 would be specialized into the graph)")


def export(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
           path: str | Path, *, dynamic_batch: bool = True, max_batch: int = 1024,
           dynamic_image: bool = False, threshold: float | None = None,
           backend: str = "torch") -> str:
    """Export ``model`` to an AOTInductor package at ``path`` (a ``.pt2`` file); returns the path.

    ``model``: a :class:`~dtop_kernels.models.ViTDToP` in eval mode (its packed forward at fixed
    capacity is exported: ``img -> (pred, exit_stage)``, ``threshold`` overriding the model's),
    or any module built from the public ops, called as ``model(*example_inputs)``.
    ``dynamic_batch``: dimension 0 of every input is dynamic (1 .. ``max_batch``).
    ``dynamic_image`` (a ViTDToP only): height and width are dynamic too (multiples of the patch
    size, up to 64 patches each); the capacity is then ``B * N`` of each call. ``backend``: the op
    backend traced: "torch" (the default; the op library's CPU or CUDA kernels for the pruning
    ops, PyTorch's operators for the rest), "cuda" (the op library's CUDA kernels for every op
    they take) or "triton" (the package's Triton kernels, compiled into the package); the last
    two on a GPU only.

    Load the package with ``torch._inductor.aoti_load_package(path)`` after
    ``torch.ops.load_library(dtop_kernels.ops_library_path())`` (no ``import dtop_kernels``
    needed), or from C++ (``examples/cpp``). Raises :class:`ExportError` before tracing for what
    cannot be exported (training mode, ``tighten``, a device without the ops' kernels); the
    example inputs run once, eagerly, on the op library's kernels first.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    _check(model, example_inputs, dynamic_batch)
    module = PackedForward(model, threshold, backend) if _is_dtop_model(model) else model
    lib_path = native.load()
    on_gpu = "cuda" in {t.device.type for t in example_inputs}
    if backend not in ("torch", "cuda", "triton"):
        raise ExportError(f"backend must be 'torch', 'cuda' or 'triton'; got {backend!r}")
    if backend != "torch" and not on_gpu:
        raise ExportError(f"backend {backend!r} runs on a GPU; a CPU model exports with the "
                          "'torch' backend (the op library's CPU kernels)")
    if on_gpu and not native.has_cuda_kernels():
        raise ExportError(f"the op library {lib_path} has no CUDA kernels (it was built without "
                          "nvcc or against a CPU build of torch): reinstall the package with a "
                          "CUDA build of torch and nvcc, or export a CPU model")
    # One eager call on the op library's own kernels: the inputs' errors (sizes, dtypes) and what
    # those kernels refuse (a dtype, a head dim) surface here, before any tracing.
    with torch.no_grad(), library.native_ops():
        module(*example_inputs)
    dynamic = None
    if dynamic_image and not _is_dtop_model(model):
        raise ExportError("dynamic_image needs a ViTDToP (its patch size sets the steps)")
    if dynamic_batch or dynamic_image:
        dims: dict[int, object] = {}
        if dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1, max=max_batch)
        if dynamic_image:
            p = model.patch_size
            dims[2] = p * torch.export.Dim("patch_rows", min=2, max=64)
            dims[3] = p * torch.export.Dim("patch_cols", min=2, max=64)
        dynamic = tuple(dict(dims) for _ in example_inputs)
    with torch.no_grad(), library.native_ops():
        program = torch.export.export(module, example_inputs, dynamic_shapes=dynamic,
                                      strict=False)
    ops = sorted({str(n.target).split(".")[1] for n in program.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("dtop")})
    python_ops = [str(n.target) for n in program.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith(f"{library.NS}.")]
    if python_ops:  # an op without a package implementation (a bug: every op is routed)
        raise ExportError(f"the traced graph calls Python-only ops {sorted(set(python_ops))}, "
                          "which no package can hold")
    metadata = {
        "dtop_kernels.version": _version(),
        "dtop_kernels.torch": torch.__version__,
        "dtop_kernels.ops_library": native.library_version(lib_path),
        "dtop_kernels.ops": ",".join(ops),
        "dtop_kernels.outputs": "pred,exit_stage" if _is_dtop_model(model) else "",
        "dtop_kernels.batch": f"1..{max_batch}" if dynamic_batch else
                              str(example_inputs[0].shape[0]),
        # one input's shape without the batch dimension, "3,512,512" (as traced)
        "dtop_kernels.image": ",".join(str(d) for d in example_inputs[0].shape[1:]),
        "dtop_kernels.dynamic_image": str(bool(dynamic_image)),
    }
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"the package path must end in .pt2; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    from torch._inductor import aoti_compile_and_package

    return str(aoti_compile_and_package(
        program, package_path=str(path),
        inductor_configs={"aot_inductor.metadata": metadata}))


def _version() -> str:
    import dtop_kernels

    return dtop_kernels.__version__


def package_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a package written by :func:`export` (loads the package: the op library
    must be loaded first)."""
    import torch._inductor

    native.load()
    loader = torch._inductor.aoti_load_package(str(path))
    return dict(loader.get_metadata())


def check_package(path: str | Path, library_path: str | None = None) -> list[str]:
    """What does not match between a package and an op library (empty: they match): the
    library's version string and the ``dtop::`` ops the package calls."""
    lib = library_path or native.ops_library_path()
    meta = package_metadata(path)
    problems = []
    want, have = meta.get("dtop_kernels.ops_library"), native.library_version(lib)
    if want != have:
        problems.append(f"the package was exported with op library {want!r}; {lib} is {have!r}")
    for op in filter(None, meta.get("dtop_kernels.ops", "").split(",")):
        if not hasattr(torch.ops.dtop, op):
            problems.append(f"the package calls dtop::{op}, which {lib} does not define")
    return problems


# ---------------------------------------------------------------------- dtop-export
def main(argv: Sequence[str] | None = None) -> int:
    """``dtop-export``: a checkpoint (``dtop-train``'s) to an AOTInductor package."""
    p = argparse.ArgumentParser(
        prog="dtop-export", description="Export a ViT-DToP checkpoint to an AOTInductor package "
        "(.pt2) with a dynamic batch dimension, and print the op library to ship beside it.")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint written by dtop-train")
    p.add_argument("--arch", help="no checkpoint: a freshly initialized model of this "
                   "architecture (tiny, small, base, large): for trying the path")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --arch: the number of classes (default 5)")
    p.add_argument("--res", type=int, nargs="+", required=True, metavar="PIXELS",
                   help="image size: one value (square) or height width")
    p.add_argument("--out", required=True, help="the package to write (.pt2)")
    p.add_argument("--threshold", type=float, default=None, help="exit threshold to bake in")
    p.add_argument("--max-batch", type=int, default=64,
                   help="the largest batch the package takes (default 64)")
    p.add_argument("--dynamic-image", action="store_true",
                   help="leave height and width dynamic too (multiples of the patch size)")
    p.add_argument("--static-batch", type=int, default=None, metavar="B",
                   help="export for batch size B only (no dynamic batch)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that is not a plain tensor archive (runs its code)")
    args = p.parse_args(argv)
    from dtop_kernels.models.checkpoint import build_model, load_model

    if (args.checkpoint is None) == (args.arch is None):
        p.error("give a checkpoint or --arch (not both)")
    if len(args.res) not in (1, 2):
        p.error("--res takes one or two values")
    if args.checkpoint:
        model, _ = load_model(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    else:
        model = build_model(args.arch, args.num_classes or 5).eval()
    h, w = (args.res * 2)[:2]
    batch = args.static_batch or 2
    img = torch.randn(batch, model.in_chans, h, w, dtype=model.patch_embed.proj.weight.dtype)
    start = time.perf_counter()
    try:
        out = export(model, (img,), args.out, dynamic_batch=args.static_batch is None,
                     max_batch=args.max_batch, dynamic_image=args.dynamic_image,
                     threshold=args.threshold)
    except (ExportError, native.OpsLibraryError) as e:
        print(f"dtop-export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"package": out, "ops_library": native.ops_library_path(),
                      "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
