"""What can run here: the backends, the compiled CUDA module's build, Triton's state.

The public answers ``python -m dtop_kernels.info`` and the benchmarks print; exported from
``dtop_kernels``. Nothing here initializes CUDA unless a CUDA tensor is passed in.
"""

from __future__ import annotations

from dtop_kernels import backends, cuda, triton
from dtop_kernels.backends import BACKENDS, BackendError

__all__ = [
    "BACKENDS",
    "auto_backend",
    "backend_reasons",
    "cuda_build_info",
    "cuda_kernel_problems",
    "public_ops",
    "triton_import_error",
    "triton_interpreted",
    "unverified_backends",
]


def public_ops() -> tuple[str, ...]:
    """The names of the dispatched public ops ("gather_tokens", "varlen_attention", ...)."""
    return backends.ops()


def backend_reasons(op: str, *args, **kwargs) -> dict[str, list[str]]:
    """Per backend, why it cannot run ``op(*args, **kwargs)`` (an empty list: it can)."""
    return backends.dispatcher(op).reasons(*args, **kwargs)


def auto_backend(op: str, *args, **kwargs) -> str | None:
    """The backend ``backend="auto"`` (or ``DTOP_BACKEND``) takes for this call; None when
    none can run it."""
    try:
        return backends.dispatcher(op).select("auto", *args, **kwargs)
    except BackendError:
        return None


def unverified_backends(op: str) -> frozenset[str]:
    """The backends of ``op`` that have not yet passed their GPU tests ("auto" skips them)."""
    return backends.dispatcher(op).unverified


def cuda_build_info() -> dict:
    """What ``pip install`` recorded about the compiled CUDA module, and whether it imports.

    Keys: ``cuda_built``, ``reason`` (why not built), ``archs``, ``nvcc_version``, ``seconds``
    (compile time) and ``torch`` (the torch build it saw) from setup.py's record, plus
    ``import_error`` (None when it imports) and, when it does, ``built_archs`` and
    ``cuda_runtime`` ("13.0") from the module itself.
    """
    info = dict(cuda.build_info())
    problems = cuda.unavailable_reasons()
    info["import_error"] = problems[0] if problems else None
    if not problems:
        module = cuda.load_C()
        rt = module.cuda_runtime_version()
        info["built_archs"] = module.built_archs()
        info["cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
    return info


def cuda_kernel_problems() -> list[str]:
    """Why the compiled CUDA kernels cannot run on this machine's GPU ([] when they can)."""
    import torch

    problems = list(cuda.unavailable_reasons())
    if not torch.cuda.is_available():
        problems.append("no CUDA device visible to torch")
    elif not problems:
        problems += cuda.device_reasons(torch.device("cuda", torch.cuda.current_device()))
    return problems


def triton_import_error() -> str | None:
    """None when triton imports, else why not."""
    return triton.import_error()


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` selects Triton's CPU interpreter (slow; for tests)."""
    return triton.interpret()
