"""tests/gpu_check.py without a GPU: its commands name real scripts, flags and tests, and its
plumbing (time limits, continuing past failures, one results folder of at most 8 files, the
summary JSON) works. The full ``--dry-run`` runs every step's CPU stand-in (~40 s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as gc


def _flags(path: Path) -> set[str]:
    return set(re.findall(r'"(--[a-z][a-z0-9-]*)"', path.read_text()))


VALUE_ORDER = ["preflight", "build", "info", "gpu tests", "memcheck", "racecheck", "syncs",
               "ops", "latency"]


@pytest.mark.parametrize("cc", [(9, 0), (8, 0)])
def test_gpu_commands_name_real_scripts_and_flags(cc, tmp_path):
    steps = gc.build_steps(tmp_path, cc, dry=False, workers=8)
    names = [s.name for s in steps]
    assert names == list(gc.EXPECTED) == list(gc.LIMIT)
    by = {s.name: s for s in steps}
    assert by["build"].env["DTOP_CUDA_ARCHS"] == f"{cc[0]}{cc[1]}"
    assert by["build"].cmd[-5:] == ["install", "--no-build-isolation", "--no-deps", "-q", "."]
    assert {"-n", "8"} <= set(by["gpu tests"].cmd)
    for s in steps:
        scripts = [a for a in s.cmd if a.endswith(".py") and not a.startswith("--")]
        for script in scripts:
            path = gc.ROOT / script
            assert path.is_file(), f"{s.name}: {script} does not exist"
            used = {a for a in s.cmd[s.cmd.index(script) + 1:] if a.startswith("--")
                    and not a.startswith("--ignore=")}
            assert used <= _flags(path) | {"--sync-check", "--preflight"}, \
                f"{s.name}: unknown flags"
    assert by["racecheck"].cmd[-3:] == ["--only", "attention", "linear"]
    san = (gc.ROOT / "tests" / "sanitize_cuda.py").read_text()
    assert all(f'"{g}"' in san for g in ("attention", "linear"))
    assert str(tmp_path / "ops.json") in by["ops"].cmd
    assert by["latency"].cmd[-10:-2] == ["--res", "512", "--batch", "1", "8", "--compile",
                                         "dense", "--quiet"]


def test_steps_in_order_of_value_within_the_window(tmp_path):
    """Preflight first, the benchmarks last; the expected GPU seconds (steps beside others
    counted once per group) fit the deadline, which fits 8 minutes of device time."""
    steps = gc.build_steps(tmp_path, (9, 0), dry=False, workers=8)
    assert [s.name for s in steps] == VALUE_ORDER
    assert steps[0].stop_on_failure and not any(s.stop_on_failure for s in steps[1:])
    groups, group = [], []
    for s in steps:
        group.append(gc.EXPECTED[s.name])
        if not s.beside_next:
            groups.append(max(group))
            group = []
    assert sum(groups) <= gc.DEADLINE_S - gc.RESERVE_S
    assert gc.DEADLINE_S <= 8 * 60 - 30  # the machine's start takes the rest
    assert all(limit <= gc.DEADLINE_S - gc.RESERVE_S for limit in gc.LIMIT.values())


def test_gpu_tests_are_every_test_a_gpu_unskips(tmp_path):
    """Not only ``-m gpu``: the whole suite, less the host-only files (which exist)."""
    cmd = {s.name: s for s in gc.build_steps(tmp_path, (9, 0), dry=False, workers=8)}
    cmd = cmd["gpu tests"].cmd
    assert "-m" not in cmd[cmd.index("pytest"):] and "tests" in cmd
    ignored = [a.removeprefix("--ignore=") for a in cmd if a.startswith("--ignore=")]
    assert ignored and all((gc.ROOT / f).is_file() for f in ignored)
    assert not {"tests/test_attention.py", "tests/test_graphs.py"} & set(ignored)


def test_sanitizers_see_past_the_caching_allocator(tmp_path):
    by = {s.name: s for s in gc.build_steps(tmp_path, (9, 0), dry=False, workers=8)}
    for name in ("memcheck", "racecheck"):
        assert by[name].env.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
        assert by[name].cmd[:3] == ["compute-sanitizer", "--tool", name]


def test_preflight_names_everything_missing_in_one_line(monkeypatch, capsys):
    gone = {"cmake", "compute-sanitizer"}
    real_which, real_find = shutil.which, gc.importlib.util.find_spec
    monkeypatch.setattr(gc.shutil, "which", lambda t, *a: None if t in gone else real_which(t))
    monkeypatch.setattr(gc.importlib.util, "find_spec",
                        lambda m, *a: None if m in ("PIL", "xdist") else real_find(m, *a))
    assert set(gc.missing()) >= {"cmake", "compute-sanitizer", "Pillow", "pytest-xdist"}
    assert gc.preflight("cuda") == 1
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and all(w in line for w in ("cmake", "compute-sanitizer", "Pillow",
                                                        "pytest-xdist"))
    assert gc.preflight("cpu") == 0  # the dry run only reports


def test_preflight_checks_the_build_and_test_requirements():
    """Every Python package of the build system and of the test extra is checked."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((gc.ROOT / "pyproject.toml").read_text())
    need = meta["build-system"]["requires"] + meta["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in need}
    checked = {d.lower() for d in gc.MODULES.values()} | set(gc.TOOLS) | {"wheel"}
    assert names <= checked


def test_failed_preflight_stops_the_run(tmp_path):
    py = sys.executable
    steps = [gc.Step("preflight", [py, "-c", "import sys; sys.exit(1)"], stop_on_failure=True),
             gc.Step("build", [py, "-c", "pass"]),
             gc.Step("info", [py, "-c", "pass"])]
    gc.run_steps(steps, deadline_s=60, log_dir=tmp_path)
    assert steps[0].status == "failed"
    assert [s.status for s in steps[1:]] == ["skipped: preflight failed"] * 2


def test_each_step_sees_its_deadline(tmp_path):
    py = sys.executable
    step = gc.Step("info", [py, "-c", "import os; print(os.environ['DTOP_STEP_DEADLINE'])"])
    t0 = time.time()
    gc.run_steps([step], deadline_s=gc.RESERVE_S + 10, log_dir=tmp_path)
    t1 = time.time()
    assert step.status == "ok"
    # the deadline is printed to the millisecond: allow that rounding, nothing more
    assert t0 < float(step.output) <= t1 + 10 + 0.001


ORDER_TESTS = """
import pytest

def test_plain():
    pass

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_op(backend, dtype):
    pass

@pytest.mark.gpu
def test_marked():
    pass
"""


def _inner_pytest(tmp_path: Path, deadline: float | None) -> list[str]:
    """Runs the suite's conftest.py on ORDER_TESTS; the test ids in the order run, with their
    outcome."""
    shutil.copy(gc.ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_order.py").write_text(ORDER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    env = {k: v for k, v in os.environ.items() if k != "DTOP_STEP_DEADLINE"}
    if deadline is not None:
        env["DTOP_STEP_DEADLINE"] = str(deadline)
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "-rs", "test_order.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False).stdout
    return re.findall(r"test_order\.py::(\S+) (PASSED|SKIPPED)", out) + (
        ["time is up"] if "time for tests is up" in out else [])


def test_gpu_check_runs_tests_by_value_and_stops_at_its_deadline(tmp_path):
    """Under DTOP_STEP_DEADLINE: GPU-marked first, then the cuda backend, Triton, bf16, the
    rest; past the deadline (less the teardown time) every test is skipped with the reason."""
    ran = _inner_pytest(tmp_path, time.time() + 3600)
    assert [t for t, _ in ran] == [
        "test_marked", "test_op[cuda-float32]", "test_op[cuda-bfloat16]",
        "test_op[triton-float32]", "test_op[triton-bfloat16]", "test_op[torch-bfloat16]",
        "test_plain", "test_op[torch-float32]"]
    late = _inner_pytest(tmp_path, time.time())
    assert late[-1] == "time is up" and {o for _, o in late[:-1]} == {"SKIPPED"}
    plain = _inner_pytest(tmp_path, None)  # the CPU suite: file order, nothing skipped by time
    assert [t for t, _ in plain][:2] == ["test_plain", "test_op[torch-float32]"]


def test_steps_time_boxed_and_run_past_failures(tmp_path):
    py = sys.executable
    steps = [gc.Step("ok", [py, "-c", "print('fine')"]),
             gc.Step("slow", [py, "-c", "import time; time.sleep(30)"], beside_next=True),
             gc.Step("fails", [py, "-c", "import sys; print('bad'); sys.exit(3)"]),
             gc.Step("missing", ["/nonexistent/tool"]),
             gc.Step("after", [py, "-c", "print('still runs')"])]
    gc.LIMIT["slow"] = 2
    try:
        t0 = time.monotonic()
        gc.run_steps(steps, deadline_s=60 + gc.RESERVE_S, log_dir=tmp_path)
        took = time.monotonic() - t0
    finally:
        del gc.LIMIT["slow"]
    st = {s.name: s for s in steps}
    assert st["ok"].status == "ok" and "fine" in st["ok"].output
    assert st["slow"].status.startswith("timeout") and took < 15
    assert st["fails"].status == "failed" and st["fails"].rc == 3 and "bad" in st["fails"].output
    assert st["missing"].status == "failed"
    assert st["after"].status == "ok" and "still runs" in st["after"].output

    out = tmp_path / "out"
    out.mkdir()
    summary = gc.write_results(out, steps, {"torch": "x"}, took)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.json"] and len(files) <= gc.MAX_FILES
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and "error" not in summary
    assert on_disk["steps"][0]["status"] == "ok"
    assert "still runs" in (out / "gpu_check.log").read_text()


def test_a_step_over_its_limit_gets_sigterm_first(tmp_path):
    """A step over its limit gets SIGTERM (the benchmarks then write what they measured) and,
    if it does not end within GRACE_S, SIGKILL."""
    py = sys.executable
    mark = tmp_path / "wrote"
    polite = ("import pathlib, signal, sys, time\n"
              "def stop(*a):\n"
              f"    pathlib.Path({str(mark)!r}).write_text('partial')\n"
              "    sys.exit(1)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "time.sleep(30)\n")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    steps = [gc.Step("ops", [py, "-c", polite]), gc.Step("latency", [py, "-c", stubborn])]
    saved = dict(gc.LIMIT)
    gc.LIMIT.update(ops=2, latency=2)
    try:
        t0 = time.monotonic()
        gc.run_steps(steps, deadline_s=60 + gc.RESERVE_S, log_dir=tmp_path)
        took = time.monotonic() - t0
    finally:
        gc.LIMIT.clear()
        gc.LIMIT.update(saved)
    assert [s.status for s in steps] == ["timeout after 2 s"] * 2
    assert mark.read_text() == "partial"
    assert steps[1].seconds >= 2 + gc.GRACE_S - 0.5 and took < 4 + gc.GRACE_S + 5


def test_deadline_cuts_limits_and_skips(tmp_path):
    py = sys.executable
    steps = [gc.Step("info", [py, "-c", "import time; time.sleep(30)"]),
             gc.Step("syncs", [py, "-c", "pass"])]
    gc.run_steps(steps, deadline_s=gc.RESERVE_S + 1.5, log_dir=tmp_path)
    assert steps[0].status.startswith("timeout") and steps[0].limit <= 1.5
    assert steps[1].status == "skipped: no time left"


def test_too_many_files_is_an_error(tmp_path):
    for i in range(gc.MAX_FILES):
        (tmp_path / f"extra{i}.json").write_text("{}")
    summary = gc.write_results(tmp_path, [], {}, 0.0)
    assert "error" in summary and str(gc.MAX_FILES) in summary["error"]


def test_out_must_be_new(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--out", str(tmp_path)])
