"""Shared test setup.

Without a GPU, Triton kernels run under the CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before anything imports triton, so it is set here, first. With a GPU the real kernels run
(the interpreter would replace them), unless the variable is already set by the caller.
"""

from __future__ import annotations

import os
import re
import sys
import time


def _has_cuda() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def _selects_emulated(config: pytest.Config) -> bool:
    """The run's marker expression selects the emulated CUDA kernels (``-m emulated``, ``-m
    "gpu or emulated"``; not ``-m "not emulated"``)."""
    expr = config.option.markexpr or ""
    if "emulated" not in expr:
        return False
    from _pytest.mark.expression import Expression

    return Expression.compile(expr).evaluate(lambda name, **kwargs: name == "emulated")


def _reexec_with_asan(config: pytest.Config) -> None:
    """The emulator's memcheck build needs AddressSanitizer's runtime loaded before anything
    else: restart this pytest with it preloaded (once; xdist workers inherit it)."""
    if hasattr(config, "workerinput") or os.environ.get("DTOP_EMU_REEXEC"):
        return
    import cuda_emulator

    if cuda_emulator.asan_loaded():
        return
    env = dict(os.environ, DTOP_EMU_REEXEC="1", LD_PRELOAD=cuda_emulator.asan_preload(),
               ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "detect_leaks=0"),
               UBSAN_OPTIONS=os.environ.get("UBSAN_OPTIONS", "print_stacktrace=1"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _build_emulator(config: pytest.Config) -> None:
    """Builds the emulator's modules once, before xdist starts its workers (which would each
    compile them)."""
    if hasattr(config, "workerinput"):
        return
    import cuda_emulator

    start = time.time()
    for variant in cuda_emulator.VARIANTS:
        cuda_emulator.build_module(variant)
    config.emulator_build_s = time.time() - start


def pytest_configure(config: pytest.Config) -> None:
    if _selects_emulated(config):
        _reexec_with_asan(config)
        _build_emulator(config)
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
    if not _selects_emulated(config):  # the emulator runs on request only: pytest -m emulated
        emulated = [i for i in items if i.get_closest_marker("emulated")]
        if emulated:
            config.hook.pytest_deselected(items=emulated)
            items[:] = [i for i in items if not i.get_closest_marker("emulated")]
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
    """One line naming why tests skipped (no GPU, no timm, ...), even under -q and xdist; after
    emulated tests, the count of CUDA kernel instantiations they ran."""
    reports = [r for r in terminalreporter.stats.get("skipped", []) if r.when in ("setup", "call")]
    if reports:
        terminalreporter.write_line(f"skipped {len(reports)}: " + "; ".join(
            f"{n} {reason}" for n, reason in skip_reasons(reports)))
    if _EMULATED_RUNS:
        import emulated_coverage

        for line in emulated_coverage.report(_EMULATED_RUNS)[0]:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    """After emulated tests, the last line: ``emulated kernels: X of Y instantiations run``."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if _EMULATED_RUNS and reporter is not None:
        import emulated_coverage

        built = getattr(config, "emulator_build_s", None)
        line = emulated_coverage.report(_EMULATED_RUNS)[1]
        reporter.write_line(line if built is None else f"{line}; built in {built:.0f} s")


# ---------------------------------------------------------------------- the CUDA emulator
# {build variant: {"file": module path, "executed": {symbol value: name}}}, merged from the
# xdist workers: what the emulated tests ran.
_EMULATED_RUNS: dict[str, dict] = {}


def _merge_runs(runs: dict) -> None:
    for variant, run in runs.items():
        mine = _EMULATED_RUNS.setdefault(variant, {"file": run["file"], "executed": {}})
        mine["executed"].update({int(k): v for k, v in run["executed"].items()})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    cuda_emulator = sys.modules.get("cuda_emulator")  # imported only where emulated tests ran
    if cuda_emulator is None:
        return
    runs = {}
    for variant, module in cuda_emulator.loaded().items():
        runs[variant] = {"file": module.__emu_file__, "executed": {
            str(k): name for k, (name, _) in cuda_emulator.executed(module).items()}}
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["emulated_runs"] = runs
    else:
        _merge_runs(runs)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without xdist
def pytest_testnodedown(node, error) -> None:  # xdist controller: a worker's results
    _merge_runs(getattr(node, "workeroutput", {}).get("emulated_runs", {}))


@pytest.fixture(autouse=True)
def _emulation(request: pytest.FixtureRequest):
    """Tests marked ``emulated(variant)`` run with the CUDA backend on that emulator build."""
    mark = request.node.get_closest_marker("emulated")
    if mark is None or not mark.args:  # no build named: the test loads its own
        yield
        return
    import cuda_emulator

    with cuda_emulator.active(cuda_emulator.load(mark.args[0])):
        yield


@pytest.fixture
def kernel_device(request: pytest.FixtureRequest) -> torch.device:
    """The device of a ``cuda_kernel_test``: the GPU, or the CPU for the emulator's builds."""
    return torch.device("cuda" if request.param == "cuda" else "cpu")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the same seed and with no process-wide backend override."""
    monkeypatch.delenv("DTOP_BACKEND", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for tests that draw their own random inputs."""
    return torch.Generator().manual_seed(1234)
