"""Shared test setup.

Without a GPU, Triton kernels run under the CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before anything imports triton, so it is set here, first. With a GPU the real kernels run
(the interpreter would replace them), unless the variable is already set by the caller.
"""

from __future__ import annotations

import os
import re
import time


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
    # torch.compile's import of torch.jit warns about torch's own deprecated API (torch 2.13)
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


# Set by tests/gpu_check.py: the end of the GPU tests' time (seconds since the epoch).
DEADLINE = float(os.environ.get("DTOP_STEP_DEADLINE", "0"))
TEARDOWN_S = 20  # left before the step's end for the last test and pytest's report


def gpu_value(item: pytest.Item) -> int:
    """Order of a test in the GPU check (lower first): GPU-marked, cuda backend, Triton, bf16,
    the rest: what the CPU suite cannot check first."""
    words = set(re.split(r"[^a-z0-9]+", item.name.lower()))
    if "gpu" in item.keywords:
        return 0
    for rank, word in enumerate(("cuda", "triton"), 1):
        if word in words:
            return rank
    return 3 if words & {"bf16", "bfloat16"} else 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEADLINE:
        items.sort(key=gpu_value)  # stable: file order within a rank
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if DEADLINE and time.time() > DEADLINE - TEARDOWN_S:
        pytest.skip("the GPU check's time for tests is up (DTOP_STEP_DEADLINE)")


def skip_reasons(reports: list) -> list[tuple[int, str]]:
    """(count, reason) of skipped test reports, most frequent first."""
    counts: dict[str, int] = {}
    for rep in reports:
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(((n, r) for r, n in counts.items()), key=lambda x: (-x[0], x[1]))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line naming why tests skipped (no GPU, no timm, ...), even under -q and xdist."""
    reports = [r for r in terminalreporter.stats.get("skipped", []) if r.when in ("setup", "call")]
    if reports:
        terminalreporter.write_line(f"skipped {len(reports)}: " + "; ".join(
            f"{n} {reason}" for n, reason in skip_reasons(reports)))


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the same seed and with no process-wide backend override."""
    monkeypatch.delenv("DTOP_BACKEND", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for tests that draw their own random inputs."""
    return torch.Generator().manual_seed(1234)
