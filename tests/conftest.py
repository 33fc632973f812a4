"""Shared test setup.

Without a GPU, Triton kernels run under the CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before anything imports triton, so it is set here, first. With a GPU the real kernels run
(the interpreter would replace them), unless the variable is already set by the caller.
"""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Explicitly requested kernels that have not passed their GPU tests warn on every call.
    config.addinivalue_line("filterwarnings", "ignore:.*has not yet passed its tests:UserWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the same seed and with no process-wide backend override."""
    monkeypatch.delenv("DTOP_BACKEND", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for tests that draw their own random inputs."""
    return torch.Generator().manual_seed(1234)
