"""The CUDA backend's architecture guard, checked on the CPU with a faked compiled module and
GPU: a GPU the module has no kernel image for is declined with a reason and "auto" falls back."""

from __future__ import annotations

import types

import pytest
import torch

import dtop_kernels.cuda as dc
from dtop_kernels.backends import BackendError, Dispatcher
from dtop_kernels.cuda import tensor_reasons as device_reasons_cuda


@pytest.mark.parametrize("built,cc,runs", [
    ("80;90", (8, 0), True), ("80;90", (8, 6), True), ("80;90", (8, 9), True),
    ("80;90", (9, 0), True),
    ("80;90", (10, 0), True),           # compute_90 PTX, JIT-compiled by the driver
    ("80;90", (12, 0), True),
    ("80-real;90-real", (10, 0), False),  # SASS only: nothing for a newer major
    ("80-real", (9, 0), False),         # SASS is compatible within a major version only
    ("86", (8, 0), False),              # ... and only for later minors
    ("80-virtual", (8, 6), True),
    ("90a", (9, 0), True),
    ("90a", (8, 0), False), ("90a", (10, 0), False),  # arch-specific: exactly 9.0
    ("90a-virtual", (10, 0), False),
    ("100f", (10, 3), True), ("100f", (12, 0), False),  # family: same major
    ("80;90a", (10, 0), True),          # compute_80 PTX
    ("80,90", (9, 0), True),            # separators setup.py accepts
])
def test_arch_rules(built, cc, runs):
    reason = dc.arch_mismatch(built, cc)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"sm_{cc[0]}{cc[1]}" in reason and f"DTOP_CUDA_ARCHS={cc[0]}{cc[1]}" in reason


def test_arch_entry_errors():
    with pytest.raises(ValueError, match="CMake syntax"):
        dc.arch_mismatch("sm_90", (9, 0))


class _CudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0 (only the device is looked at)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Set the compiled module's archs and the GPU's capability."""
    def setup(built: str, cc: tuple[int, int]):
        module = types.SimpleNamespace(built_archs=lambda: built)
        monkeypatch.setattr(dc, "_import_C", lambda: (module, None))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cc)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        dc._device_arch_reason.cache_clear()
    yield setup
    dc._device_arch_reason.cache_clear()


def test_cuda_declines_and_auto_falls_back(fake_gpu):
    fake_gpu("90a", (8, 0))  # an sm_90a-only build on an A100
    x = torch.zeros(2).as_subclass(_CudaTensor)
    reasons = device_reasons_cuda([x])
    assert len(reasons) == 1 and "no kernel image" in reasons[0] and "sm_80" in reasons[0]
    d = Dispatcher("op", {"torch": lambda t: [], "triton": lambda t: ["no"],
                          "cuda": lambda t: device_reasons_cuda([t])},
                   auto_order=("cuda", "torch"))
    assert d.select("auto", x) == "torch"
    with pytest.raises(BackendError, match="no kernel image"):
        d.select("cuda", x)


def test_cuda_runs_where_built(fake_gpu):
    fake_gpu("80;90", (9, 0))
    x = torch.zeros(2).as_subclass(_CudaTensor)
    assert device_reasons_cuda([x]) == []
    assert dc.device_reasons(torch.device("cuda", 0)) == []
