"""The compiled CUDA extension ``dtop_kernels._C``: lazy loading, build info, availability.

Importing this package neither imports ``_C`` nor initializes CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

# dtype codes understood by _C (csrc/common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# What the CUDA backend supports, declared once (the ops combine it with their shapes): row
# kernels (gather / scatter, LayerNorm, selection) take every dtype of DTYPE_CODES; the tensor-
# core kernels (attention, linear) float16 / bfloat16, features in multiples of 8, and the head
# dims the compiled module reports (head_dims()).
DTYPES = tuple(DTYPE_CODES)
MMA_DTYPES = (torch.float16, torch.bfloat16)

_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"
_HOW_TO_BUILD = "install with nvcc on PATH: `pip install .` (set DTOP_CUDA_ARCHS to pick archs)"


@functools.cache
def _import_C() -> tuple[ModuleType | None, str | None]:
    """(module, None) when ``_C`` imports, else (None, the import error); tried once.

    The build record is authoritative: where it says the kernels were not built, a ``_C`` file
    found anyway (left in a source tree by an earlier in-place build) is not imported."""
    info = build_info()
    if _BUILD_INFO.is_file() and not info.get("cuda_built"):
        return None, "not built"
    try:
        from dtop_kernels import _C
    except ImportError as e:
        return None, str(e)
    return _C, None


def load_C() -> ModuleType:
    """The ``dtop_kernels._C`` module; raises RuntimeError saying how to build it if missing.
    Under :func:`emulated`, the emulated module."""
    if _emulation.module is not None:
        return _emulation.module
    module, _ = _import_C()
    if module is None:
        raise RuntimeError(unavailable_reasons()[0])
    return module


@functools.cache
def build_info() -> dict:
    """What setup.py recorded: {"cuda_built", "reason", "archs", "nvcc_version"}."""
    if not _BUILD_INFO.is_file():
        return {"cuda_built": False,
                "reason": f"a source tree without a build record, {_BUILD_INFO.parent}; "
                          "`pip install .` builds and installs the package"}
    return json.loads(_BUILD_INFO.read_text())


def unavailable_reasons() -> list[str]:
    """[] when ``_C`` imports, else one line saying why not and how to build it."""
    if _emulation.module is not None:
        return []
    module, error = _import_C()
    if module is not None:
        return []
    info = build_info()
    if info.get("cuda_built"):
        return [(f"the CUDA extension dtop_kernels._C was built but fails to import ({error}); "
                 "rebuild it: pip install .")]
    # advice to build only where the kernels could run: a CUDA build of torch
    how = f"; {_HOW_TO_BUILD}" if torch.version.cuda else ""
    return [f"the CUDA extension dtop_kernels._C is not built ({info.get('reason', 'unknown')})"
            + how]


def head_dims() -> tuple[int, ...]:
    """The attention head dims the compiled module has kernels for (empty when it is not
    built)."""
    module = _emulation.module or _import_C()[0]
    return tuple(module.head_dims()) if module is not None and hasattr(module, "head_dims") \
        else ()


def tensor_reasons(tensors) -> list[str]:
    """Why the CUDA kernels cannot run on these tensors (empty: they can): the module is not
    built or has no kernel image for a GPU's architecture, or a tensor is not on CUDA."""
    reasons = list(unavailable_reasons())
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    types = {d.type for d in devices}
    want = kernel_device_type()
    if types - {want}:
        reasons.append(f"tensors on {sorted(types - {want})}: the CUDA kernels need CUDA "
                       "tensors" + (" (emulated: CPU tensors)" if want == "cpu" else ""))
    elif not reasons and want == "cuda":  # built, all on CUDA: a kernel image for each GPU?
        for device in sorted(devices, key=str):
            reasons += [r for r in device_reasons(device) if r not in reasons]
    return reasons


def mma_reasons(dtype: torch.dtype) -> list[str]:
    if dtype in MMA_DTYPES:
        return []
    return [(f"dtype {dtype} not supported by the CUDA tensor-core kernels (float16, "
             "bfloat16; the triton and torch backends take float32)")]


def head_dim_reasons(q_dim: int, v_dim: int) -> list[str]:
    r = []
    if v_dim != q_dim:
        r.append(f"v head dim {v_dim} differs from q/k head dim {q_dim}")
    dims = head_dims()
    if dims and q_dim not in dims:
        r.append(f"head dim {q_dim} not compiled {dims}")
    return r


# ---------------------------------------------------------------------- architectures
def _parse_arch(entry: str) -> tuple[int, int, str, bool, bool]:
    """One CMake CUDA_ARCHITECTURES entry -> (major, minor, suffix, has SASS, has PTX).

    "80" = sm_80 SASS + compute_80 PTX, "80-real" = SASS only, "80-virtual" = PTX only;
    suffix "a" (arch-specific, e.g. 90a) or "f" (family, e.g. 100f).
    """
    m = re.fullmatch(r"(\d+)([af]?)(-real|-virtual)?", entry.strip())
    if not m:
        raise ValueError(f"not a CUDA architecture in CMake syntax: {entry!r}")
    num, suffix, kind = int(m.group(1)), m.group(2), m.group(3) or ""
    return num // 10, num % 10, suffix, kind != "-virtual", kind != "-real"


def arch_mismatch(built: str, capability: tuple[int, int]) -> str | None:
    """None when a module built for ``built`` (CMake syntax, e.g. "80;90") has a kernel image
    that runs on a GPU of compute ``capability`` (major, minor); else the reason.

    SASS sm_XY runs on X.y for y >= Y (binary compatible within a major version); sm_XYa only
    on X.Y; sm_XYf on its family (X.y, y >= Y). PTX compute_XY is JIT-compiled by the driver
    for any X.Y or newer; compute_XYa only for X.Y, compute_XYf for its family.
    """
    major, minor = capability
    for entry in (e for e in re.split(r"[;,\s]+", built) if e):
        x, y, suffix, sass, ptx = _parse_arch(entry)
        same_family = major == x and minor >= y
        if suffix == "a" and (major, minor) == (x, y):
            return None
        if suffix == "f" and same_family:
            return None
        if not suffix and ((sass and same_family) or (ptx and (major, minor) >= (x, y))):
            return None
    return (f"the CUDA extension was built for {built!r}, which has no kernel image for this "
            f"GPU (sm_{major}{minor}); rebuild with DTOP_CUDA_ARCHS={major}{minor} "
            "(or add it to the list)")


@functools.cache
def _device_arch_reason(index: int) -> str | None:
    module, _ = _import_C()
    if module is None:
        return None  # unavailable_reasons() says why
    return arch_mismatch(module.built_archs(), torch.cuda.get_device_capability(index))


def device_reasons(device: torch.device) -> list[str]:
    """[] when the compiled kernels can run on CUDA ``device``, else why not (no kernel image
    for its architecture). Asks the GPU once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    reason = _device_arch_reason(index)
    return [reason] if reason else []


# ---------------------------------------------------------------------- emulation
class _Emulation:
    module: ModuleType | None = None
    sm_count: int = 0


_emulation = _Emulation()


@contextlib.contextmanager
def emulated(module: ModuleType, sm_count: int) -> Iterator[None]:
    """Runs the CUDA backend on CPU tensors through ``module``: a build of ``_C`` whose kernels
    execute on the CPU (the CUDA emulator of the test suite, tests/cuda_emulator; see
    docs/testing.md). The launchers, their checks and the backend dispatch are unchanged; only
    the device they require becomes the CPU, the stream is 0 and the device has ``sm_count``
    SMs. Not thread-safe; for tests."""
    if _emulation.module is not None:
        raise RuntimeError("dtop_kernels.cuda.emulated is already active")
    _emulation.module, _emulation.sm_count = module, sm_count
    try:
        yield
    finally:
        _emulation.module, _emulation.sm_count = None, 0


def kernel_device_type() -> str:
    """The device type the CUDA kernels take: "cuda", or "cpu" under :func:`emulated`."""
    return "cpu" if _emulation.module is not None else "cuda"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the kernels' ``device`` (the emulated count under
    :func:`emulated`)."""
    if _emulation.module is not None:
        return _emulation.sm_count
    from dtop_kernels import _gpu

    return _gpu.sm_count(device)
