"""tests/sanitize_cuda.py, the compute-sanitizer workload (every CUDA kernel once, forward and
backward, compared loosely with the torch backend): it says what it needs where it cannot run,
and its own comparisons hold with the Triton kernels in its place."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dtop_kernels.cuda import unavailable_reasons

HAS_CUDA = torch.cuda.is_available()


def _driver():
    spec = importlib.util.spec_from_file_location(
        "sanitize_cuda", Path(__file__).with_name("sanitize_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sanitize_driver_needs_a_gpu():
    """The driver says what it needs and exits 2 where it cannot run."""
    if HAS_CUDA and not unavailable_reasons():
        pytest.skip("a GPU is here: the driver runs (see pytest -m gpu and compute-sanitizer)")
    assert _driver().main([]) == 2


@pytest.mark.parametrize("group", ["gather", "layernorm", "attention", "linear", "select"])
def test_sanitize_driver_harness(group):
    """The driver's own comparisons hold with the Triton kernels in place of the CUDA ones (under
    the CPU interpreter here), so a failure under compute-sanitizer points at the CUDA kernel.
    ("stage" composes the same ops: too slow for the interpreter, covered by test_block.)"""
    pytest.importorskip("triton")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    _driver().check(group, torch.float16, "cuda" if HAS_CUDA else "cpu", kernel="triton")
