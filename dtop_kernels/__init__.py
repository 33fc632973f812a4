"""dtop_kernels: ragged-batch kernels that turn DToP token pruning into wall-clock speed.

Importing this package neither initializes CUDA nor compiles anything.
"""

from dtop_kernels.backends import BackendError
from dtop_kernels.ops.attention import varlen_attention
from dtop_kernels.ops.block import pruned_block, pruned_stage
from dtop_kernels.ops.gather import gather_tokens, scatter_tokens
from dtop_kernels.ops.linear import packed_linear
from dtop_kernels.ops.native import OpsLibraryError, ops_library_path
from dtop_kernels.ops.select import Selection, dtop_select
from dtop_kernels.status import (
    BACKENDS,
    auto_backend,
    backend_reasons,
    cuda_build_info,
    cuda_kernel_problems,
    public_ops,
    triton_import_error,
    triton_interpreted,
    unverified_backends,
)
from dtop_kernels.tokens import TokenSet

__version__ = "0.1.0"


def __getattr__(name: str):
    """``export`` and ``ExportError`` (dtop_kernels.deploy), imported on first use: the module is
    also the ``dtop-export`` command (``python -m dtop_kernels.deploy``)."""
    if name in ("export", "ExportError"):
        from dtop_kernels import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'dtop_kernels' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "BackendError",
    "ExportError",
    "OpsLibraryError",
    "Selection",
    "TokenSet",
    "auto_backend",
    "backend_reasons",
    "cuda_build_info",
    "cuda_kernel_problems",
    "dtop_select",
    "export",
    "gather_tokens",
    "ops_library_path",
    "packed_linear",
    "pruned_block",
    "pruned_stage",
    "public_ops",
    "scatter_tokens",
    "triton_import_error",
    "triton_interpreted",
    "unverified_backends",
    "varlen_attention",
]
