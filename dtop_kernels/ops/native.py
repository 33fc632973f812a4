"""The op library: ``libdtop_ops.so``, the ``dtop::`` ops defined and implemented in C++.

The library (``csrc/oplib/``) is built by ``pip install .`` against PyTorch's stable ABI only
and links to nothing of PyTorch's C++ API (only to the C functions of its shim): it loads into
any PyTorch that keeps that ABI, from Python (``torch.ops.load_library``) and from C++ (an
AOTInductor package loaded by ``AOTIModelPackageLoader``). It defines one schema per op (gather,
scatter, layer_norm, varlen_attention, packed_linear, select) and registers their CPU
implementations (built with the host C++ compiler) and, when the package is built with nvcc
against a CUDA build of torch, their CUDA implementations over the kernels of ``csrc/`` (built by
CMake). This module registers each op's fake (meta) implementation, which export and
``torch.compile`` trace with.

A package exported by :func:`dtop_kernels.export` calls these ops; to run it, load this library
first (:func:`ops_library_path` says where it is; a process without ``dtop_kernels`` can copy it).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

#: The ops the library defines (``torch.ops.dtop.<name>``).
OPS = ("gather", "scatter", "layer_norm", "varlen_attention", "packed_linear", "select")
LIBRARY_NAME = "libdtop_ops.so"
_loaded: str | None = None


class OpsLibraryError(RuntimeError):
    """The op library is missing or cannot be loaded; the message says why and what to do."""


def _build_reason() -> str:
    info = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        reason = json.loads(info.read_text()).get("ops_library_reason", "")
    except (OSError, ValueError):
        reason = ""
    return reason or "the package was installed without it"


def ops_library_path() -> str:
    """Absolute path of the op library (``libdtop_ops.so``) to ship beside an exported model
    package; ``DTOP_OPS_LIBRARY`` overrides it. Raises :class:`OpsLibraryError` (with the build's
    reason) when the install has none."""
    env = os.environ.get("DTOP_OPS_LIBRARY", "").strip()
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "lib" / LIBRARY_NAME
    if not path.is_file():
        what = f"DTOP_OPS_LIBRARY={env} is not a file" if env else \
            f"no op library at {path}: {_build_reason()}"
        raise OpsLibraryError(f"{what}. Reinstall with a C++ compiler on PATH (pip install .) "
                              "to build it; exporting models needs it.")
    return str(path)


def library_version(path: str | None = None) -> str:
    """The version string the library was built with (read without loading its ops)."""
    lib = ctypes.CDLL(path or ops_library_path())
    fn = lib.dtop_ops_library_version
    fn.restype = ctypes.c_char_p
    return fn().decode()


def loaded() -> bool:
    return _loaded is not None


def load() -> str:
    """Load the op library once and register the fake implementations; returns its path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = ops_library_path()
    if not hasattr(torch.ops.dtop, "gather") or not _defined():
        try:
            torch.ops.load_library(path)
        except OSError as e:
            raise OpsLibraryError(f"cannot load the op library {path}: {e.__cause__ or e}. It "
                                  f"needs PyTorch >= 2.10 (this is {torch.__version__}); "
                                  "reinstall the package to rebuild it.") from e
    _register_fakes()
    _loaded = path
    return path


def has_cuda_kernels() -> bool:
    """Whether the loaded op library registers the ops' CUDA implementations."""
    load()
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dtop::{op}", "CUDA")
               for op in OPS)


def _defined() -> bool:
    try:
        torch.ops.dtop.gather.default  # noqa: B018 - raises when the schema is absent
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_fakes() -> None:
    def fake(name):
        return torch.library.register_fake(f"dtop::{name}", lib=_FAKE_LIB)

    @fake("gather")
    def _(x2d, indices, cu_seqlens, seq_len):
        return x2d.new_empty(indices.shape[0], x2d.shape[1])

    @fake("scatter")
    def _(packed, indices, cu_seqlens, base, seq_len, add):
        return packed.new_empty((cu_seqlens.shape[0] - 1) * seq_len, packed.shape[1])

    @fake("layer_norm")
    def _(x2d, weight, bias, indices, cu_seqlens, seq_len, eps, gather_rows):
        cap, c = indices.shape[0], x2d.shape[1]
        xp = x2d.new_empty(cap, c) if gather_rows else x2d.new_empty(0)
        stat = x2d.new_empty(cap, dtype=torch.promote_types(x2d.dtype, torch.float32))
        return x2d.new_empty(cap, c), xp, stat, stat.clone()

    @fake("varlen_attention")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
          return_logits):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        logits = q.new_empty(max_seqlen_q, k.shape[0]) if return_logits else q.new_empty(0)
        return out, q.new_empty(0, dtype=torch.float32), logits

    @fake("packed_linear")
    def _(x2d, weight, bias, residual, base, indices, cu_seqlens, seq_len, act, gather_rows,
          save_pre):
        cap, n = indices.shape[0], weight.shape[0]
        y = x2d.new_empty(cap, n) if base is None else torch.empty_like(base)
        return y, (x2d.new_empty(cap, n) if save_pre else x2d.new_empty(0))

    @fake("select")
    def _(class_logits, mask_logits, indices, cu_seqlens, seq_len, max_seqlen, threshold,
          top_k):
        b = cu_seqlens.shape[0] - 1
        return (torch.empty_like(indices), torch.empty_like(cu_seqlens),
                indices.new_empty(b, seq_len, dtype=torch.bool))


# the registrations live as long as the process (a Library object keeps them)
_FAKE_LIB = torch.library.Library("dtop", "FRAGMENT")
