"""The compiled CUDA extension ``dtop_kernels._C``: lazy loading, build info, availability.

Importing this package neither imports ``_C`` nor initializes CUDA.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import ModuleType

import torch

# dtype codes understood by _C (csrc/common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

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
    """The ``dtop_kernels._C`` module; raises RuntimeError saying how to build it if missing."""
    module, _ = _import_C()
    if module is None:
        raise RuntimeError(unavailable_reasons()[0])
    return module


@functools.cache
def build_info() -> dict:
    """What setup.py recorded: {"cuda_built", "reason", "archs", "nvcc_version"}."""
    if not _BUILD_INFO.is_file():
        return {"cuda_built": False,
                "reason": f"no build record in {_BUILD_INFO.parent}: a source tree, not an "
                          "installed package (`pip install .` builds and installs the kernels)"}
    return json.loads(_BUILD_INFO.read_text())


def unavailable_reasons() -> list[str]:
    """[] when ``_C`` imports, else one line saying why not and how to build it."""
    module, error = _import_C()
    if module is not None:
        return []
    info = build_info()
    if info.get("cuda_built"):
        why = f"was built but fails to import ({error}); rebuild it"
    else:
        why = f"is not built ({info.get('reason', 'unknown')})"
    return [f"the CUDA extension dtop_kernels._C {why}; {_HOW_TO_BUILD}"]
